//! virtio 1.x PCI transport ("modern" devices: vendor 0x1AF4, device ID
//! 0x1040 + device type) with MSI-X.
//!
//! Vendor capability (ID 0x09): +3 cfg_type (1 common, 2 notify, 3 ISR,
//! 4 device config), +4 BAR, +8 le32 offset, +12 le32 length; the notify
//! capability adds +16 le32 notify_off_multiplier. A queue's notify
//! register is at notify + queue_notify_off * multiplier.
//!
//! MSI-X capability (ID 0x11): +2 message control (bits 10:0 = table
//! size minus 1, bit 14 function mask, bit 15 enable), +4 table offset |
//! BAR index (bits 2:0). Table entry (16 bytes): address low/high, data, vector
//! control (bit 0 = masked). Address 0xFEE0_0000 | APIC ID << 12 and data
//! = vector give a fixed, edge-triggered interrupt on that CPU.
//!
//! Initialisation: reset (status 0), MSI-X enable, ACKNOWLEDGE, DRIVER,
//! feature negotiation, FEATURES_OK (must stick), queue setup (MSI-X
//! entry, queue vector), DRIVER_OK.

use crate::interrupts::MSIX_VECTOR_BASE;
use crate::lapic;
use crate::mmio::Mmio;
use crate::pci::{self, Function};
use crate::virtq::{Virtq, MAX_SIZE};

const VENDOR_VIRTIO: u16 = 0x1AF4;
const CAP_VENDOR: u8 = 0x09;
const CAP_MSIX: u8 = 0x11;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_DEVICE: u8 = 4;

// Common configuration structure (struct virtio_pci_common_cfg).
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0C;
const CONFIG_MSIX_VECTOR: u64 = 0x10;
const DEVICE_STATUS: u64 = 0x14;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1A;
const QUEUE_ENABLE: u64 = 0x1C;
const QUEUE_NOTIFY_OFF: u64 = 0x1E;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;
const COMMON_LEN: u64 = 0x38;

const STATUS_ACKNOWLEDGE: u8 = 1;
const STATUS_DRIVER: u8 = 2;
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
const STATUS_FAILED: u8 = 128;

/// VIRTIO_F_VERSION_1: the device is a virtio 1.x device (always required).
const F_VERSION_1: u64 = 1 << 32;
/// "No MSI-X vector" in the vector registers.
const NO_VECTOR: u16 = 0xFFFF;
const MSIX_ENABLE: u16 = 1 << 15;
const MSIX_FUNCTION_MASK: u16 = 1 << 14;

/// Why a device is not usable.
pub enum InitError {
    Absent,
    Failed(&'static str),
}

impl From<&'static str> for InitError {
    fn from(reason: &'static str) -> Self {
        InitError::Failed(reason)
    }
}

/// What a driver asks for.
pub struct DeviceSpec {
    /// Output prefix: `BLK`, `NET` or `RNG`.
    pub name: &'static str,
    pub device_id: u16,
    /// Feature bits accepted if offered (VERSION_1 is always required).
    pub optional_features: u64,
}

struct Msix {
    table: Mmio,
    entries: u16,
}

pub struct Device {
    name: &'static str,
    common: Mmio,
    notify: Mmio,
    notify_multiplier: u32,
    /// Device-specific configuration, if the device has one.
    pub config: Option<Mmio>,
    msix: Option<Msix>,
    /// Negotiated features.
    pub features: u64,
}

/// Raw fields of a vendor capability.
struct VendorCap {
    cfg_type: u8,
    bar: u8,
    offset: u32,
    length: u32,
}

/// Maps `length` bytes at `offset` into BAR `bar` of `func`.
fn window(func: Function, bar: u8, offset: u64, length: u64) -> Result<Mmio, &'static str> {
    let base = func.bar(bar)?;
    // SAFETY: the range lies inside a memory BAR the device decodes (the
    // capability says so), not in RAM.
    unsafe { Mmio::new(base + offset, length) }.ok_or("bar-not-below-4g")
}

