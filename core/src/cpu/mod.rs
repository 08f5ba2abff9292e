//! The guest's CPU in the compatibility contract: which CPU a guest is
//! given (a model from its machine type), which MSRs its vCPUs save (a
//! catalogue chosen by that CPU, not by the host), what this host's KVM
//! can give, and the verdict on whether a host can run a guest's CPU.
//!
//! ```text
//!  models.rs   host | x86-64-v1@1 | ...  --> the guest's CPUID table
//!  msrs.rs     the MSR catalogue         --> the MSRs that table enables
//!  host.rs     this host's KVM (supported CPUID, MSR list, TSC)
//!  verdict.rs  guest CPU x host --> one line per problem, before anything runs
//!  cpuid.rs    entries, registers, feature names, per-vCPU APIC ids
//! ```

pub mod cpuid;
pub mod host;
pub mod models;
pub mod msrs;
pub mod verdict;

use kvm_ioctls::VcpuFd;
use thiserror::Error;

use cpuid::CpuidEntry;
pub use host::HostCpu;
pub use models::CpuModel;

/// CPU errors: each names the model, feature, MSR or knob it is about.
#[derive(Debug, Error)]
pub enum CpuError {
    /// A KVM call failed.
    #[error("{0}: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    /// An unknown or unversioned model name.
    #[error("{0}")]
    Model(String),
    /// This host cannot give the model.
    #[error("cpu model {model}: this host's KVM does not offer {}", .missing.join(", "))]
    Unavailable {
        /// The model.
        model: String,
        /// What is missing, one item each.
        missing: Vec<String>,
    },
    /// A malformed `FERRY_TEST_HOST_CPU`.
    #[error("{0}")]
    Disguise(String),
    /// Installing the CPU into a vCPU failed.
    #[error("vCPU {cpu}: {what}: {reason}")]
    Install {
        /// vCPU index.
        cpu: u8,
        /// Which call.
        what: &'static str,
        /// KVM's answer.
        reason: String,
    },
}

/// The CPU every vCPU of one VM gets: model, vendor, vCPU 0's CPUID, the
/// MSRs the vCPUs save, and the TSC frequency.
#[derive(Debug, Clone)]
pub struct VmCpu {
    /// Model id (`host`, `x86-64-v1@1`).
    pub model: String,
    /// Vendor string.
    pub vendor: String,
    /// vCPU 0's CPUID (others differ in APIC ids only).
    pub cpuid: Vec<CpuidEntry>,
    /// What each vCPU saves, in restore order.
    pub msrs: Vec<(u32, &'static str)>,
    /// The guest's TSC frequency.
    pub tsc_khz: Option<u32>,
    /// Run the vCPUs' TSC at `tsc_khz` (the host scales it).
    pub scale_tsc: bool,
    /// Where this host's KVM holds another CPUID than ferry set (one line
    /// per register): empty on an ordinary KVM.
    pub kvm_rewrote: Vec<String>,
}

impl VmCpu {
    /// A new guest of `model` with `cpus` vCPUs on `host`: refused, naming
    /// every missing feature or MSR, when the host cannot give the model.
    pub fn for_model(model: CpuModel, host: &HostCpu, cpus: u8) -> Result<VmCpu, CpuError> {
        let unavailable = |missing| CpuError::Unavailable { model: model.id(), missing };
        let table = model
            .guest_cpuid(host, cpus)
            .map_err(|problems| unavailable(problems.iter().map(|p| p.subject()).collect()))?;
        let wanted = msrs::for_guest(&table, &host.vendor);
        let lacking: Vec<&msrs::MsrSpec> =
            wanted.iter().copied().filter(|m| !host.has_msr(m.index)).collect();
        match (model, lacking.is_empty()) {
            (_, true) => {}
            (CpuModel::Named(_), false) => {
                return Err(unavailable(lacking.iter().map(|m| msrs::label(m.index)).collect()));
            }
            // The host model's CPUID is whatever KVM offers; an MSR it
            // enables that KVM cannot save would be lost, so say which.
            (CpuModel::Host, false) => crate::log::warn(&format!(
                "cpu host: this host's KVM offers the features of {} but cannot save them; they are not migrated",
                lacking.iter().map(|m| msrs::label(m.index)).collect::<Vec<_>>().join(", ")
            )),
        }
        Ok(VmCpu {
            model: model.id(),
            vendor: host.vendor.clone(),
            msrs: wanted.iter().filter(|m| host.has_msr(m.index)).map(|m| (m.index, m.name)).collect(),
            cpuid: table,
            tsc_khz: host.tsc_khz,
            scale_tsc: false,
            kvm_rewrote: Vec::new(),
        })
    }

