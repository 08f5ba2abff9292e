//! Time-stamp counter: reading it, and its rate measured against the PIT.
//!
//! `rdtsc` loads the 64-bit counter into edx:eax. Current CPUs (and KVM)
//! provide an invariant TSC: it ticks at a constant rate whatever the
//! core's clock, so one calibration holds for the whole run. The PIT
//! counts at 1.193182 MHz from its own crystal, independent of the CPU.

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::pic_pit::{Stopwatch, PIT_HZ};

/// Length of the calibration window in PIT counts (30 ms).
const WINDOW_COUNTS: u64 = PIT_HZ * 30 / 1000;

/// TSC ticks per second, 0 until calibrated.
static HZ: AtomicU64 = AtomicU64::new(0);

/// Reads the TSC.
pub fn read() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: `rdtsc` only reads the counter (allowed in ring 0 whatever
    // CR4.TSD says). Not `nomem`: the asm also orders the read with the
    // memory and MMIO accesses around it, which the timings rely on.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nostack, preserves_flags)) };
    u64::from(hi) << 32 | u64::from(lo)
}

/// TSC ticks per second, calibrated on the first call (about 30 ms of
/// polling the PIT). Err names why calibration failed: `pit-stuck` or
/// `tsc-stuck`.
pub fn hz() -> Result<u64, &'static str> {
    let hz = HZ.load(Ordering::Relaxed);
    if hz != 0 {
        return Ok(hz);
    }
    let hz = calibrate()?;
    HZ.store(hz, Ordering::Relaxed);
    Ok(hz)
}

/// Counts TSC ticks over ~30 ms of PIT channel 0 (polled, no interrupts).
/// The TSC is read just before each PIT read, whose first access latches
/// the count: the delay between the two is about the same at both ends of
/// the window, so it cancels out.
fn calibrate() -> Result<u64, &'static str> {
    let mut clock = Stopwatch::start();
    let tsc_start = read();
    let pit_start = clock.elapsed_counts();
    let (tsc_end, pit_end) = loop {
        let tsc = read();
        let pit = clock.elapsed_counts();
        if pit - pit_start >= WINDOW_COUNTS {
            break (tsc, pit);
        }
        if clock.stuck() {
            return Err("pit-stuck");
        }
    };
    let ticks = tsc_end.wrapping_sub(tsc_start);
    if ticks == 0 {
        return Err("tsc-stuck");
    }
    Ok(scale(ticks, PIT_HZ, pit_end - pit_start))
}

/// `value * mul / div`, rounded to nearest, without intermediate overflow
/// (saturating if the result does not fit).
pub fn scale(value: u64, mul: u64, div: u64) -> u64 {
    let div = u128::from(div.max(1));
    u64::try_from((u128::from(value) * u128::from(mul) + div / 2) / div).unwrap_or(u64::MAX)
}
