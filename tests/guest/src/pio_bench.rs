//! `pio-bench=<port>:<n>`: `n` one-byte reads of an I/O port, timed with
//! the TSC as one run. Each read is a VM exit that the VMM answers: from a
//! device in its own process, a device in-process, or (on a port nobody
//! claims) no device at all.

use crate::{io::inb, tsc};

/// Most reads per token.
pub const MAX_READS: u64 = 10_000_000;

/// Runs the reads and prints `PIO BENCH port=0x.. n=.. total_ns=..
/// value=0x..` (`value` is the last byte read), or `CALIBRATE FAILED` if
/// the TSC cannot be calibrated.
pub fn run(port: u16, count: u64) {
    let hz = match tsc::hz() {
        Ok(hz) => hz,
        Err(reason) => {
            crate::println!("CALIBRATE FAILED {}", reason);
            return;
        }
    };
    let mut last = 0;
    let start = tsc::read();
    for _ in 0..count {
        // SAFETY: the port is the caller's choice; a benchmark reads ports
        // whose reads have no side effects (or nothing behind them).
        last = unsafe { inb(port) };
    }
    let ticks = tsc::read().wrapping_sub(start);
    crate::println!(
        "PIO BENCH port={:#x} n={} total_ns={} value={:#04x}",
        port,
        count,
        tsc::scale(ticks, 1_000_000_000, hz),
        last
    );
}