    /// The CPU of a guest that already exists (a snapshot or an incoming
    /// migration) on `host`, after the verdict let it run here: its
    /// recorded CPUID and TSC frequency.
    pub fn recorded(
        model: &str,
        vendor: &str,
        cpuid: Vec<CpuidEntry>,
        tsc_khz: Option<u32>,
        scale_tsc: bool,
        host: &HostCpu,
    ) -> Self {
        let wanted = msrs::for_guest(&cpuid, vendor);
        let lacking: Vec<String> =
            wanted.iter().filter(|m| !host.has_msr(m.index)).map(|m| msrs::label(m.index)).collect();
        if !lacking.is_empty() {
            // Only possible when the source saved fewer MSRs than this
            // ferry's catalogue has (the verdict checked what it saved).
            crate::log::warn(&format!(
                "cpu {model}: this host's KVM cannot save {}; they will not be migrated from here",
                lacking.join(", ")
            ));
        }
        let msrs = wanted.iter().filter(|m| host.has_msr(m.index)).map(|m| (m.index, m.name)).collect();
        VmCpu {
            model: model.into(),
            vendor: vendor.into(),
            cpuid,
            msrs,
            tsc_khz,
            scale_tsc,
            kvm_rewrote: Vec::new(),
        }
    }

    /// Give vCPU `index` this CPU (before it first runs): its TSC
    /// frequency when scaled, then its CPUID. Returns the table KVM holds
    /// afterwards (KVM_GET_CPUID2).
    pub fn install(&self, vcpu: &VcpuFd, index: u8) -> Result<Vec<CpuidEntry>, CpuError> {
        let err = |what: &'static str| {
            move |e: kvm_ioctls::Error| CpuError::Install { cpu: index, what, reason: e.to_string() }
        };
        if let (true, Some(khz)) = (self.scale_tsc, self.tsc_khz) {
            vcpu.set_tsc_khz(khz).map_err(err("KVM_SET_TSC_KHZ"))?;
        }
        let table = cpuid::to_kvm(&cpuid::for_vcpu(&self.cpuid, index)).map_err(|e| match e {
            CpuError::Install { what, reason, .. } => CpuError::Install { cpu: index, what, reason },
            other => other,
        })?;
        vcpu.set_cpuid2(&table).map_err(err("KVM_SET_CPUID2"))?;
        let back = vcpu.get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES).map_err(err("KVM_GET_CPUID2"))?;
        Ok(cpuid::from_kvm(&back))
    }
}

/// Where `held` (what KVM holds after KVM_SET_CPUID2) differs from `set`
/// (what ferry set), one line per register, less the bits KVM keeps at run
/// time (OSXSAVE, the APIC enable bit, OSPKE). An ordinary KVM holds what
/// it was given; some nested or paravirtual KVMs merge in their host's
/// features.
pub fn rewritten(set: &[CpuidEntry], held: &[CpuidEntry]) -> Vec<String> {
    let runtime = |leaf: u32, reg: cpuid::Reg| match (leaf, reg) {
        (1, cpuid::Reg::Ecx) => 1u32 << 27,
        (1, cpuid::Reg::Edx) => 1 << 9,
        (7, cpuid::Reg::Ecx) => 1 << 4,
        _ => 0,
    };
    let mut out = Vec::new();
    for e in set {
        for reg in cpuid::Reg::ALL {
            let want = reg.get(e);
            let have = cpuid::value(held, e.function, e.index, reg);
            if (want ^ have) & !runtime(e.function, reg) != 0 {
                out.push(format!(
                    "{}:{} set {want:#010x}, KVM holds {have:#010x}",
                    cpuid::leaf_label(e.function, e.index),
                    reg.name()
                ));
            }
        }
    }
    for e in held {
        let added = cpuid::find(set, e.function, e.index).is_none();
        if added && cpuid::Reg::ALL.iter().any(|r| r.get(e) != 0) {
            out.push(format!("{}: not set, KVM holds one", cpuid::leaf_label(e.function, e.index)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kvm_that_rewrites_the_table_is_noticed() {
        let set =
            vec![CpuidEntry { function: 1, index: 0, flags: 0, eax: 0xf61, ebx: 0, ecx: 1 << 31, edx: 1 }];
        let mut held = set.clone();
        held[0].ecx |= 1 << 27; // OSXSAVE follows CR4: not a rewrite
        assert!(rewritten(&set, &held).is_empty());
        held[0].ecx |= 1 << 26;
        held.push(CpuidEntry { function: 0xd, index: 0, flags: 1, eax: 7, ebx: 0, ecx: 0, edx: 0 });
        assert_eq!(
            rewritten(&set, &held),
            ["CPUID.01H:ECX set 0x80000000, KVM holds 0x8c000000", "CPUID.0DH.0: not set, KVM holds one"]
        );
    }
}
