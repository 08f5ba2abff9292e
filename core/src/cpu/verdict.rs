//! Can this host run that guest's CPU? One verdict for every path: a model
//! at boot, a snapshot before anything is restored, an incoming live
//! migration in its plan (before the source pauses), and `ferry compat`
//! offline. Each problem is one line naming the CPUID bit, MSR, vendor or
//! TSC it is about.
//!
//! CPUID is compared register by register with a rule table:
//!
//! | rule | registers | the guest's value must be |
//! |---|---|---|
//! | features | feature flags (leaf 1 ECX/EDX, leaf 7, 0xD components, 0x80000001, 0x80000007 EDX, 0x80000008 EBX, KVM's 0x40000001) | a subset of the host's (less bits ferry or KVM set themselves: hypervisor, HTT, OSXSAVE, OSPKE) |
//! | not greater | highest leaf numbers, XSAVE area size, address widths | at most the host's |
//! | equal | KVM's signature, XSAVE component sizes and offsets | the host's |
//! | ignored | identity and description (family/model, brand, cache and TLB descriptors, topology, APIC ids), PMU and SVM leaves (ferry gives neither) | anything |
//!
//! Leaves the table does not know are compared as feature flags.

use super::{
    cpuid::{self, has_subleaves, leaf_label, Bit, CpuidEntry, Reg},
    host::HostCpu,
    msrs,
};

/// How one register is compared.
#[derive(Debug, Clone, Copy)]
enum Rule {
    /// Feature flags: the guest's bits, less `ferry_sets`, must be offered.
    Features { ferry_sets: u32 },
    /// Numeric fields `(lowest bit, width, what)`: not greater than the host's.
    NotGreater(&'static [(u8, u8, &'static str)]),
    /// Must equal the host's.
    Equal(&'static str),
    /// Not a capability.
    Ignore,
}

const FEATURES: Rule = Rule::Features { ferry_sets: 0 };

fn rule(leaf: u32, sub: u32, reg: Reg) -> Rule {
    use Reg::{Eax, Ebx, Ecx, Edx};
    match (leaf, reg) {
        (0, Eax) => Rule::NotGreater(&[(0, 32, "highest basic leaf")]),
        (0, _) => Rule::Ignore, // the vendor, compared on its own
        (1, Ecx) => Rule::Features { ferry_sets: 1 << 31 | 1 << 27 }, // hypervisor, OSXSAVE
        (1, Edx) => Rule::Features { ferry_sets: 1 << 28 }, // HTT
        (1, _) => Rule::Ignore, // signature, APIC id, counts
        (2..=5, _) => Rule::Ignore, // caches, TLBs, MONITOR sizes
        (6, Eax) => FEATURES,
        (6, _) => Rule::Ignore,
        (7, Eax) if sub == 0 => Rule::NotGreater(&[(0, 32, "highest subleaf")]),
        (7, Ecx) if sub == 0 => Rule::Features { ferry_sets: 1 << 4 }, // OSPKE
        (0xa | 0xb | 0x1f, _) => Rule::Ignore,                         // PMU (not given), topology
        (0xd, Ebx) if sub <= 1 => Rule::Ignore,                        // size for the current XCR0/XSS
        (0xd, Ecx) if sub == 0 => Rule::NotGreater(&[(0, 32, "XSAVE area size in bytes")]),
        (0xd, Eax) if sub >= 2 => Rule::Equal("XSAVE component size"),
        (0xd, Ebx) if sub >= 2 => Rule::Equal("XSAVE component offset"),
        (0xd, _) if sub >= 2 => Rule::Ignore,
        (0x4000_0000, Eax) => Rule::NotGreater(&[(0, 32, "highest KVM leaf")]),
        (0x4000_0000, _) => Rule::Equal("KVM signature"),
        (0x4000_0001, Ebx | Ecx) => Rule::Ignore,
        (0x8000_0000, Eax) => Rule::NotGreater(&[(0, 32, "highest extended leaf")]),
        (0x8000_0000, _) => Rule::Ignore,
        (0x8000_0001, Eax | Ebx) => Rule::Ignore,
        (0x8000_0002..=0x8000_0006, _) => Rule::Ignore, // brand, caches
        (0x8000_0007, Edx) => FEATURES,
        (0x8000_0007, _) => Rule::Ignore,
        (0x8000_0008, Eax) => {
            Rule::NotGreater(&[(0, 8, "physical address bits"), (8, 8, "linear address bits")])
        }
        (0x8000_0008, Ecx | Edx) => Rule::Ignore, // core counts
        (
            0x8000_000a | 0x8000_0019 | 0x8000_001a | 0x8000_001d | 0x8000_001e | 0x8000_0022 | 0x8000_0026,
            _,
        ) => {
            Rule::Ignore // SVM (not given), TLB and cache descriptions, topology, PMU
        }
        _ => FEATURES,
    }
}

