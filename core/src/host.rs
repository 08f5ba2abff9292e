//! The host services each device gets: interrupt lines on the in-kernel
//! irqchip, a way to end the VM, and logging tagged with the device id.

use std::sync::Arc;

use abi_stable::{
    sabi_trait::TD_Opaque,
    std_types::{RArc, RResult, RStr, RString},
};
use ferry_plugin_api::{Host, HostBox, LogLevel, StopKind};
use kvm_ioctls::VmFd;

use crate::vcpu::{StopEvent, VmControl};

/// Host services for one device.
#[derive(Clone)]
pub struct DeviceHost {
    id: Arc<str>,
    vm: Arc<VmFd>,
    control: Arc<VmControl>,
}

impl DeviceHost {
    /// Services for device `id`, as the ABI handle plugins receive.
    pub fn new_box(id: &str, vm: Arc<VmFd>, control: Arc<VmControl>) -> HostBox {
        HostBox::from_ptr(
            RArc::new(DeviceHost {
                id: id.into(),
                vm,
                control,
            }),
            TD_Opaque,
        )
    }
}

impl Host for DeviceHost {
    fn set_irq_level(&self, gsi: u32, level: bool) -> RResult<(), RString> {
        self.vm
            .set_irq_line(gsi, level)
            .map_err(|e| RString::from(format!("setting IRQ line {gsi}: {e}")))
            .into()
    }

    fn stop_vm(&self, kind: StopKind, status: i32) {
        let event = match kind {
            StopKind::Reset => {
                crate::log::info(&format!("{}: guest reset the machine", self.id));
                StopEvent::Reset
            }
            StopKind::Exit => StopEvent::Exit(status),
            StopKind::Error => StopEvent::Error(format!(
                "device {} stopped the VM (status {status})",
                self.id
            )),
        };
        self.control.stop(event);
    }

    fn log(&self, level: LogLevel, message: RStr<'_>) {
        crate::log::log(level, &format!("{}: {}", self.id, message));
    }
}
