//! PCI configuration space through configuration mechanism 1 (bus 0 only)
//! and the `pci` token.
//!
//! Port 0xCF8 takes the address 0x8000_0000 | bus << 16 | device << 11 |
//! function << 8 | (register & 0xFC); ports 0xCFC-0xCFF then access that
//! dword. Header registers used: 0x00 vendor ID (0xFFFF = no function) /
//! device ID, 0x04 command (bit 1 memory space, bit 2 bus master, bit 10
//! INTx disable) / status (bit 4 = capability list), 0x08 class code in
//! bits 31:8, 0x0E header type (bit 7 = multi-function), 0x10-0x24 BARs,
//! 0x34 first capability pointer.
//!
//! Memory BAR: bit 0 = 0, bits 2:1 type (0 = 32-bit, 2 = 64-bit with the
//! upper half in the next BAR), bits 31:4 address. Each capability starts
//! with an ID byte and a next-pointer byte (0 ends the list).

use crate::io::{inl, outl, outw};

const CONFIG_ADDRESS: u16 = 0xCF8;
const CONFIG_DATA: u16 = 0xCFC;
const DEVICES: u8 = 32;
const FUNCTIONS: u8 = 8;

pub const REG_COMMAND: u8 = 0x04;
pub const CMD_MEMORY: u16 = 1 << 1;
pub const CMD_BUS_MASTER: u16 = 1 << 2;
pub const CMD_INTX_DISABLE: u16 = 1 << 10;
const REG_STATUS: u8 = 0x06;
const STATUS_CAP_LIST: u16 = 1 << 4;
const REG_CLASS: u8 = 0x08;
const REG_HEADER_TYPE: u8 = 0x0E;
const REG_BAR0: u8 = 0x10;
const REG_CAP_PTR: u8 = 0x34;

/// One function on bus 0.
#[derive(Clone, Copy)]
pub struct Function {
    pub dev: u8,
    pub func: u8,
}

impl Function {
    fn select(self, reg: u8) {
        let addr =
            0x8000_0000 | u32::from(self.dev) << 11 | u32::from(self.func) << 8 | u32::from(reg & 0xFC);
        // SAFETY: CONFIG_ADDRESS only latches the target of the next data
        // port access; it has no memory side effects.
        unsafe { outl(CONFIG_ADDRESS, addr) }
    }

    pub fn read32(self, reg: u8) -> u32 {
        self.select(reg);
        // SAFETY: configuration reads have no side effects on guest memory.
        unsafe { inl(CONFIG_DATA) }
    }

    pub fn read16(self, reg: u8) -> u16 {
        (self.read32(reg) >> (u32::from(reg & 2) * 8)) as u16
    }

    pub fn read8(self, reg: u8) -> u8 {
        (self.read32(reg) >> (u32::from(reg & 3) * 8)) as u8
    }

    /// 16-bit write (no read-modify-write of the neighbouring half, which
    /// for the command register would clear write-1-to-clear status bits).
    pub fn write16(self, reg: u8, val: u16) {
        self.select(reg);
        // SAFETY: callers write the command register and MSI-X message
        // control. Enabling bus mastering lets the device DMA, but only to
        // buffers the drivers hand it (the `.dma` area).
        unsafe { outw(CONFIG_DATA + u16::from(reg & 2), val) }
    }

    /// Sets bits in the command register.
    pub fn enable(self, bits: u16) {
        let cmd = self.read16(REG_COMMAND);
        self.write16(REG_COMMAND, cmd | bits);
    }

    /// Address of memory BAR `index` (32- or 64-bit).
    pub fn bar(self, index: u8) -> Result<u64, &'static str> {
        if index > 5 {
            return Err("bad-bar-index");
        }
        let reg = REG_BAR0 + 4 * index;
        let low = self.read32(reg);
        if low & 1 != 0 {
            return Err("io-bar");
        }
        let addr = match (low >> 1) & 3 {
            0 => u64::from(low & !0xF),
            2 if index < 5 => u64::from(self.read32(reg + 4)) << 32 | u64::from(low & !0xF),
            _ => return Err("bad-bar-type"),
        };
        if addr == 0 {
            return Err("bar-unassigned");
        }
        Ok(addr)
    }

    /// Capability list: `(offset, id)` pairs.
    pub fn capabilities(self) -> Capabilities {
        let first =
            if self.read16(REG_STATUS) & STATUS_CAP_LIST != 0 { self.read8(REG_CAP_PTR) & 0xFC } else { 0 };
        Capabilities { func: self, next: first, budget: 48 }
    }
}

pub struct Capabilities {
    func: Function,
    next: u8,
    /// Guards against a looping list (at most 48 capabilities fit).
    budget: u8,
}

impl Iterator for Capabilities {
    type Item = (u8, u8);

    fn next(&mut self) -> Option<(u8, u8)> {
        if self.next < 0x40 || self.budget == 0 {
            return None;
        }
        self.budget -= 1;
        let at = self.next;
        let head = self.func.read16(at);
        self.next = (head >> 8) as u8 & 0xFC;
        Some((at, head as u8))
    }
}

/// Calls `visit(function, vendor_device)` for every function on bus 0
/// (vendor ID in bits 15:0, device ID in bits 31:16).
fn scan(mut visit: impl FnMut(Function, u32)) {
    for dev in 0..DEVICES {
        let f0 = Function { dev, func: 0 };
        let id = f0.read32(0);
        if id & 0xFFFF == 0xFFFF {
            continue;
        }
        visit(f0, id);
        if f0.read8(REG_HEADER_TYPE) & 0x80 == 0 {
            continue;
        }
        for func in 1..FUNCTIONS {
            let f = Function { dev, func };
            let id = f.read32(0);
            if id & 0xFFFF != 0xFFFF {
                visit(f, id);
            }
        }
    }
}

/// First function with the given vendor and device ID.
pub fn find(vendor: u16, device: u16) -> Option<Function> {
    let want = u32::from(device) << 16 | u32::from(vendor);
    let mut found = None;
    scan(|f, id| {
        if id == want && found.is_none() {
            found = Some(f);
        }
    });
    found
}

/// `pci`: one line per function, then `PCI DONE count=<n>`.
pub fn report() {
    let mut count = 0;
    scan(|f, id| {
        count += 1;
        crate::println!(
            "PCI 00:{:02x}.{} vendor={:04x} device={:04x} class={:06x}",
            f.dev,
            f.func,
            id & 0xFFFF,
            id >> 16,
            f.read32(REG_CLASS) >> 8
        );
    });
    crate::println!("PCI DONE count={}", count);
}
