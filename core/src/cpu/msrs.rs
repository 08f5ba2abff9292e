//! The MSRs ferry migrates: a catalogue chosen by the guest's CPU, not by
//! the host.
//!
//! Each entry names the MSR, the guest CPUID feature that makes it exist
//! (an MSR the guest cannot know about is not saved: it is not part of
//! the guest), and the vendors whose CPUs have it. A vCPU saves exactly
//! the entries its guest CPUID enables, in the table's order, which is
//! also the order KVM_SET_MSRS loads them: the TSC before the TSC
//! deadline (KVM reads the deadline against the TSC), the async-PF
//! interrupt vector before async-PF enable.
//!
//! What is deliberately *not* migrated, and why, is listed in
//! [`NOT_MIGRATED`] (names only, so messages about older snapshots that
//! saved them can still name them).

use super::cpuid::{bit, Bit, CpuidEntry, Reg, AMD, INTEL};

/// Which vendors' CPUs have an MSR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every x86-64 CPU that has the feature.
    Any,
    /// Intel's only.
    Intel,
    /// AMD's only.
    Amd,
}

/// What makes an MSR exist for a guest.
#[derive(Debug, Clone, Copy)]
pub enum Needs {
    /// Any one of these guest CPUID bits.
    AnyOf(&'static [Bit]),
    /// Nothing beyond the vendor: architectural on every such CPU.
    Always,
}

/// One catalogue entry.
#[derive(Debug, Clone, Copy)]
pub struct MsrSpec {
    /// The MSR's index.
    pub index: u32,
    /// Its architectural name.
    pub name: &'static str,
    /// The guest CPUID bits that make it exist.
    pub needs: Needs,
    /// Which vendors have it.
    pub scope: Scope,
}

const TSC: Bit = bit(1, 0, Reg::Edx, 4);
const SEP: Bit = bit(1, 0, Reg::Edx, 11);
const MTRR: Bit = bit(1, 0, Reg::Edx, 12);
const MCA: Bit = bit(1, 0, Reg::Edx, 14);
const PAT: Bit = bit(1, 0, Reg::Edx, 16);
const VMX: Bit = bit(1, 0, Reg::Ecx, 5);
const SMX: Bit = bit(1, 0, Reg::Ecx, 6);
const TSC_DEADLINE: Bit = bit(1, 0, Reg::Ecx, 24);
const TSC_ADJUST: Bit = bit(7, 0, Reg::Ebx, 1);
const MPX: Bit = bit(7, 0, Reg::Ebx, 14);
const WAITPKG: Bit = bit(7, 0, Reg::Ecx, 5);
const RDPID: Bit = bit(7, 0, Reg::Ecx, 22);
const SPEC_CTRL: Bit = bit(7, 0, Reg::Edx, 26);
const SPEC_CTRL_SSBD: Bit = bit(7, 0, Reg::Edx, 31);
const XSAVES: Bit = bit(0xd, 1, Reg::Eax, 3);
const SYSCALL: Bit = bit(0x8000_0001, 0, Reg::Edx, 11);
const RDTSCP: Bit = bit(0x8000_0001, 0, Reg::Edx, 27);
const LM: Bit = bit(0x8000_0001, 0, Reg::Edx, 29);
const AMD_IBRS: Bit = bit(0x8000_0008, 0, Reg::Ebx, 14);
const AMD_STIBP: Bit = bit(0x8000_0008, 0, Reg::Ebx, 15);
const AMD_SSBD: Bit = bit(0x8000_0008, 0, Reg::Ebx, 24);
const VIRT_SSBD: Bit = bit(0x8000_0008, 0, Reg::Ebx, 25);
const KVMCLOCK: Bit = bit(0x4000_0001, 0, Reg::Eax, 0);
const KVMCLOCK2: Bit = bit(0x4000_0001, 0, Reg::Eax, 3);
const ASYNC_PF: Bit = bit(0x4000_0001, 0, Reg::Eax, 4);
const STEAL_TIME: Bit = bit(0x4000_0001, 0, Reg::Eax, 5);
const PV_EOI: Bit = bit(0x4000_0001, 0, Reg::Eax, 6);
const POLL_CONTROL: Bit = bit(0x4000_0001, 0, Reg::Eax, 12);
const ASYNC_PF_INT: Bit = bit(0x4000_0001, 0, Reg::Eax, 14);

const fn msr(index: u32, name: &'static str, needs: &'static [Bit], scope: Scope) -> MsrSpec {
    MsrSpec { index, name, needs: Needs::AnyOf(needs), scope }
}

const fn always(index: u32, name: &'static str, scope: Scope) -> MsrSpec {
    MsrSpec { index, name, needs: Needs::Always, scope }
}

/// The MSRs ferry migrates, in restore order.
pub const CATALOGUE: &[MsrSpec] = &[
    msr(0x10, "IA32_TSC", &[TSC], Scope::Any),
    msr(0x3b, "IA32_TSC_ADJUST", &[TSC_ADJUST], Scope::Any),
    msr(0x174, "IA32_SYSENTER_CS", &[SEP], Scope::Any),
    msr(0x175, "IA32_SYSENTER_ESP", &[SEP], Scope::Any),
    msr(0x176, "IA32_SYSENTER_EIP", &[SEP], Scope::Any),
    msr(0xc000_0081, "STAR", &[SYSCALL, LM], Scope::Any),
    msr(0xc000_0082, "LSTAR", &[LM], Scope::Any),
    msr(0xc000_0083, "CSTAR", &[LM], Scope::Any),
    msr(0xc000_0084, "SYSCALL_MASK", &[SYSCALL, LM], Scope::Any),
    msr(0xc000_0102, "KERNEL_GS_BASE", &[LM], Scope::Any),
    msr(0xc000_0103, "TSC_AUX", &[RDTSCP, RDPID], Scope::Any),
    msr(0x277, "IA32_PAT", &[PAT], Scope::Any),
    always(0x1a0, "IA32_MISC_ENABLE", Scope::Intel),
    always(0x140, "MISC_FEATURES_ENABLES", Scope::Intel),
    always(0xc001_0015, "HWCR", Scope::Amd),
    msr(0x3a, "IA32_FEATURE_CONTROL", &[VMX, SMX], Scope::Intel),
    msr(0x48, "IA32_SPEC_CTRL", &[SPEC_CTRL, SPEC_CTRL_SSBD, AMD_IBRS, AMD_STIBP, AMD_SSBD], Scope::Any),
    msr(0xc001_011f, "VIRT_SPEC_CTRL", &[VIRT_SSBD], Scope::Any),
    msr(0xda0, "IA32_XSS", &[XSAVES], Scope::Any),
    msr(0xd90, "IA32_BNDCFGS", &[MPX], Scope::Intel),
    msr(0xe1, "IA32_UMWAIT_CONTROL", &[WAITPKG], Scope::Intel),
    msr(0x17a, "IA32_MCG_STATUS", &[MCA], Scope::Any),
    // MTRRs: KVM keeps them for every vCPU (8 variable ranges) without
    // listing them in KVM_GET_MSR_INDEX_LIST; see KVM_EMULATES.
    msr(0x200, "IA32_MTRR_PHYSBASE0", &[MTRR], Scope::Any),
    msr(0x201, "IA32_MTRR_PHYSMASK0", &[MTRR], Scope::Any),
    msr(0x202, "IA32_MTRR_PHYSBASE1", &[MTRR], Scope::Any),
    msr(0x203, "IA32_MTRR_PHYSMASK1", &[MTRR], Scope::Any),
    msr(0x204, "IA32_MTRR_PHYSBASE2", &[MTRR], Scope::Any),
    msr(0x205, "IA32_MTRR_PHYSMASK2", &[MTRR], Scope::Any),
    msr(0x206, "IA32_MTRR_PHYSBASE3", &[MTRR], Scope::Any),
    msr(0x207, "IA32_MTRR_PHYSMASK3", &[MTRR], Scope::Any),
    msr(0x208, "IA32_MTRR_PHYSBASE4", &[MTRR], Scope::Any),
    msr(0x209, "IA32_MTRR_PHYSMASK4", &[MTRR], Scope::Any),
    msr(0x20a, "IA32_MTRR_PHYSBASE5", &[MTRR], Scope::Any),
    msr(0x20b, "IA32_MTRR_PHYSMASK5", &[MTRR], Scope::Any),
    msr(0x20c, "IA32_MTRR_PHYSBASE6", &[MTRR], Scope::Any),
    msr(0x20d, "IA32_MTRR_PHYSMASK6", &[MTRR], Scope::Any),
    msr(0x20e, "IA32_MTRR_PHYSBASE7", &[MTRR], Scope::Any),
    msr(0x20f, "IA32_MTRR_PHYSMASK7", &[MTRR], Scope::Any),
    msr(0x250, "IA32_MTRR_FIX64K_00000", &[MTRR], Scope::Any),
    msr(0x258, "IA32_MTRR_FIX16K_80000", &[MTRR], Scope::Any),
    msr(0x259, "IA32_MTRR_FIX16K_A0000", &[MTRR], Scope::Any),
    msr(0x268, "IA32_MTRR_FIX4K_C0000", &[MTRR], Scope::Any),
    msr(0x269, "IA32_MTRR_FIX4K_C8000", &[MTRR], Scope::Any),
    msr(0x26a, "IA32_MTRR_FIX4K_D0000", &[MTRR], Scope::Any),
    msr(0x26b, "IA32_MTRR_FIX4K_D8000", &[MTRR], Scope::Any),
    msr(0x26c, "IA32_MTRR_FIX4K_E0000", &[MTRR], Scope::Any),
    msr(0x26d, "IA32_MTRR_FIX4K_E8000", &[MTRR], Scope::Any),
    msr(0x26e, "IA32_MTRR_FIX4K_F0000", &[MTRR], Scope::Any),
    msr(0x26f, "IA32_MTRR_FIX4K_F8000", &[MTRR], Scope::Any),
    msr(0x2ff, "IA32_MTRR_DEF_TYPE", &[MTRR], Scope::Any),
    // KVM's paravirtual MSRs, with the feature bits of its leaf 0x40000001.
    msr(0x11, "KVM_WALL_CLOCK", &[KVMCLOCK], Scope::Any),
    msr(0x12, "KVM_SYSTEM_TIME", &[KVMCLOCK], Scope::Any),
    msr(0x4b56_4d00, "KVM_WALL_CLOCK_NEW", &[KVMCLOCK2], Scope::Any),
    msr(0x4b56_4d01, "KVM_SYSTEM_TIME_NEW", &[KVMCLOCK2], Scope::Any),
    msr(0x4b56_4d06, "KVM_ASYNC_PF_INT", &[ASYNC_PF_INT], Scope::Any),
    msr(0x4b56_4d02, "KVM_ASYNC_PF_EN", &[ASYNC_PF], Scope::Any),
    msr(0x4b56_4d07, "KVM_ASYNC_PF_ACK", &[ASYNC_PF_INT], Scope::Any),
    msr(0x4b56_4d03, "KVM_STEAL_TIME", &[STEAL_TIME], Scope::Any),
    msr(0x4b56_4d04, "KVM_PV_EOI_EN", &[PV_EOI], Scope::Any),
    msr(0x4b56_4d05, "KVM_POLL_CONTROL", &[POLL_CONTROL], Scope::Any),
    // After the TSC: KVM arms the deadline against the restored TSC.
    msr(0x6e0, "IA32_TSC_DEADLINE", &[TSC_DEADLINE], Scope::Any),
];

/// MSRs KVM saves and restores for every vCPU without listing them in
/// KVM_GET_MSR_INDEX_LIST (its MTRR emulation): part of every host's set.
pub fn kvm_emulates() -> impl Iterator<Item = u32> {
    CATALOGUE.iter().filter(|m| (0x200..=0x2ff).contains(&m.index) && m.index != 0x277).map(|m| m.index)
}

/// MSRs KVM may list that ferry does not migrate, with the reason. They
/// describe the host rather than the guest, or belong to features no ferry
/// guest is given (SMM, nested virtualization, a PMU, branch tracing).
pub const NOT_MIGRATED: &[(u32, &str, &str)] = &[
    (0x34, "MSR_SMI_COUNT", "SMM is not given to guests"),
    (0x9e, "IA32_SMBASE", "SMM is not given to guests"),
    (0x8b, "IA32_UCODE_REV", "describes the host's microcode"),
    (0xce, "MSR_PLATFORM_INFO", "describes the host"),
    (0x10a, "IA32_ARCH_CAPABILITIES", "describes the host's CPU"),
    (0x345, "IA32_PERF_CAPABILITIES", "guests get no PMU"),
    (0x122, "IA32_TSX_CTRL", "guests of ferry's models get no TSX"),
    (0x17b, "IA32_MCG_CTL", "guests get no machine-check banks"),
    (0x1d9, "IA32_DEBUGCTL", "branch tracing is not given to guests"),
    (0x1db, "LASTBRANCHFROMIP", "branch tracing is not given to guests"),
    (0x1dc, "LASTBRANCHTOIP", "branch tracing is not given to guests"),
    (0x1dd, "LASTINTFROMIP", "branch tracing is not given to guests"),
    (0x1de, "LASTINTTOIP", "branch tracing is not given to guests"),
    (0x1fc, "MSR_IA32_POWER_CTL", "describes the host's power management"),
    (0xc001_0117, "VM_HSAVE_PA", "nested virtualization is not given to guests"),
];

/// The name of an MSR, from the catalogue or the not-migrated list.
pub fn name(index: u32) -> Option<&'static str> {
    CATALOGUE
        .iter()
        .find(|m| m.index == index)
        .map(|m| m.name)
        .or_else(|| NOT_MIGRATED.iter().find(|m| m.0 == index).map(|m| m.1))
}

