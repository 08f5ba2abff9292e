//! Local APIC (xAPIC mode, MMIO page at 0xFEE0_0000, identity-mapped
//! uncached by `boot.rs`).
//!
//! Registers (32-bit, 16-byte aligned): ID +0x20 (bits 31:24), EOI +0xB0
//! (write 0 to end the in-service interrupt), SVR +0xF0 (bit 8 = software
//! enable, bits 7:0 = spurious vector), ICR low +0x300 / high +0x310.

use crate::interrupts::SPURIOUS_VECTOR;

pub const BASE: u64 = 0xFEE0_0000;
pub const ID: u64 = 0x20;
pub const EOI: u64 = 0xB0;
pub const SVR: u64 = 0xF0;
pub const ICR_LOW: u64 = 0x300;
pub const ICR_HIGH: u64 = 0x310;

pub fn read(reg: u64) -> u32 {
    // SAFETY: the xAPIC page is identity-mapped (uncached); aligned 32-bit
    // reads of architectural registers have no memory-safety impact.
    unsafe { ((BASE + reg) as *const u32).read_volatile() }
}

pub fn write(reg: u64, val: u32) {
    // SAFETY: as for `read`; callers write only ID/SVR/EOI/ICR registers,
    // which do not touch memory.
    unsafe { ((BASE + reg) as *mut u32).write_volatile(val) }
}

/// APIC ID of the calling CPU.
pub fn id() -> u8 {
    (read(ID) >> 24) as u8
}

/// Software-enables the calling CPU's LAPIC (spurious vector 0xFF), so it
/// accepts fixed interrupts (IPIs, MSIs).
pub fn enable() {
    write(SVR, 0x100 | u32::from(SPURIOUS_VECTOR));
}
