//! The running machine: the resources one VM holds while it runs, shared
//! by its main loop, the control API and a migration thread. It sits below
//! both the VM's lifecycle (`vm/`) and the migration protocol
//! (`migration/live.rs`), which use it.

use std::sync::Arc;

use crate::{
    bus::Bus,
    cpu::VmCpu,
    kvm::Machine,
    machine::MachineType,
    memory::GuestRam,
    migration::{
        manifest::{DeviceRecord, MachineRecord, Manifest},
        plan::cpu_record,
        status::Status,
    },
    plugins::Registry,
    vcpu::VmControl,
};

/// A device refused to pause or resume.
#[derive(Debug, thiserror::Error)]
#[error("device {id} ({plugin}): {message}")]
pub struct DeviceCallError {
    /// Device id.
    pub id: String,
    /// Its plugin.
    pub plugin: String,
    /// What it said.
    pub message: String,
}

/// What a running VM shares between its main loop, the control API and a
/// migration thread.
pub struct VmCore {
    // Fields drop in declaration order, and this order is the teardown:
    // the devices first (a virtio device joins its worker thread, an
    // isolated one's process is let go), then the run control and the
    // placement, then the KVM VM, and guest RAM last, so nothing that
    // holds a guest address (a device worker, KVM's memory slots, a
    // device process's mapping) outlives the mapping (kvm.rs and
    // memory.rs rely on it). The vCPUs are joined and dropped before
    // (`Vm` declares them ahead of its core).
    pub(crate) bus: Arc<Bus>,
    /// Which devices run in device processes.
    pub(crate) placement: Arc<crate::isolate::Placement>,
    pub(crate) control: Arc<VmControl>,
    pub(crate) kvm: Machine,
    pub(crate) ram: GuestRam,
    pub(crate) registry: Registry,
    pub(crate) machine: MachineType,
    pub(crate) cpus: u8,
    /// The guest's CPU (vCPU 0's CPUID as KVM holds it).
    pub(crate) cpu: VmCpu,
    /// The live migration in progress or last finished, if any.
    pub(crate) migration: std::sync::Mutex<Option<Status>>,
    /// Each device's status line, by bus index (`Host::set_status`).
    pub(crate) status: Arc<std::sync::Mutex<std::collections::BTreeMap<usize, String>>>,
    /// How often the guest rebooted in this process.
    pub(crate) reboots: std::sync::atomic::AtomicU32,
    /// The isolated device that failed, by bus index, and the line saying
    /// how (the VM is stopped for good then).
    pub(crate) failure: std::sync::Mutex<Option<(usize, String)>>,
    /// The kernel, initramfs and command line the guest reboots into, and
    /// the store holding them: set once, after the VM is built, when this
    /// host has them.
    pub(crate) image: std::sync::OnceLock<GuestImage>,
}

/// A guest's boot image and the store that holds its files.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// Where the files are.
    pub store: crate::images::ImageStore,
    /// What the manifest says.
    pub record: crate::images::BootRecord,
}

impl VmCore {
    pub(crate) fn set_devices_paused(&self, paused: bool) -> Result<(), DeviceCallError> {
        for d in self.bus.devices() {
            let mut dev = d.device.lock().unwrap_or_else(|e| e.into_inner());
            let r = if paused { dev.pause() } else { dev.resume() };
            r.into_result().map_err(|e| DeviceCallError {
                id: d.id.clone(),
                plugin: d.plugin.clone(),
                message: e.to_string(),
            })?;
        }
        Ok(())
    }

    /// Pause vCPUs, then devices.
    pub fn pause(&self) -> Result<(), DeviceCallError> {
        self.control.pause();
        self.set_devices_paused(true)
    }

    /// Resume devices, then vCPUs.
    pub fn resume(&self) -> Result<(), DeviceCallError> {
        self.set_devices_paused(false)?;
        self.control.resume();
        Ok(())
    }

    /// The manifest of this VM, with every device at its plugin's current
    /// state version.
    pub fn manifest(&self) -> Manifest {
        let records = self
            .bus
            .devices()
            .iter()
            .map(|d| {
                let lib = self.registry.get(&d.plugin);
                DeviceRecord {
                    id: d.id.clone(),
                    plugin: d.plugin.clone(),
                    plugin_version: lib.map(|l| l.descriptor.version.to_string()).unwrap_or_default(),
                    state_version: lib.map(|l| l.descriptor.state.current).unwrap_or(0),
                    oldest_save: lib.map(|l| l.descriptor.state.oldest_save).unwrap_or(0),
                    contract: d.contract(),
                }
            })
            .collect();
        let mut machine = MachineRecord::new(&self.machine);
        let bindings = crate::bindings::split(&mut machine, |plugin, property| {
            crate::bindings::is_binding(&self.registry, plugin, property)
        });
        Manifest {
            ferry_version: env!("CARGO_PKG_VERSION").to_string(),
            machine,
            devices: records,
            cpus: self.cpus,
            memory: self.ram.size(),
            ram: self.ram.ranges().iter().map(|r| (r.gpa, r.len)).collect(),
            cpuid: self.cpu.cpuid.clone(),
            cpu: Some(cpu_record(&self.cpu)),
            bindings,
            boot: self.image.get().map(|i| i.record.clone()),
        }
    }
    /// What `ferry ctl info` shows.
    pub fn info(&self) -> serde_json::Value {
        let status = self.status.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let failure = self.failure.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let state = match &failure {
            Some(_) => "failed",
            None if self.control.is_paused() => "paused",
            None => "running",
        };
        serde_json::json!({
            "state": state,
            "failure": failure.as_ref().map(|f| f.1.clone()),
            "throttle_pct": self.control.throttle(),
            "reboots": self.reboots.load(std::sync::atomic::Ordering::Relaxed),
            "machine": self.machine.name,
            "cpus": self.cpus,
            "cpu": {
                "model": self.cpu.model,
                "vendor": self.cpu.vendor,
                "tsc_khz": self.cpu.tsc_khz,
                "msrs": self.cpu.msrs.len(),
                "kvm_rewrote": self.cpu.kvm_rewrote,
            },
            "memory_bytes": self.ram.size(),
            "devices": self.bus.devices().iter().enumerate().map(|(i, d)| serde_json::json!({
                "id": d.id,
                "plugin": d.plugin,
                "plugin_version": self.registry.get(&d.plugin).map(|p| p.descriptor.version.to_string()),
                "plugin_api": self.registry.get(&d.plugin).map(|p| p.api_version.clone()),
                "state_version": self.registry.get(&d.plugin).map(|p| p.descriptor.state.current),
                "status": status.get(&i),
                "isolated": self.placement.isolates(&d.id),
                "failed": failure.as_ref().filter(|f| f.0 == i).map(|f| f.1.clone()),
            })).collect::<Vec<_>>(),
        })
    }
}
