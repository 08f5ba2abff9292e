//! The VM's state besides its memory, as one value: the machine (8259s,
//! I/O APIC, PIT, clock), every vCPU and every device. It has one writer
//! and one reader, so snapshots and live migration carry it alike:
//!
//! ```text
//!  snapshot (vm/snapshot.rs) --+                            +--> restore (vm/restore.rs)
//!                              +-> VmState::capture ->      |
//!  stop-and-copy (source.rs) --+   VmState::write           |
//!                                  (MACHINE, VCPU x N,      |
//!                                   DEVICE x M sections)    |
//!                                          |                |
//!                      file or connection  v                |
//!                                  StateReader::take ... finish -> VmState::load
//!                                                           +--> incoming (vm/incoming.rs)
//! ```
//!
//! Versions are checked in one place each: the machine and vCPU sections
//! through the same [`Versioned`] trait plugins use (the core's types
//! implement it in `state.rs`), device sections by their plugins when
//! loaded (and, before anything is created, against the plugins'
//! declared ranges by the plan or the restore check).

use ferry_plugin_api::{
    state::{self as versioned, Versioned},
    StateBlob,
};
use kvm_ioctls::VcpuFd;
use thiserror::Error;

use super::{
    plan::Plan,
    stream::{Kind, SectionHeader, SectionSink, StreamError},
};
use crate::{
    state::{self, MachineStateV1, StateError, VcpuStateV2},
    vmcore::VmCore,
};

