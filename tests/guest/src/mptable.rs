//! Intel MultiProcessor Specification 1.4 table discovery.
//!
//! The MP floating pointer structure ("_MP_", 16 bytes, 16-byte aligned,
//! bytes sum to 0) lives in the first KiB of the EBDA (segment in the BDA
//! word at 0x40E), the last KiB of base memory (KiB count in the BDA word
//! at 0x413; 639 KiB if unset), or the BIOS ROM area 0xF0000-0xFFFFF.
//! Offset 4 holds the physical address of the configuration table
//! ("PCMP"; offset 4 u16 base length, 7 checksum, 34 u16 entry count,
//! 36 u32 LAPIC address, entries from offset 44). Entry type 0 (processor,
//! 20 bytes: 1 APIC ID, 3 flags with bit 0 = enabled); types 1-4 (bus,
//! I/O APIC, I/O interrupt, local interrupt) are 8 bytes.
//! A pointer of 0 selects a "default configuration" (two CPUs).

use core::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

/// Upper bound on CPUs tracked (APIC IDs are 8-bit in xAPIC mode).
pub const MAX_CPUS: usize = 64;

const FP_SIGNATURE: u32 = u32::from_le_bytes(*b"_MP_");
const CT_SIGNATURE: u32 = u32::from_le_bytes(*b"PCMP");

static CPU_COUNT: AtomicUsize = AtomicUsize::new(1);
static APIC_IDS: [AtomicU8; MAX_CPUS] = [const { AtomicU8::new(0) }; MAX_CPUS];

/// Number of enabled processors (1 when no MP table was found).
pub fn cpu_count() -> usize {
    CPU_COUNT.load(Ordering::Relaxed)
}

/// APIC ID of the `i`-th enabled processor entry.
pub fn apic_id(i: usize) -> u8 {
    APIC_IDS[i].load(Ordering::Relaxed)
}

fn read8(addr: u64) -> u8 {
    // SAFETY: only called for addresses below 1 MiB or inside an MP table
    // the firmware/VMM placed in RAM; all identity-mapped and readable.
    unsafe { (addr as *const u8).read_volatile() }
}

fn read16(addr: u64) -> u16 {
    u16::from_le_bytes([read8(addr), read8(addr + 1)])
}

fn read32(addr: u64) -> u32 {
    // SAFETY: as for `read8`; unaligned reads are fine on x86.
    unsafe { (addr as *const u32).read_unaligned() }
}

fn checksum_ok(addr: u64, len: u64) -> bool {
    (0..len).fold(0u8, |sum, i| sum.wrapping_add(read8(addr + i))) == 0
}

/// Scans `[start, start + len)` at 16-byte steps for a valid "_MP_".
fn scan(start: u64, len: u64) -> Option<u64> {
    (start..start + len).step_by(16).find(|&a| {
        read32(a) == FP_SIGNATURE && {
            let units = u64::from(read8(a + 8)); // length in 16-byte units
            units >= 1 && checksum_ok(a, units * 16)
        }
    })
}

fn find_floating_pointer() -> Option<u64> {
    let ebda = u64::from(read16(0x40E)) << 4;
    if (0x400..0xA0000).contains(&ebda) {
        if let Some(fp) = scan(ebda, 1024) {
            return Some(fp);
        }
    }
    let base_kib = match u64::from(read16(0x413)) {
        k @ 1..=640 => k,
        _ => 639,
    };
    scan((base_kib - 1) * 1024, 1024).or_else(|| scan(0xF0000, 0x10000))
}

/// Finds the MP table and records the enabled CPUs. Prints a `GUEST:`
/// diagnostic if a table exists but is malformed (the count stays 1).
pub fn discover() {
    let Some(fp) = find_floating_pointer() else {
        return; // no MP table: uniprocessor
    };
    let table = u64::from(read32(fp + 4));
    if table == 0 {
        // Default configurations (feature byte 1 != 0) have two CPUs with
        // APIC IDs 0 and 1.
        if read8(fp + 11) != 0 {
            APIC_IDS[1].store(1, Ordering::Relaxed);
            CPU_COUNT.store(2, Ordering::Relaxed);
        }
        return;
    }
    if read32(table) != CT_SIGNATURE {
        crate::println!("GUEST: mptable bad PCMP signature at 0x{:x}", table);
        return;
    }
    let base_len = u64::from(read16(table + 4));
    if base_len < 44 || !checksum_ok(table, base_len) {
        crate::println!("GUEST: mptable bad PCMP checksum/length at 0x{:x}", table);
        return;
    }
    let entries = read16(table + 34);
    let end = table + base_len;
    let mut p = table + 44;
    let mut count = 0;
    for _ in 0..entries {
        if p >= end {
            break;
        }
        let size = match read8(p) {
            0 => {
                let enabled = read8(p + 3) & 1 != 0;
                if enabled && count < MAX_CPUS {
                    APIC_IDS[count].store(read8(p + 1), Ordering::Relaxed);
                    count += 1;
                }
                20
            }
            1..=4 => 8,
            other => {
                crate::println!("GUEST: mptable unknown entry type {}", other);
                break;
            }
        };
        p += size;
    }
    CPU_COUNT.store(count.max(1), Ordering::Relaxed);
}
