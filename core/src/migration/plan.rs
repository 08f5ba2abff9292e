//! The migration plan: for a stream's manifest and a destination's plugin
//! set, what happens to each device, decided before the guest is paused.
//!
//! | verdict | when |
//! |---|---|
//! | same vN | the destination's plugin loads and writes the source's state version |
//! | upgrade vA->vB | the destination loads vA and upgrades it to its vB |
//! | downgrade vB->vA | the source writes the older vA the destination loads (its downgrade functions run at stop-and-copy, and may still refuse then if the guest's state needs vB) |
//! | refused | no plugin, an unknown property, or no version path |
//!
//! The guest's CPU gets its own verdict (`cpu::verdict`): another vendor,
//! a CPUID feature or MSR the destination's KVM lacks, or a TSC frequency
//! it cannot match refuse the whole plan, one line each.

use serde::{Deserialize, Serialize};

use super::manifest::{CpuRecord, Manifest, MsrName};
use crate::cpu::{verdict, HostCpu, VmCpu};

/// How the plan introduces the guest's CPU in its lines.
pub const LIVE_ORIGIN: &str = "the source runs it";

/// What one plugin on a host can do: enough to plan without loading it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostPlugin {
    /// Plugin name.
    pub name: String,
    /// Plugin version.
    pub version: String,
    /// State version written by default.
    pub current: u32,
    /// Oldest state version it loads.
    pub oldest_load: u32,
    /// Oldest state version it writes (through downgrades).
    pub oldest_save: u32,
    /// Property names it accepts.
    pub properties: Vec<String>,
    /// Default values of the properties that have one.
    #[serde(default)]
    pub defaults: std::collections::BTreeMap<String, String>,
}

/// A host's plugin set, as `ferry plugins --manifest` writes it: what an
/// orchestrator needs to plan a migration between two hosts offline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostManifest {
    /// The ferry of that host.
    pub ferry_version: String,
    /// Its plugin-api.
    pub plugin_api: String,
    /// Its plugins.
    pub plugins: Vec<HostPlugin>,
    /// Its CPU as KVM offers it (absent if /dev/kvm could not be read).
    #[serde(default)]
    pub cpu: Option<HostCpu>,
}

/// Why a VM's manifest on another host cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The host's manifest lacks its CPU.
    #[error("the source host's manifest has no CPU description")]
    NoCpu,
    /// The host cannot give the machine type's CPU.
    #[error("on the source host: {0}")]
    Cpu(crate::cpu::CpuError),
    /// A device's plugin is missing there.
    #[error("device {id}: plugin {plugin} is not installed on the source host")]
    NotInstalled {
        /// Device id.
        id: String,
        /// Its plugin.
        plugin: String,
    },
}

/// The manifest a VM of machine type `machine` would carry on host `from`:
/// every device at its plugin's current state version, with the properties
/// the machine type sets, as the live handshake would send it.
pub fn vm_manifest_on(
    machine: &crate::machine::MachineType,
    from: &HostManifest,
    cpus: u8,
    memory: u64,
) -> Result<Manifest, ManifestError> {
    use super::manifest::{DeviceRecord, MachineDevice, MachineRecord};
    let host_cpu = from.cpu.as_ref().ok_or(ManifestError::NoCpu)?;
    let cpu = VmCpu::for_model(machine.cpu, host_cpu, cpus).map_err(ManifestError::Cpu)?;
    let mut devices = Vec::new();
    let mut records = Vec::new();
    for d in &machine.devices {
        let p = from
            .plugins
            .iter()
            .find(|p| p.name == d.plugin)
            .ok_or_else(|| ManifestError::NotInstalled { id: d.id.clone(), plugin: d.plugin.clone() })?;
        let properties = d.properties.iter().map(|(k, v)| (k.clone(), v.as_string())).collect();
        devices.push(MachineDevice { id: d.id.clone(), plugin: d.plugin.clone(), properties });
        records.push(DeviceRecord {
            id: d.id.clone(),
            plugin: p.name.clone(),
            plugin_version: p.version.clone(),
            state_version: p.current,
            oldest_save: p.oldest_save,
            contract: Default::default(),
        });
    }
    Ok(Manifest {
        ferry_version: from.ferry_version.clone(),
        machine: MachineRecord {
            name: machine.name.clone(),
            description: machine.description.clone(),
            devices,
        },
        devices: records,
        cpus,
        memory,
        ram: crate::memory::layout(memory).iter().map(|r| (r.gpa, r.len)).collect(),
        cpu: Some(cpu_record(&cpu)),
        cpuid: cpu.cpuid,
        bindings: Default::default(),
        boot: None,
    })
}

/// The manifest's record of a VM's CPU.
pub fn cpu_record(cpu: &VmCpu) -> CpuRecord {
    CpuRecord {
        model: cpu.model.clone(),
        vendor: cpu.vendor.clone(),
        tsc_khz: cpu.tsc_khz,
        msrs: cpu.msrs.iter().map(|&(index, name)| MsrName { index, name: name.to_string() }).collect(),
    }
}

