//! Rebooting a guest in place, when it resets the machine (the i8042
//! reset line, a triple fault, KVM's reset event) and the host asked for
//! `--on-reset reboot` (the default).
//!
//! What a reset puts back, in this order, with the vCPU threads joined:
//!
//! 1. every device: its own `Device::reset` (plugin-api 1.1), or, for a
//!    plugin that lacks it (1.0, `UNSUPPORTED`), a new instance created
//!    from its machine-type configuration in place of the old one (the
//!    old one is dropped first, so host resources it held are free);
//!    then each PCI function is programmed as firmware did at boot;
//! 2. guest RAM reads zero again;
//! 3. the in-kernel irqchip, PIT and clock, and every vCPU, go back to the
//!    state they had when the VM was built ([`ResetPoint`]);
//! 4. the kernel, initramfs and command line are loaded again and the boot
//!    CPU is put at the kernel's entry, as at the first boot.
//!
//! The host side stays: the process, the API socket, the plugin set, the
//! KVM VM and its memory slots, the devices' files and taps.

use ferry_plugin_api::{DeviceConfig, ErrorKind};
use kvm_ioctls::{VcpuFd, VmFd};

use super::{Vm, VmError};
use crate::{
    bus::RecreateError,
    host::{DeviceHost, VmServices},
    state::{self, MachineStateV1, StateError, VcpuStateV2},
};

/// What to do when the guest resets the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnReset {
    /// Reboot the guest in place (as QEMU and Cloud Hypervisor do).
    #[default]
    Reboot,
    /// End ferry with status 0.
    Exit,
}

