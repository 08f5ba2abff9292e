//! `i8042`: the PS/2 controller's command port, enough for a guest to reset
//! the machine (command 0xFE on port 0x64). A reset ends the VM cleanly.

mod device;

ferry_plugin_api::export_plugin! {
    describe: device::describe,
    create: device::I8042::create,
}
