//! CPU models: what CPU a guest is given.
//!
//! - `host`: KVM's whole supported CPUID on the host the guest starts on,
//!   less what ferry cannot migrate (VMX/SVM, a PMU). The guest sees that
//!   host; it can move only to hosts that offer everything it was given.
//! - Named, versioned models (`x86-64-v1@1`, ...): exactly the CPUID the
//!   guest sees, defined here; everything outside the model is cleared. A
//!   model's features are vendor-neutral (the x86-64 psABI levels); its
//!   vendor string is the host's, because KVM runs a guest with its host's
//!   vendor semantics (SYSCALL/SYSENTER in compatibility mode, the MSRs
//!   each vendor has) and no VMM can move a running guest between vendors.
//!
//! A released model version never changes: a test pins each one's table.
//! A change is a new version (`x86-64-v2@2`) beside the old one, which
//! keeps running the guests that were started with it.

use super::{
    cpuid::{self, CpuidEntry, SIGNIFICANT_INDEX},
    host::HostCpu,
    verdict::{cpuid_problems, tsc, CpuidProblem, Tsc},
    CpuError,
};

/// A guest's CPU model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuModel {
    /// The host's CPU.
    Host,
    /// A named model.
    Named(&'static ModelDef),
}

/// One released model version.
#[derive(Debug)]
pub struct ModelDef {
    /// Family name ("x86-64-v1").
    pub name: &'static str,
    /// Version of that family's definition.
    pub version: u32,
    /// One line for `ferry machines` and the docs.
    pub summary: &'static str,
    /// The table, vendor and vCPU count not filled in yet.
    table: fn() -> Vec<CpuidEntry>,
}

/// Every released model version.
pub const MODELS: &[ModelDef] = &[
    ModelDef {
        name: "x86-64-v1",
        version: 1,
        summary: "x86-64 baseline (psABI v1: SSE2, CMOV, CX8, FXSR, NX, SYSCALL) with kvmclock",
        table: x86_64_v1_1,
    },
    ModelDef {
        name: "x86-64-v2",
        version: 1,
        summary: "x86-64-v1 + psABI v2 (SSE3, SSSE3, SSE4.1, SSE4.2, POPCNT, CX16, LAHF/SAHF)",
        table: x86_64_v2_1,
    },
    ModelDef {
        name: "x86-64-v3",
        version: 1,
        summary: "x86-64-v2 + psABI v3 (AVX, AVX2, BMI1, BMI2, FMA, F16C, LZCNT, MOVBE, XSAVE)",
        table: x86_64_v3_1,
    },
];

impl PartialEq for ModelDef {
    fn eq(&self, other: &Self) -> bool {
        (self.name, self.version) == (other.name, other.version)
    }
}

impl Eq for ModelDef {}

impl ModelDef {
    /// `name@version`.
    pub fn id(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }
}

impl CpuModel {
    /// Parse a machine type's `cpu` value: `host` or `NAME@VERSION`.
    pub fn parse(s: &str) -> Result<CpuModel, CpuError> {
        if s == "host" {
            return Ok(CpuModel::Host);
        }
        let known = || {
            std::iter::once("host".to_string())
                .chain(MODELS.iter().map(ModelDef::id))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let Some((name, version)) = s.split_once('@') else {
            if MODELS.iter().any(|m| m.name == s) {
                return Err(CpuError::Model(format!(
                    "cpu model '{s}' needs a version, such as {s}@1: a machine type pins the exact CPU"
                )));
            }
            return Err(CpuError::Model(format!("unknown cpu model '{s}' (known: {})", known())));
        };
        MODELS
            .iter()
            .find(|m| m.name == name && version.parse::<u32>().ok() == Some(m.version))
            .map(CpuModel::Named)
            .ok_or_else(|| CpuError::Model(format!("unknown cpu model '{s}' (known: {})", known())))
    }

    /// The name streams and machine types use.
    pub fn id(&self) -> String {
        match self {
            CpuModel::Host => "host".into(),
            CpuModel::Named(m) => m.id(),
        }
    }

    /// The CPUID table vCPU 0 of a `cpus`-vCPU guest gets on `host`, or
    /// why the host cannot give this model.
    pub fn guest_cpuid(&self, host: &HostCpu, cpus: u8) -> Result<Vec<CpuidEntry>, Vec<CpuidProblem>> {
        let mut t = match self {
            CpuModel::Host => host_table(&host.cpuid),
            CpuModel::Named(m) => {
                let mut t = (m.table)();
                cpuid::set_vendor(&mut t, &host.vendor);
                t
            }
        };
        topology(&mut t, cpus);
        let problems = cpuid_problems(&t, &host.cpuid);
        if problems.is_empty() {
            Ok(t)
        } else {
            Err(problems)
        }
    }
}

/// Which CPU models a guest that must move among `hosts` (name, CPU)
/// can be given: one line per model, and per reason none can.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommonModels {
    /// What was found, one line each.
    pub lines: Vec<String>,
    /// Models every host runs, between which a guest can move.
    pub portable: Vec<String>,
}