/// Why a guest cannot reboot, or its reboot failed.
#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    /// The machine as built could not be recorded.
    #[error("the machine as built could not be recorded ({0})")]
    NotRecorded(StateError),
    /// Restored or migrated in: no kernel to load.
    #[error("it was restored or migrated in, and ferry does not have its kernel")]
    NoKernel,
    /// A vCPU thread ended without handing its vCPU back.
    #[error("a vCPU thread failed")]
    VcpuLost,
    /// A device could not be reset or recreated.
    #[error("device {id} ({plugin}): {message}")]
    Device {
        /// Device id.
        id: String,
        /// Its plugin.
        plugin: String,
        /// Why.
        message: String,
    },
    /// Guest RAM could not be cleared.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    /// Loading the recorded KVM state.
    #[error("{what}: {source}")]
    State {
        /// The machine or a vCPU.
        what: String,
        /// KVM's error.
        source: StateError,
    },
    /// The kernel could not be loaded again.
    #[error(transparent)]
    Boot(#[from] crate::boot::BootError),
    /// The devices would not resume.
    #[error(transparent)]
    Devices(#[from] crate::vmcore::DeviceCallError),
}

/// The machine as it was built, before anything ran: what a reboot puts
/// back.
pub(super) struct ResetPoint {
    vcpus: Vec<VcpuStateV2>,
    machine: MachineStateV1,
    /// Each device's configuration, by bus index (for recreating it).
    devices: Vec<DeviceConfig>,
    services: VmServices,
    placement: std::sync::Arc<crate::isolate::Placement>,
}

impl ResetPoint {
    /// Record the state of fresh vCPUs (their CPUID and local APIC set up,
    /// never run) and of the fresh in-kernel devices.
    pub(super) fn capture(
        vm: &VmFd,
        vcpus: &[VcpuFd],
        msrs: &[(u32, &'static str)],
        devices: Vec<DeviceConfig>,
        services: VmServices,
        placement: std::sync::Arc<crate::isolate::Placement>,
    ) -> Result<Self, StateError> {
        let vcpus = vcpus.iter().map(|fd| state::save_vcpu(fd, msrs)).collect::<Result<Vec<_>, _>>()?;
        let machine = state::save_machine(vm)?;
        Ok(ResetPoint { vcpus, machine, devices, services, placement })
    }
}

impl Vm {
    /// Can this VM reboot? `Err` says why not (then a reset ends it).
    pub(super) fn can_reboot(&self) -> Result<(), ResetError> {
        self.point()?;
        if self.image.is_none() {
            return Err(ResetError::NoKernel);
        }
        if self.vcpus.len() != usize::from(self.cpus) {
            return Err(ResetError::VcpuLost);
        }
        Ok(())
    }

    fn point(&self) -> Result<&ResetPoint, ResetError> {
        self.reset.as_ref().map_err(|e| ResetError::NotRecorded(e.clone()))
    }

    /// Reboot in place (the vCPU threads joined, their fds back in
    /// `self.vcpus`, the devices paused). On success the devices run again
    /// and the control is re-armed; the caller starts the vCPUs.
    pub(super) fn reboot(&mut self) -> Result<(), VmError> {
        self.reset_devices()?;
        self.ram.clear().map_err(ResetError::from)?;
        let point = self.point()?;
        state::restore_machine(&self.kvm.vm, &point.machine)
            .map_err(|source| ResetError::State { what: "machine".into(), source })?;
        for (index, (fd, s)) in self.vcpus.iter().zip(&point.vcpus).enumerate() {
            state::restore_vcpu(fd, s)
                .map_err(|source| ResetError::State { what: format!("vCPU {index}"), source })?;
        }
        let image = self.image.clone().ok_or(ResetError::NoKernel)?;
        super::boot::load_image(self, &image)?;
        self.control.rearm();
        self.set_devices_paused(false).map_err(ResetError::from)?;
        let n = self.reboots.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        crate::log::info(&format!("the guest rebooted (reboot {n})"));
        Ok(())
    }

    /// Step 1: reset or recreate every device, then replay firmware's PCI
    /// programming.
    fn reset_devices(&self) -> Result<(), ResetError> {
        for (index, slot) in self.bus.devices().iter().enumerate() {
            let result = slot.device.lock().unwrap_or_else(|e| e.into_inner()).reset().into_result();
            match result {
                Ok(()) => {}
                Err(e) if e.kind == ErrorKind::UNSUPPORTED => {
                    let api = self.registry.get(&slot.plugin).map(|l| l.api_version.as_str()).unwrap_or("?");
                    crate::log::info(&format!(
                        "reboot: device {} ({}, plugin-api {api}) cannot reset itself: recreated from its machine-type configuration",
                        slot.id, slot.plugin
                    ));
                    self.recreate_device(index)?;
                }
                Err(e) => {
                    return Err(ResetError::Device {
                        id: slot.id.clone(),
                        plugin: slot.plugin.clone(),
                        message: e.to_string(),
                    })
                }
            }
            self.bus.reprogram_pci(index);
        }
        Ok(())
    }

    /// The fallback for a device that cannot reset itself.
    fn recreate_device(&self, index: usize) -> Result<(), ResetError> {
        let point = self.point()?;
        let slot = &self.bus.devices()[index];
        let named = |message: String| ResetError::Device {
            id: slot.id.clone(),
            plugin: slot.plugin.clone(),
            message,
        };
        let lib = self.registry.get(&slot.plugin).ok_or_else(|| named("its plugin vanished".into()))?;
        let config =
            point.devices.get(index).cloned().ok_or_else(|| named("no configuration kept".into()))?;
        // KVM lets go of the old instance's eventfds before it is dropped.
        point.services.irq.release_device(index).map_err(|e| named(e.to_string()))?;
        let services = point.services.clone();
        self.bus
            .recreate_device(index, || {
                let host = DeviceHost::new_box(&slot.id, index, services);
                let parts = point
                    .placement
                    .create(lib, config, host, index)
                    .map_err(|e| RecreateError::Create(e.to_string()))?;
                let mut device = parts.device;
                // Paused like every other device until the reboot is done.
                device.pause().into_result().map_err(|e| RecreateError::Create(e.to_string()))?;
                Ok((device, parts.pci.into_option()))
            })
            .map_err(|e| named(e.to_string()))
    }
}
