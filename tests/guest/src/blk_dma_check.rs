//! `blk-dma-check=<sector>:<count>:<seed>:<before>:<after>`: does data a
//! device wrote into guest memory survive what happens while the guest
//! waits (a live migration, a snapshot)?
//!
//! The CPU zeroes a dedicated buffer (`dma::BLK_CHECK_DATA`, used by no
//! other token), sleeps `before` PIT ticks, has the device read sectors
//! into it, sleeps `after` ticks without touching it, and only then reads
//! it to compare with the `blk-write` pattern. Its last writer before the
//! comparison is the device, so a destination that lost device writes
//! (e.g. untracked DMA dirty pages) shows zeros or stale bytes.

use crate::blk::{self, Blk, STATUS_OK, T_IN};
use crate::{dma, ticks};

/// Largest `before`/`after` (1000 s at 100 Hz).
pub const MAX_WAIT_TICKS: u64 = 100_000;

const _: () = assert!(blk::MAX_SECTORS as usize * blk::SECTOR <= dma::BLK_CHECK_DATA_LEN);

/// Runs the token (`count` is 1..=64). `None` on a request timeout.
pub fn run(blk: &mut Blk, sector: u64, count: u64, seed: u64, before: u64, after: u64) -> Option<()> {
    let len = blk::bytes(count);
    // SAFETY: the buffer belongs to this token alone and no request holds
    // it (requests are issued one at a time, each returned before the
    // next); the slice ends here.
    unsafe { dma::words(dma::BLK_CHECK_DATA, len / 8) }.fill(0);
    ticks::sleep(before);

    crate::println!("BLK DMA READ sector={} count={}", sector, count);
    let done = blk.submit(T_IN, sector, dma::BLK_CHECK_DATA, len, true)?;
    if done.status != STATUS_OK {
        crate::println!("BLK DMA BAD status={}", done.status);
        blk::fail();
    }
    // The buffer is not read or written until the comparison below.
    ticks::sleep(after);

    // SAFETY: the device has returned the buffer, nothing else uses it.
    // Created only now: the `hlt` asm in `sleep` may touch memory, so no
    // load of the buffer moves before it.
    let words = unsafe { dma::words(dma::BLK_CHECK_DATA, len / 8) };
    match blk::compare_pattern(words, sector, seed) {
        Ok(()) => crate::println!("BLK DMA OK sector={} count={}", sector, count),
        Err(m) => {
            crate::println!(
                "BLK DMA BAD sector={} offset={} want=0x{:x} got=0x{:x}",
                sector,
                m.buf_offset,
                m.want,
                m.got
            );
            blk::fail();
        }
    }
    Some(())
}
