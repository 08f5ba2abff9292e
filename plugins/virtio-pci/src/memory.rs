//! Guest memory as a virtio device sees it: the core's RAM mappings, wrapped
//! in vm-memory, with every write marking its pages in the core's dirty
//! bitmap (device writes are invisible to KVM's dirty log, and live
//! migration must resend those pages).

use std::sync::atomic::{AtomicU64, Ordering};

use ferry_plugin_api::GuestMemoryMap;
use vm_memory::{
    bitmap::{Bitmap, BitmapSlice, WithBitmapSlice},
    mmap::MmapRegionBuilder,
    GuestAddress, GuestRegionMmap,
};

/// Guest memory whose writes mark the shared dirty bitmap.
pub type GuestMemory = vm_memory::GuestMemoryMmap<DirtyMarker>;

const PAGE: usize = 4096;

/// vm-memory bitmap backend over the core's shared dirty bitmap. One value
/// per RAM region; slices carry their offset into the region.
#[derive(Clone, Copy, Debug)]
pub struct DirtyMarker {
    /// Address of the core's `AtomicU64` words.
    words: usize,
    /// Pages the core's bitmap covers.
    pages: u64,
    /// Bitmap index of the region's first page.
    first_page: u64,
    /// Byte offset of this slice inside the region.
    offset: usize,
}

impl DirtyMarker {
    fn word(&self, page: u64) -> Option<&AtomicU64> {
        if page >= self.pages || self.words == 0 {
            return None;
        }
        // SAFETY: `words` points at `pages.div_ceil(64)` AtomicU64s that the
        // core keeps alive for the whole life of the VM (and so of every
        // device), and `page < pages`.
        Some(unsafe { &*(self.words as *const AtomicU64).add((page / 64) as usize) })
    }

    fn page_at(&self, offset: usize) -> u64 {
        self.first_page + ((self.offset + offset) / PAGE) as u64
    }
}

impl<'a> WithBitmapSlice<'a> for DirtyMarker {
    type S = Self;
}

impl BitmapSlice for DirtyMarker {}

impl Bitmap for DirtyMarker {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        let first = self.page_at(offset);
        let last = self.page_at(offset + len - 1);
        for page in first..=last {
            if let Some(w) = self.word(page) {
                w.fetch_or(1 << (page % 64), Ordering::Release);
            }
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        let page = self.page_at(offset);
        self.word(page).is_some_and(|w| w.load(Ordering::Acquire) & (1 << (page % 64)) != 0)
    }

    fn slice_at(&self, offset: usize) -> Self {
        DirtyMarker { offset: self.offset + offset, ..*self }
    }
}

/// Build the device's view of guest memory from what the host handed over.
pub fn from_host(map: &GuestMemoryMap) -> Result<GuestMemory, String> {
    let mut regions = Vec::with_capacity(map.regions.len());
    for r in map.regions.iter() {
        let size = usize::try_from(r.len).map_err(|_| "guest RAM region too large".to_string())?;
        let marker = DirtyMarker {
            words: map.dirty_bitmap as usize,
            pages: map.dirty_pages,
            first_page: r.first_page,
            offset: 0,
        };
        // SAFETY: the host guarantees `host_addr..host_addr + len` is a live
        // shared, read-write mapping of guest RAM for the VM's life.
        let builder = unsafe {
            MmapRegionBuilder::new_with_bitmap(size, marker)
                .with_raw_mmap_pointer(r.host_addr as *mut u8)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_SHARED)
        };
        let mapping = builder.build().map_err(|e| format!("cannot map guest RAM: {e}"))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(r.gpa))
            .ok_or_else(|| format!("guest RAM region at {:#x} wraps", r.gpa))?;
        regions.push(region);
    }
    GuestMemory::from_regions(regions).map_err(|e| format!("bad guest RAM layout: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakeRam;
    use vm_memory::Bytes;

    #[test]
    fn device_writes_mark_exactly_their_pages() {
        let fake = FakeRam::new(1 << 20);
        let mem = from_host(&fake.map()).unwrap();
        mem.write_slice(&[1u8; 10], GuestAddress(3 * 4096 + 4090)).unwrap();
        let _ = mem.read_obj::<u64>(GuestAddress(9 * 4096)).unwrap();
        assert_eq!(
            fake.dirty_pages(),
            vec![3, 4],
            "a write across a page boundary marks both; reads mark nothing"
        );
        assert_eq!(fake.bytes()[3 * 4096 + 4095], 1);
    }

    #[test]
    fn accesses_outside_ram_fail() {
        let fake = FakeRam::new(1 << 20);
        let mem = from_host(&fake.map()).unwrap();
        assert!(mem.write_slice(&[1u8; 8], GuestAddress(1 << 20)).is_err());
        assert!(mem.write_slice(&[1u8; 8], GuestAddress((1 << 20) - 4)).is_err());
    }
}
