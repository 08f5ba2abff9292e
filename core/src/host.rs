//! The host services each device gets: interrupt lines on the in-kernel
//! irqchip, MSI routes and ioeventfds, guest memory with the device dirty
//! bitmap, a way to end the VM, logging tagged with the device id, and a
//! status line for `ferry ctl info` (plugin-api 1.1).

use std::sync::Arc;

use abi_stable::{
    sabi_trait::TD_Opaque,
    std_types::{RArc, RResult, RStr},
};
use ferry_plugin_api::{
    ErrorKind, GuestMemoryMap, Host, HostBox, LogLevel, MemoryFds, MsiMessage, PluginError, StopKind,
};
use kvm_ioctls::VmFd;

use crate::{
    interrupts::IrqRouter,
    vcpu::{StopEvent, VmControl},
};

/// What every device of one VM shares.
#[derive(Clone)]
pub struct VmServices {
    /// The VM fd (interrupt lines).
    pub vm: Arc<VmFd>,
    /// Run control (stop).
    pub control: Arc<VmControl>,
    /// MSI routes and ioeventfds.
    pub irq: Arc<IrqRouter>,
    /// Guest RAM as devices see it.
    pub memory: GuestMemoryMap,
    /// The files behind RAM (`Host::memory_fds`); `None` when RAM is
    /// mapped from a snapshot file.
    pub files: Option<Arc<crate::memory::RamFiles>>,
    /// Each device's status line (`Host::set_status`), by bus index.
    pub status: Arc<std::sync::Mutex<std::collections::BTreeMap<usize, String>>>,
}

/// Host services for one device.
#[derive(Clone)]
pub struct DeviceHost {
    id: Arc<str>,
    index: usize,
    vm: VmServices,
}

impl DeviceHost {
    /// Services for device `id` (the `index`-th device), as the ABI handle
    /// plugins receive.
    pub fn new_box(id: &str, index: usize, vm: VmServices) -> HostBox {
        HostBox::from_ptr(RArc::new(DeviceHost { id: id.into(), index, vm }), TD_Opaque)
    }

    fn err(&self, e: impl std::fmt::Display) -> PluginError {
        PluginError::new(ErrorKind::IO, e.to_string())
    }
}

impl Host for DeviceHost {
    fn set_irq_level(&self, gsi: u32, level: bool) -> RResult<(), PluginError> {
        self.vm
            .vm
            .set_irq_line(gsi, level)
            .map_err(|e| PluginError::new(ErrorKind::IO, format!("setting IRQ line {gsi}: {e}")))
            .into()
    }

    fn stop_vm(&self, kind: StopKind, status: i32) {
        let event = match kind {
            StopKind::RESET => {
                crate::log::info(&format!("{}: guest reset the machine", self.id));
                StopEvent::Reset
            }
            StopKind::EXIT => StopEvent::Exit(status),
            StopKind::ERROR => {
                StopEvent::Error(format!("device {} stopped the VM (status {status})", self.id))
            }
            // A kind from a later plugin-api minor this core does not know.
            StopKind(other) => StopEvent::Error(format!(
                "device {} stopped the VM for a reason this core does not know (kind {other}, status {status})",
                self.id
            )),
        };
        self.vm.control.stop(event);
    }

    fn log(&self, level: LogLevel, message: RStr<'_>) {
        crate::log::log(level, &format!("{}: {}", self.id, message));
    }

    fn guest_memory(&self) -> GuestMemoryMap {
        self.vm.memory.clone()
    }

    fn msi_route(&self, fd: i32, message: MsiMessage) -> RResult<(), PluginError> {
        self.vm.irq.msi_route(self.index, fd, message.address, message.data).map_err(|e| self.err(e)).into()
    }

    fn msi_unroute(&self, fd: i32) -> RResult<(), PluginError> {
        self.vm.irq.msi_unroute(self.index, fd).map_err(|e| self.err(e)).into()
    }

    fn ioeventfd(&self, fd: i32, address: u64) -> RResult<(), PluginError> {
        self.vm.irq.ioeventfd(self.index, fd, address).map_err(|e| self.err(e)).into()
    }

    fn remove_ioeventfd(&self, fd: i32, address: u64) -> RResult<(), PluginError> {
        self.vm.irq.remove_ioeventfd(self.index, fd, address).map_err(|e| self.err(e)).into()
    }

    fn set_status(&self, status: RStr<'_>) -> RResult<(), PluginError> {
        // One line, and not a novel: a status is shown in `ferry ctl info`.
        let line: String = status.as_str().chars().filter(|c| !c.is_control()).take(200).collect();
        self.vm.status.lock().unwrap_or_else(|e| e.into_inner()).insert(self.index, line);
        RResult::ROk(())
    }

    fn fail(&self, message: RStr<'_>) -> RResult<(), PluginError> {
        let line: String = message.as_str().chars().filter(|c| !c.is_control()).take(300).collect();
        let message = format!("device {} failed: {line}", self.id);
        self.vm.control.stop(StopEvent::DeviceFailed { index: self.index, message });
        RResult::ROk(())
    }

    fn memory_fds(&self) -> RResult<MemoryFds, PluginError> {
        use std::os::fd::AsRawFd;
        match &self.vm.files {
            Some(f) => RResult::ROk(MemoryFds {
                ram: f.ram.as_raw_fd(),
                ranges: f.ranges.iter().copied().collect(),
                dirty_bitmap: f.bitmap.as_raw_fd(),
                dirty_bitmap_len: f.bitmap_len,
            }),
            None => RResult::RErr(PluginError::unsupported(
                "guest RAM is mapped from a snapshot file here, not shareable with another program",
            )),
        }
    }
}