/// One CPUID difference that stops a guest running here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpuidProblem {
    /// A feature the guest has and the host does not offer.
    Missing(Bit),
    /// A count or size larger than the host's.
    Greater {
        /// `CPUID.80000008H:EAX`.
        register: String,
        /// What the field is.
        what: &'static str,
        /// The guest's value.
        guest: u32,
        /// The host's.
        host: u32,
    },
    /// A value that must match and does not.
    Differs {
        /// `CPUID.0DH.2:EAX`.
        register: String,
        /// What the field is.
        what: &'static str,
        /// The guest's value.
        guest: u32,
        /// The host's.
        host: u32,
    },
}

impl CpuidProblem {
    /// The bit or field it is about.
    pub fn subject(&self) -> String {
        match self {
            CpuidProblem::Missing(b) => b.describe(),
            CpuidProblem::Greater { register, what, .. } | CpuidProblem::Differs { register, what, .. } => {
                format!("{register} {what}")
            }
        }
    }
}

impl std::fmt::Display for CpuidProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CpuidProblem::Missing(b) => {
                write!(f, "{}: the guest's CPU has it; this host's KVM does not offer it", b.describe())
            }
            CpuidProblem::Greater { guest, host, .. } => write!(
                f,
                "{}: the guest's CPU has {guest}; this host's KVM offers at most {host}",
                self.subject()
            ),
            CpuidProblem::Differs { guest, host, .. } => {
                write!(f, "{}: the guest's CPU has {guest:#x}; this host's KVM has {host:#x}", self.subject())
            }
        }
    }
}

/// What in `guest` (a guest's CPUID table) `host` (KVM's supported
/// CPUID) cannot give, by the rule table.
pub fn cpuid_problems(guest: &[CpuidEntry], host: &[CpuidEntry]) -> Vec<CpuidProblem> {
    let mut out = Vec::new();
    let xsave_components = u64::from(cpuid::value(guest, 0xd, 0, Reg::Eax))
        | u64::from(cpuid::value(guest, 0xd, 0, Reg::Edx)) << 32
        | u64::from(cpuid::value(guest, 0xd, 1, Reg::Ecx))
        | u64::from(cpuid::value(guest, 0xd, 1, Reg::Edx)) << 32;
    let mut entries: Vec<&CpuidEntry> = guest.iter().collect();
    entries.sort_by_key(|e| (e.function, e.index));
    for e in entries {
        let sub = if has_subleaves(e.function) { e.index } else { 0 };
        if e.function == 0xd && sub >= 2 && (sub >= 64 || xsave_components & (1 << sub) == 0) {
            continue; // a component the guest cannot enable
        }
        for reg in Reg::ALL {
            let g = reg.get(e);
            let h = cpuid::value(host, e.function, sub, reg);
            let register = || format!("{}:{}", leaf_label(e.function, sub), reg.name());
            match rule(e.function, sub, reg) {
                Rule::Ignore => {}
                Rule::Features { ferry_sets } => {
                    let lacking = g & !ferry_sets & !h;
                    for b in (0..32u8).filter(|b| lacking & (1 << b) != 0) {
                        out.push(CpuidProblem::Missing(cpuid::bit(e.function, sub, reg, b)));
                    }
                }
                Rule::NotGreater(fields) => {
                    for &(lo, width, what) in fields {
                        let mask = if width >= 32 { u32::MAX } else { (1u32 << width) - 1 };
                        let (gv, hv) = ((g >> lo) & mask, (h >> lo) & mask);
                        if gv > hv {
                            out.push(CpuidProblem::Greater {
                                register: register(),
                                what,
                                guest: gv,
                                host: hv,
                            });
                        }
                    }
                }
                Rule::Equal(what) => {
                    if g != h {
                        out.push(CpuidProblem::Differs { register: register(), what, guest: g, host: h });
                    }
                }
            }
        }
    }
    out
}

