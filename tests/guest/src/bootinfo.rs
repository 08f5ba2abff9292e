//! `struct hvm_start_info` (PVH boot ABI) parsing: command line and the
//! RAM layout.
//!
//! Layout (all little-endian, offsets in bytes):
//!   0 magic (0x336ec578)   4 version   8 flags   12 nr_modules
//!  16 modlist_paddr       24 cmdline_paddr      32 rsdp_paddr
//!  40 memmap_paddr (version >= 1)   48 memmap_entries   52 reserved
//! Memory map entries: { u64 addr, u64 size, u32 type (1 = RAM), u32 rsvd }.
//!
//! Ferry always passes version 1 with a memory map. QEMU's PVH option ROM
//! may not; then the RAM size comes from the CMOS registers QEMU fills in
//! (0x34/0x35: 64 KiB units above 16 MiB, 0x5B-0x5D: 64 KiB units above
//! 4 GiB), or is assumed to be 64 MiB.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::rtc;

const HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// RAM assumed when neither a memory map nor CMOS data is available.
const FALLBACK_RAM: u64 = 64 * MIB;
/// Start of the region used by `pattern` and `dirty`.
pub const TEST_REGION_BASE: u64 = 16 * MIB;
/// RAM ranges remembered from the memory map.
const MAX_RANGES: usize = 32;

/// Where the guest's view of RAM ended up (written once by the BSP at boot).
pub struct MemInfo {
    /// Sum of all RAM ranges, in bytes.
    pub total: AtomicU64,
    /// Highest RAM end address (exclusive).
    pub max_end: AtomicU64,
    /// End (exclusive) of the contiguous RAM that starts at or below
    /// 16 MiB and covers it; the pattern/dirty region lies in
    /// `TEST_REGION_BASE..low_end`. Equal to 16 MiB if there is none.
    pub low_end: AtomicU64,
}

/// The first boot module (initramfs), if the loader passed one: physical
/// address and size (0, 0 when none).
pub static MODULE: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

pub static MEM: MemInfo =
    MemInfo { total: AtomicU64::new(0), max_end: AtomicU64::new(0), low_end: AtomicU64::new(0) };

#[derive(Clone, Copy)]
struct Range {
    start: u64,
    end: u64,
}

struct Ranges {
    list: [Range; MAX_RANGES],
    len: usize,
}

impl Ranges {
    fn push(&mut self, start: u64, size: u64) {
        if size == 0 || self.len == MAX_RANGES {
            return;
        }
        self.list[self.len] = Range { start, end: start.saturating_add(size) };
        self.len += 1;
    }

    fn iter(&self) -> impl Iterator<Item = &Range> {
        self.list[..self.len].iter()
    }
}

/// Reads a little-endian value of type `T` at physical address `addr`.
///
/// # Safety
/// `addr` must be identity-mapped, readable memory.
unsafe fn phys_read<T: Copy>(addr: u64) -> T {
    // SAFETY: forwarded; unaligned reads are allowed on x86.
    unsafe { (addr as *const T).read_unaligned() }
}