/// The verdict for one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// Same state version on both sides.
    Same {
        /// The version.
        version: u32,
    },
    /// The destination upgrades.
    Upgrade {
        /// Written by the source.
        from: u32,
        /// The destination's.
        to: u32,
    },
    /// The source downgrades before sending.
    Downgrade {
        /// The source's.
        from: u32,
        /// Written for the destination.
        to: u32,
    },
    /// It cannot go.
    Refused {
        /// Why.
        reason: String,
    },
}

/// One device's line of the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceLine {
    /// Device id.
    pub id: String,
    /// Plugin name.
    pub plugin: String,
    /// Plugin version on the source.
    pub source_version: String,
    /// Plugin version on the destination, if installed.
    pub destination_version: Option<String>,
    /// What happens.
    pub verdict: Verdict,
}

/// The whole plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Per device, in machine-type order.
    pub devices: Vec<DeviceLine>,
    /// The CPU verdict's problems: each refuses the whole plan.
    pub cpu: Vec<String>,
    /// Whether the destination can take the rest of memory by post-copy
    /// (None: it can; otherwise why not). A plan from a ferry that predates
    /// post-copy, or made offline, says it cannot.
    #[serde(default = "postcopy_unknown")]
    pub postcopy: Option<String>,
    /// The guest's boot images the destination's store lacks: the source
    /// sends these (IMAGE sections) before its decision. Empty from a
    /// ferry that predates them, and offline.
    #[serde(default)]
    pub images: Vec<crate::images::ImageRef>,
}

fn postcopy_unknown() -> Option<String> {
    Some("the destination does not offer post-copy".into())
}

impl Plan {
    /// Anything refused?
    pub fn refused(&self) -> bool {
        !self.cpu.is_empty() || self.devices.iter().any(|d| matches!(d.verdict, Verdict::Refused { .. }))
    }

    /// One line per device, and per CPU problem.
    pub fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        for d in &self.devices {
            let versions = format!(
                "{} {} -> {}",
                d.plugin,
                d.source_version,
                d.destination_version.as_deref().unwrap_or("(not installed)")
            );
            let what = match &d.verdict {
                Verdict::Same { version } => format!("same state v{version}"),
                Verdict::Upgrade { from, to } => format!("destination upgrades v{from}->v{to}"),
                Verdict::Downgrade { from, to } => format!("source downgrades v{from}->v{to}"),
                Verdict::Refused { reason } => format!("REFUSED: {reason}"),
            };
            out.push(format!("device {} ({versions}): {what}", d.id));
        }
        for m in &self.cpu {
            out.push(format!("cpu: REFUSED: {m}"));
        }
        out
    }

    /// Refuse device `id` for `reason`, unless it is refused already (the
    /// first reason stands).
    pub fn refuse(&mut self, id: &str, reason: String) {
        if let Some(line) = self.devices.iter_mut().find(|l| l.id == id) {
            if !matches!(line.verdict, Verdict::Refused { .. }) {
                line.verdict = Verdict::Refused { reason };
            }
        }
    }

    /// The target state version for device `id` (what the source writes).
    pub fn write_version(&self, id: &str) -> Option<u32> {
        self.devices.iter().find(|d| d.id == id).and_then(|d| match d.verdict {
            Verdict::Same { version } => Some(version),
            Verdict::Upgrade { from, .. } => Some(from),
            Verdict::Downgrade { to, .. } => Some(to),
            Verdict::Refused { .. } => None,
        })
    }
}