impl Device {
    /// Finds the device, maps its structures, enables MSI-X, resets it and
    /// negotiates features. Queues follow with [`Device::queue`], then
    /// [`Device::driver_ok`].
    pub fn probe(spec: &DeviceSpec) -> Result<Self, InitError> {
        let func = pci::find(VENDOR_VIRTIO, spec.device_id).ok_or(InitError::Absent)?;
        func.enable(pci::CMD_MEMORY | pci::CMD_BUS_MASTER | pci::CMD_INTX_DISABLE);

        let (mut common, mut notify, mut config, mut msix_cap) = (None, None, None, None);
        for (at, id) in func.capabilities() {
            if id == CAP_MSIX {
                msix_cap.get_or_insert(at);
                continue;
            }
            if id != CAP_VENDOR {
                continue;
            }
            let head = func.read32(at);
            let cap = VendorCap {
                cfg_type: (head >> 24) as u8,
                bar: func.read8(at + 4),
                offset: func.read32(at + 8),
                length: func.read32(at + 12),
            };
            // The first capability of each type is the one to use.
            match cap.cfg_type {
                CFG_COMMON if common.is_none() => common = Some(cap),
                CFG_NOTIFY if notify.is_none() => {
                    notify = Some((cap, func.read32(at + 16)));
                }
                CFG_DEVICE if config.is_none() => config = Some(cap),
                _ => {}
            }
        }
        let map = |c: &VendorCap| window(func, c.bar, c.offset.into(), c.length.into());
        let common_cap = common.ok_or("no-common-cfg")?;
        let common = map(&common_cap)?;
        let (notify_cap, notify_multiplier) = notify.ok_or("no-notify-cfg")?;
        let notify = map(&notify_cap)?;
        let config = config.as_ref().map(map).transpose()?;
        if common_cap.length < COMMON_LEN as u32 {
            return Err("common-cfg-too-short".into());
        }

        let mut dev =
            Device { name: spec.name, common, notify, notify_multiplier, config, msix: None, features: 0 };
        dev.reset();
        // Only after the reset, as Linux does: a VMM may tie MSI-X state to it.
        dev.msix = msix_cap.map(|at| enable_msix(func, at)).transpose()?;
        dev.set_status(STATUS_ACKNOWLEDGE);
        dev.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER);

        let offered = dev.read_features();
        if offered & F_VERSION_1 == 0 {
            dev.set_status(STATUS_FAILED);
            return Err("no-version-1".into());
        }
        dev.features = offered & (F_VERSION_1 | spec.optional_features);
        for half in 0..2u32 {
            dev.common.write32(DRIVER_FEATURE_SELECT, half);
            dev.common.write32(DRIVER_FEATURE, (dev.features >> (32 * half)) as u32);
        }
        let status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        dev.set_status(status);
        if dev.common.read8(DEVICE_STATUS) & STATUS_FEATURES_OK == 0 {
            dev.set_status(STATUS_FAILED);
            return Err("features-rejected".into());
        }
        dev.common.write16(CONFIG_MSIX_VECTOR, NO_VECTOR);
        Ok(dev)
    }

    fn read_features(&self) -> u64 {
        let mut features = 0;
        for half in 0..2u32 {
            self.common.write32(DEVICE_FEATURE_SELECT, half);
            features |= u64::from(self.common.read32(DEVICE_FEATURE)) << (32 * half);
        }
        features
    }

    fn set_status(&self, status: u8) {
        self.common.write8(DEVICE_STATUS, status);
    }

    /// Resets the device: it stops using every queue and buffer.
    pub fn reset(&self) {
        self.set_status(0);
        // The device may finish the reset asynchronously: status reads 0
        // once it is done.
        for _ in 0..1000 {
            if self.common.read8(DEVICE_STATUS) == 0 {
                break;
            }
            core::hint::spin_loop();
        }
    }

    /// Sets up queue `index` in the page at `dma_offset`, with MSI-X table
    /// entry `entry` raising vector `MSIX_VECTOR_BASE + irq`. Prints
    /// `<DEV> NO MSIX queue=<q> reason=<r>` if the queue gets no vector.
    pub fn queue(
        &mut self,
        index: u16,
        dma_offset: usize,
        entry: u16,
        irq: usize,
    ) -> Result<Virtq, InitError> {
        let c = self.common;
        c.write16(QUEUE_SELECT, index);
        let max = c.read16(QUEUE_SIZE);
        if max == 0 {
            return Err(self.fail("queue-missing"));
        }
        // Largest power of two <= min(max, MAX_SIZE).
        let size = 1u16 << (15 - max.min(MAX_SIZE).leading_zeros());
        let off = u64::from(c.read16(QUEUE_NOTIFY_OFF)) * u64::from(self.notify_multiplier);
        let Some(notify) = self.notify.sub(off, 2) else {
            return Err(self.fail("notify-outside-cap"));
        };
        let mut q = Virtq::new(index, size, dma_offset, notify, irq);
        c.write16(QUEUE_SIZE, size);
        for (reg, addr) in
            [(QUEUE_DESC, q.desc_addr()), (QUEUE_DRIVER, q.avail_addr()), (QUEUE_DEVICE, q.used_addr())]
        {
            c.write32(reg, addr as u32);
            c.write32(reg + 4, (addr >> 32) as u32);
        }
        q.msix = self.route(index, entry, irq);
        c.write16(QUEUE_ENABLE, 1);
        Ok(q)
    }

    /// Programs MSI-X entry `entry` and assigns it to the selected queue.
    fn route(&self, index: u16, entry: u16, irq: usize) -> bool {
        let reason = match &self.msix {
            None => "no-capability",
            Some(m) if entry >= m.entries => "table-too-small",
            Some(m) => {
                let e = u64::from(entry) * 16;
                let t = m.table;
                t.write32(e, 0xFEE0_0000 | u32::from(lapic::id()) << 12);
                t.write32(e + 4, 0);
                t.write32(e + 8, u32::from(MSIX_VECTOR_BASE) + irq as u32);
                t.write32(e + 12, 0); // unmask
                self.common.write16(QUEUE_MSIX_VECTOR, entry);
                if self.common.read16(QUEUE_MSIX_VECTOR) == entry {
                    return true;
                }
                self.common.write16(QUEUE_MSIX_VECTOR, NO_VECTOR);
                "refused"
            }
        };
        crate::println!("{} NO MSIX queue={} reason={}", self.name, index, reason);
        false
    }

    /// Tells the device the driver is ready (queues are live from now on).
    pub fn driver_ok(&self) {
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    }

    fn fail(&self, reason: &'static str) -> InitError {
        self.set_status(STATUS_FAILED);
        InitError::Failed(reason)
    }
}

