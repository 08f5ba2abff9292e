//! The PCI host bridge: configuration mechanism 1 on ports 0xCF8-0xCFF,
//! bus 0 only, and BAR placement in the 32-bit MMIO window.
//!
//! ```text
//!  0xCF8 (dword)  CONFIG_ADDRESS: enable(31) | bus(23:16) | dev(15:11) | fn(10:8) | reg(7:2)
//!  0xCFC..0xCFF   CONFIG_DATA: the addressed dword, any byte lane
//! ```
//!
//! Slot 0 is the host bridge itself (a read-only header). Device plugins
//! that come with a PCI function take slots from 1 up, function 0. The
//! core assigns every BAR an address as firmware would, then maps what the
//! function says it decodes; a guest may move BARs later.

use ferry_plugin_api::PciBar;

/// First port of the configuration mechanism.
pub const CONFIG_ADDRESS_PORT: u16 = 0xcf8;
/// Ports the mechanism occupies.
pub const CONFIG_PORTS: u64 = 8;
/// Start of the window BARs are placed in.
pub const MMIO_WINDOW_START: u64 = 0xc000_0000;
/// End (exclusive) of the window: the I/O APIC follows.
pub const MMIO_WINDOW_END: u64 = 0xfec0_0000;
/// Device slots on bus 0 (slot 0 is the host bridge).
pub const SLOTS: u8 = 32;

/// A decoded CONFIG_ADDRESS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigAddress {
    /// Bus.
    pub bus: u8,
    /// Device (slot).
    pub device: u8,
    /// Function.
    pub function: u8,
    /// Register offset, dword aligned.
    pub register: u32,
}

impl ConfigAddress {
    /// Decode a CONFIG_ADDRESS value; None when the enable bit is clear.
    pub fn decode(value: u32) -> Option<Self> {
        (value & 0x8000_0000 != 0).then_some(ConfigAddress {
            bus: ((value >> 16) & 0xff) as u8,
            device: ((value >> 11) & 0x1f) as u8,
            function: ((value >> 8) & 0x7) as u8,
            register: value & 0xfc,
        })
    }
}

/// The host bridge's configuration header: Intel 440FX PMC, class "host
/// bridge", everything read-only.
pub fn host_bridge_read(offset: u32, data: &mut [u8]) {
    let mut header = [0u8; 64];
    header[0..2].copy_from_slice(&0x8086u16.to_le_bytes());
    header[2..4].copy_from_slice(&0x1237u16.to_le_bytes());
    header[8] = 0x02; // revision
    header[9..12].copy_from_slice(&[0x00, 0x00, 0x06]); // class 06.00.00
    for (i, b) in data.iter_mut().enumerate() {
        *b = header.get(offset as usize + i).copied().unwrap_or(0);
    }
}

/// Places BARs in the MMIO window, naturally aligned, never reusing space.
#[derive(Debug)]
pub struct BarAllocator {
    next: u64,
}

impl Default for BarAllocator {
    fn default() -> Self {
        BarAllocator { next: MMIO_WINDOW_START }
    }
}

impl BarAllocator {
    /// An address for a BAR of `size` bytes (a power of two), if it fits.
    pub fn allocate(&mut self, size: u64) -> Option<u64> {
        if size == 0 || !size.is_power_of_two() {
            return None;
        }
        let addr = self.next.checked_add(size - 1)? & !(size - 1);
        let end = addr.checked_add(size)?;
        if end > MMIO_WINDOW_END {
            return None;
        }
        self.next = end;
        Some(addr)
    }
}

/// Config writes that program `bar` to `address` (one or two dwords).
pub fn bar_writes(bar: &PciBar, address: u64) -> Vec<(u32, u32)> {
    let reg = 0x10 + 4 * bar.index;
    let mut w = vec![(reg, address as u32)];
    if bar.is_64bit {
        w.push((reg + 4, (address >> 32) as u32));
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_address_decodes() {
        assert_eq!(ConfigAddress::decode(0x0000_1810), None, "enable bit clear");
        let a = ConfigAddress::decode(0x8001_1a13).unwrap();
        assert_eq!(a, ConfigAddress { bus: 1, device: 3, function: 2, register: 0x10 });
    }

    #[test]
    fn bars_are_aligned_and_inside_the_window() {
        let mut a = BarAllocator::default();
        assert_eq!(a.allocate(0x1000), Some(MMIO_WINDOW_START));
        assert_eq!(a.allocate(0x8000), Some(MMIO_WINDOW_START + 0x8000));
        assert_eq!(a.allocate(0x1000), Some(MMIO_WINDOW_START + 0x10000));
        assert_eq!(a.allocate(3), None, "not a power of two");
        assert_eq!(a.allocate(1 << 31), None, "larger than the window");
    }

    #[test]
    fn host_bridge_identifies_itself() {
        let mut id = [0u8; 4];
        host_bridge_read(0, &mut id);
        assert_eq!(id, [0x86, 0x80, 0x37, 0x12]);
        let mut class = [0u8; 4];
        host_bridge_read(8, &mut class);
        assert_eq!(class, [0x02, 0x00, 0x00, 0x06]);
    }
}
