//! Guest RAM: one memfd, mapped shared into ferry and registered with KVM.
//!
//! ```text
//!  guest physical                          memfd offset
//!  0 ............... low_end  (<= 3 GiB)   0
//!  [ MMIO hole: 3 GiB .. 4 GiB: IOAPIC, LAPIC, PCI later ]
//!  4 GiB ........... 4 GiB + high          low_end
//! ```
//!
//! The memfd is what later lets a snapshot or a same-host migration hand
//! the RAM over without copying it.

use std::{
    fs::File,
    os::fd::FromRawFd,
    sync::atomic::{AtomicU64, Ordering},
};

use abi_stable::std_types::RVec;
use ferry_plugin_api::{GuestMemoryMap, MemoryRegion};

use thiserror::Error;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

/// Where RAM below 4 GiB stops at the latest; above is the MMIO hole.
pub const LOW_RAM_LIMIT: u64 = 0xC000_0000;
/// Where RAM continues above the MMIO hole.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
/// Smallest guest ferry agrees to build.
pub const MIN_MEMORY: u64 = 8 << 20;

/// Guest RAM errors.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// Too small for the boot layout.
    #[error("memory {0} is below the minimum of 8 MiB")]
    TooSmall(String),
    /// More than this host has.
    #[error("memory {requested} is more than this host can give ({host} of RAM)")]
    MoreThanHost {
        /// What was asked for.
        requested: String,
        /// What the host has.
        host: String,
    },
    /// The memfd could not be created or sized.
    #[error("cannot allocate guest RAM ({size}): {source}")]
    Allocate {
        /// Requested size.
        size: String,
        /// OS error.
        source: std::io::Error,
    },
    /// The mapping failed.
    #[error("cannot map guest RAM: {0}")]
    Map(String),
    /// Pages could not be written.
    #[error("cannot write guest RAM at {gpa:#x}: {source}")]
    Write {
        /// Where.
        gpa: u64,
        /// OS error.
        source: std::io::Error,
    },
}

/// One contiguous RAM range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRange {
    /// Guest-physical start.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// Offset of this range in the memfd.
    pub file_offset: u64,
}

/// The RAM layout for a given size.
pub fn layout(size: u64) -> Vec<RamRange> {
    let low = size.min(LOW_RAM_LIMIT);
    let mut ranges = vec![RamRange { gpa: 0, len: low, file_offset: 0 }];
    if size > low {
        ranges.push(RamRange { gpa: HIGH_RAM_START, len: size - low, file_offset: low });
    }
    ranges
}

/// Guest page size for dirty tracking.
pub const PAGE_SIZE: u64 = 4096;

/// Appends to `out` the index of every set bit of a bitmap given as 64-bit
/// words (bit `b` of word `i` is page `first + 64 * i + b`).
pub fn push_set_bits(words: impl IntoIterator<Item = u64>, first: u64, out: &mut Vec<u64>) {
    for (i, mut bits) in words.into_iter().enumerate() {
        while bits != 0 {
            out.push(first + i as u64 * 64 + u64::from(bits.trailing_zeros()));
            bits &= bits - 1;
        }
    }
}

/// Pages written by devices, one bit per 4 KiB page of RAM, indexed by the
/// page's offset in the memfd. Devices set bits with atomic ORs through the
/// address they get from `Host::guest_memory`; migration reads and clears
/// them here. The words live in a memfd of their own, mapped shared, so a
/// device process (`isolate/`) maps the same bitmap.
pub struct DirtyBitmap {
    memfd: File,
    words: *const AtomicU64,
    len: usize,
    pages: u64,
}

// SAFETY: the mapping is plain shared memory accessed only through atomics;
// it lives as long as this value.
unsafe impl Send for DirtyBitmap {}
// SAFETY: as above.
unsafe impl Sync for DirtyBitmap {}

impl Drop for DirtyBitmap {
    fn drop(&mut self) {
        // SAFETY: the mapping `new` made; nothing refers to it once the
        // bitmap (owned by the VM's RAM) is gone.
        unsafe { libc::munmap(self.words as *mut libc::c_void, self.len * 8) };
    }
}