/// How messages name an MSR: `MSR 0x3a IA32_FEATURE_CONTROL`.
pub fn label(index: u32) -> String {
    match name(index) {
        Some(n) => format!("MSR {index:#x} {n}"),
        None => format!("MSR {index:#x}"),
    }
}

/// Is `index` in the catalogue?
pub fn is_catalogued(index: u32) -> bool {
    CATALOGUE.iter().any(|m| m.index == index)
}

/// Where an MSR sits in restore order (catalogue position; others last).
pub fn restore_rank(index: u32) -> usize {
    CATALOGUE.iter().position(|m| m.index == index).unwrap_or(CATALOGUE.len())
}

/// The catalogue entries a guest with CPUID `table` from `vendor` has.
pub fn for_guest(table: &[CpuidEntry], vendor: &str) -> Vec<&'static MsrSpec> {
    CATALOGUE
        .iter()
        .filter(|m| match m.scope {
            Scope::Any => true,
            Scope::Intel => vendor == INTEL,
            Scope::Amd => vendor == AMD,
        })
        .filter(|m| match m.needs {
            Needs::Always => true,
            Needs::AnyOf(bits) => bits.iter().any(|b| b.is_set(table)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::cpuid::CpuidEntry;

    fn table(leaf1_edx: u32, ext_edx: u32) -> Vec<CpuidEntry> {
        vec![
            CpuidEntry { function: 1, index: 0, flags: 0, eax: 0, ebx: 0, ecx: 0, edx: leaf1_edx },
            CpuidEntry { function: 0x8000_0001, index: 0, flags: 0, eax: 0, ebx: 0, ecx: 0, edx: ext_edx },
        ]
    }

    #[test]
    fn the_guest_cpu_chooses_the_msrs() {
        let none = for_guest(&table(0, 0), INTEL);
        let names: Vec<&str> = none.iter().map(|m| m.name).collect();
        assert_eq!(
            names,
            ["IA32_MISC_ENABLE", "MISC_FEATURES_ENABLES"],
            "only the vendor's architectural ones"
        );
        let amd: Vec<&str> = for_guest(&table(0, 0), AMD).iter().map(|m| m.name).collect();
        assert_eq!(amd, ["HWCR"]);

        let with_tsc_lm = for_guest(&table(1 << 4, 1 << 29), AMD);
        let idx: Vec<u32> = with_tsc_lm.iter().map(|m| m.index).collect();
        assert_eq!(idx[0], 0x10, "the TSC first");
        assert!(idx.contains(&0xc000_0082) && idx.contains(&0xc000_0102));
        assert!(!idx.contains(&0x3a), "FEATURE_CONTROL needs VMX or SMX, and Intel");
        assert!(!idx.contains(&0x200), "MTRRs need CPUID.MTRR");
        assert!(
            for_guest(&table(1 << 12, 0), INTEL).iter().filter(|m| m.name.contains("MTRR")).count() == 28
        );
    }

    #[test]
    fn restore_order_puts_the_tsc_before_its_deadline_and_async_pf_vector_before_enable() {
        assert!(restore_rank(0x10) < restore_rank(0x6e0));
        assert!(restore_rank(0x4b56_4d06) < restore_rank(0x4b56_4d02));
        assert_eq!(restore_rank(0x1234), CATALOGUE.len());
    }

    #[test]
    fn every_msr_has_one_name() {
        for (i, a) in CATALOGUE.iter().enumerate() {
            assert!(CATALOGUE[i + 1..].iter().all(|b| b.index != a.index), "{} twice", a.name);
            assert!(NOT_MIGRATED.iter().all(|n| n.0 != a.index), "{} migrated and not", a.name);
        }
        assert_eq!(label(0x3a), "MSR 0x3a IA32_FEATURE_CONTROL");
        assert_eq!(label(0x1d9), "MSR 0x1d9 IA32_DEBUGCTL");
        assert_eq!(label(0x4242), "MSR 0x4242");
        assert_eq!(kvm_emulates().count(), 28);
    }
}
