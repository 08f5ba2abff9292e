//! `virtio-rng`: a virtio entropy device fed by the host's getrandom(2).

mod device;

ferry_plugin_api::export_plugin! {
    describe: device::describe,
    create: device::create,
}
