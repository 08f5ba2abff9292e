//! `vhost-user-fs`: a virtio-fs device whose requests a vhost-user backend
//! serves (virtiofsd sharing a host directory). The backend's socket is a
//! binding of the host (`socket`); its own state (inodes, open files)
//! moves with the guest through DEVICE_STATE (`ferry-vhost-user`'s
//! device).

use ferry_plugin_api::{DeviceConfig, HostBox, PluginDescriptor};
use ferry_vhost_user::{
    device::{self, VhostUserDevice},
    Device,
};
use ferry_virtio_pci::VirtioPci;

fn describe() -> PluginDescriptor {
    device::describe(
        "vhost-user-fs",
        env!("CARGO_PKG_VERSION"),
        "virtio-fs device served by a vhost-user backend (virtiofsd)",
    )
}

fn create(config: &DeviceConfig, host: HostBox) -> Result<VirtioPci<VhostUserDevice>, String> {
    device::create(Device::Fs, config, host)
}

fn check(config: &DeviceConfig, contract: &[(String, String)]) -> Result<(), String> {
    device::check_config(Device::Fs, config, contract)
}

ferry_plugin_api::export_plugin! {
    describe: describe,
    create: create,
    check: check,
}