/// Why the VM's state cannot be captured, read or loaded. Each names the
/// section (machine, vCPU, device) it is about.
#[derive(Debug, Error)]
pub enum VmStateError {
    /// KVM could not save or load part of it.
    #[error("{section}: {source}")]
    Kvm {
        /// "machine section", "vcpu cpu1".
        section: String,
        /// What failed.
        source: StateError,
    },
    /// A section that does not decode, or whose version this ferry does
    /// not load.
    #[error("{section}: {message}")]
    Section {
        /// Which.
        section: String,
        /// Why.
        message: String,
    },
    /// A section this VM has no place for.
    #[error("section {index} ({kind} {id}): {problem}")]
    Unexpected {
        /// Its number in the stream.
        index: usize,
        /// Its kind's name.
        kind: &'static str,
        /// Its id.
        id: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// A section that never came.
    #[error("{0}")]
    Missing(String),
    /// A device refused to save or load its state.
    #[error("device {id} ({plugin}): {message}")]
    Device {
        /// Device id.
        id: String,
        /// Its plugin.
        plugin: String,
        /// What the plugin said.
        message: String,
    },
    /// A vCPU did not park with its state.
    #[error("vCPU {index}: {source}")]
    Vcpu {
        /// Which.
        index: usize,
        /// Why.
        source: crate::vcpu::VcpuError,
    },
    /// The devices would not resume after loading.
    #[error(transparent)]
    Resume(#[from] crate::vmcore::DeviceCallError),
    /// Writing the sections.
    #[error(transparent)]
    Stream(#[from] StreamError),
}

/// One device's state as its plugin wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceState {
    /// Device id.
    pub id: String,
    /// State version.
    pub version: u32,
    /// The plugin's bytes.
    pub bytes: Vec<u8>,
}

/// The VM's state besides memory.
pub struct VmState {
    /// irqchip, PIT, clock.
    pub machine: MachineStateV1,
    /// Every vCPU, in order.
    pub vcpus: Vec<VcpuStateV2>,
    /// Every device, in bus order.
    pub devices: Vec<DeviceState>,
}

impl VmState {
    /// Capture the state of `core`'s VM, which must be paused: each device
    /// at the version `plan` gives it (a downgrade runs now and may be
    /// refused with the guest-state reason), or at its plugin's current
    /// version without a plan.
    pub fn capture(core: &VmCore, plan: Option<&Plan>) -> Result<VmState, VmStateError> {
        let t0 = std::time::Instant::now();
        let mut devices = Vec::with_capacity(core.bus.devices().len());
        for d in core.bus.devices() {
            let refused = |message: String| VmStateError::Device {
                id: d.id.clone(),
                plugin: d.plugin.clone(),
                message,
            };
            let version = match plan {
                Some(plan) => plan.write_version(&d.id).ok_or_else(|| refused("not in the plan".into()))?,
                None => core
                    .registry
                    .get(&d.plugin)
                    .map(|lib| lib.descriptor.state.current)
                    .ok_or_else(|| refused("its plugin is not loaded".into()))?,
            };
            let blob = d
                .device
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .save_state(version)
                .into_result()
                .map_err(|e| refused(format!("state v{version}: {e}")))?;
            devices.push(DeviceState {
                id: d.id.clone(),
                version: blob.version,
                bytes: blob.bytes.into_vec(),
            });
        }
        let t_devices = t0.elapsed();
        let mut vcpus = Vec::with_capacity(usize::from(core.cpus));
        for (index, s) in core.control.take_vcpu_states().into_iter().enumerate() {
            vcpus.push(s.map_err(|source| VmStateError::Vcpu { index, source })?);
        }
        let t_vcpus = t0.elapsed();
        let machine = state::save_machine(&core.kvm.vm)
            .map_err(|source| VmStateError::Kvm { section: "machine section".into(), source })?;
        if crate::log::debugging() {
            let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
            crate::log::debug(&format!(
                "state captured: devices at {:.2} ms, vCPUs at {:.2} ms, machine at {:.2} ms",
                ms(t_devices),
                ms(t_vcpus),
                ms(t0.elapsed())
            ));
        }
        Ok(VmState { machine, vcpus, devices })
    }

    /// Write it as MACHINE, VCPU ("cpu0".."cpuN-1") and DEVICE sections.
    pub fn write(&self, sink: &mut impl SectionSink) -> Result<(), VmStateError> {
        let encoded = |section: String, bytes: Result<Vec<u8>, _>| {
            bytes.map_err(|message| VmStateError::Section { section, message })
        };
        let machine = encoded("machine section".into(), self.machine.save_version(MachineStateV1::CURRENT))?;
        sink.put(Kind::Machine, "", MachineStateV1::CURRENT, &machine)?;
        for (i, v) in self.vcpus.iter().enumerate() {
            let bytes = encoded(format!("vcpu cpu{i}"), v.save_version(VcpuStateV2::CURRENT))?;
            sink.put(Kind::Vcpu, &format!("cpu{i}"), VcpuStateV2::CURRENT, &bytes)?;
        }
        for d in &self.devices {
            sink.put(Kind::Device, &d.id, d.version, &d.bytes)?;
        }
        Ok(())
    }

    /// Load it into a VM built for it, before its vCPUs first run: the
    /// machine, each vCPU, each device (paused, then loaded; the plugin
    /// upgrades older versions); then the PCI BARs are mapped where the
    /// guest had them and the devices resume.
    pub fn load(&self, core: &VmCore, vcpus: &[VcpuFd]) -> Result<(), VmStateError> {
        let t0 = std::time::Instant::now();
        state::restore_machine(&core.kvm.vm, &self.machine)
            .map_err(|source| VmStateError::Kvm { section: "machine section".into(), source })?;
        if self.vcpus.len() != vcpus.len() {
            return Err(VmStateError::Missing(format!(
                "{} vCPU sections for {} vCPUs",
                self.vcpus.len(),
                vcpus.len()
            )));
        }
        crate::log::debug(&format!("machine state loaded at {:.2} ms", t0.elapsed().as_secs_f64() * 1e3));
        for (i, (fd, st)) in vcpus.iter().zip(&self.vcpus).enumerate() {
            state::restore_vcpu(fd, st)
                .map_err(|source| VmStateError::Kvm { section: format!("vcpu cpu{i}"), source })?;
        }
        crate::log::debug(&format!("vCPU state loaded at {:.2} ms", t0.elapsed().as_secs_f64() * 1e3));
        for slot in core.bus.devices() {
            let failed = |message: String| VmStateError::Device {
                id: slot.id.clone(),
                plugin: slot.plugin.clone(),
                message,
            };
            let Some(d) = self.devices.iter().find(|d| d.id == slot.id) else {
                return Err(VmStateError::Missing(format!("device {}: no state section", slot.id)));
            };
            let blob = StateBlob { version: d.version, bytes: d.bytes.clone().into() };
            let mut dev = slot.device.lock().unwrap_or_else(|e| e.into_inner());
            dev.pause().into_result().map_err(|e| failed(e.to_string()))?;
            dev.load_state(blob).into_result().map_err(|e| failed(e.to_string()))?;
        }
        core.bus.refresh_pci();
        Ok(core.set_devices_paused(false)?)
    }
}

/// Collects a VM's state sections as a file or a connection yields them,
/// checking each against the VM it is for (its vCPU count and device ids),
/// and decodes the core's own sections when all have come: everything is
/// refused before anything is loaded.
pub struct StateReader {
    machine: Option<(u32, Vec<u8>)>,
    vcpus: Vec<Option<(u32, Vec<u8>)>>,
    device_ids: Vec<String>,
    devices: Vec<DeviceState>,
}

impl StateReader {
    /// For a VM with `cpus` vCPUs and these device ids.
    pub fn new(cpus: u8, device_ids: Vec<String>) -> Self {
        StateReader { machine: None, vcpus: vec![None; usize::from(cpus)], device_ids, devices: Vec::new() }
    }

    /// Is a section of `kind` one of the VM's state?
    pub fn wants(kind: Kind) -> bool {
        matches!(kind, Kind::Machine | Kind::Vcpu | Kind::Device)
    }

    /// Take one state section (a kind [`wants`](Self::wants) says yes to).
    pub fn take(&mut self, h: &SectionHeader, payload: Vec<u8>) -> Result<(), VmStateError> {
        let unexpected = |problem| VmStateError::Unexpected {
            index: h.index,
            kind: h.kind.name(),
            id: h.id.clone(),
            problem,
        };
        match h.kind {
            Kind::Machine => self.machine = Some((h.version, payload)),
            Kind::Vcpu => {
                let n = h.id.strip_prefix("cpu").and_then(|n| n.parse::<usize>().ok());
                let slot = n
                    .and_then(|n| self.vcpus.get_mut(n))
                    .ok_or_else(|| unexpected("no such vCPU in the manifest"))?;
                *slot = Some((h.version, payload));
            }
            Kind::Device => {
                if !self.device_ids.contains(&h.id) {
                    return Err(unexpected("unknown device id"));
                }
                self.devices.retain(|d| d.id != h.id);
                self.devices.push(DeviceState { id: h.id.clone(), version: h.version, bytes: payload });
            }
            _ => return Err(unexpected("not part of the VM's state")),
        }
        Ok(())
    }

    /// Every section came: decode the machine and vCPU sections (upgrading
    /// older versions) and check that every device has its state.
    pub fn finish(self) -> Result<VmState, VmStateError> {
        let (version, bytes) =
            self.machine.ok_or_else(|| VmStateError::Missing("no machine section".into()))?;
        let machine = load_section::<MachineStateV1>("machine section", version, &bytes)?;
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for (i, v) in self.vcpus.into_iter().enumerate() {
            let (version, bytes) =
                v.ok_or_else(|| VmStateError::Missing(format!("no state for vCPU {i}")))?;
            vcpus.push(load_section::<VcpuStateV2>(&format!("vcpu cpu{i}"), version, &bytes)?);
        }
        if let Some(id) = self.device_ids.iter().find(|id| !self.devices.iter().any(|d| &d.id == *id)) {
            return Err(VmStateError::Missing(format!("device {id}: no state section")));
        }
        Ok(VmState { machine, vcpus, devices: self.devices })
    }
}

/// Decode one of the core's sections at `version`, as a plugin decodes
/// its state: the range checked first, then the upgrade chain.
pub(crate) fn load_section<S: Versioned>(
    section: &str,
    version: u32,
    bytes: &[u8],
) -> Result<S, VmStateError> {
    let bad = |message: String| VmStateError::Section { section: section.to_string(), message };
    versioned::check_load(versioned::versions::<S>(), version, "this ferry").map_err(bad)?;
    S::load_version(version, bytes).map_err(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(index: usize, kind: Kind, id: &str, version: u32) -> SectionHeader {
        SectionHeader { index, kind, id: id.into(), version, payload_len: 0, payload_crc: 0, payload_at: 0 }
    }

    #[test]
    fn sections_the_vm_has_no_place_for_are_named() {
        let mut r = StateReader::new(2, vec!["com1".into()]);
        let err = r.take(&header(3, Kind::Vcpu, "cpu2", 2), vec![]).unwrap_err().to_string();
        assert_eq!(err, "section 3 (vcpu cpu2): no such vCPU in the manifest");
        let err = r.take(&header(4, Kind::Vcpu, "x", 2), vec![]).unwrap_err().to_string();
        assert_eq!(err, "section 4 (vcpu x): no such vCPU in the manifest");
        let err = r.take(&header(5, Kind::Device, "xyz", 1), vec![]).unwrap_err().to_string();
        assert_eq!(err, "section 5 (device xyz): unknown device id");
        let err = r.take(&header(6, Kind::Pages, "", 1), vec![]).unwrap_err().to_string();
        assert_eq!(err, "section 6 (pages ): not part of the VM's state");
    }

    #[test]
    fn a_missing_or_newer_section_is_refused_before_anything_loads() {
        let r = StateReader::new(1, vec![]);
        assert_eq!(r.finish().err().map(|e| e.to_string()), Some("no machine section".into()));
        let mut r = StateReader::new(1, vec!["com1".into()]);
        r.take(&header(1, Kind::Machine, "", 9), vec![]).unwrap();
        let err = r.finish().err().map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(err, "machine section: state v9 is newer than this ferry loads (v1..v1)");
    }
}
