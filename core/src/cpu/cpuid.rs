//! CPUID tables as ferry keeps them: entries, registers, the names of
//! feature bits, how a bit is named in a message, and the fields that
//! differ per vCPU.
//!
//! A bit is named the way people look it up in the manuals:
//! `CPUID.01H:ECX.sse4_2 [bit 20]`, with the subleaf for leaves that have
//! subleaves (`CPUID.07H.0:EBX.avx2 [bit 5]`).

use serde::{Deserialize, Serialize};

/// One CPUID entry, as KVM takes it and as a stream records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    /// Leaf (EAX on input).
    pub function: u32,
    /// Subleaf (ECX on input), meaningful when `flags` says so.
    pub index: u32,
    /// KVM flags (`SIGNIFICANT_INDEX`).
    pub flags: u32,
    /// Output registers.
    pub eax: u32,
    /// Output registers.
    pub ebx: u32,
    /// Output registers.
    pub ecx: u32,
    /// Output registers.
    pub edx: u32,
}

/// KVM_CPUID_FLAG_SIGNIFCANT_INDEX: the entry is for one subleaf only.
pub const SIGNIFICANT_INDEX: u32 = 1;

/// An output register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reg {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

impl Reg {
    /// All four, in order.
    pub const ALL: [Reg; 4] = [Reg::Eax, Reg::Ebx, Reg::Ecx, Reg::Edx];

    /// "EAX" .. "EDX".
    pub fn name(self) -> &'static str {
        match self {
            Reg::Eax => "EAX",
            Reg::Ebx => "EBX",
            Reg::Ecx => "ECX",
            Reg::Edx => "EDX",
        }
    }

    /// The register's value in `e`.
    pub fn get(self, e: &CpuidEntry) -> u32 {
        match self {
            Reg::Eax => e.eax,
            Reg::Ebx => e.ebx,
            Reg::Ecx => e.ecx,
            Reg::Edx => e.edx,
        }
    }

    /// Set the register in `e`.
    pub fn set(self, e: &mut CpuidEntry, value: u32) {
        match self {
            Reg::Eax => e.eax = value,
            Reg::Ebx => e.ebx = value,
            Reg::Ecx => e.ecx = value,
            Reg::Edx => e.edx = value,
        }
    }

    /// Parse "eax" .. "edx" (any case).
    pub fn parse(s: &str) -> Option<Reg> {
        match s.to_ascii_lowercase().as_str() {
            "eax" => Some(Reg::Eax),
            "ebx" => Some(Reg::Ebx),
            "ecx" => Some(Reg::Ecx),
            "edx" => Some(Reg::Edx),
            _ => None,
        }
    }
}

/// One feature bit: leaf, subleaf, register, bit number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bit {
    /// Leaf.
    pub leaf: u32,
    /// Subleaf.
    pub sub: u32,
    /// Register.
    pub reg: Reg,
    /// Bit number, 0..=31.
    pub bit: u8,
}

/// A feature bit, for tables.
pub const fn bit(leaf: u32, sub: u32, reg: Reg, bit: u8) -> Bit {
    Bit { leaf, sub, reg, bit }
}

impl Bit {
    /// The bit's mask in its register.
    pub fn mask(self) -> u32 {
        1u32 << self.bit
    }

    /// Is the bit set in `table`?
    pub fn is_set(self, table: &[CpuidEntry]) -> bool {
        value(table, self.leaf, self.sub, self.reg) & self.mask() != 0
    }

    /// How messages name it: `CPUID.01H:ECX.sse4_2 [bit 20]`.
    pub fn describe(self) -> String {
        let name = feature_name(self).map(|n| format!(".{n}")).unwrap_or_default();
        format!("{}:{}{name} [bit {}]", leaf_label(self.leaf, self.sub), self.reg.name(), self.bit)
    }
}

/// Leaves whose subleaf selects different data.
pub fn has_subleaves(leaf: u32) -> bool {
    matches!(
        leaf,
        4 | 7
            | 0xb
            | 0xd
            | 0xf
            | 0x10
            | 0x12
            | 0x14
            | 0x17
            | 0x18
            | 0x1d
            | 0x1e
            | 0x1f
            | 0x20
            | 0x23
            | 0x24
            | 0x8000_001d
            | 0x8000_0020
            | 0x8000_0026
    )
}

