//! `virtio-blk`: a virtio block device backed by a raw image file.

mod device;

ferry_plugin_api::export_plugin! {
    describe: device::describe,
    create: device::create,
}
