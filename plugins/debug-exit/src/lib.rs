//! `debug-exit`: an I/O port that ends the VM with an exit status the guest
//! writes. Tests end their guests this way.

mod device;

ferry_plugin_api::export_plugin! {
    describe: device::describe,
    create: device::DebugExit::create,
}
