//! Reboots: a boot counter kept in CMOS RAM (a machine reset leaves CMOS
//! RAM alone, as battery-backed CMOS does), a check that devices come back
//! reset, and a reset until the counter reaches a number.
//!
//! - `boot`: add one to CMOS byte 0x50 and print `BOOT <n>`;
//! - `fresh`: print how the devices look before this boot touched them:
//!   `SERIAL FRESH rx=<empty|pending>` (data in the UART's receive FIFO at
//!   entry, read before `serial::init` clears it) and `<NAME> FRESH
//!   status=<s> msix=<on|off>` for each virtio device;
//! - `blk-boots=<sector>`: on boot `n`, verify the 8 sectors each earlier
//!   boot `i` wrote at `sector + 8 * (i - 1)` (seed `i`), then write this
//!   boot's (the usual `BLK VERIFY ...`/`BLK WRITE ...` lines);
//! - `reboot-until=<n>`: reset the machine (i8042) while the count is
//!   below `n`.

use core::sync::atomic::{AtomicU8, Ordering};

use crate::{blk, cmdline::BlkOp, io, rtc, virtio};

/// The CMOS byte the count lives in (no RTC register, no size field).
const COUNTER: u8 = 0x50;
const COM1_LSR: u16 = 0x3FD;
const LSR_DATA_READY: u8 = 0x01;

static LSR_AT_ENTRY: AtomicU8 = AtomicU8::new(0);

/// Remember the UART's line status before anything reprograms it.
pub fn note_entry() {
    // SAFETY: reading the line status register has no side effects.
    LSR_AT_ENTRY.store(unsafe { io::inb(COM1_LSR) }, Ordering::Relaxed);
}

/// `boot`: count this boot; returns the count.
pub fn count() -> u8 {
    let n = rtc::read_cmos(COUNTER).wrapping_add(1);
    rtc::write_cmos(COUNTER, n);
    crate::println!("BOOT {}", n);
    n
}

/// `fresh`.
pub fn report_fresh() {
    let rx = if LSR_AT_ENTRY.load(Ordering::Relaxed) & LSR_DATA_READY != 0 { "pending" } else { "empty" };
    crate::println!("SERIAL FRESH rx={}", rx);
    for spec in [&crate::blk::SPEC, &crate::net::SPEC, &crate::rng::SPEC] {
        virtio::report_untouched(spec);
    }
}

/// `reboot-until=<n>`.
pub fn until(n: u64, boots: u8) {
    if u64::from(boots) < n {
        io::i8042_reset();
    }
}

/// `blk-boots=<sector>`.
pub fn blk_boots(slot: &mut virtio::Slot<blk::Blk>, sector: u64, boots: u8) {
    let at = |i: u64| sector + 8 * (i - 1);
    for i in 1..u64::from(boots) {
        blk::run(slot, BlkOp::Verify { sector: at(i), count: 8, seed: i });
    }
    let n = u64::from(boots.max(1));
    blk::run(slot, BlkOp::Write { sector: at(n), count: 8, seed: n });
}
