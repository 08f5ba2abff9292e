//! The manifest: what a stream holds, readable before any state is. It
//! carries the machine type with every device's resolved properties (the
//! guest keeps its machine type for life), the device list with plugin and
//! state versions, the vCPU count, the memory layout, and the guest's CPU:
//! its model, vendor, exact CPUID, the MSRs its vCPUs save and its TSC
//! frequency.
//!
//! | version | CPU |
//! |---|---|
//! | 1 | the CPUID only (it was the host's; no model, vendor field, MSR list or TSC) |
//! | 2 | `cpu`: model, vendor, TSC kHz, MSRs by index and name, beside the CPUID |
//! | 3 | `bindings`: the writer's host bindings (disk paths, taps), apart from the machine type, which has none; later, optional `boot`: the boot image by hash (`images.rs`) |

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::cpu::cpuid::CpuidEntry;
use crate::{
    cpu::{cpuid, verdict::GuestCpu, CpuModel},
    machine::{DeviceSpec, MachineType, PropValue},
};

/// Version of [`Manifest`]'s encoding.
pub const MANIFEST_VERSION: u32 = 3;

/// One device of the machine type, properties resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineDevice {
    /// Device id.
    pub id: String,
    /// Plugin name.
    pub plugin: String,
    /// Every property, as given to the plugin.
    pub properties: BTreeMap<String, String>,
}

/// The machine type as the guest runs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineRecord {
    /// Name.
    pub name: String,
    /// Description.
    pub description: String,
    /// Devices, in order.
    pub devices: Vec<MachineDevice>,
}

/// One device's state section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// Device id.
    pub id: String,
    /// Plugin name.
    pub plugin: String,
    /// Plugin version that wrote it.
    pub plugin_version: String,
    /// State version of its section.
    pub state_version: u32,
    /// Oldest state version the source's plugin can write (downgrades).
    #[serde(default)]
    pub oldest_save: u32,
    /// What a destination must offer to take the device as it runs
    /// (`Device::contract`, plugin-api 1.3: a vhost-user backend's features
    /// and what the guest negotiated); the destination plugin's `check`
    /// reads it. Absent for devices without one, and from ferries that
    /// predate it.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub contract: std::collections::BTreeMap<String, String>,
}

/// One MSR the guest's vCPUs save.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrName {
    /// Index.
    pub index: u32,
    /// Name.
    pub name: String,
}

/// The guest's CPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuRecord {
    /// Model (`host`, `x86-64-v1@1`).
    pub model: String,
    /// Vendor of the host it was started on (and so of its CPUID).
    pub vendor: String,
    /// Its TSC frequency.
    pub tsc_khz: Option<u32>,
    /// The MSRs each vCPU section holds, in restore order.
    pub msrs: Vec<MsrName>,
}

/// Everything a reader needs before the state sections.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The ferry that wrote it.
    pub ferry_version: String,
    /// The machine type (the properties it sets).
    pub machine: MachineRecord,
    /// Device sections, in order.
    pub devices: Vec<DeviceRecord>,
    /// vCPUs.
    pub cpus: u8,
    /// RAM bytes.
    pub memory: u64,
    /// RAM ranges (gpa, length).
    pub ram: Vec<(u64, u64)>,
    /// CPUID of vCPU 0 as KVM holds it (others differ only in APIC ids).
    pub cpuid: Vec<CpuidEntry>,
    /// The guest's CPU (absent in v1 manifests).
    #[serde(default)]
    pub cpu: Option<CpuRecord>,
    /// The writer's host bindings, by device and property (v3; a v2
    /// manifest has them among the machine type's properties, which
    /// `bindings::split` moves here). A reader uses them only when told
    /// to (`--bindings from-snapshot|from-source`).
    #[serde(default)]
    pub bindings: crate::bindings::Bindings,
    /// The kernel, initramfs (by hash and size) and command line the guest
    /// booted with, so it can reboot wherever it goes. An optional field
    /// of v3: a reader that predates it skips it (the guest then cannot
    /// reboot there), so it needs no new version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<crate::images::BootRecord>,
}

impl Manifest {
    /// The guest's CPU for a verdict. `msrs` are the MSRs its vCPUs saved
    /// (a v1 manifest does not list them; its vCPU sections do).
    pub fn guest_cpu<'a>(&'a self, msrs: &'a [u32], origin: &'a str) -> GuestCpu<'a> {
        match &self.cpu {
            Some(c) => GuestCpu {
                model: c.model.clone(),
                vendor: c.vendor.clone(),
                cpuid: &self.cpuid,
                msrs,
                tsc_khz: c.tsc_khz,
                legacy: false,
                origin,
            },
            None => GuestCpu {
                model: "host".into(),
                vendor: cpuid::vendor(&self.cpuid),
                cpuid: &self.cpuid,
                msrs,
                tsc_khz: None,
                legacy: true,
                origin,
            },
        }
    }

    /// The MSRs a v2 manifest lists.
    pub fn msr_indexes(&self) -> Vec<u32> {
        self.cpu.iter().flat_map(|c| c.msrs.iter().map(|m| m.index)).collect()
    }
}

impl MachineRecord {
    /// From a machine type: the properties it sets, not the plugins'
    /// defaults. The machine type is the compatibility contract: a plugin
    /// never changes a default, so what the machine type leaves unset means
    /// the same on every host.
    pub fn new(machine: &MachineType) -> Self {
        MachineRecord {
            name: machine.name.clone(),
            description: machine.description.clone(),
            devices: machine
                .devices
                .iter()
                .map(|d| MachineDevice {
                    id: d.id.clone(),
                    plugin: d.plugin.clone(),
                    properties: d.properties.iter().map(|(k, v)| (k.clone(), v.as_string())).collect(),
                })
                .collect(),
        }
    }

    /// Back to a machine type (properties as strings; resolution checks
    /// them against the installed plugins again).
    pub fn to_machine_type(&self, cpus: u8, memory: u64) -> MachineType {
        MachineType {
            name: self.name.clone(),
            description: self.description.clone(),
            cpus: Some(cpus),
            memory: Some(memory),
            // The CPU a restored guest runs comes from the stream's CPU
            // record, not from a model: the model only starts new guests.
            cpu: CpuModel::Host,
            devices: self
                .devices
                .iter()
                .map(|d| DeviceSpec {
                    id: d.id.clone(),
                    plugin: d.plugin.clone(),
                    properties: d
                        .properties
                        .iter()
                        .map(|(k, v)| (k.clone(), PropValue::Str(v.clone())))
                        .collect(),
                })
                .collect(),
            origin: "snapshot".to_string(),
        }
    }
}