/// See [`CommonModels`].
pub fn common_models(hosts: &[(String, HostCpu)]) -> CommonModels {
    let mut lines = Vec::new();
    let mut movable = true;
    let mut vendors: Vec<(&str, Vec<&str>)> = Vec::new();
    for (name, h) in hosts {
        match vendors.iter_mut().find(|v| v.0 == h.vendor) {
            Some(v) => v.1.push(name),
            None => vendors.push((&h.vendor, vec![name])),
        }
    }
    if vendors.len() > 1 {
        movable = false;
        let groups: Vec<String> = vendors.iter().map(|(v, n)| format!("{v}: {}", n.join(", "))).collect();
        lines.push(format!(
            "CPU vendor: the hosts mix vendors ({}): no model moves a running guest between them",
            groups.join("; ")
        ));
    }
    for (a, ha) in hosts {
        for (b, hb) in hosts.iter().filter(|(b, _)| b != a) {
            if let Tsc::Refused(why) = tsc(ha.tsc_khz, hb) {
                movable = false;
                lines.push(format!(
                    "TSC frequency: a guest started on {a} cannot move to {b}: its TSC runs at {why}"
                ));
            }
        }
    }
    let mut portable = Vec::new();
    for model in MODELS.iter().map(CpuModel::Named) {
        let lacking: Vec<String> = hosts
            .iter()
            .filter_map(|(name, h)| match super::VmCpu::for_model(model, h, 1) {
                Ok(_) => None,
                Err(super::CpuError::Unavailable { missing, .. }) => {
                    Some(format!("{name} lacks {}", missing.join(", ")))
                }
                Err(e) => Some(format!("{name}: {e}")),
            })
            .collect();
        if lacking.is_empty() {
            lines.push(format!("{}: runs on every host", model.id()));
            if movable {
                portable.push(model.id());
            }
        } else {
            lines.push(format!("{}: not on every host: {}", model.id(), lacking.join("; ")));
        }
    }
    let mut host_differs = Vec::new();
    for (a, ha) in hosts {
        for (b, hb) in hosts.iter().filter(|(b, hb)| b != a && hb.vendor == ha.vendor) {
            if let Some(p) = cpuid_problems(&host_table(&ha.cpuid), &hb.cpuid).first() {
                host_differs.push(format!("{a}'s {} is not on {b}", p.subject()));
            }
        }
    }
    if host_differs.is_empty() {
        lines.push("host: every host's KVM offers the same features".to_string());
        if movable {
            portable.push("host".to_string());
        }
    } else {
        lines.push(format!("host: a guest moves only one way at best: {}", host_differs.join("; ")));
    }
    CommonModels { lines, portable }
}

/// The host model: KVM's supported CPUID less what ferry does not migrate
/// (nested virtualization, performance counters), with the hypervisor bit.
fn host_table(supported: &[CpuidEntry]) -> Vec<CpuidEntry> {
    let mut t = supported.to_vec();
    for e in &mut t {
        match e.function {
            1 => e.ecx = (e.ecx & !(1 << 5 | 1 << 6)) | 1 << 31, // no VMX, SMX; hypervisor
            0xa | 0x8000_000a | 0x8000_0022 => (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0),
            0x8000_0001 => e.ecx &= !(1 << 2 | 1 << 23 | 1 << 24 | 1 << 28), // no SVM, AMD counters
            _ => {}
        }
    }
    t
}

/// The vCPU count in leaf 1 (logical processors, HTT when more than one).
fn topology(t: &mut Vec<CpuidEntry>, cpus: u8) {
    let e = cpuid::entry_mut(t, 1, 0);
    e.ebx = (e.ebx & 0xff00_ffff) | (u32::from(cpus) << 16);
    if cpus > 1 {
        e.edx |= 1 << 28;
    } else {
        e.edx &= !(1 << 28);
    }
}

