//! What this host's KVM can give a guest: its vendor, the CPUID it
//! supports, the MSRs it saves and restores, and its TSC.
//!
//! The same description serves every decision: booting a model, the
//! verdict on a snapshot or an incoming migration, and the host manifest
//! other hosts plan against (`ferry plugins --manifest`).
//!
//! Tests make one machine look like another with `FERRY_TEST_HOST_CPU`
//! (a test knob, announced on stderr whenever it is in effect), a comma-
//! separated list of:
//!
//! | item | effect |
//! |---|---|
//! | `vendor=AuthenticAMD` | another vendor string |
//! | `hide-cpuid=sse2` or `hide-cpuid=0x7.0.ebx.5` | a CPUID bit KVM does not offer |
//! | `hide-msr=0x6e0` | an MSR KVM does not save or restore |
//! | `tsc-khz=2400000` | another TSC frequency |
//! | `tsc-scaling=off` | no TSC scaling |

use kvm_ioctls::{Cap, Kvm, VmFd};
use serde::{Deserialize, Serialize};

use super::{
    cpuid::{self, feature_by_name, Bit, CpuidEntry, Reg},
    msrs, CpuError,
};

/// The environment variable of the test-only disguise.
pub const DISGUISE_ENV: &str = "FERRY_TEST_HOST_CPU";

/// One host's CPU as KVM offers it to guests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCpu {
    /// Vendor string of the host's CPU.
    pub vendor: String,
    /// KVM_GET_SUPPORTED_CPUID.
    pub cpuid: Vec<CpuidEntry>,
    /// MSRs KVM saves and restores (KVM_GET_MSR_INDEX_LIST and the MTRRs
    /// it emulates for every vCPU), sorted.
    pub msrs: Vec<u32>,
    /// The TSC frequency KVM gives a new vCPU (KVM_GET_TSC_KHZ).
    pub tsc_khz: Option<u32>,
    /// Can KVM run a vCPU's TSC at another frequency (KVM_CAP_TSC_CONTROL)?
    pub tsc_scaling: bool,
    /// The test disguise in effect when this was read, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disguise: Option<String>,
}

impl HostCpu {
    /// Read this host's KVM (and apply the test disguise, if set).
    pub fn probe() -> Result<HostCpu, CpuError> {
        Self::probe_with(None)
    }

    /// [`probe`](Self::probe), asking `vm` (a VM ferry made anyway)
    /// for the TSC frequency instead of a VM of its own.
    pub fn probe_on(vm: &VmFd) -> Result<HostCpu, CpuError> {
        Self::probe_with(Some(vm))
    }

    fn probe_with(vm: Option<&VmFd>) -> Result<HostCpu, CpuError> {
        let kvm = Kvm::new().map_err(|e| CpuError::Kvm("open /dev/kvm", e))?;
        let supported = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| CpuError::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
        let cpuid = cpuid::from_kvm(&supported);
        let list = kvm.get_msr_index_list().map_err(|e| CpuError::Kvm("KVM_GET_MSR_INDEX_LIST", e))?;
        let mut msrs: Vec<u32> = list.as_slice().iter().copied().chain(msrs::kvm_emulates()).collect();
        msrs.sort_unstable();
        msrs.dedup();
        let mut host = HostCpu {
            vendor: cpuid::vendor(&cpuid),
            cpuid,
            msrs,
            tsc_khz: tsc_khz(&kvm, vm),
            tsc_scaling: kvm.check_extension(Cap::TscControl),
            disguise: None,
        };
        if let Ok(spec) = std::env::var(DISGUISE_ENV) {
            host.disguise(&spec)?;
            announce(&spec);
        }
        Ok(host)
    }

    /// A host described by hand (unit tests, fakes).
    pub fn fake(vendor: &str, cpuid: Vec<CpuidEntry>) -> HostCpu {
        let mut msrs: Vec<u32> = msrs::CATALOGUE.iter().map(|m| m.index).collect();
        msrs.sort_unstable();
        HostCpu {
            vendor: vendor.into(),
            cpuid,
            msrs,
            tsc_khz: Some(2_000_000),
            tsc_scaling: false,
            disguise: None,
        }
    }

    /// Does KVM here save and restore MSR `index`?
    pub fn has_msr(&self, index: u32) -> bool {
        self.msrs.binary_search(&index).is_ok()
    }