/// Parses the start info, copies the command line into `cmdline` (returns
/// its length) and records the RAM layout in [`MEM`].
pub fn parse(start_info: u64, cmdline: &mut [u8]) -> usize {
    let mut ranges = Ranges { list: [Range { start: 0, end: 0 }; MAX_RANGES], len: 0 };
    let mut cmd_len = 0;

    let magic: u32 = if start_info != 0 && start_info < 4 * GIB {
        // SAFETY: the loader passes the physical address of hvm_start_info
        // in ebx; the first 4 GiB are identity-mapped.
        unsafe { phys_read(start_info) }
    } else {
        0
    };
    if magic == HVM_START_MAGIC {
        // SAFETY: the structure is valid (magic checked), identity-mapped.
        let (version, cmdline_paddr, memmap_paddr, entries) = unsafe {
            (
                phys_read::<u32>(start_info + 4),
                phys_read::<u64>(start_info + 24),
                phys_read::<u64>(start_info + 40),
                phys_read::<u32>(start_info + 48),
            )
        };
        // SAFETY: as above; nr_modules and modlist_paddr are part of every
        // version of the structure.
        let (nr_modules, modlist) =
            unsafe { (phys_read::<u32>(start_info + 12), phys_read::<u64>(start_info + 16)) };
        if nr_modules > 0 && modlist != 0 && modlist < 4 * GIB {
            // SAFETY: the first hvm_modlist_entry { paddr, size, cmdline,
            // reserved } at modlist_paddr, identity-mapped.
            let (paddr, size) = unsafe { (phys_read::<u64>(modlist), phys_read::<u64>(modlist + 8)) };
            MODULE[0].store(paddr, Ordering::Relaxed);
            MODULE[1].store(size, Ordering::Relaxed);
        }
        if cmdline_paddr != 0 && cmdline_paddr < 4 * GIB {
            while cmd_len < cmdline.len() - 1 {
                // SAFETY: NUL-terminated string provided by the loader in
                // identity-mapped memory; we stop at the NUL or buffer end.
                let b: u8 = unsafe { phys_read(cmdline_paddr + cmd_len as u64) };
                if b == 0 {
                    break;
                }
                cmdline[cmd_len] = b;
                cmd_len += 1;
            }
        }
        if version >= 1 && memmap_paddr != 0 && memmap_paddr < 4 * GIB {
            for i in 0..u64::from(entries.min(128)) {
                let e = memmap_paddr + i * 24;
                // SAFETY: `entries` memmap entries at memmap_paddr, as
                // described by the loader; identity-mapped.
                let (addr, size, kind) =
                    unsafe { (phys_read::<u64>(e), phys_read::<u64>(e + 8), phys_read::<u32>(e + 16)) };
                if kind == E820_RAM {
                    ranges.push(addr, size);
                }
            }
        }
    } else {
        crate::println!("GUEST: bad start_info magic 0x{:x}", magic);
    }

    if ranges.len == 0 {
        fallback_ranges(&mut ranges);
    }
    record(&ranges);
    cmd_len
}

/// RAM layout without a memory map: CMOS sizes if set, else 64 MiB.
fn fallback_ranges(ranges: &mut Ranges) {
    let above_16m = u64::from(rtc::read_cmos(0x34)) | u64::from(rtc::read_cmos(0x35)) << 8;
    let above_4g = u64::from(rtc::read_cmos(0x5B))
        | u64::from(rtc::read_cmos(0x5C)) << 8
        | u64::from(rtc::read_cmos(0x5D)) << 16;
    let low_top = if above_16m != 0 { 16 * MIB + above_16m * 64 * 1024 } else { FALLBACK_RAM };
    ranges.push(0, 640 * 1024);
    ranges.push(MIB, low_top - MIB);
    if above_16m != 0 && above_4g != 0 {
        ranges.push(4 * GIB, above_4g * 64 * 1024);
    }
}

fn record(ranges: &Ranges) {
    let total: u64 = ranges.iter().map(|r| r.end - r.start).sum();
    let max_end = ranges.iter().map(|r| r.end).max().unwrap_or(0);

    // Follow ranges (possibly split into several entries) upwards from
    // 16 MiB until no range continues the covered span.
    let mut low_end = TEST_REGION_BASE;
    loop {
        let next = ranges.iter().filter(|r| r.start <= low_end && r.end > low_end).map(|r| r.end).max();
        match next {
            Some(end) => low_end = end,
            None => break,
        }
    }

    MEM.total.store(total, Ordering::Relaxed);
    MEM.max_end.store(max_end, Ordering::Relaxed);
    MEM.low_end.store(low_end, Ordering::Relaxed);
}

/// Total RAM rounded to the nearest MiB (as printed by `ready`).
pub fn total_mib() -> u64 {
    (MEM.total.load(Ordering::Relaxed) + MIB / 2) / MIB
}

/// Prints `INITRD size=<n> fnv=<hex>` (FNV-1a 32 of the module's bytes) for
/// the first boot module, or `INITRD none`.
pub fn report_initrd() {
    let (paddr, size) = (MODULE[0].load(Ordering::Relaxed), MODULE[1].load(Ordering::Relaxed));
    if size == 0 || paddr.saturating_add(size) > 4 * GIB {
        crate::println!("INITRD none");
        return;
    }
    let mut hash: u32 = 0x811c_9dc5;
    for i in 0..size {
        // SAFETY: the module lies in RAM below 4 GiB (checked above),
        // which is identity-mapped; the loader placed it there.
        let b: u8 = unsafe { phys_read(paddr + i) };
        hash = (hash ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    crate::println!("INITRD size={} fnv={:08x}", size, hash);
}
