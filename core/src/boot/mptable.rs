//! Intel MultiProcessor Specification 1.4 tables: how a guest without ACPI
//! learns how many CPUs it has, their local APIC ids, and the I/O APIC.
//!
//! ```text
//!  0x9fc00  floating pointer "_MP_" (16 bytes) --physptr--+
//!  0x9fc10  configuration table "PCMP" header (44 bytes) <-+
//!           processor entries   (20 bytes each, one per vCPU)
//!           bus entry "ISA"     (8)
//!           I/O APIC entry      (8)
//!           I/O interrupt entries, ISA IRQ n -> I/O APIC pin n (8 each)
//!           local interrupt entries: LINT0 ExtINT, LINT1 NMI (8 each)
//! ```
//!
//! The tables sit in the last KiB of base memory, which the memory map
//! reports as reserved.

use thiserror::Error;

/// Where the tables start (the last KiB below 640 KiB).
pub const MPTABLE_START: u64 = 0x9_fc00;
/// Bytes available for the tables.
pub const MPTABLE_SIZE: usize = 0x400;
/// Local APIC base address.
pub const APIC_BASE: u32 = 0xfee0_0000;
/// I/O APIC base address.
pub const IOAPIC_BASE: u32 = 0xfec0_0000;

const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const PROCESSOR_LEN: usize = 20;
const SMALL_ENTRY_LEN: usize = 8;
const ISA_IRQS: u8 = 16;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;

/// The largest vCPU count whose tables fit in [`MPTABLE_SIZE`].
pub const MAX_CPUS: u8 = ((MPTABLE_SIZE
    - FLOATING_LEN
    - HEADER_LEN
    - 2 * SMALL_ENTRY_LEN
    - (ISA_IRQS as usize + 2) * SMALL_ENTRY_LEN)
    / PROCESSOR_LEN) as u8;

/// MP table errors.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum MpTableError {
    /// Zero or too many CPUs.
    #[error("{0} vCPUs: the MP table describes 1 to {MAX_CPUS}")]
    CpuCount(u8),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Build the floating pointer and configuration table for `cpus` vCPUs,
/// to be written at [`MPTABLE_START`]. vCPU `i` has local APIC id `i`; the
/// I/O APIC gets id `cpus`.
pub fn build(cpus: u8) -> Result<Vec<u8>, MpTableError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(MpTableError::CpuCount(cpus));
    }
    let table_addr = MPTABLE_START as u32 + FLOATING_LEN as u32;
    let ioapic_id = cpus;

    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let flags = 1 | if id == 0 { 2 } else { 0 }; // enabled, BSP
        entries.extend_from_slice(&[0, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // family 6 signature
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // FPU + APIC feature flags
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]); // bus 0
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_BASE.to_le_bytes());
    count += 1;
    for irq in 0..ISA_IRQS {
        // type INT, flags "conforms to bus", ISA bus 0, IRQ n -> pin n
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0 ExtINT, LINT1 NMI, on every local APIC (0xff).
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_len = (HEADER_LEN + entries.len()) as u16;
    let mut table = Vec::with_capacity(usize::from(table_len));
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&table_len.to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"FERRY   ");
    table.extend_from_slice(b"FERRYVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&APIC_BASE.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(FLOATING_LEN);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&table_addr.to_le_bytes());
    floating.push(1); // length in 16-byte units
    floating.push(4); // spec revision
    floating.push(0); // checksum, below
    floating.extend_from_slice(&[0; 5]); // feature bytes: table present, no IMCR
    floating[10] = checksum(&floating);

    floating.extend_from_slice(&table);
    debug_assert!(floating.len() <= MPTABLE_SIZE);
    Ok(floating)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn tables_checksum_to_zero_and_point_at_each_other() {
        let t = build(4).unwrap();
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(sum(&t[0..16]), 0);
        let phys = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
        assert_eq!(phys, MPTABLE_START + 16);
        let table = &t[16..];
        assert_eq!(&table[0..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0);
    }

    #[test]
    fn one_enabled_processor_entry_per_cpu_and_one_bsp() {
        for cpus in [1u8, 4, MAX_CPUS] {
            let t = build(cpus).unwrap();
            let table = &t[16..];
            let count = u16::from_le_bytes([table[34], table[35]]);
            let mut off = HEADER_LEN;
            let (mut procs, mut bsps) = (0, 0);
            for _ in 0..count {
                let len = if table[off] == 0 { PROCESSOR_LEN } else { SMALL_ENTRY_LEN };
                if table[off] == 0 {
                    assert_eq!(table[off + 1], procs as u8, "APIC ids count up");
                    assert_eq!(table[off + 3] & 1, 1, "enabled");
                    bsps += (table[off + 3] >> 1) & 1;
                    procs += 1;
                }
                off += len;
            }
            assert_eq!(off, table.len());
            assert_eq!((procs, bsps), (usize::from(cpus), 1));
        }
    }

    #[test]
    fn cpu_count_is_bounded() {
        assert_eq!(build(0), Err(MpTableError::CpuCount(0)));
        assert!(build(MAX_CPUS).unwrap().len() <= MPTABLE_SIZE);
        assert_eq!(build(MAX_CPUS + 1), Err(MpTableError::CpuCount(MAX_CPUS + 1)));
    }
}
