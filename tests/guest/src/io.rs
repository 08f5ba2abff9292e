//! Raw x86 port I/O and CPU halting helpers.
//!
//! Every port access is a VM exit (~14 µs under the nested emulating KVM
//! this guest is tested on), so callers keep the number of accesses small.

use core::arch::asm;

/// Debug-exit port: writing byte `v` ends the VM (Ferry exits with `v`,
/// QEMU's isa-debug-exit with `(v << 1) | 1`).
pub const DEBUG_EXIT_PORT: u16 = 0xF4;

/// Writes one byte to an I/O port.
///
/// # Safety
/// The caller must know which device sits at `port` and that the write
/// cannot break memory safety (e.g. no DMA into memory Rust is using).
#[inline(always)]
pub unsafe fn outb(port: u16, val: u8) {
    // SAFETY: forwarded to the caller's contract. No `nomem`: port writes
    // must stay ordered with surrounding memory accesses (e.g. lock release).
    unsafe { asm!("out dx, al", in("dx") port, in("al") val, options(nostack, preserves_flags)) }
}

/// Reads one byte from an I/O port.
///
/// # Safety
/// As for [`outb`]: reads can have device side effects.
#[inline(always)]
pub unsafe fn inb(port: u16) -> u8 {
    let val: u8;
    // SAFETY: forwarded to the caller's contract.
    unsafe { asm!("in al, dx", out("al") val, in("dx") port, options(nostack, preserves_flags)) }
    val
}

/// Writes a 16-bit word to an I/O port.
///
/// # Safety
/// As for [`outb`].
#[inline(always)]
pub unsafe fn outw(port: u16, val: u16) {
    // SAFETY: forwarded to the caller's contract.
    unsafe { asm!("out dx, ax", in("dx") port, in("ax") val, options(nostack, preserves_flags)) }
}

/// Writes a 32-bit doubleword to an I/O port.
///
/// # Safety
/// As for [`outb`].
#[inline(always)]
pub unsafe fn outl(port: u16, val: u32) {
    // SAFETY: forwarded to the caller's contract.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") val, options(nostack, preserves_flags)) }
}

/// Reads a 32-bit doubleword from an I/O port.
///
/// # Safety
/// As for [`inb`].
#[inline(always)]
pub unsafe fn inl(port: u16) -> u32 {
    let val: u32;
    // SAFETY: forwarded to the caller's contract.
    unsafe { asm!("in eax, dx", out("eax") val, in("dx") port, options(nostack, preserves_flags)) }
    val
}

/// Ends the VM through the debug-exit port. Returns only if no such device
/// exists (then the write is ignored).
pub fn debug_exit(code: u8) {
    // SAFETY: port 0xF4 is the debug-exit device; a write has no memory
    // side effects (it stops the VM or is ignored).
    unsafe { outb(DEBUG_EXIT_PORT, code) }
}

/// Requests a machine reset through the i8042 controller (command 0xFE on
/// port 0x64 pulses the CPU reset line).
pub fn i8042_reset() {
    // SAFETY: port 0x64 is the i8042 command port; 0xFE only resets.
    unsafe { outb(0x64, 0xFE) }
}

/// Disables interrupts and halts this CPU forever.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: `cli; hlt` only stops this CPU; nothing is touched.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

/// Enables interrupts, halts until the next one is delivered, then disables
/// them again. `sti` delays interrupt recognition by one instruction, so no
/// wake-up can be lost between `sti` and `hlt`.
pub fn wait_for_interrupt() {
    // SAFETY: the IDT is loaded before any caller unmasks an interrupt
    // source; the handlers preserve all registers. Not `nomem`: the handler
    // changes memory (the tick counter) that the caller reads afterwards.
    unsafe { asm!("sti", "hlt", "cli", options(nostack)) }
}
