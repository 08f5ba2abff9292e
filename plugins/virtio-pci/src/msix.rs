//! MSI-X: the vector table and pending bits in BAR 0, and delivery through
//! eventfds the core routes to the guest's chosen message (irqfd), so a
//! completion interrupt never leaves the kernel.
//!
//! Each table entry is 16 bytes: address low, address high, data, vector
//! control (bit 0 masks). A vector that fires while masked (entry or whole
//! function) sets its pending bit; unmasking delivers it.

use std::os::fd::AsRawFd;

use ferry_plugin_api::{serde, HostBox, MsiMessage};

/// Saved MSI-X state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(crate = "ferry_plugin_api::serde")]
pub struct MsixStateV1 {
    entries: Vec<(u64, u32, bool)>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
}
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Entry {
    address: u64,
    data: u32,
    masked: bool,
}

/// MSI-X state of one function.
pub struct Msix {
    entries: Vec<Entry>,
    pending: Vec<bool>,
    fds: Vec<EventFd>,
    /// The message each fd is routed to now, if any.
    routed: Vec<Option<MsiMessage>>,
    /// Message control: MSI-X enable (bit 15).
    pub enabled: bool,
    /// Message control: function mask (bit 14).
    pub function_masked: bool,
    host: HostBox,
}

impl Msix {
    /// `vectors` table entries, all masked.
    pub fn new(vectors: usize, host: HostBox) -> Result<Self, String> {
        let fds = (0..vectors)
            .map(|_| EventFd::new(EFD_NONBLOCK).map_err(|e| format!("cannot create MSI eventfd: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Msix {
            entries: vec![Entry { masked: true, ..Entry::default() }; vectors],
            pending: vec![false; vectors],
            fds,
            routed: vec![None; vectors],
            enabled: false,
            function_masked: false,
            host,
        })
    }

    /// Entries (address, data, masked), pending bits, enable, function mask.
    pub fn snapshot(&self) -> MsixStateV1 {
        MsixStateV1 {
            entries: self.entries.iter().map(|e| (e.address, e.data, e.masked)).collect(),
            pending: self.pending.clone(),
            enabled: self.enabled,
            function_masked: self.function_masked,
        }
    }

    /// Take over a saved table, routing what is deliverable.
    pub fn restore(&mut self, s: &MsixStateV1) -> Result<(), String> {
        if s.entries.len() != self.entries.len() || s.pending.len() != self.pending.len() {
            return Err(format!(
                "MSI-X table of {} vectors, this device has {}",
                s.entries.len(),
                self.entries.len()
            ));
        }
        for (e, &(address, data, masked)) in self.entries.iter_mut().zip(&s.entries) {
            *e = Entry { address, data, masked };
        }
        self.pending.clone_from(&s.pending);
        self.enabled = s.enabled;
        self.function_masked = s.function_masked;
        self.control_changed()
    }

    /// Power-on state: every route undone, every entry masked and empty,
    /// nothing pending, MSI-X disabled (a reset of the PCI function).
    pub fn reset(&mut self) {
        for i in 0..self.entries.len() {
            if self.routed[i].take().is_some() {
                let _ = self.host.msi_unroute(self.fds[i].as_raw_fd());
            }
            let _ = self.fds[i].read();
        }
        self.entries.fill(Entry { masked: true, ..Entry::default() });
        self.pending.fill(false);
        self.enabled = false;
        self.function_masked = false;
    }

    /// Table size.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Read table bytes.
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        let mut bytes = Vec::with_capacity(self.entries.len() * 16);
        for e in &self.entries {
            bytes.extend_from_slice(&(e.address as u32).to_le_bytes());
            bytes.extend_from_slice(&((e.address >> 32) as u32).to_le_bytes());
            bytes.extend_from_slice(&e.data.to_le_bytes());
            bytes.extend_from_slice(&u32::from(e.masked).to_le_bytes());
        }
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    /// Write table bytes (dword accesses, as the spec requires of drivers).
    pub fn table_write(&mut self, offset: u64, data: &[u8]) -> Result<(), String> {
        let index = (offset / 16) as usize;
        let Some(entry) = self.entries.get_mut(index) else { return Ok(()) };
        let mut word = [0u8; 4];
        let n = data.len().min(4);
        word[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(word);
        match offset % 16 {
            0 => entry.address = (entry.address & !0xffff_ffff) | u64::from(value),
            4 => entry.address = (entry.address & 0xffff_ffff) | (u64::from(value) << 32),
            8 => entry.data = value,
            12 => entry.masked = value & 1 != 0,
            _ => {}
        }
        self.sync(index)
    }

    /// Pending bits as the PBA reads.
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        let mut words = vec![0u64; self.pending.len().div_ceil(64)];
        for (i, p) in self.pending.iter().enumerate() {
            if *p {
                words[i / 64] |= 1 << (i % 64);
            }
        }
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    /// Message control changed: re-check every vector.
    pub fn control_changed(&mut self) -> Result<(), String> {
        for i in 0..self.entries.len() {
            self.sync(i)?;
        }
        Ok(())
    }

    fn deliverable(&self, index: usize) -> bool {
        self.enabled && !self.function_masked && !self.entries[index].masked
    }

    /// Keep the route of `index` equal to its entry while it is usable, and
    /// deliver a pending vector once it is unmasked.
    fn sync(&mut self, index: usize) -> Result<(), String> {
        let e = self.entries[index];
        let fd = self.fds[index].as_raw_fd();
        if self.deliverable(index) && e.address != 0 {
            let message = MsiMessage { address: e.address, data: e.data };
            if self.routed[index] != Some(message) {
                self.host.msi_route(fd, message).into_result().map_err(String::from)?;
                self.routed[index] = Some(message);
            }
            if self.pending[index] {
                self.pending[index] = false;
                let _ = self.fds[index].write(1);
            }
        }
        Ok(())
    }

    /// The eventfd of vector `index`: writing it raises the vector once
    /// routed (a write before the route is delivered when it is made).
    pub fn fd(&self, index: u16) -> Option<&EventFd> {
        self.fds.get(usize::from(index))
    }

    /// Raise vector `index` (queue completion or config change).
    pub fn signal(&mut self, index: u16) {
        let i = usize::from(index);
        if i >= self.entries.len() || !self.enabled {
            return;
        }
        if self.deliverable(i) && self.routed[i].is_some() {
            let _ = self.fds[i].write(1);
        } else {
            self.pending[i] = true;
        }
    }
}

impl Drop for Msix {
    fn drop(&mut self) {
        for i in 0..self.entries.len() {
            if self.routed[i].is_some() {
                let _ = self.host.msi_unroute(self.fds[i].as_raw_fd());
            }
        }
    }
}
