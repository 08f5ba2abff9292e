//! `vhost-user-blk`: a virtio block device whose requests a vhost-user
//! backend serves (qemu-storage-daemon's vhost-user-blk export). The
//! backend's socket is a binding of the host (`socket`); ferry passes guest
//! RAM, the rings and their eventfds to it and is off the data path.

use ferry_plugin_api::{
    sdk::{DescriptorBuilder, Properties},
    DeviceConfig, HostBox, PluginDescriptor,
};
use ferry_vhost_user::{
    device::{BackendStateV1, VhostUserDevice},
    Device,
};
use ferry_virtio_pci::VirtioPci;

fn describe() -> PluginDescriptor {
    DescriptorBuilder::new(
        "vhost-user-blk",
        env!("CARGO_PKG_VERSION"),
        "virtio block device served by a vhost-user backend (qemu-storage-daemon)",
    )
    .binding("socket", None, "the backend's vhost-user socket (a host binding)")
    .needs("Host::memory_fds")
    .versioned::<BackendStateV1>()
    .build()
}

fn create(config: &DeviceConfig, host: HostBox) -> Result<VirtioPci<VhostUserDevice>, String> {
    let props = Properties::new(config);
    let socket = props.string("socket")?;
    let device = VhostUserDevice::connect(Device::Blk, config.id.as_str(), socket, host.clone())?;
    VirtioPci::new(device, host)
}

fn check(config: &DeviceConfig, contract: &[(String, String)]) -> Result<(), String> {
    let socket = Properties::new(config).string("socket")?;
    ferry_vhost_user::device::check(Device::Blk, socket, contract)
}

ferry_plugin_api::export_plugin! {
    describe: describe,
    create: create,
    check: check,
}