/// `CPUID.01H`, `CPUID.07H.0`, `CPUID.80000008H`.
pub fn leaf_label(leaf: u32, sub: u32) -> String {
    if has_subleaves(leaf) {
        format!("CPUID.{leaf:02X}H.{sub}")
    } else {
        format!("CPUID.{leaf:02X}H")
    }
}

/// The entry KVM would use for (leaf, subleaf): an exact match, or the
/// leaf's only entry when its subleaf does not matter.
pub fn find(table: &[CpuidEntry], leaf: u32, sub: u32) -> Option<&CpuidEntry> {
    table.iter().find(|e| e.function == leaf && (e.index == sub || e.flags & SIGNIFICANT_INDEX == 0))
}

/// A register's value (0 when the leaf is absent, as KVM answers for a
/// leaf in range with no entry).
pub fn value(table: &[CpuidEntry], leaf: u32, sub: u32, reg: Reg) -> u32 {
    find(table, leaf, sub).map(|e| reg.get(e)).unwrap_or(0)
}

/// Mutable access to an entry, added (zeroed) when missing.
pub fn entry_mut(table: &mut Vec<CpuidEntry>, leaf: u32, sub: u32) -> &mut CpuidEntry {
    let at =
        table.iter().position(|e| e.function == leaf && (e.index == sub || e.flags & SIGNIFICANT_INDEX == 0));
    let at = match at {
        Some(i) => i,
        None => {
            let flags = if has_subleaves(leaf) { SIGNIFICANT_INDEX } else { 0 };
            table.push(CpuidEntry { function: leaf, index: sub, flags, eax: 0, ebx: 0, ecx: 0, edx: 0 });
            table.len() - 1
        }
    };
    &mut table[at]
}

/// The vendor string of leaf 0 ("GenuineIntel", "AuthenticAMD", ...).
pub fn vendor(table: &[CpuidEntry]) -> String {
    let Some(e) = find(table, 0, 0) else { return String::new() };
    let bytes: Vec<u8> = [e.ebx, e.edx, e.ecx].iter().flat_map(|r| r.to_le_bytes()).collect();
    String::from_utf8_lossy(&bytes).trim_end_matches('\0').to_string()
}

/// Write a 12-byte vendor string into leaf 0.
pub fn set_vendor(table: &mut Vec<CpuidEntry>, vendor: &str) {
    let mut b = [0u8; 12];
    for (d, s) in b.iter_mut().zip(vendor.bytes()) {
        *d = s;
    }
    let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let e = entry_mut(table, 0, 0);
    (e.ebx, e.edx, e.ecx) = (word(0), word(4), word(8));
}

/// Write the processor brand string (leaves 0x80000002..4, 48 bytes).
pub fn set_brand(table: &mut Vec<CpuidEntry>, brand: &str) {
    let mut b = [0u8; 48];
    for (d, s) in b.iter_mut().zip(brand.bytes().take(47)) {
        *d = s;
    }
    for (n, chunk) in b.chunks(16).enumerate() {
        let w = |i: usize| u32::from_le_bytes([chunk[i], chunk[i + 1], chunk[i + 2], chunk[i + 3]]);
        let e = entry_mut(table, 0x8000_0002 + n as u32, 0);
        (e.eax, e.ebx, e.ecx, e.edx) = (w(0), w(4), w(8), w(12));
    }
}

/// The brand string, if the table has one.
pub fn brand(table: &[CpuidEntry]) -> String {
    let bytes: Vec<u8> = (0x8000_0002..=0x8000_0004u32)
        .flat_map(|leaf| Reg::ALL.map(|r| value(table, leaf, 0, r)))
        .flat_map(u32::to_le_bytes)
        .collect();
    String::from_utf8_lossy(&bytes).trim_end_matches('\0').trim().to_string()
}

/// Vendors ferry tells apart.
pub const INTEL: &str = "GenuineIntel";
/// AMD's vendor string.
pub const AMD: &str = "AuthenticAMD";

/// vCPU `index`'s copy of a VM's table: the same CPU with its own APIC
/// id (leaf 1 EBX[31:24], the x2APIC id of leaves 0xB/0x1F, AMD's
/// extended APIC id of leaf 0x8000001E).
pub fn for_vcpu(table: &[CpuidEntry], index: u8) -> Vec<CpuidEntry> {
    let mut t = table.to_vec();
    for e in &mut t {
        match e.function {
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | (u32::from(index) << 24),
            0xb | 0x1f => e.edx = u32::from(index),
            0x8000_001e => e.eax = u32::from(index),
            _ => {}
        }
    }
    t
}

