//! `calibrate`: how fast this CPU runs guest code, so a test can tell a
//! natively executing KVM (~0.3 ns per loop iteration) from one that
//! emulates every instruction (hundreds of ns).
//!
//! The loop is `dec reg; jnz` (one taken branch per iteration, about one
//! cycle on current hardware), timed with the TSC.

use core::arch::asm;

use crate::serial::Tenths;
use crate::tsc;

/// First run; enough for a precise figure when iterations are emulated.
const FIRST_ITERATIONS: u64 = 1000;
/// The first run is only long enough if it took at least this long.
const FIRST_MIN_NS: u64 = 1_000_000;
/// Otherwise a second run is sized for about this long ...
const SECOND_TARGET_NS: u64 = 20_000_000;
/// ... but with at most this many iterations (~3 ms natively).
const MAX_ITERATIONS: u64 = 10_000_000;

/// Runs `iterations` (>= 1) loop iterations; returns the TSC ticks taken.
fn spin(iterations: u64) -> u64 {
    let start = tsc::read();
    // SAFETY: the loop only counts a register down to zero (changing the
    // flags, which the asm does not claim to preserve); it touches no
    // memory and no stack.
    unsafe {
        asm!(
            "2:",
            "dec {n}",
            "jnz 2b",
            n = inout(reg) iterations.max(1) => _,
            options(nomem, nostack),
        );
    }
    tsc::read() - start
}

/// Runs the `calibrate` token: prints `CALIBRATE loop_ns=... tsc_mhz=...`.
pub fn run() {
    let hz = match tsc::hz() {
        Ok(hz) => hz,
        Err(reason) => {
            crate::println!("CALIBRATE FAILED {}", reason);
            return;
        }
    };
    let mut iterations = FIRST_ITERATIONS;
    let mut ticks = spin(iterations);
    let first_ns = tsc::scale(ticks, 1_000_000_000, hz);
    if first_ns < FIRST_MIN_NS {
        // Too short to time precisely: repeat with a longer loop, sized
        // from this run so that even a slow CPU stays near the target.
        iterations = tsc::scale(FIRST_ITERATIONS, SECOND_TARGET_NS, first_ns.max(1))
            .clamp(FIRST_ITERATIONS, MAX_ITERATIONS);
        ticks = spin(iterations);
    }
    // Tenths of a nanosecond per iteration.
    let loop_tenths_ns = tsc::scale(ticks, 10_000_000_000, hz.saturating_mul(iterations));
    crate::println!("CALIBRATE loop_ns={} tsc_mhz={}", Tenths(loop_tenths_ns), tsc::scale(hz, 1, 1_000_000));
}