impl DirtyBitmap {
    /// A clean bitmap for `pages` pages.
    pub fn new(pages: u64) -> Result<Self, MemoryError> {
        use std::os::fd::AsRawFd;
        let len = usize::try_from(pages.div_ceil(64).max(1)).map_err(|e| MemoryError::Map(e.to_string()))?;
        let fail = |source| MemoryError::Allocate { size: format!("dirty bitmap of {pages} pages"), source };
        let memfd = create_memfd(c"ferry-dirty-bitmap").map_err(fail)?;
        memfd.set_len(len as u64 * 8).map_err(fail)?;
        // SAFETY: a new shared mapping of the whole memfd (sized above);
        // checked for failure below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len * 8,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                memfd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(MemoryError::Map(format!("dirty bitmap: {}", std::io::Error::last_os_error())));
        }
        Ok(DirtyBitmap { memfd, words: p as *const AtomicU64, len, pages })
    }

    fn words(&self) -> &[AtomicU64] {
        // SAFETY: `len` words mapped read-write by `new`, zero-filled by
        // the memfd, alive as long as `self`; AtomicU64 has u64's layout.
        unsafe { std::slice::from_raw_parts(self.words, self.len) }
    }

    /// Pages covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Mark page `page` dirty.
    pub fn mark(&self, page: u64) {
        if page < self.pages {
            self.words()[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Release);
        }
    }

    /// Is page `page` dirty?
    pub fn is_dirty(&self, page: u64) -> bool {
        page < self.pages
            && self.words()[(page / 64) as usize].load(Ordering::Acquire) & (1 << (page % 64)) != 0
    }

    /// The dirty page indexes, clearing them.
    ///
    /// Only words with a bit set are swapped: a locked swap of every word
    /// cost 0.15 ms at 8 GiB, inside the downtime, where the plain reads
    /// cost 0.01. A bit a device sets after its word was read stays for
    /// the next call, as it would after a swap.
    pub fn take(&self) -> Vec<u64> {
        let mut pages = Vec::new();
        let words = self.words().iter().map(|w| match w.load(Ordering::Acquire) {
            0 => 0,
            _ => w.swap(0, Ordering::AcqRel),
        });
        push_set_bits(words, 0, &mut pages);
        pages
    }

    /// The memfd holding the words (for a device process).
    pub fn memfd(&self) -> &File {
        &self.memfd
    }

    /// Address of the first word, for devices.
    fn as_addr(&self) -> u64 {
        self.words as u64
    }
}

/// Guest RAM: the memfd, the layout, the mapping and the device dirty
/// bitmap.
pub struct GuestRam {
    /// The backing memfd (None for RAM mapped from a snapshot file).
    memfd: Option<File>,
    ranges: Vec<RamRange>,
    mem: GuestMemoryMmap,
    dirty: DirtyBitmap,
    /// Mappings this value made itself and must unmap.
    own_maps: Vec<(usize, usize)>,
}

// SAFETY: the raw mappings in `own_maps` are plain memory owned by this
// value; access goes through vm-memory, which is Send + Sync.
unsafe impl Send for GuestRam {}
// SAFETY: as above.
unsafe impl Sync for GuestRam {}

impl Drop for GuestRam {
    fn drop(&mut self) {
        for &(addr, len) in &self.own_maps {
            // SAFETY: a mapping made by `from_snapshot`, unused once the
            // VM (which holds this value) is gone.
            unsafe { libc::munmap(addr as *mut libc::c_void, len) };
        }
    }
}

impl GuestRam {
    /// Guest RAM of `size` bytes on an existing memfd (handed over by a
    /// same-host migration source): the same pages, no copy.
    pub fn from_memfd(size: u64, memfd: File) -> Result<Self, MemoryError> {
        let have = memfd.metadata().map(|m| m.len()).map_err(|e| MemoryError::Map(e.to_string()))?;
        if have != size {
            return Err(MemoryError::Map(format!("the memfd holds {have} bytes, the guest has {size}")));
        }
        Self::map_memfd(size, memfd)
    }

