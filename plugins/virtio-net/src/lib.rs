//! `virtio-net`: a virtio network device on a host tap interface.

mod device;
mod tap;

ferry_plugin_api::export_plugin! {
    describe: device::describe,
    create: device::create,
}