fn entry(function: u32, index: u32, regs: [u32; 4]) -> CpuidEntry {
    let flags = if cpuid::has_subleaves(function) { SIGNIFICANT_INDEX } else { 0 };
    CpuidEntry { function, index, flags, eax: regs[0], ebx: regs[1], ecx: regs[2], edx: regs[3] }
}

/// "KVMKVMKVM\0\0\0" in EBX, ECX, EDX.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

/// Family 15, model 6, stepping 1: a signature no real CPU carries, so a
/// guest applies no model-specific quirks to it (QEMU's kvm64 uses it).
const SIGNATURE: u32 = 0x0000_0f61;

/// CLFLUSH line size: 8 x 8 = 64 bytes (leaf 1 EBX[15:8]).
const CLFLUSH_64: u32 = 8 << 8;

/// FPU DE PSE TSC MSR PAE CX8 APIC SEP MTRR PGE CMOV PAT PSE36 CLFLUSH MMX
/// FXSR SSE SSE2.
const V1_LEAF1_EDX: u32 = 0x078b_bb7d;
/// SYSCALL NX LM.
const V1_EXT_EDX: u32 = 0x2010_0800;
/// kvmclock, no-IO-delay, kvmclock2.
const V1_KVM_FEATURES: u32 = 0b1011;
/// 40 physical, 48 linear address bits.
const V1_ADDRESS_BITS: u32 = 40 | (48 << 8);

fn x86_64_v1_1() -> Vec<CpuidEntry> {
    let mut t = vec![
        entry(0, 0, [7, 0, 0, 0]),
        entry(1, 0, [SIGNATURE, CLFLUSH_64, 1 << 31, V1_LEAF1_EDX]),
        entry(7, 0, [0, 0, 0, 0]),
        entry(0x4000_0000, 0, [0x4000_0001, KVM_SIGNATURE[0], KVM_SIGNATURE[1], KVM_SIGNATURE[2]]),
        entry(0x4000_0001, 0, [V1_KVM_FEATURES, 0, 0, 0]),
        entry(0x8000_0000, 0, [0x8000_0008, 0, 0, 0]),
        entry(0x8000_0001, 0, [0, 0, 0, V1_EXT_EDX]),
        entry(0x8000_0008, 0, [V1_ADDRESS_BITS, 0, 0, 0]),
    ];
    cpuid::set_brand(&mut t, "Ferry x86-64-v1@1 virtual CPU");
    t
}

/// SSE3 SSSE3 CX16 SSE4.1 SSE4.2 POPCNT.
const V2_LEAF1_ECX: u32 = 1 | 1 << 9 | 1 << 13 | 1 << 19 | 1 << 20 | 1 << 23;
/// LAHF/SAHF in long mode.
const V2_EXT_ECX: u32 = 1;

fn x86_64_v2_1() -> Vec<CpuidEntry> {
    let mut t = x86_64_v1_1();
    cpuid::entry_mut(&mut t, 1, 0).ecx |= V2_LEAF1_ECX;
    cpuid::entry_mut(&mut t, 0x8000_0001, 0).ecx |= V2_EXT_ECX;
    cpuid::set_brand(&mut t, "Ferry x86-64-v2@1 virtual CPU");
    t
}

/// FMA MOVBE XSAVE AVX F16C.
const V3_LEAF1_ECX: u32 = 1 << 12 | 1 << 22 | 1 << 26 | 1 << 28 | 1 << 29;
/// BMI1 AVX2 BMI2.
const V3_LEAF7_EBX: u32 = 1 << 3 | 1 << 5 | 1 << 8;
/// LZCNT (ABM).
const V3_EXT_ECX: u32 = 1 << 5;
/// x87, SSE and AVX state: 512 legacy + 64 header + 256 AVX bytes.
const V3_XCR0: u32 = 0b111;
const V3_XSAVE_SIZE: u32 = 832;

