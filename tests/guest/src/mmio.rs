//! Register windows inside PCI memory BARs.
//!
//! Only the first 4 GiB are identity-mapped for MMIO (3-4 GiB uncached, see
//! `boot.rs`), so a window must lie entirely below 4 GiB. Every access is
//! bounds-checked against the window and is one volatile load or store
//! (one VM exit).

const MAPPED_END: u64 = 1 << 32;

#[derive(Clone, Copy)]
pub struct Mmio {
    base: u64,
    len: u64,
}

impl Mmio {
    /// A window of `len` bytes at physical address `base`; `None` unless it
    /// lies inside the identity-mapped first 4 GiB.
    ///
    /// # Safety
    /// The range must be device registers (part of a BAR that a device
    /// decodes), not RAM that Rust code uses.
    pub unsafe fn new(base: u64, len: u64) -> Option<Self> {
        let end = base.checked_add(len)?;
        (base != 0 && end <= MAPPED_END).then_some(Self { base, len })
    }

    /// The part `offset..offset + len` of this window.
    pub fn sub(self, offset: u64, len: u64) -> Option<Self> {
        let end = offset.checked_add(len)?;
        (end <= self.len).then_some(Self { base: self.base + offset, len })
    }

    /// Address of an access of `size` bytes at `offset` (panics outside
    /// the window: a guest bug).
    fn at(self, offset: u64, size: u64) -> u64 {
        assert!(offset + size <= self.len, "MMIO access outside its window");
        self.base + offset
    }

    pub fn read8(self, offset: u64) -> u8 {
        // SAFETY: inside the window, which `new` established to be device
        // registers in the identity map; a load has no memory side effects.
        unsafe { (self.at(offset, 1) as *const u8).read_volatile() }
    }

    pub fn read16(self, offset: u64) -> u16 {
        // SAFETY: as for `read8`.
        unsafe { (self.at(offset, 2) as *const u16).read_volatile() }
    }

    pub fn read32(self, offset: u64) -> u32 {
        // SAFETY: as for `read8`.
        unsafe { (self.at(offset, 4) as *const u32).read_volatile() }
    }

    pub fn write8(self, offset: u64, val: u8) {
        // SAFETY: inside the window (device registers, see `new`); a store
        // there changes device state, never Rust-visible memory.
        unsafe { (self.at(offset, 1) as *mut u8).write_volatile(val) }
    }

    pub fn write16(self, offset: u64, val: u16) {
        // SAFETY: as for `write8`.
        unsafe { (self.at(offset, 2) as *mut u16).write_volatile(val) }
    }

    pub fn write32(self, offset: u64, val: u32) {
        // SAFETY: as for `write8`.
        unsafe { (self.at(offset, 4) as *mut u32).write_volatile(val) }
    }
}