    /// Allocate `size` bytes of guest RAM (rounded up to 4 KiB).
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        let size = size.div_ceil(4096) * 4096;
        if size < MIN_MEMORY {
            return Err(MemoryError::TooSmall(human_size(size)));
        }
        if let Some(host) = host_memory() {
            if size > host {
                return Err(MemoryError::MoreThanHost {
                    requested: human_size(size),
                    host: human_size(host),
                });
            }
        }
        let memfd = create_memfd(c"ferry-guest-ram")
            .map_err(|source| MemoryError::Allocate { size: human_size(size), source })?;
        memfd.set_len(size).map_err(|source| MemoryError::Allocate { size: human_size(size), source })?;
        Self::map_memfd(size, memfd)
    }

    fn map_memfd(size: u64, memfd: File) -> Result<Self, MemoryError> {
        let ranges = layout(size);
        let mut regions = Vec::with_capacity(ranges.len());
        for r in &ranges {
            let fd = memfd.try_clone().map_err(|e| MemoryError::Map(e.to_string()))?;
            let len = usize::try_from(r.len).map_err(|e| MemoryError::Map(e.to_string()))?;
            regions.push((GuestAddress(r.gpa), len, Some(FileOffset::new(fd, r.file_offset))));
        }
        let mem =
            GuestMemoryMmap::from_ranges_with_files(regions).map_err(|e| MemoryError::Map(e.to_string()))?;
        let dirty = DirtyBitmap::new(size / PAGE_SIZE)?;
        Ok(GuestRam { memfd: Some(memfd), ranges, mem, dirty, own_maps: Vec::new() })
    }

    /// RAM of `size` bytes whose contents are the `runs` of a snapshot file,
    /// mapped privately and lazily: nothing is read until the guest touches
    /// a page, and guest writes never reach the file. Pages outside the runs
    /// are zero.
    pub fn from_snapshot(size: u64, file: &File, runs: &[(u64, u64, u64)]) -> Result<Self, MemoryError> {
        use std::os::fd::AsRawFd;
        let ranges = layout(size);
        let mut own_maps = Vec::new();
        let mut regions = Vec::new();
        let map_err = |what: &str| MemoryError::Map(format!("{what}: {}", std::io::Error::last_os_error()));
        for r in &ranges {
            let len = usize::try_from(r.len).map_err(|e| MemoryError::Map(e.to_string()))?;
            // SAFETY: a fresh anonymous reservation; checked below.
            let base = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if base == libc::MAP_FAILED {
                return Err(map_err("reserving guest RAM"));
            }
            own_maps.push((base as usize, len));
            for &(gpa, bytes, file_offset) in runs {
                if gpa < r.gpa || gpa + bytes > r.gpa + r.len {
                    continue;
                }
                let at = (base as usize + (gpa - r.gpa) as usize) as *mut libc::c_void;
                // SAFETY: `at..at + bytes` lies inside the reservation made
                // above (checked against the range), MAP_FIXED replaces
                // those pages only, and the file offset is page aligned
                // (the stream reader checks it).
                let p = unsafe {
                    libc::mmap(
                        at,
                        bytes as usize,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_FIXED,
                        file.as_raw_fd(),
                        file_offset as libc::off_t,
                    )
                };
                if p == libc::MAP_FAILED {
                    return Err(map_err("mapping snapshot memory"));
                }
            }
            // SAFETY: `base..base + len` is the live mapping made above,
            // owned by this GuestRam until it drops.
            let builder = unsafe {
                vm_memory::mmap::MmapRegionBuilder::new(len)
                    .with_raw_mmap_pointer(base.cast())
                    .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                    .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS)
            };
            let region = builder.build().map_err(|e| MemoryError::Map(e.to_string()))?;
            regions.push(
                vm_memory::GuestRegionMmap::new(region, GuestAddress(r.gpa))
                    .ok_or_else(|| MemoryError::Map("region wraps".into()))?,
            );
        }
        let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Map(e.to_string()))?;
        Ok(GuestRam { memfd: None, ranges, mem, dirty: DirtyBitmap::new(size / PAGE_SIZE)?, own_maps })
    }

    /// RAM of `size` bytes on a new memfd holding the `runs` of a snapshot
    /// file, read in now: slower than `from_snapshot`'s lazy private
    /// mapping, but shareable with device processes (`--isolate`), which a
    /// private file mapping is not.
    pub fn from_snapshot_copied(
        size: u64,
        file: &File,
        runs: &[(u64, u64, u64)],
    ) -> Result<Self, MemoryError> {
        use std::os::unix::fs::FileExt;
        let ram = Self::new(size)?;
        for &(gpa, bytes, file_offset) in runs {
            let Some(r) = ram.ranges.iter().find(|r| gpa >= r.gpa && gpa + bytes <= r.gpa + r.len) else {
                return Err(MemoryError::Map(format!("snapshot run at {gpa:#x} is outside guest RAM")));
            };
            let host = vm_memory::GuestMemoryBackend::get_host_address(&ram.mem, GuestAddress(r.gpa))
                .map_err(|e| MemoryError::Map(e.to_string()))?;
            // SAFETY: `gpa..gpa + bytes` lies in range `r` (checked above),
            // mapped read-write by `new`; nothing else uses the RAM yet.
            let dst =
                unsafe { std::slice::from_raw_parts_mut(host.add((gpa - r.gpa) as usize), bytes as usize) };
            file.read_exact_at(dst, file_offset)
                .map_err(|e| MemoryError::Map(format!("reading snapshot memory: {e}")))?;
        }
        Ok(ram)
    }

    /// The vm-memory view.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The RAM ranges, in guest-physical order.
    pub fn ranges(&self) -> &[RamRange] {
        &self.ranges
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.ranges.iter().map(|r| r.len).sum()
    }

    /// End of RAM below 4 GiB.
    pub fn low_end(&self) -> u64 {
        self.ranges[0].len
    }

    /// Make every page of guest RAM read zero again, releasing the host
    /// memory behind it (a guest reboot). memfd-backed RAM punches a hole
    /// over the whole file; RAM mapped from a snapshot gets fresh anonymous
    /// pages in place of the file's, at the same addresses, so KVM's memory
    /// slots stay valid (its MMU notifier drops the old translations). The
    /// vCPUs must not run.
    pub fn clear(&self) -> Result<(), MemoryError> {
        use std::os::fd::AsRawFd;
        let failed = |what: &str| MemoryError::Map(format!("{what}: {}", std::io::Error::last_os_error()));
        if let Some(memfd) = &self.memfd {
            let len = libc::off_t::try_from(self.size()).map_err(|e| MemoryError::Map(e.to_string()))?;
            // SAFETY: fallocate on our own memfd; punching a hole changes
            // only its contents (they read zero), never the mapping.
            let r = unsafe {
                libc::fallocate(
                    memfd.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    0,
                    len,
                )
            };
            if r != 0 {
                return Err(failed("clearing guest RAM"));
            }
        }
        for &(addr, len) in &self.own_maps {
            // SAFETY: `addr..addr + len` is a mapping this value made and
            // owns (from_snapshot); MAP_FIXED replaces exactly those pages
            // with zero pages at the same address, which every user of the
            // mapping (vm-memory, KVM's slot) keeps referring to.
            let p = unsafe {
                libc::mmap(
                    addr as *mut libc::c_void,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(failed("clearing guest RAM"));
            }
        }
        Ok(())
    }

    /// The backing memfd, if RAM is memfd-backed.
    pub fn memfd(&self) -> Option<&File> {
        self.memfd.as_ref()
    }

    /// Runs of non-zero pages: (gpa, bytes). Holes in the memfd are skipped
    /// without reading them (SEEK_DATA), the rest is checked page by page.
    pub fn nonzero_runs(&self) -> Vec<(u64, u64)> {
        use std::os::fd::AsRawFd;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for r in &self.ranges {
            let Ok(host) = vm_memory::GuestMemoryBackend::get_host_address(&self.mem, GuestAddress(r.gpa))
            else {
                continue;
            };
            let mut off = 0u64;
            while off < r.len {
                if let Some(fd) = &self.memfd {
                    // SAFETY: lseek on our memfd; no memory is touched.
                    let data = unsafe {
                        libc::lseek(fd.as_raw_fd(), (r.file_offset + off) as libc::off_t, libc::SEEK_DATA)
                    };
                    if data < 0 {
                        break; // no data up to the end of the file
                    }
                    let data = data as u64 - r.file_offset;
                    if data >= r.len {
                        break;
                    }
                    off = data & !(PAGE_SIZE - 1);
                }
                // SAFETY: host..host + len maps this range; the VM is paused
                // (vCPUs and device workers), so nothing writes it now.
                let page = unsafe { std::slice::from_raw_parts(host.add(off as usize) as *const u64, 512) };
                if page.iter().any(|w| *w != 0) {
                    let gpa = r.gpa + off;
                    match runs.last_mut() {
                        Some(last) if last.0 + last.1 == gpa => last.1 += PAGE_SIZE,
                        _ => runs.push((gpa, PAGE_SIZE)),
                    }
                }
                off += PAGE_SIZE;
            }
        }
        runs
    }

    /// The memfd offset of `gpa..gpa + len`, if it lies inside one range.
    fn file_offset(&self, gpa: u64, len: u64) -> Option<u64> {
        let end = gpa.checked_add(len)?;
        let r = self.ranges.iter().find(|r| gpa >= r.gpa && end <= r.gpa + r.len)?;
        Some(r.file_offset + gpa - r.gpa)
    }

    /// Write whole pages `data` at `gpa` (inside one range) while the
    /// guest is not running (an incoming migration). On a memfd the pages
    /// are written through the file: a page written whole then is never
    /// zero-filled first, as a first touch through the mapping would be
    /// (the kernel's page clearing was half of the destination's time).
    pub fn write_pages(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        use std::os::unix::fs::FileExt;
        let err = |source| MemoryError::Write { gpa, source };
        let Some(offset) = self.file_offset(gpa, data.len() as u64) else {
            return Err(err(std::io::Error::from_raw_os_error(libc::EFAULT)));
        };
        match &self.memfd {
            Some(fd) => fd.write_all_at(data, offset).map_err(err),
            None => vm_memory::Bytes::write_slice(&self.mem, data, GuestAddress(gpa))
                .map_err(|e| err(std::io::Error::other(e.to_string()))),
        }
    }

    /// Make `len` bytes at `gpa` (inside one range) zero while the guest
    /// is not running: on a memfd, a hole is punched (the pages are freed,
    /// and read back as zero); otherwise zeros are written.
    pub fn zero_pages(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        use std::os::fd::AsRawFd;
        let err = |source| MemoryError::Write { gpa, source };
        let Some(offset) = self.file_offset(gpa, len) else {
            return Err(err(std::io::Error::from_raw_os_error(libc::EFAULT)));
        };
        match &self.memfd {
            Some(fd) => {
                // SAFETY: fallocate on our memfd, inside its size (checked
                // above); the mapping sees the hole as zero pages.
                let r = unsafe {
                    libc::fallocate(
                        fd.as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        offset as libc::off_t,
                        len as libc::off_t,
                    )
                };
                if r != 0 {
                    return Err(err(std::io::Error::last_os_error()));
                }
                Ok(())
            }
            None => {
                let zero = [0u8; PAGE_SIZE as usize];
                for k in 0..len / PAGE_SIZE {
                    vm_memory::Bytes::write_slice(&self.mem, &zero, GuestAddress(gpa + k * PAGE_SIZE))
                        .map_err(|e| err(std::io::Error::other(e.to_string())))?;
                }
                Ok(())
            }
        }
    }

    /// The bytes of RAM at `gpa..gpa + len` (inside one range).
    ///
    /// The caller must keep the VM paused while it holds the slice.
    pub fn bytes(&self, gpa: u64, len: u64) -> Option<&[u8]> {
        let r = self.ranges.iter().find(|r| gpa >= r.gpa && gpa + len <= r.gpa + r.len)?;
        let host = vm_memory::GuestMemoryBackend::get_host_address(&self.mem, GuestAddress(r.gpa)).ok()?;
        // SAFETY: inside the mapping of range `r` (checked above); a slice
        // of plain bytes, read while the VM is paused.
        Some(unsafe { std::slice::from_raw_parts(host.add((gpa - r.gpa) as usize), len as usize) })
    }

    /// Pages written by devices.
    pub fn dirty(&self) -> &DirtyBitmap {
        &self.dirty
    }

    /// The guest-physical address of RAM page `page` (dirty-bitmap numbering).
    pub fn gpa_of_page(&self, page: u64) -> Option<u64> {
        let off = page * PAGE_SIZE;
        self.ranges
            .iter()
            .find(|r| off >= r.file_offset && off < r.file_offset + r.len)
            .map(|r| r.gpa + off - r.file_offset)
    }

    /// The page index of guest-physical address `gpa`, if it is RAM.
    pub fn page_of(&self, gpa: u64) -> Option<u64> {
        self.ranges
            .iter()
            .find(|r| gpa >= r.gpa && gpa < r.gpa + r.len)
            .map(|r| (r.file_offset + gpa - r.gpa) / PAGE_SIZE)
    }

    /// What devices get from `Host::guest_memory`. The addresses stay valid
    /// as long as this `GuestRam` lives, which is the VM's whole life.
    pub fn device_map(&self) -> GuestMemoryMap {
        use vm_memory::GuestMemoryBackend;
        let regions: RVec<MemoryRegion> = self
            .ranges
            .iter()
            .filter_map(|r| {
                let host = self.mem.get_host_address(GuestAddress(r.gpa)).ok()?;
                Some(MemoryRegion {
                    gpa: r.gpa,
                    len: r.len,
                    host_addr: host as u64,
                    first_page: r.file_offset / PAGE_SIZE,
                })
            })
            .collect();
        GuestMemoryMap { regions, dirty_bitmap: self.dirty.as_addr(), dirty_pages: self.dirty.pages() }
    }

    /// The files behind RAM and the dirty bitmap, with the ranges as
    /// `Host::memory_fds` gives them; `None` for RAM mapped from a snapshot
    /// file (private, so not shareable).
    pub fn device_files(&self) -> Option<std::io::Result<RamFiles>> {
        let memfd = self.memfd.as_ref()?;
        let map = self.device_map();
        let files = (|| {
            Ok(RamFiles {
                ram: memfd.try_clone()?,
                bitmap: self.dirty.memfd().try_clone()?,
                bitmap_len: self.dirty.pages().div_ceil(64) * 8,
                ranges: self
                    .ranges
                    .iter()
                    .zip(map.regions.iter())
                    .map(|(r, m)| ferry_plugin_api::MemoryFdRange {
                        gpa: r.gpa,
                        len: r.len,
                        offset: r.file_offset,
                        host_addr: m.host_addr,
                    })
                    .collect(),
            })
        })();
        Some(files)
    }
}

