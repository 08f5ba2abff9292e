//! Memory pattern fill/verify used to check that guest RAM survives
//! snapshot/restore and migration.
//!
//! Every 4 KiB page in the region gets two quadwords derived from its
//! physical address and the seed: the first and the last qword of the page
//! (cheap: two writes per page, yet catches lost, stale, zeroed or
//! misplaced pages). The region's parameters live in a fixed global so a
//! restored guest verifies the same region.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::bootinfo::{MEM, TEST_REGION_BASE};

const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;

/// Region last filled by `pattern` (pages == 0: none).
#[repr(C)]
pub struct PatternState {
    pub base: AtomicU64,
    pub pages: AtomicU64,
    pub seed: AtomicU64,
}

#[no_mangle]
pub static PATTERN_STATE: PatternState = PatternState {
    base: AtomicU64::new(TEST_REGION_BASE),
    pages: AtomicU64::new(0),
    seed: AtomicU64::new(1),
};

pub struct Mismatch {
    pub addr: u64,
    pub want: u64,
    pub got: u64,
}

/// Value of the first qword of the page at `addr` (never zero: odd).
fn first_word(addr: u64, seed: u64) -> u64 {
    let mut x = addr ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 29;
    x | 1
}

/// Value of the last qword of the page (also odd, differs from the first).
fn last_word(first: u64) -> u64 {
    first ^ 0xFFFF_FFFF_0000_0000
}

/// Size in bytes of the current pattern region.
pub fn region_bytes() -> u64 {
    PATTERN_STATE.pages.load(Ordering::Relaxed) * PAGE
}

/// True if a pattern region exists (so `ticks` re-verifies it).
pub fn active() -> bool {
    PATTERN_STATE.pages.load(Ordering::Relaxed) != 0
}

/// Fills `mib` MiB from 16 MiB (clamped to the RAM that is contiguous from
/// there), records the region, and returns the result of verifying it.
pub fn fill(mib: u64, seed: u64) -> Result<u64, Mismatch> {
    let base = TEST_REGION_BASE;
    let avail = MEM.low_end.load(Ordering::Relaxed).saturating_sub(base);
    let bytes = mib.saturating_mul(MIB).min(avail) & !(PAGE - 1);
    let pages = bytes / PAGE;
    PATTERN_STATE.base.store(base, Ordering::Relaxed);
    PATTERN_STATE.seed.store(seed, Ordering::Relaxed);
    PATTERN_STATE.pages.store(pages, Ordering::Relaxed);
    for i in 0..pages {
        let addr = base + i * PAGE;
        let first = first_word(addr, seed);
        // SAFETY: the page lies in RAM at or above 16 MiB (clamped to the
        // memory map), identity-mapped, and no Rust object lives there
        // (the image, its stacks and page tables end below 16 MiB).
        unsafe {
            (addr as *mut u64).write_volatile(first);
            ((addr + PAGE - 8) as *mut u64).write_volatile(last_word(first));
        }
    }
    verify()
}

/// Re-checks the recorded region; returns the page count or the first
/// mismatch.
pub fn verify() -> Result<u64, Mismatch> {
    let base = PATTERN_STATE.base.load(Ordering::Relaxed);
    let pages = PATTERN_STATE.pages.load(Ordering::Relaxed);
    let seed = PATTERN_STATE.seed.load(Ordering::Relaxed);
    for i in 0..pages {
        let addr = base + i * PAGE;
        let first = first_word(addr, seed);
        for (at, want) in [(addr, first), (addr + PAGE - 8, last_word(first))] {
            // SAFETY: same region that `fill` wrote (see there).
            let got = unsafe { (at as *const u64).read_volatile() };
            if got != want {
                return Err(Mismatch { addr: at, want, got });
            }
        }
    }
    Ok(pages)
}

/// Prints `PATTERN OK pages=<n>` or `PATTERN BAD ...`; on BAD ends the VM
/// with exit status 2.
pub fn report(result: Result<u64, Mismatch>) {
    match result {
        Ok(pages) => crate::println!("PATTERN OK pages={}", pages),
        Err(m) => {
            crate::println!("PATTERN BAD addr=0x{:x} want=0x{:x} got=0x{:x}", m.addr, m.want, m.got);
            crate::io::debug_exit(2);
            crate::io::halt_forever();
        }
    }
}