/// The table as KVM's FAM wrapper, for KVM_SET_CPUID2.
pub fn to_kvm(table: &[CpuidEntry]) -> Result<kvm_bindings::CpuId, super::CpuError> {
    let entries: Vec<kvm_bindings::kvm_cpuid_entry2> = table
        .iter()
        .map(|e| kvm_bindings::kvm_cpuid_entry2 {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
            ..Default::default()
        })
        .collect();
    kvm_bindings::CpuId::from_entries(&entries).map_err(|e| super::CpuError::Install {
        cpu: 0,
        what: "CPUID",
        reason: format!("a table of {} entries: {e:?}", table.len()),
    })
}

/// KVM's table as entries.
pub fn from_kvm(table: &kvm_bindings::CpuId) -> Vec<CpuidEntry> {
    table
        .as_slice()
        .iter()
        .map(|e| CpuidEntry {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        })
        .collect()
}

/// The name of a feature bit, where it has one (the names Linux shows in
/// /proc/cpuinfo, lower case).
pub fn feature_name(b: Bit) -> Option<&'static str> {
    let sub = if has_subleaves(b.leaf) { b.sub } else { 0 };
    FEATURES
        .iter()
        .find(|(leaf, s, reg, bit, _)| *leaf == b.leaf && *s == sub && *reg == b.reg && *bit == b.bit)
        .map(|f| f.4)
}

/// A feature bit by name ("sse2", "lm", "x2apic"), for the test-only host
/// disguise and for tests.
pub fn feature_by_name(name: &str) -> Option<Bit> {
    FEATURES.iter().find(|f| f.4 == name).map(|&(leaf, sub, reg, b, _)| bit(leaf, sub, reg, b))
}

use Reg::{Eax, Ebx, Ecx, Edx};