fn x86_64_v3_1() -> Vec<CpuidEntry> {
    let mut t = x86_64_v2_1();
    cpuid::entry_mut(&mut t, 0, 0).eax = 0xd;
    cpuid::entry_mut(&mut t, 1, 0).ecx |= V3_LEAF1_ECX;
    cpuid::entry_mut(&mut t, 7, 0).ebx |= V3_LEAF7_EBX;
    cpuid::entry_mut(&mut t, 0x8000_0001, 0).ecx |= V3_EXT_ECX;
    t.push(entry(0xd, 0, [V3_XCR0, V3_XSAVE_SIZE, V3_XSAVE_SIZE, 0]));
    t.push(entry(0xd, 1, [0, 0, 0, 0]));
    t.push(entry(0xd, 2, [256, 576, 0, 0]));
    cpuid::set_brand(&mut t, "Ferry x86-64-v3@1 virtual CPU");
    t
}

/// Register values of a model's table, for the test that keeps released
/// models from changing.
#[cfg(test)]
fn fingerprint(t: &[CpuidEntry]) -> u32 {
    let mut bytes = Vec::new();
    for e in t {
        for r in [e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx] {
            bytes.extend_from_slice(&r.to_le_bytes());
        }
    }
    crc32fast::hash(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::cpuid::{feature_by_name, value, Reg, INTEL};

    /// A host that offers every bit (for the models' own checks).
    fn generous_host() -> HostCpu {
        let mut cpuid = Vec::new();
        for (leaf, max) in [(0u32, 0x1fu32), (0x4000_0000, 0x4000_0001), (0x8000_0000, 0x8000_0008)] {
            for l in leaf..=max {
                let subs = if cpuid::has_subleaves(l) { 0..4 } else { 0..1 };
                for s in subs {
                    cpuid.push(entry(l, s, [u32::MAX; 4]));
                }
            }
        }
        cpuid::entry_mut(&mut cpuid, 0, 0).eax = 0x1f;
        cpuid::set_vendor(&mut cpuid, INTEL);
        let kvm = cpuid::entry_mut(&mut cpuid, 0x4000_0000, 0);
        (kvm.eax, kvm.ebx, kvm.ecx, kvm.edx) =
            (0x4000_0001, KVM_SIGNATURE[0], KVM_SIGNATURE[1], KVM_SIGNATURE[2]);
        cpuid::entry_mut(&mut cpuid, 0x8000_0000, 0).eax = 0x8000_0008;
        cpuid::entry_mut(&mut cpuid, 0x8000_0008, 0).eax = 52 | 57 << 8;
        let x = cpuid::entry_mut(&mut cpuid, 0xd, 2);
        (x.eax, x.ebx) = (256, 576);
        HostCpu::fake(INTEL, cpuid)
    }

    #[test]
    fn released_models_never_change() {
        // A failure here means a released model's table changed: put the
        // change in a new version instead (and add it to this list).
        let pinned =
            [("x86-64-v1@1", 0x49bc_7fb4u32), ("x86-64-v2@1", 0xdc5e_5c9c), ("x86-64-v3@1", 0x13e0_3e87)];
        for m in MODELS {
            let want = pinned.iter().find(|p| p.0 == m.id()).map(|p| p.1);
            assert_eq!(Some(fingerprint(&(m.table)())), want, "{} changed", m.id());
        }
    }

    #[test]
    fn names_parse_and_need_a_version() {
        assert_eq!(CpuModel::parse("host").unwrap(), CpuModel::Host);
        assert_eq!(CpuModel::parse("x86-64-v1@1").unwrap().id(), "x86-64-v1@1");
        let e = CpuModel::parse("x86-64-v1").unwrap_err().to_string();
        assert_eq!(
            e,
            "cpu model 'x86-64-v1' needs a version, such as x86-64-v1@1: a machine type pins the exact CPU"
        );
        let e = CpuModel::parse("x86-64-v1@9").unwrap_err().to_string();
        assert!(e.starts_with("unknown cpu model 'x86-64-v1@9' (known: host, x86-64-v1@1"), "{e}");
    }

    #[test]
    fn a_model_is_exactly_its_table_with_the_hosts_vendor() {
        let host = generous_host();
        let v1 = CpuModel::parse("x86-64-v1@1").unwrap().guest_cpuid(&host, 2).unwrap();
        assert_eq!(cpuid::vendor(&v1), INTEL);
        assert_eq!(cpuid::brand(&v1), "Ferry x86-64-v1@1 virtual CPU");
        assert_eq!(
            value(&v1, 1, 0, Reg::Ecx),
            1 << 31,
            "only the hypervisor bit, though the host offers all"
        );
        assert_eq!(value(&v1, 1, 0, Reg::Edx), V1_LEAF1_EDX | 1 << 28, "HTT with two vCPUs");
        assert_eq!((value(&v1, 1, 0, Reg::Ebx) >> 16) & 0xff, 2);
        assert_eq!(value(&v1, 7, 0, Reg::Ebx), 0);
        assert!(feature_by_name("sse2").unwrap().is_set(&v1));
        assert!(!feature_by_name("sse3").unwrap().is_set(&v1));
        let v2 = CpuModel::parse("x86-64-v2@1").unwrap().guest_cpuid(&host, 1).unwrap();
        assert!(
            feature_by_name("sse4_2").unwrap().is_set(&v2) && !feature_by_name("ht").unwrap().is_set(&v2)
        );
        let v3 = CpuModel::parse("x86-64-v3@1").unwrap().guest_cpuid(&host, 1).unwrap();
        assert!(
            feature_by_name("avx2").unwrap().is_set(&v3) && feature_by_name("xsave").unwrap().is_set(&v3)
        );
        assert_eq!(value(&v3, 0xd, 0, Reg::Ecx), V3_XSAVE_SIZE);
    }

    #[test]
    fn a_host_without_a_model_feature_is_named() {
        let mut host = generous_host();
        cpuid::entry_mut(&mut host.cpuid, 1, 0).ecx &= !(1 << 20);
        let v1 = CpuModel::parse("x86-64-v1@1").unwrap();
        assert!(v1.guest_cpuid(&host, 1).is_ok(), "v1 has no SSE4.2");
        let err = CpuModel::parse("x86-64-v2@1").unwrap().guest_cpuid(&host, 1).unwrap_err();
        let subjects: Vec<String> = err.iter().map(CpuidProblem::subject).collect();
        assert_eq!(subjects, ["CPUID.01H:ECX.sse4_2 [bit 20]"]);
        cpuid::entry_mut(&mut host.cpuid, 0x8000_0008, 0).eax = 39 | 48 << 8;
        let err = v1.guest_cpuid(&host, 1).unwrap_err();
        assert_eq!(
            err[0].to_string(),
            "CPUID.80000008H:EAX physical address bits: the guest's CPU has 40; this host's KVM offers at most 39"
        );
    }

    #[test]
    fn common_models_name_what_each_host_lacks() {
        let a = generous_host();
        let mut b = generous_host();
        cpuid::entry_mut(&mut b.cpuid, 1, 0).ecx &= !1; // no SSE3
        let r = common_models(&[("a.json".into(), a.clone()), ("b.json".into(), b.clone())]);
        assert_eq!(r.portable, ["x86-64-v1@1"]);
        assert!(r.lines.contains(&"x86-64-v1@1: runs on every host".to_string()), "{:?}", r.lines);
        assert!(r.lines.iter().any(
            |l| l.starts_with("x86-64-v2@1: not on every host: b.json lacks CPUID.01H:ECX.sse3 [bit 0]")
        ));
        assert!(r
            .lines
            .iter()
            .any(|l| l.starts_with("host: a guest moves only one way at best: a.json's CPUID.01H:ECX.sse3")));

        let mut amd = generous_host();
        amd.vendor = cpuid::AMD.into();
        let r = common_models(&[("a.json".into(), a.clone()), ("c.json".into(), amd)]);
        assert!(r.portable.is_empty());
        assert!(r.lines[0]
            .starts_with("CPU vendor: the hosts mix vendors (GenuineIntel: a.json; AuthenticAMD: c.json)"));

        let mut slow = a.clone();
        slow.tsc_khz = Some(1_000_000);
        let r = common_models(&[("a.json".into(), a), ("s.json".into(), slow)]);
        assert!(r.portable.is_empty());
        assert!(r.lines[0].starts_with("TSC frequency: a guest started on a.json cannot move to s.json: its TSC runs at 2000000 kHz; this host's runs at 1000000 kHz"), "{:?}", r.lines);
    }

    #[test]
    fn the_host_model_leaves_out_what_ferry_does_not_migrate() {
        let host = generous_host();
        let t = CpuModel::Host.guest_cpuid(&host, 1).unwrap();
        assert!(!feature_by_name("vmx").unwrap().is_set(&t));
        assert!(!feature_by_name("svm").unwrap().is_set(&t));
        assert_eq!(value(&t, 0xa, 0, Reg::Eax), 0, "no PMU");
        assert!(feature_by_name("avx512f").unwrap().is_set(&t), "everything else the host has");
    }
}