/// A guest's CPU, as a stream records it.
#[derive(Debug, Clone)]
pub struct GuestCpu<'a> {
    /// Its model (`host`, `x86-64-v1@1`).
    pub model: String,
    /// The vendor it was started on.
    pub vendor: String,
    /// vCPU 0's CPUID.
    pub cpuid: &'a [CpuidEntry],
    /// The MSRs its vCPUs saved.
    pub msrs: &'a [u32],
    /// Its TSC frequency, if recorded.
    pub tsc_khz: Option<u32>,
    /// Written before ferry recorded CPU models: the guest is given the
    /// CPUID of the host that restores it (as then), so CPUID is not
    /// compared.
    pub legacy: bool,
    /// How messages introduce where it comes from: "the snapshot was
    /// written", "the source runs it".
    pub origin: &'a str,
}

/// Largest TSC frequency difference a guest tolerates without scaling.
pub const TSC_TOLERANCE_PPM: u64 = 250;

/// The verdict on one guest CPU for one host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuVerdict {
    /// One line per problem; empty when the host can run the guest.
    pub problems: Vec<String>,
    /// Run the vCPUs' TSC at this frequency (the host scales).
    pub scale_tsc_khz: Option<u32>,
    /// What was not checked, and why.
    pub notes: Vec<String>,
}

impl CpuVerdict {
    /// Can the host run the guest?
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// The verdict for `guest` on `host`.
pub fn check(guest: &GuestCpu<'_>, host: &HostCpu) -> CpuVerdict {
    let mut v = CpuVerdict::default();
    let from = format!("{} with cpu={} on {}", guest.origin, guest.model, guest.vendor);
    let same_vendor = guest.vendor == host.vendor;
    if !same_vendor {
        v.problems.push(format!(
            "CPU vendor: {from}; this host is {} (a running guest cannot move between CPU vendors)",
            host.vendor
        ));
    }
    if guest.legacy {
        v.notes.push(
            "CPUID not compared: written before ferry recorded CPU models; the guest gets this host's CPUID, as it did then"
                .to_string(),
        );
    } else if same_vendor {
        v.problems.extend(cpuid_problems(guest.cpuid, &host.cpuid).iter().map(ToString::to_string));
    }
    let mut seen = Vec::new();
    for &index in guest.msrs {
        if !host.has_msr(index) && !seen.contains(&index) {
            seen.push(index);
            v.problems.push(format!(
                "{}: this host's KVM does not support it ({}); {from}",
                msrs::label(index),
                host.vendor
            ));
        }
    }
    match tsc(guest.tsc_khz, host) {
        Tsc::Unrecorded => v.notes.push("TSC frequency not recorded: not compared".to_string()),
        Tsc::Same => {}
        Tsc::Scale(khz) => v.scale_tsc_khz = Some(khz),
        Tsc::Refused(why) => v.problems.push(format!("TSC frequency: {from} at {why}")),
    }
    v
}

/// What a guest TSC frequency means on a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tsc {
    /// The guest's frequency is not known.
    Unrecorded,
    /// Within tolerance.
    Same,
    /// The host runs the vCPUs' TSC at this frequency.
    Scale(u32),
    /// The guest's frequency and why the host cannot match it.
    Refused(String),
}

