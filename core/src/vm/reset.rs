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
    host::{DeviceHost, VmServices},
    state::{self, MachineStateV1, VcpuStateV2},
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
    ) -> Result<Self, String> {
        let vcpus = vcpus
            .iter()
            .map(|fd| state::save_vcpu(fd, msrs).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        let machine = state::save_machine(vm).map_err(|e| e.to_string())?;
        Ok(ResetPoint { vcpus, machine, devices, services, placement })
    }
}

impl Vm {
    /// Can this VM reboot? `Err` says why not (then a reset ends it).
    pub(super) fn can_reboot(&self) -> Result<(), String> {
        self.reset.as_ref().map_err(Clone::clone)?;
        if self.image.is_none() {
            return Err("it was restored or migrated in, and ferry does not have its kernel".into());
        }
        if self.vcpus.len() != usize::from(self.cpus) {
            return Err("a vCPU thread failed".into());
        }
        Ok(())
    }

    /// Reboot in place (the vCPU threads joined, their fds back in
    /// `self.vcpus`, the devices paused). On success the devices run again
    /// and the control is re-armed; the caller starts the vCPUs.
    pub(super) fn reboot(&mut self) -> Result<(), VmError> {
        let failed = |what: String| VmError::Failed(format!("reboot: {what}"));
        self.reset_devices().map_err(failed)?;
        self.ram.clear().map_err(|e| failed(e.to_string()))?;
        let point = self.reset.as_ref().map_err(|e| failed(e.clone()))?;
        state::restore_machine(&self.kvm.vm, &point.machine).map_err(|e| failed(e.to_string()))?;
        for (index, (fd, s)) in self.vcpus.iter().zip(&point.vcpus).enumerate() {
            state::restore_vcpu(fd, s).map_err(|e| failed(format!("vCPU {index}: {e}")))?;
        }
        let image = self.image.clone().ok_or_else(|| failed("no kernel to load".into()))?;
        super::boot::load_image(self, &image)?;
        self.control.rearm();
        self.set_devices_paused(false).map_err(failed)?;
        let n = self.reboots.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        crate::log::info(&format!("the guest rebooted (reboot {n})"));
        Ok(())
    }

    /// Step 1: reset or recreate every device, then replay firmware's PCI
    /// programming.
    fn reset_devices(&self) -> Result<(), String> {
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
                Err(e) => return Err(format!("device {} ({}): {e}", slot.id, slot.plugin)),
            }
            self.bus.reprogram_pci(index);
        }
        Ok(())
    }

    /// The fallback for a device that cannot reset itself.
    fn recreate_device(&self, index: usize) -> Result<(), String> {
        let point = self.reset.as_ref().map_err(Clone::clone)?;
        let slot = &self.bus.devices()[index];
        let named = |m: String| format!("device {} ({}): {m}", slot.id, slot.plugin);
        let lib = self.registry.get(&slot.plugin).ok_or_else(|| named("its plugin vanished".into()))?;
        let config =
            point.devices.get(index).cloned().ok_or_else(|| named("no configuration kept".into()))?;
        // KVM lets go of the old instance's eventfds before it is dropped.
        point.services.irq.release_device(index).map_err(|e| named(e.to_string()))?;
        let services = point.services.clone();
        self.bus
            .recreate_device(index, || {
                let host = DeviceHost::new_box(&slot.id, index, services);
                let parts = point.placement.create(lib, config, host, index)?;
                let mut device = parts.device;
                // Paused like every other device until the reboot is done.
                device.pause().into_result().map_err(String::from)?;
                Ok((device, parts.pci.into_option()))
            })
            .map_err(named)
    }
}
