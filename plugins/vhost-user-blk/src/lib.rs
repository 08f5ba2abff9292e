//! `vhost-user-blk`: a virtio block device whose requests a vhost-user
//! backend serves (qemu-storage-daemon's vhost-user-blk export). The
//! backend's socket is a binding of the host (`socket`); ferry passes guest
//! RAM, the rings and their eventfds to it and is off the data path
//! (`ferry-vhost-user`'s device).

use ferry_plugin_api::{DeviceConfig, HostBox, PluginDescriptor};
use ferry_vhost_user::{
    device::{self, VhostUserDevice},
    Device,
};
use ferry_virtio_pci::VirtioPci;

fn describe() -> PluginDescriptor {
    device::describe(
        "vhost-user-blk",
        env!("CARGO_PKG_VERSION"),
        "virtio block device served by a vhost-user backend (qemu-storage-daemon)",
    )
}

fn create(config: &DeviceConfig, host: HostBox) -> Result<VirtioPci<VhostUserDevice>, String> {
    device::create(Device::Blk, config, host)
}

fn check(config: &DeviceConfig, contract: &[(String, String)]) -> Result<(), String> {
    device::check_config(Device::Blk, config, contract)
}

ferry_plugin_api::export_plugin! {
    describe: describe,
    create: create,
    check: check,
}
