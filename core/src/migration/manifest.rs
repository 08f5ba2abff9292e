//! The manifest: what a stream holds, readable before any state is. It
//! carries the machine type with every device's resolved properties (the
//! guest keeps its machine type for life), the device list with plugin and
//! state versions, the vCPU count, the memory layout and the CPUID.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::machine::{DeviceSpec, MachineType, PropValue};

/// Version of [`Manifest`]'s encoding.
pub const MANIFEST_VERSION: u32 = 1;

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
}

/// One CPUID entry given to the vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidRecord {
    /// Leaf.
    pub function: u32,
    /// Subleaf.
    pub index: u32,
    /// KVM flags.
    pub flags: u32,
    /// Registers.
    pub eax: u32,
    /// Registers.
    pub ebx: u32,
    /// Registers.
    pub ecx: u32,
    /// Registers.
    pub edx: u32,
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
    /// CPUID of vCPU 0 (others differ only in APIC ids).
    pub cpuid: Vec<CpuidRecord>,
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