/// Plan the move of `manifest`'s VM to a host with `plugins` and, if
/// known, CPU `host_cpu`.
pub fn make_plan(manifest: &Manifest, plugins: &[HostPlugin], host_cpu: Option<&HostCpu>) -> Plan {
    let mut devices = Vec::new();
    for d in &manifest.devices {
        let dest = plugins.iter().find(|p| p.name == d.plugin);
        let properties = manifest.machine.devices.iter().find(|m| m.id == d.id).map(|m| m.properties.clone());
        let verdict = match dest {
            None => Verdict::Refused {
                reason: format!("plugin {} is not installed on the destination", d.plugin),
            },
            Some(p) => {
                let unknown: Vec<&String> = properties
                    .iter()
                    .flat_map(|props| props.keys())
                    .filter(|k| !p.properties.iter().any(|q| q == *k))
                    .collect();
                let (s_cur, s_min) = (d.state_version, d.oldest_save.min(d.state_version));
                let downgrade = s_cur > p.current;
                // A property an older plugin does not know switches on a
                // feature it does not have: acceptable for a downgrade (the
                // downgrade functions refuse if the guest uses the feature),
                // a refusal otherwise.
                if let Some(k) = unknown.first().filter(|_| !downgrade) {
                    Verdict::Refused {
                        reason: format!("property '{k}' is unknown to {} {}", p.name, p.version),
                    }
                } else if (p.oldest_load..=p.current).contains(&s_cur) {
                    if s_cur == p.current {
                        Verdict::Same { version: s_cur }
                    } else {
                        Verdict::Upgrade { from: s_cur, to: p.current }
                    }
                } else if s_cur > p.current && s_min <= p.current && p.oldest_load <= p.current {
                    Verdict::Downgrade { from: s_cur, to: p.current }
                } else {
                    Verdict::Refused {
                        reason: format!(
                            "no version path: the source writes state v{s_min}..v{s_cur}, the destination loads v{}..v{}",
                            p.oldest_load, p.current
                        ),
                    }
                }
            }
        };
        devices.push(DeviceLine {
            id: d.id.clone(),
            plugin: d.plugin.clone(),
            source_version: d.plugin_version.clone(),
            destination_version: dest.map(|p| p.version.clone()),
            verdict,
        });
    }
    let cpu = match host_cpu {
        Some(host) => {
            let msrs = manifest.msr_indexes();
            verdict::check(&manifest.guest_cpu(&msrs, LIVE_ORIGIN), host).problems
        }
        None => Vec::new(),
    };
    Plan { devices, cpu, postcopy: postcopy_unknown(), images: Vec::new() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        cpu::cpuid::{self, CpuidEntry, INTEL},
        migration::manifest::{DeviceRecord, MachineDevice, MachineRecord},
    };

    fn manifest(state_version: u32, oldest_save: u32) -> Manifest {
        Manifest {
            ferry_version: "0.1.0".into(),
            machine: MachineRecord {
                name: "pc-1".into(),
                description: String::new(),
                devices: vec![MachineDevice {
                    id: "com1".into(),
                    plugin: "serial-16550".into(),
                    properties: [("port".to_string(), "1016".to_string())].into(),
                }],
            },
            devices: vec![DeviceRecord {
                id: "com1".into(),
                plugin: "serial-16550".into(),
                plugin_version: "0.2.0".into(),
                state_version,
                oldest_save,
                contract: Default::default(),
            }],
            cpus: 1,
            memory: 1 << 28,
            ram: vec![(0, 1 << 28)],
            cpuid: table(0b1011),
            cpu: Some(CpuRecord {
                model: "x86-64-v1@1".into(),
                vendor: INTEL.into(),
                tsc_khz: Some(2_000_000),
                msrs: vec![MsrName { index: 0x10, name: "IA32_TSC".into() }],
            }),
            bindings: Default::default(),
            boot: None,
        }
    }

    fn table(leaf1_ecx: u32) -> Vec<CpuidEntry> {
        let mut t =
            vec![CpuidEntry { function: 1, index: 0, flags: 0, eax: 0, ebx: 0, ecx: leaf1_ecx, edx: 1 }];
        cpuid::set_vendor(&mut t, INTEL);
        t
    }

    fn host(current: u32, oldest_load: u32) -> Vec<HostPlugin> {
        vec![HostPlugin {
            name: "serial-16550".into(),
            version: "0.1.0".into(),
            current,
            oldest_load,
            oldest_save: current,
            properties: vec!["port".into()],
            defaults: Default::default(),
        }]
    }

    #[test]
    fn verdicts_follow_the_version_ranges() {
        let p = make_plan(&manifest(1, 1), &host(1, 1), None);
        assert_eq!(p.devices[0].verdict, Verdict::Same { version: 1 });
        let p = make_plan(&manifest(1, 1), &host(3, 1), None);
        assert_eq!(p.devices[0].verdict, Verdict::Upgrade { from: 1, to: 3 });
        let p = make_plan(&manifest(3, 1), &host(2, 1), None);
        assert_eq!(p.devices[0].verdict, Verdict::Downgrade { from: 3, to: 2 });
        assert_eq!(p.write_version("com1"), Some(2));
        let p = make_plan(&manifest(3, 3), &host(2, 1), None);
        assert!(p.refused());
        assert_eq!(
            p.lines()[0],
            "device com1 (serial-16550 0.2.0 -> 0.1.0): REFUSED: no version path: the source writes state v3..v3, \
             the destination loads v1..v2"
        );
    }

    #[test]
    fn missing_plugins_properties_and_cpu_features_refuse() {
        let p = make_plan(&manifest(1, 1), &[], None);
        assert_eq!(
            p.lines()[0],
            "device com1 (serial-16550 0.2.0 -> (not installed)): REFUSED: plugin serial-16550 is not installed on the destination"
        );
        let mut h = host(1, 1);
        h[0].properties.clear();
        assert!(make_plan(&manifest(1, 1), &h, None).lines()[0]
            .contains("property 'port' is unknown to serial-16550 0.1.0"));
        let dest = HostCpu::fake(INTEL, table(0b0011));
        let p = make_plan(&manifest(1, 1), &host(1, 1), Some(&dest));
        assert!(p.refused());
        assert_eq!(
            p.lines()[1],
            "cpu: REFUSED: CPUID.01H:ECX.monitor [bit 3]: the guest's CPU has it; this host's KVM does not offer it"
        );
        assert!(
            !make_plan(&manifest(1, 1), &host(1, 1), Some(&HostCpu::fake(INTEL, table(0b1011)))).refused()
        );
    }
}