/// The files behind guest RAM, for devices whose work another program does
/// (`Host::memory_fds`).
#[derive(Debug)]
pub struct RamFiles {
    /// The RAM memfd.
    pub ram: File,
    /// The dirty bitmap's memfd.
    pub bitmap: File,
    /// Its length in bytes.
    pub bitmap_len: u64,
    /// RAM ranges with their file offsets and host addresses.
    pub ranges: Vec<ferry_plugin_api::MemoryFdRange>,
}

fn create_memfd(name: &std::ffi::CStr) -> std::io::Result<File> {
    // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns
    // a new fd or -1, and we take ownership of the fd only on success.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a freshly created descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Physical RAM of the host (MemTotal), if /proc says.
pub fn host_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Parse a size such as `512M`, `2G`, `1048576` or `64MiB`.
pub fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return None,
    };
    n.checked_mul(1u64 << shift)
}

/// Format a byte count for people.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (name, unit) in UNITS {
        if bytes >= unit {
            return if bytes % unit == 0 {
                format!("{} {name}", bytes / unit)
            } else {
                format!("{:.1} {name}", bytes as f64 / unit as f64)
            };
        }
    }
    format!("{bytes} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_written_through_the_memfd_show_in_the_mapping_and_zero_runs_free_them() {
        use std::os::unix::fs::MetadataExt;
        let ram = GuestRam::new(16 << 20).unwrap();
        let blocks = |ram: &GuestRam| ram.memfd().unwrap().metadata().unwrap().blocks();
        ram.write_pages(0x20_0000, &[0x5a; 8192]).unwrap();
        assert_eq!(ram.bytes(0x20_0000, 8192).unwrap(), &[0x5a; 8192][..]);
        let written = blocks(&ram);
        assert!(written >= 16, "two pages allocated: {written} blocks");
        ram.zero_pages(0x20_0000, 8192).unwrap();
        assert_eq!(blocks(&ram), written - 16, "the zero run is a hole again");
        assert_eq!(ram.bytes(0x20_0000, 8192).unwrap(), &[0u8; 8192][..]);
        let outside = ram.write_pages(16 << 20, &[1; 4096]).unwrap_err().to_string();
        assert!(outside.starts_with("cannot write guest RAM at 0x1000000"), "{outside}");
        assert!(ram.zero_pages(u64::MAX - 4095, 4096).is_err(), "an overflowing run is refused");
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("64MiB"), Some(64 << 20));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("12Q"), None);
        assert_eq!(parse_size("99999999999T"), None);
    }

    #[test]
    fn layout_splits_around_the_mmio_hole() {
        assert_eq!(layout(256 << 20), vec![RamRange { gpa: 0, len: 256 << 20, file_offset: 0 }]);
        let big = layout(4 << 30);
        assert_eq!(big[0], RamRange { gpa: 0, len: LOW_RAM_LIMIT, file_offset: 0 });
        assert_eq!(
            big[1],
            RamRange { gpa: HIGH_RAM_START, len: (4 << 30) - LOW_RAM_LIMIT, file_offset: LOW_RAM_LIMIT }
        );
    }

    #[test]
    fn more_than_the_host_is_refused() {
        let host = host_memory().expect("/proc/meminfo");
        let err = GuestRam::new(host + (1 << 30)).err().expect("must fail");
        assert!(err.to_string().contains("more than this host can give"), "{err}");
    }

    #[test]
    fn dirty_bitmap_marks_and_takes() {
        let ram = GuestRam::new(4 << 30).unwrap();
        let high = ram.page_of(HIGH_RAM_START + 8192).unwrap();
        assert_eq!(high, (LOW_RAM_LIMIT + 8192) / PAGE_SIZE);
        ram.dirty().mark(3);
        ram.dirty().mark(high);
        assert!(ram.dirty().is_dirty(3) && !ram.dirty().is_dirty(4));
        assert_eq!(ram.dirty().take(), vec![3, high]);
        assert!(ram.dirty().take().is_empty(), "take clears");
        assert_eq!(ram.page_of(LOW_RAM_LIMIT), None, "the MMIO hole is not RAM");
    }

    #[test]
    fn device_writes_through_the_virtio_transport_mark_the_core_bitmap() {
        use vm_memory::Bytes;
        let ram = GuestRam::new(64 << 20).unwrap();
        // The view a virtio device builds from Host::guest_memory.
        let device_view = ferry_virtio_pci::guest_memory_from_host(&ram.device_map()).unwrap();
        device_view.write_slice(&[7u8; 100], GuestAddress(0x20_0ff0)).unwrap();
        assert_eq!(ram.dirty().take(), vec![0x200, 0x201]);
        assert_eq!(ram.mem().read_obj::<u8>(GuestAddress(0x20_1000)).unwrap(), 7, "same RAM");
    }

    #[test]
    fn nonzero_runs_skip_zero_pages_and_holes() {
        use vm_memory::Bytes;
        let ram = GuestRam::new(64 << 20).unwrap();
        ram.mem().write_obj(1u8, GuestAddress(0x5000)).unwrap();
        ram.mem().write_obj(1u8, GuestAddress(0x6fff)).unwrap();
        ram.mem().write_obj(1u8, GuestAddress(0x30_0000)).unwrap();
        ram.mem().write_obj(0u8, GuestAddress(0x40_0000)).unwrap(); // touched, still zero
        assert_eq!(ram.nonzero_runs(), vec![(0x5000, 0x2000), (0x30_0000, 0x1000)]);
    }

    #[test]
    fn cleared_ram_reads_zero() {
        use vm_memory::Bytes;
        let ram = GuestRam::new(16 << 20).unwrap();
        ram.mem().write_slice(b"before the reboot", GuestAddress(0x10_0000)).unwrap();
        ram.clear().unwrap();
        let mut back = [0xffu8; 17];
        ram.mem().read_slice(&mut back, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(back, [0u8; 17]);
        assert!(ram.nonzero_runs().is_empty(), "no page holds data");
    }

    #[test]
    fn cleared_snapshot_ram_reads_zero_not_the_file() {
        use std::io::Write;
        use vm_memory::Bytes;
        let path = std::env::temp_dir().join(format!("ferry-clear-{}", std::process::id()));
        let mut f = File::create(&path).unwrap();
        f.write_all(&[0x5a; 4096]).unwrap();
        drop(f);
        let file = File::open(&path).unwrap();
        let ram = GuestRam::from_snapshot(16 << 20, &file, &[(0x10_0000, 4096, 0)]).unwrap();
        assert_eq!(ram.mem().read_obj::<u8>(GuestAddress(0x10_0000)).unwrap(), 0x5a);
        ram.clear().unwrap();
        assert_eq!(ram.mem().read_obj::<u8>(GuestAddress(0x10_0000)).unwrap(), 0, "not the file's byte");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn ram_is_usable() {
        use vm_memory::Bytes;
        let ram = GuestRam::new(16 << 20).unwrap();
        ram.mem().write_obj(0xdead_beefu32, GuestAddress(0x1000)).unwrap();
        assert_eq!(ram.mem().read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0xdead_beef);
        assert_eq!(ram.size(), 16 << 20);
    }
}
