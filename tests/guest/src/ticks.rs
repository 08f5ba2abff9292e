//! `ticks=<n>`: periodic PIT interrupts through the PIC, `TICK <k>` lines
//! every 100 ms, optional page dirtying and pattern re-verification.
//!
//! All counters are fixed globals so that a snapshot taken mid-run and
//! restored later continues counting where it stopped.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::bootinfo::{MEM, TEST_REGION_BASE};
use crate::{io, pattern, pic_pit};

const PAGE: u64 = 4096;

/// Incremented by the IRQ0 stub (`interrupts.rs`) on every PIT interrupt.
#[no_mangle]
pub static TICK_IRQS: AtomicU64 = AtomicU64::new(0);

/// Progress of the current `ticks` run.
#[repr(C)]
pub struct TickState {
    /// Interrupts processed by the main loop in this run.
    pub handled: AtomicU64,
    /// Value of `TICK_IRQS` already accounted for.
    pub seen: AtomicU64,
    /// `TICK` lines printed in this run (the k of `TICK <k>`).
    pub lines: AtomicU64,
    /// Next page the dirtier writes (persists across runs).
    pub dirty_cursor: AtomicU64,
}

#[no_mangle]
pub static TICK_STATE: TickState = TickState {
    handled: AtomicU64::new(0),
    seen: AtomicU64::new(0),
    lines: AtomicU64::new(0),
    dirty_cursor: AtomicU64::new(0),
};

/// How much of the dirty region `dirty_pages` cycles through, in MiB
/// (`dirty-mib=N`: a hot working set); 0: all of it.
pub static DIRTY_SPAN_MIB: AtomicU64 = AtomicU64::new(0);

/// Writes one qword into each of `count` successive pages of the dirty
/// region (16 MiB + pattern size .. end of contiguous RAM, or the first
/// `DIRTY_SPAN_MIB` of it), wrapping.
fn dirty_pages(count: u64, stamp: u64) {
    let start = TEST_REGION_BASE + pattern::region_bytes();
    let mut end = MEM.low_end.load(Ordering::Relaxed) & !(PAGE - 1);
    let span = DIRTY_SPAN_MIB.load(Ordering::Relaxed) << 20;
    if span != 0 {
        end = end.min(start.saturating_add(span));
    }
    if count == 0 || start >= end {
        return;
    }
    let mut cursor = TICK_STATE.dirty_cursor.load(Ordering::Relaxed);
    for _ in 0..count {
        if cursor < start || cursor >= end {
            cursor = start;
        }
        // SAFETY: the page lies in RAM between the pattern region and the
        // end of contiguous RAM from 16 MiB; nothing else uses it.
        unsafe { (cursor as *mut u64).write_volatile(stamp) };
        cursor += PAGE;
    }
    TICK_STATE.dirty_cursor.store(cursor, Ordering::Relaxed);
}

/// Runs the tick loop: `lines_wanted` TICK lines (0 = forever) at `hz`
/// interrupts per second, dirtying `dirty` pages per interrupt.
pub fn run(hz: u64, lines_wanted: u64, dirty: u64) {
    let divisor = pic_pit::pit_set_periodic(hz);
    let real_hz = pic_pit::PIT_HZ / u64::from(divisor);
    let per_line = (real_hz / 10).max(1);

    TICK_STATE.handled.store(0, Ordering::Relaxed);
    TICK_STATE.lines.store(0, Ordering::Relaxed);
    TICK_STATE.seen.store(TICK_IRQS.load(Ordering::SeqCst), Ordering::Relaxed);
    pic_pit::pic_unmask_irq0_only();

    loop {
        io::wait_for_interrupt();
        let now = TICK_IRQS.load(Ordering::SeqCst);
        while TICK_STATE.seen.load(Ordering::Relaxed) < now {
            TICK_STATE.seen.fetch_add(1, Ordering::Relaxed);
            let handled = TICK_STATE.handled.fetch_add(1, Ordering::Relaxed) + 1;
            dirty_pages(dirty, handled);
            if handled % per_line != 0 {
                continue;
            }
            let k = TICK_STATE.lines.fetch_add(1, Ordering::Relaxed) + 1;
            crate::println!("TICK {}", k);
            if k % 10 == 0 && pattern::active() {
                if let Err(m) = pattern::verify() {
                    pattern::report(Err(m));
                }
            }
            if lines_wanted != 0 && k >= lines_wanted {
                pic_pit::pic_mask_all();
                return;
            }
        }
    }
}

/// PIT rate of [`sleep`].
pub const SLEEP_HZ: u64 = 100;

/// Halts (`sti; hlt`) until `n` PIT interrupts at [`SLEEP_HZ`] arrived
/// (IRQ0 through the PIC, as for `ticks`), printing nothing and touching
/// no memory but the stack and `TICK_IRQS`. `n = 0` returns at once.
pub fn sleep(n: u64) {
    if n == 0 {
        return;
    }
    pic_pit::pit_set_periodic(SLEEP_HZ);
    let start = TICK_IRQS.load(Ordering::SeqCst);
    pic_pit::pic_unmask_irq0_only();
    while TICK_IRQS.load(Ordering::SeqCst).wrapping_sub(start) < n {
        io::wait_for_interrupt();
    }
    pic_pit::pic_mask_all();
}
