//! `serial-16550`: a 16550A UART (register model from vm-superio). Guest
//! output goes to ferry's stdout, a file, or a unix socket; input comes from
//! stdin or the socket.

mod backend;
mod device;

ferry_plugin_api::export_plugin! {
    describe: device::describe,
    create: device::Serial16550::create,
}