    /// Apply a test disguise (see the module documentation).
    pub fn disguise(&mut self, spec: &str) -> Result<(), CpuError> {
        let bad = |item: &str, why: &str| CpuError::Disguise(format!("{DISGUISE_ENV}: '{item}': {why}"));
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (key, value) = item.split_once('=').ok_or_else(|| bad(item, "not key=value"))?;
            match key {
                "vendor" => {
                    if value.is_empty() || value.len() > 12 || !value.is_ascii() {
                        return Err(bad(item, "a vendor string is 1 to 12 ASCII characters"));
                    }
                    self.vendor = value.to_string();
                    cpuid::set_vendor(&mut self.cpuid, value);
                }
                "hide-cpuid" => {
                    let b = parse_bit(value)
                        .ok_or_else(|| bad(item, "not a feature name or LEAF.SUB.REG.BIT"))?;
                    if let Some(e) = self.cpuid.iter_mut().find(|e| {
                        e.function == b.leaf && (e.index == b.sub || e.flags & cpuid::SIGNIFICANT_INDEX == 0)
                    }) {
                        let v = b.reg.get(e) & !b.mask();
                        b.reg.set(e, v);
                    }
                }
                "hide-msr" => {
                    let index = parse_u32(value).ok_or_else(|| bad(item, "not an MSR index"))?;
                    self.msrs.retain(|m| *m != index);
                }
                "tsc-khz" => {
                    let khz =
                        value.parse::<u32>().ok().filter(|k| *k > 0).ok_or_else(|| bad(item, "not kHz"))?;
                    self.tsc_khz = Some(khz);
                }
                "tsc-scaling" => match value {
                    "on" => self.tsc_scaling = true,
                    "off" => self.tsc_scaling = false,
                    _ => return Err(bad(item, "on or off")),
                },
                _ => {
                    return Err(bad(
                        item,
                        "expected vendor=, hide-cpuid=, hide-msr=, tsc-khz= or tsc-scaling=",
                    ))
                }
            }
        }
        self.disguise = Some(spec.to_string());
        Ok(())
    }
}

/// Say once per process that the host is disguised.
fn announce(spec: &str) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        crate::log::warn(&format!(
            "{DISGUISE_ENV}={spec}: this host's CPU is described as changed (a test knob)"
        ))
    });
}

/// The TSC frequency KVM gives a new vCPU: asked of a VM (`vm`, or one
/// made for the question) where this KVM answers on the VM (Linux 5.19
/// on), else of a throwaway vCPU, which costs more than the rest of the
/// probe together.
fn tsc_khz(kvm: &Kvm, vm: Option<&VmFd>) -> Option<u32> {
    if !kvm.check_extension(Cap::GetTscKhz) {
        return None;
    }
    if let Some(khz) = vm.and_then(vm_tsc_khz) {
        return Some(khz);
    }
    let own = kvm.create_vm().ok()?;
    vm_tsc_khz(&own).or_else(|| own.create_vcpu(0).ok()?.get_tsc_khz().ok())
}

/// KVM_GET_TSC_KHZ on a VM fd: the frequency its new vCPUs get.
fn vm_tsc_khz(vm: &VmFd) -> Option<u32> {
    use std::os::fd::AsRawFd;
    /// `_IO(KVMIO, 0xa3)`.
    const KVM_GET_TSC_KHZ: libc::c_ulong = 0xAEA3;
    // SAFETY: KVM_GET_TSC_KHZ takes no argument and touches no memory of
    // ours; it returns the frequency in kHz or -1 (an older KVM answers
    // it only on a vCPU). The fd is a VM fd this process holds.
    let r = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_GET_TSC_KHZ) };
    u32::try_from(r).ok().filter(|khz| *khz > 0)
}

fn parse_u32(s: &str) -> Option<u32> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// `sse2`, or `LEAF.SUB.REG.BIT` such as `0x7.0.ebx.5`.
fn parse_bit(s: &str) -> Option<Bit> {
    if let Some(b) = feature_by_name(s) {
        return Some(b);
    }
    let parts: Vec<&str> = s.split('.').collect();
    let [leaf, sub, reg, b] = parts.as_slice() else { return None };
    let b: u8 = b.parse().ok().filter(|b| *b < 32)?;
    Some(cpuid::bit(parse_u32(leaf)?, parse_u32(sub)?, Reg::parse(reg)?, b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::cpuid::{value, AMD, INTEL};

    fn host() -> HostCpu {
        let mut t =
            vec![CpuidEntry { function: 1, index: 0, flags: 0, eax: 0, ebx: 0, ecx: 0, edx: u32::MAX }];
        cpuid::set_vendor(&mut t, INTEL);
        HostCpu::fake(INTEL, t)
    }

    #[test]
    fn a_disguise_changes_what_it_names_and_nothing_else() {
        let mut h = host();
        h.disguise("vendor=AuthenticAMD, hide-cpuid=sse2,hide-msr=0x10,tsc-khz=1234567,tsc-scaling=on")
            .unwrap();
        assert_eq!((h.vendor.as_str(), cpuid::vendor(&h.cpuid)), (AMD, AMD.to_string()));
        assert_eq!(value(&h.cpuid, 1, 0, Reg::Edx), !(1 << 26));
        assert!(!h.has_msr(0x10) && h.has_msr(0x174));
        assert_eq!((h.tsc_khz, h.tsc_scaling), (Some(1_234_567), true));
        let mut h = host();
        h.disguise("hide-cpuid=0x1.0.edx.0").unwrap();
        assert_eq!(value(&h.cpuid, 1, 0, Reg::Edx), !1);
    }

    #[test]
    fn a_bad_disguise_is_refused_naming_the_item() {
        for (spec, want) in [
            ("colour=blue", "'colour=blue': expected vendor="),
            ("hide-cpuid=nosuch", "'hide-cpuid=nosuch': not a feature name"),
            ("tsc-khz=fast", "'tsc-khz=fast': not kHz"),
            ("vendor", "'vendor': not key=value"),
        ] {
            let e = host().disguise(spec).unwrap_err().to_string();
            assert!(e.starts_with("FERRY_TEST_HOST_CPU: ") && e.contains(want), "{spec}: {e}");
        }
    }
}