/// Enables MSI-X on `func` (capability at `at`); entries stay masked until
/// [`Device::queue`] programs them.
fn enable_msix(func: Function, at: u8) -> Result<Msix, &'static str> {
    let control = func.read16(at + 2);
    let table = func.read32(at + 4);
    let entries = (control & 0x7FF) + 1;
    let table = window(func, (table & 7) as u8, u64::from(table & !7), u64::from(entries) * 16)?;
    lapic::enable();
    func.write16(at + 2, (control | MSIX_ENABLE) & !MSIX_FUNCTION_MASK);
    Ok(Msix { table, entries })
}

/// `fresh`: how device `spec` looks before any driver touched it in this
/// boot: `<NAME> FRESH status=<device status> msix=<on|off>` (after a
/// reset both are 0/off), or `<NAME> FRESH absent`. Changes nothing.
pub fn report_untouched(spec: &DeviceSpec) {
    let Some(func) = pci::find(VENDOR_VIRTIO, spec.device_id) else {
        crate::println!("{} FRESH absent", spec.name);
        return;
    };
    let mut msix = false;
    let mut common = None;
    for (at, id) in func.capabilities() {
        if id == CAP_MSIX {
            msix |= func.read16(at + 2) & MSIX_ENABLE != 0;
        } else if id == CAP_VENDOR && common.is_none() && (func.read32(at) >> 24) as u8 == CFG_COMMON {
            common = Some((func.read8(at + 4), func.read32(at + 8)));
        }
    }
    let status = common
        .and_then(|(bar, offset)| window(func, bar, offset.into(), COMMON_LEN).ok())
        .map(|m| m.read8(DEVICE_STATUS));
    match status {
        Some(s) => crate::println!("{} FRESH status={} msix={}", spec.name, s, if msix { "on" } else { "off" }),
        None => crate::println!("{} FRESH unmapped", spec.name),
    }
}

/// A device that is initialised on first use and kept.
pub enum Slot<T> {
    Untried,
    Absent,
    Failed(&'static str),
    Ready(T),
}

impl<T> Slot<T> {
    /// The device, initialising it first if needed; otherwise prints
    /// `<name> NO DEVICE` or `<name> INIT FAILED <reason>`.
    pub fn get(&mut self, name: &str, init: impl FnOnce() -> Result<T, InitError>) -> Option<&mut T> {
        if let Slot::Untried = self {
            *self = match init() {
                Ok(dev) => Slot::Ready(dev),
                Err(InitError::Absent) => Slot::Absent,
                Err(InitError::Failed(reason)) => Slot::Failed(reason),
            };
        }
        match self {
            Slot::Ready(dev) => Some(dev),
            Slot::Absent => {
                crate::println!("{} NO DEVICE", name);
                None
            }
            Slot::Failed(reason) => {
                crate::println!("{} INIT FAILED {}", name, reason);
                None
            }
            Slot::Untried => None,
        }
    }
}

/// All virtio devices, kept across tokens.
pub struct Devices {
    pub blk: Slot<crate::blk::Blk>,
    pub net: Slot<crate::net::Net>,
    pub rng: Slot<crate::rng::Rng>,
    pub fs: Slot<crate::fs::Fs>,
}

impl Devices {
    pub const fn new() -> Self {
        Self { blk: Slot::Untried, net: Slot::Untried, rng: Slot::Untried, fs: Slot::Untried }
    }
}