/// (leaf, subleaf, register, bit, name).
const FEATURES: &[(u32, u32, Reg, u8, &str)] = &[
    // Leaf 1 EDX.
    (1, 0, Edx, 0, "fpu"),
    (1, 0, Edx, 1, "vme"),
    (1, 0, Edx, 2, "de"),
    (1, 0, Edx, 3, "pse"),
    (1, 0, Edx, 4, "tsc"),
    (1, 0, Edx, 5, "msr"),
    (1, 0, Edx, 6, "pae"),
    (1, 0, Edx, 7, "mce"),
    (1, 0, Edx, 8, "cx8"),
    (1, 0, Edx, 9, "apic"),
    (1, 0, Edx, 11, "sep"),
    (1, 0, Edx, 12, "mtrr"),
    (1, 0, Edx, 13, "pge"),
    (1, 0, Edx, 14, "mca"),
    (1, 0, Edx, 15, "cmov"),
    (1, 0, Edx, 16, "pat"),
    (1, 0, Edx, 17, "pse36"),
    (1, 0, Edx, 18, "pn"),
    (1, 0, Edx, 19, "clflush"),
    (1, 0, Edx, 21, "dts"),
    (1, 0, Edx, 22, "acpi"),
    (1, 0, Edx, 23, "mmx"),
    (1, 0, Edx, 24, "fxsr"),
    (1, 0, Edx, 25, "sse"),
    (1, 0, Edx, 26, "sse2"),
    (1, 0, Edx, 27, "ss"),
    (1, 0, Edx, 28, "ht"),
    (1, 0, Edx, 29, "tm"),
    (1, 0, Edx, 31, "pbe"),
    // Leaf 1 ECX.
    (1, 0, Ecx, 0, "sse3"),
    (1, 0, Ecx, 1, "pclmulqdq"),
    (1, 0, Ecx, 2, "dtes64"),
    (1, 0, Ecx, 3, "monitor"),
    (1, 0, Ecx, 4, "ds_cpl"),
    (1, 0, Ecx, 5, "vmx"),
    (1, 0, Ecx, 6, "smx"),
    (1, 0, Ecx, 7, "est"),
    (1, 0, Ecx, 8, "tm2"),
    (1, 0, Ecx, 9, "ssse3"),
    (1, 0, Ecx, 10, "cid"),
    (1, 0, Ecx, 11, "sdbg"),
    (1, 0, Ecx, 12, "fma"),
    (1, 0, Ecx, 13, "cx16"),
    (1, 0, Ecx, 14, "xtpr"),
    (1, 0, Ecx, 15, "pdcm"),
    (1, 0, Ecx, 17, "pcid"),
    (1, 0, Ecx, 18, "dca"),
    (1, 0, Ecx, 19, "sse4_1"),
    (1, 0, Ecx, 20, "sse4_2"),
    (1, 0, Ecx, 21, "x2apic"),
    (1, 0, Ecx, 22, "movbe"),
    (1, 0, Ecx, 23, "popcnt"),
    (1, 0, Ecx, 24, "tsc_deadline_timer"),
    (1, 0, Ecx, 25, "aes"),
    (1, 0, Ecx, 26, "xsave"),
    (1, 0, Ecx, 27, "osxsave"),
    (1, 0, Ecx, 28, "avx"),
    (1, 0, Ecx, 29, "f16c"),
    (1, 0, Ecx, 30, "rdrand"),
    (1, 0, Ecx, 31, "hypervisor"),
    // Leaf 6 EAX.
    (6, 0, Eax, 2, "arat"),
    // Leaf 7.0 EBX.
    (7, 0, Ebx, 0, "fsgsbase"),
    (7, 0, Ebx, 1, "tsc_adjust"),
    (7, 0, Ebx, 2, "sgx"),
    (7, 0, Ebx, 3, "bmi1"),
    (7, 0, Ebx, 4, "hle"),
    (7, 0, Ebx, 5, "avx2"),
    (7, 0, Ebx, 6, "fdp_excptn_only"),
    (7, 0, Ebx, 7, "smep"),
    (7, 0, Ebx, 8, "bmi2"),
    (7, 0, Ebx, 9, "erms"),
    (7, 0, Ebx, 10, "invpcid"),
    (7, 0, Ebx, 11, "rtm"),
    (7, 0, Ebx, 12, "cqm"),
    (7, 0, Ebx, 13, "zero_fcs_fds"),
    (7, 0, Ebx, 14, "mpx"),
    (7, 0, Ebx, 15, "rdt_a"),
    (7, 0, Ebx, 16, "avx512f"),
    (7, 0, Ebx, 17, "avx512dq"),
    (7, 0, Ebx, 18, "rdseed"),
    (7, 0, Ebx, 19, "adx"),
    (7, 0, Ebx, 20, "smap"),
    (7, 0, Ebx, 21, "avx512ifma"),
    (7, 0, Ebx, 23, "clflushopt"),
    (7, 0, Ebx, 24, "clwb"),
    (7, 0, Ebx, 25, "intel_pt"),
    (7, 0, Ebx, 26, "avx512pf"),
    (7, 0, Ebx, 27, "avx512er"),
    (7, 0, Ebx, 28, "avx512cd"),
    (7, 0, Ebx, 29, "sha_ni"),
    (7, 0, Ebx, 30, "avx512bw"),
    (7, 0, Ebx, 31, "avx512vl"),
    // Leaf 7.0 ECX.
    (7, 0, Ecx, 0, "prefetchwt1"),
    (7, 0, Ecx, 1, "avx512vbmi"),
    (7, 0, Ecx, 2, "umip"),
    (7, 0, Ecx, 3, "pku"),
    (7, 0, Ecx, 4, "ospke"),
    (7, 0, Ecx, 5, "waitpkg"),
    (7, 0, Ecx, 6, "avx512_vbmi2"),
    (7, 0, Ecx, 7, "cet_ss"),
    (7, 0, Ecx, 8, "gfni"),
    (7, 0, Ecx, 9, "vaes"),
    (7, 0, Ecx, 10, "vpclmulqdq"),
    (7, 0, Ecx, 11, "avx512_vnni"),
    (7, 0, Ecx, 12, "avx512_bitalg"),
    (7, 0, Ecx, 13, "tme"),
    (7, 0, Ecx, 14, "avx512_vpopcntdq"),
    (7, 0, Ecx, 16, "la57"),
    (7, 0, Ecx, 22, "rdpid"),
    (7, 0, Ecx, 23, "kl"),
    (7, 0, Ecx, 24, "bus_lock_detect"),
    (7, 0, Ecx, 25, "cldemote"),
    (7, 0, Ecx, 27, "movdiri"),
    (7, 0, Ecx, 28, "movdir64b"),
    (7, 0, Ecx, 29, "enqcmd"),
    (7, 0, Ecx, 30, "sgx_lc"),
    (7, 0, Ecx, 31, "pks"),
    // Leaf 7.0 EDX.
    (7, 0, Edx, 2, "avx512_4vnniw"),
    (7, 0, Edx, 3, "avx512_4fmaps"),
    (7, 0, Edx, 4, "fsrm"),
    (7, 0, Edx, 5, "uintr"),
    (7, 0, Edx, 8, "avx512_vp2intersect"),
    (7, 0, Edx, 9, "srbds_ctrl"),
    (7, 0, Edx, 10, "md_clear"),
    (7, 0, Edx, 11, "rtm_always_abort"),
    (7, 0, Edx, 13, "tsx_force_abort"),
    (7, 0, Edx, 14, "serialize"),
    (7, 0, Edx, 15, "hybrid_cpu"),
    (7, 0, Edx, 16, "tsxldtrk"),
    (7, 0, Edx, 18, "pconfig"),
    (7, 0, Edx, 19, "arch_lbr"),
    (7, 0, Edx, 20, "ibt"),
    (7, 0, Edx, 22, "amx_bf16"),
    (7, 0, Edx, 23, "avx512_fp16"),
    (7, 0, Edx, 24, "amx_tile"),
    (7, 0, Edx, 25, "amx_int8"),
    (7, 0, Edx, 26, "spec_ctrl"),
    (7, 0, Edx, 27, "intel_stibp"),
    (7, 0, Edx, 28, "flush_l1d"),
    (7, 0, Edx, 29, "arch_capabilities"),
    (7, 0, Edx, 30, "core_capabilities"),
    (7, 0, Edx, 31, "spec_ctrl_ssbd"),
    // Leaf 7.1 EAX.
    (7, 1, Eax, 4, "avx_vnni"),
    (7, 1, Eax, 5, "avx512_bf16"),
    (7, 1, Eax, 10, "fzrm"),
    (7, 1, Eax, 11, "fsrs"),
    (7, 1, Eax, 12, "fsrc"),
    (7, 1, Eax, 22, "hreset"),
    (7, 1, Eax, 26, "lam"),
    // Leaf 0xD.0 EAX: the XSAVE components XCR0 may enable.
    (0xd, 0, Eax, 0, "x87"),
    (0xd, 0, Eax, 1, "sse_state"),
    (0xd, 0, Eax, 2, "avx_state"),
    (0xd, 0, Eax, 3, "bndregs"),
    (0xd, 0, Eax, 4, "bndcsr"),
    (0xd, 0, Eax, 5, "opmask"),
    (0xd, 0, Eax, 6, "zmm_hi256"),
    (0xd, 0, Eax, 7, "hi16_zmm"),
    (0xd, 0, Eax, 9, "pkru"),
    (0xd, 0, Eax, 17, "xtilecfg"),
    (0xd, 0, Eax, 18, "xtiledata"),
    // Leaf 0xD.1 EAX.
    (0xd, 1, Eax, 0, "xsaveopt"),
    (0xd, 1, Eax, 1, "xsavec"),
    (0xd, 1, Eax, 2, "xgetbv1"),
    (0xd, 1, Eax, 3, "xsaves"),
    (0xd, 1, Eax, 4, "xfd"),
    // KVM's leaf 0x40000001 EAX.
    (0x4000_0001, 0, Eax, 0, "kvmclock"),
    (0x4000_0001, 0, Eax, 1, "kvm_nopiodelay"),
    (0x4000_0001, 0, Eax, 2, "kvm_mmu"),
    (0x4000_0001, 0, Eax, 3, "kvmclock2"),
    (0x4000_0001, 0, Eax, 4, "kvm_async_pf"),
    (0x4000_0001, 0, Eax, 5, "kvm_steal_time"),
    (0x4000_0001, 0, Eax, 6, "kvm_pv_eoi"),
    (0x4000_0001, 0, Eax, 7, "kvm_pv_unhalt"),
    (0x4000_0001, 0, Eax, 9, "kvm_pv_tlb_flush"),
    (0x4000_0001, 0, Eax, 10, "kvm_async_pf_vmexit"),
    (0x4000_0001, 0, Eax, 11, "kvm_pv_send_ipi"),
    (0x4000_0001, 0, Eax, 12, "kvm_poll_control"),
    (0x4000_0001, 0, Eax, 13, "kvm_pv_sched_yield"),
    (0x4000_0001, 0, Eax, 14, "kvm_async_pf_int"),
    (0x4000_0001, 0, Eax, 15, "kvm_msi_ext_dest_id"),
    (0x4000_0001, 0, Eax, 16, "kvm_hc_map_gpa_range"),
    (0x4000_0001, 0, Eax, 17, "kvm_migration_control"),
    (0x4000_0001, 0, Eax, 24, "kvmclock_stable_bit"),
    // Leaf 0x80000001 ECX.
    (0x8000_0001, 0, Ecx, 0, "lahf_lm"),
    (0x8000_0001, 0, Ecx, 1, "cmp_legacy"),
    (0x8000_0001, 0, Ecx, 2, "svm"),
    (0x8000_0001, 0, Ecx, 3, "extapic"),
    (0x8000_0001, 0, Ecx, 4, "cr8_legacy"),
    (0x8000_0001, 0, Ecx, 5, "abm"),
    (0x8000_0001, 0, Ecx, 6, "sse4a"),
    (0x8000_0001, 0, Ecx, 7, "misalignsse"),
    (0x8000_0001, 0, Ecx, 8, "3dnowprefetch"),
    (0x8000_0001, 0, Ecx, 9, "osvw"),
    (0x8000_0001, 0, Ecx, 10, "ibs"),
    (0x8000_0001, 0, Ecx, 11, "xop"),
    (0x8000_0001, 0, Ecx, 12, "skinit"),
    (0x8000_0001, 0, Ecx, 13, "wdt"),
    (0x8000_0001, 0, Ecx, 15, "lwp"),
    (0x8000_0001, 0, Ecx, 16, "fma4"),
    (0x8000_0001, 0, Ecx, 17, "tce"),
    (0x8000_0001, 0, Ecx, 19, "nodeid_msr"),
    (0x8000_0001, 0, Ecx, 21, "tbm"),
    (0x8000_0001, 0, Ecx, 22, "topoext"),
    (0x8000_0001, 0, Ecx, 23, "perfctr_core"),
    (0x8000_0001, 0, Ecx, 24, "perfctr_nb"),
    (0x8000_0001, 0, Ecx, 26, "bpext"),
    (0x8000_0001, 0, Ecx, 27, "ptsc"),
    (0x8000_0001, 0, Ecx, 28, "perfctr_llc"),
    (0x8000_0001, 0, Ecx, 29, "mwaitx"),
    // Leaf 0x80000001 EDX (AMD repeats several leaf 1 EDX bits here).
    (0x8000_0001, 0, Edx, 0, "fpu"),
    (0x8000_0001, 0, Edx, 1, "vme"),
    (0x8000_0001, 0, Edx, 2, "de"),
    (0x8000_0001, 0, Edx, 3, "pse"),
    (0x8000_0001, 0, Edx, 4, "tsc"),
    (0x8000_0001, 0, Edx, 5, "msr"),
    (0x8000_0001, 0, Edx, 6, "pae"),
    (0x8000_0001, 0, Edx, 7, "mce"),
    (0x8000_0001, 0, Edx, 8, "cx8"),
    (0x8000_0001, 0, Edx, 9, "apic"),
    (0x8000_0001, 0, Edx, 11, "syscall"),
    (0x8000_0001, 0, Edx, 12, "mtrr"),
    (0x8000_0001, 0, Edx, 13, "pge"),
    (0x8000_0001, 0, Edx, 14, "mca"),
    (0x8000_0001, 0, Edx, 15, "cmov"),
    (0x8000_0001, 0, Edx, 16, "pat"),
    (0x8000_0001, 0, Edx, 17, "pse36"),
    (0x8000_0001, 0, Edx, 19, "mp"),
    (0x8000_0001, 0, Edx, 20, "nx"),
    (0x8000_0001, 0, Edx, 22, "mmxext"),
    (0x8000_0001, 0, Edx, 23, "mmx"),
    (0x8000_0001, 0, Edx, 24, "fxsr"),
    (0x8000_0001, 0, Edx, 25, "fxsr_opt"),
    (0x8000_0001, 0, Edx, 26, "pdpe1gb"),
    (0x8000_0001, 0, Edx, 27, "rdtscp"),
    (0x8000_0001, 0, Edx, 29, "lm"),
    (0x8000_0001, 0, Edx, 30, "3dnowext"),
    (0x8000_0001, 0, Edx, 31, "3dnow"),
    // Leaf 0x80000007 EDX.
    (0x8000_0007, 0, Edx, 8, "invtsc"),
    // Leaf 0x80000008 EBX.
    (0x8000_0008, 0, Ebx, 0, "clzero"),
    (0x8000_0008, 0, Ebx, 1, "irperf"),
    (0x8000_0008, 0, Ebx, 2, "xsaveerptr"),
    (0x8000_0008, 0, Ebx, 4, "rdpru"),
    (0x8000_0008, 0, Ebx, 9, "wbnoinvd"),
    (0x8000_0008, 0, Ebx, 12, "amd_ibpb"),
    (0x8000_0008, 0, Ebx, 14, "amd_ibrs"),
    (0x8000_0008, 0, Ebx, 15, "amd_stibp"),
    (0x8000_0008, 0, Ebx, 17, "amd_stibp_always_on"),
    (0x8000_0008, 0, Ebx, 19, "amd_ibrs_same_mode"),
    (0x8000_0008, 0, Ebx, 24, "amd_ssbd"),
    (0x8000_0008, 0, Ebx, 25, "virt_ssbd"),
    (0x8000_0008, 0, Ebx, 26, "amd_ssb_no"),
    (0x8000_0008, 0, Ebx, 27, "cppc"),
    (0x8000_0008, 0, Ebx, 28, "amd_psfd"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_are_named_as_the_manuals_do() {
        assert_eq!(bit(1, 0, Ecx, 20).describe(), "CPUID.01H:ECX.sse4_2 [bit 20]");
        assert_eq!(bit(7, 0, Ebx, 5).describe(), "CPUID.07H.0:EBX.avx2 [bit 5]");
        assert_eq!(bit(0x8000_0001, 0, Edx, 29).describe(), "CPUID.80000001H:EDX.lm [bit 29]");
        assert_eq!(bit(7, 0, Ebx, 22).describe(), "CPUID.07H.0:EBX [bit 22]", "an unnamed bit");
        assert_eq!(feature_by_name("sse2"), Some(bit(1, 0, Edx, 26)));
    }

    #[test]
    fn names_are_unique_per_register() {
        for (i, a) in FEATURES.iter().enumerate() {
            for b in &FEATURES[i + 1..] {
                assert!((a.0, a.1, a.2, a.3) != (b.0, b.1, b.2, b.3), "bit listed twice: {a:?}");
            }
        }
    }

    #[test]
    fn vendor_and_brand_round_trip() {
        let mut t = Vec::new();
        set_vendor(&mut t, AMD);
        assert_eq!(vendor(&t), AMD);
        set_vendor(&mut t, INTEL);
        assert_eq!(vendor(&t), INTEL);
        assert_eq!(t.len(), 1);
        set_brand(&mut t, "Ferry test CPU");
        assert_eq!(brand(&t), "Ferry test CPU");
    }

    #[test]
    fn each_vcpu_gets_its_own_apic_id_and_nothing_else_changes() {
        let t = vec![
            CpuidEntry { function: 1, index: 0, flags: 0, eax: 0xf61, ebx: 0x0004_0800, ecx: 1, edx: 2 },
            CpuidEntry { function: 0xb, index: 0, flags: 1, eax: 0, ebx: 1, ecx: 0x100, edx: 0 },
        ];
        let v3 = for_vcpu(&t, 3);
        assert_eq!(v3[0].ebx, 0x0304_0800);
        assert_eq!(v3[1].edx, 3);
        assert_eq!((v3[0].eax, v3[0].ecx, v3[0].edx, v3[1].ebx), (0xf61, 1, 2, 1));
    }

    #[test]
    fn lookups_respect_subleaves() {
        let t = vec![
            CpuidEntry { function: 7, index: 0, flags: 1, eax: 1, ebx: 2, ecx: 0, edx: 0 },
            CpuidEntry { function: 7, index: 1, flags: 1, eax: 3, ebx: 0, ecx: 0, edx: 0 },
            CpuidEntry { function: 1, index: 0, flags: 0, eax: 9, ebx: 0, ecx: 0, edx: 0 },
        ];
        assert_eq!(value(&t, 7, 1, Eax), 3);
        assert_eq!(value(&t, 7, 2, Eax), 0);
        assert_eq!(value(&t, 1, 5, Eax), 9, "leaf 1 ignores the subleaf");
        assert_eq!(value(&t, 0x8000_0001, 0, Edx), 0, "absent leaves read as zero");
    }
}