/// The verdict on a guest TSC of `guest_khz` for `host`.
pub fn tsc(guest_khz: Option<u32>, host: &HostCpu) -> Tsc {
    match (guest_khz, host.tsc_khz) {
        (None, _) => Tsc::Unrecorded,
        (Some(g), Some(h)) if within_tolerance(g, h) => Tsc::Same,
        (Some(g), _) if host.tsc_scaling => Tsc::Scale(g),
        (Some(g), Some(h)) => Tsc::Refused(format!(
            "{g} kHz; this host's runs at {h} kHz ({:+} ppm, more than {TSC_TOLERANCE_PPM}) and its KVM cannot \
             scale it (no KVM_CAP_TSC_CONTROL)",
            ppm(g, h)
        )),
        (Some(g), None) => {
            Tsc::Refused(format!("{g} kHz; this host's KVM does not report its own (no KVM_CAP_GET_TSC_KHZ)"))
        }
    }
}

/// `host` relative to `guest`, in parts per million.
fn ppm(guest: u32, host: u32) -> i64 {
    (i64::from(host) - i64::from(guest)) * 1_000_000 / i64::from(guest.max(1))
}

fn within_tolerance(guest: u32, host: u32) -> bool {
    ppm(guest, host).unsigned_abs() <= TSC_TOLERANCE_PPM
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::cpuid::{AMD, INTEL};

    fn e(function: u32, index: u32, regs: [u32; 4]) -> CpuidEntry {
        let flags = if has_subleaves(function) { 1 } else { 0 };
        CpuidEntry { function, index, flags, eax: regs[0], ebx: regs[1], ecx: regs[2], edx: regs[3] }
    }

    fn host_with(table: Vec<CpuidEntry>) -> HostCpu {
        let mut h = HostCpu::fake(INTEL, table);
        h.tsc_khz = Some(2_000_000);
        h
    }

    fn guest<'a>(cpuid: &'a [CpuidEntry], msrs: &'a [u32]) -> GuestCpu<'a> {
        GuestCpu {
            model: "x86-64-v1@1".into(),
            vendor: INTEL.into(),
            cpuid,
            msrs,
            tsc_khz: Some(2_000_000),
            legacy: false,
            origin: "the snapshot was written",
        }
    }

    #[test]
    fn features_must_be_offered_and_ferrys_own_bits_do_not_count() {
        let guest_t = [e(1, 0, [0xf61, 0x0002_0800, 1 << 31 | 1 << 20 | 1, 1 << 28 | 1 << 26])];
        let host_t = vec![e(1, 0, [0x906ea, 0, 1, 1 << 26])];
        let p = cpuid_problems(&guest_t, &host_t);
        assert_eq!(
            p,
            [CpuidProblem::Missing(cpuid::bit(1, 0, Reg::Ecx, 20))],
            "hypervisor, HTT, signature ignored"
        );
        assert_eq!(
            p[0].to_string(),
            "CPUID.01H:ECX.sse4_2 [bit 20]: the guest's CPU has it; this host's KVM does not offer it"
        );
    }

    #[test]
    fn counts_may_not_exceed_and_signatures_must_match() {
        let g = [
            e(0, 0, [0xd, 0, 0, 0]),
            e(0x4000_0000, 0, [0x4000_0001, 1, 2, 3]),
            e(0x8000_0008, 0, [46 | 57 << 8, 0, 0, 0]),
        ];
        let h = vec![
            e(0, 0, [0x20, 0, 0, 0]),
            e(0x4000_0000, 0, [0x4000_0001, 1, 2, 4]),
            e(0x8000_0008, 0, [40 | 48 << 8, 0, 0, 0]),
        ];
        let lines: Vec<String> = cpuid_problems(&g, &h).iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "CPUID.40000000H:EDX KVM signature: the guest's CPU has 0x3; this host's KVM has 0x4",
                "CPUID.80000008H:EAX physical address bits: the guest's CPU has 46; this host's KVM offers at most 40",
                "CPUID.80000008H:EAX linear address bits: the guest's CPU has 57; this host's KVM offers at most 48",
            ]
        );
    }

    #[test]
    fn xsave_components_the_guest_can_enable_must_have_the_same_layout() {
        let g = [e(0xd, 0, [0b111, 832, 832, 0]), e(0xd, 2, [256, 576, 0, 0]), e(0xd, 5, [64, 1088, 0, 0])];
        let h =
            vec![e(0xd, 0, [0b111, 832, 2696, 0]), e(0xd, 2, [256, 576, 0, 0]), e(0xd, 5, [64, 1152, 0, 0])];
        assert!(cpuid_problems(&g, &h).is_empty(), "component 5 is not one the guest enables");
        let h = vec![e(0xd, 0, [0b11, 576, 576, 0])];
        let lines: Vec<String> = cpuid_problems(&g, &h).iter().map(|p| p.subject()).collect();
        assert_eq!(
            lines,
            [
                "CPUID.0DH.0:EAX.avx_state [bit 2]",
                "CPUID.0DH.0:ECX XSAVE area size in bytes",
                "CPUID.0DH.2:EAX XSAVE component size",
                "CPUID.0DH.2:EBX XSAVE component offset"
            ]
        );
    }

    #[test]
    fn another_vendor_is_one_line_and_msrs_are_named() {
        let t = [e(1, 0, [0, 0, 0, 1])];
        let mut host = host_with(vec![e(1, 0, [0, 0, 0, 0])]);
        host.vendor = AMD.into();
        host.msrs.retain(|m| *m != 0x3a);
        let mut g = guest(&t, &[0x10, 0x3a]);
        g.model = "host".into();
        let v = check(&g, &host);
        assert_eq!(
            v.problems,
            [
                "CPU vendor: the snapshot was written with cpu=host on GenuineIntel; this host is AuthenticAMD \
                 (a running guest cannot move between CPU vendors)",
                "MSR 0x3a IA32_FEATURE_CONTROL: this host's KVM does not support it (AuthenticAMD); the snapshot was \
                 written with cpu=host on GenuineIntel"
            ],
            "no CPUID lines across vendors"
        );
    }

    #[test]
    fn the_tsc_must_match_within_250_ppm_unless_the_host_scales() {
        let t = [e(1, 0, [0, 0, 0, 0])];
        let mut host = host_with(t.to_vec());
        host.tsc_khz = Some(2_000_400);
        assert!(check(&guest(&t, &[]), &host).ok(), "200 ppm");
        host.tsc_khz = Some(2_020_000);
        let v = check(&guest(&t, &[]), &host);
        assert_eq!(
            v.problems,
            ["TSC frequency: the snapshot was written with cpu=x86-64-v1@1 on GenuineIntel at 2000000 kHz; this host's \
              runs at 2020000 kHz (+10000 ppm, more than 250) and its KVM cannot scale it (no KVM_CAP_TSC_CONTROL)"]
        );
        host.tsc_scaling = true;
        let v = check(&guest(&t, &[]), &host);
        assert!(v.ok());
        assert_eq!(v.scale_tsc_khz, Some(2_000_000));
    }

    #[test]
    fn a_legacy_snapshot_is_checked_for_vendor_and_msrs_only() {
        let t = [e(1, 0, [0, 0, u32::MAX, u32::MAX])];
        let host = host_with(vec![e(1, 0, [0, 0, 0, 0])]);
        let mut g = guest(&t, &[0x10]);
        (g.legacy, g.tsc_khz) = (true, None);
        let v = check(&g, &host);
        assert!(v.ok(), "{:?}", v.problems);
        assert_eq!(v.notes.len(), 2);
    }
}
