//! Port and MMIO dispatch: which device answers which guest address.
//!
//! Each address space is a sorted map from range start to (end, owner).
//! Ranges never overlap: inserting one that does is an error that names
//! both claimants. Ranges the in-kernel devices (PIC, PIT, I/O APIC, local
//! APIC) answer are reserved up front, so a plugin cannot claim ports it
//! would never see. The PCI host bridge (ports 0xCF8-0xCFF) is part of the
//! bus: it forwards configuration accesses to the devices' PCI functions
//! and maps their BARs, remapping whenever a configuration write moves one
//! (`pci.rs` here: configuration cycles and BAR mapping; `vacant.rs`: the
//! stand-in while a device is recreated).

use std::{
    collections::BTreeMap,
    fmt,
    sync::{Mutex, MutexGuard, RwLock},
};

use abi_stable::std_types::{RSlice, RSliceMut};
use ferry_plugin_api::{AddressSpace, DeviceBox, PciBar, PciFunctionBox, PCI_BAR_REGION};
use thiserror::Error;

use crate::pci::BarAllocator;

mod pci;
mod vacant;

/// One device instance on the bus.
pub struct DeviceSlot {
    /// Device id from the machine type.
    pub id: String,
    /// Plugin name.
    pub plugin: String,
    /// The device; the lock serialises vCPU threads.
    pub device: Mutex<DeviceBox>,
    /// Its PCI function, if it is a PCI device.
    pub pci: Option<PciSlot>,
}

/// A device's place on PCI bus 0.
pub struct PciSlot {
    /// Slot number (device number on bus 0).
    pub slot: u8,
    function: Mutex<PciFunctionBox>,
    /// BARs currently mapped on the bus.
    mapped: Mutex<Vec<PciBar>>,
    /// The configuration writes ferry made as firmware (BAR addresses, the
    /// command register), replayed when the guest reboots.
    firmware: Mutex<Vec<(u32, Vec<u8>)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl DeviceSlot {
    fn lock(&self) -> MutexGuard<'_, DeviceBox> {
        lock(&self.device)
    }

    /// What a destination must offer to take the device as it runs
    /// (`Device::contract`); empty when it has no contract.
    pub fn contract(&self) -> std::collections::BTreeMap<String, String> {
        match self.lock().contract().into_result() {
            Ok(facts) => facts.iter().map(|p| (p.name.to_string(), p.value.to_string())).collect(),
            Err(_) => Default::default(),
        }
    }
}

/// Who owns a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    Device { index: usize, region: u32 },
    InKernel(&'static str),
    PciConfig,
}

#[derive(Debug, Clone, Copy)]
struct Mapping {
    end: u64, // exclusive
    owner: Owner,
}

type RangeMap = BTreeMap<u64, Mapping>;

/// Bus errors.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    /// Two claimants for one address.
    #[error("{first} and {second} both claim {space} {range}")]
    Overlap {
        /// The earlier claimant.
        first: String,
        /// The later claimant.
        second: String,
        /// "I/O ports" or "MMIO".
        space: &'static str,
        /// The overlapping range.
        range: String,
    },
    /// An empty or wrapping range.
    #[error("{device} claims an invalid {space} range at {base:#x} (length {len})")]
    Invalid {
        /// Claimant.
        device: String,
        /// Space.
        space: &'static str,
        /// Start.
        base: u64,
        /// Length.
        len: u64,
    },
    /// PCI resources ran out.
    #[error("device {device}: {reason}")]
    Pci {
        /// Device id.
        device: String,
        /// What ran out.
        reason: String,
    },
}

/// A device failed while handling a guest access.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceFault {
    /// Device id.
    pub id: String,
    /// Plugin name.
    pub plugin: String,
    /// What the device said.
    pub message: String,
}

impl fmt::Display for DeviceFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "device {} ({}): {}", self.id, self.plugin, self.message)
    }
}

fn space_name(space: AddressSpace) -> &'static str {
    match space {
        AddressSpace::PIO => "I/O ports",
        AddressSpace::MMIO => "MMIO",
        _ => "an unknown address space",
    }
}

/// In-kernel devices' ranges (KVM irqchip and PIT).
const IN_KERNEL: &[(AddressSpace, u64, u64, &str)] = &[
    (AddressSpace::PIO, 0x20, 2, "the in-kernel 8259 PIC"),
    (AddressSpace::PIO, 0xa0, 2, "the in-kernel 8259 PIC"),
    (AddressSpace::PIO, 0x40, 4, "the in-kernel 8254 PIT"),
    (AddressSpace::PIO, 0x61, 1, "the in-kernel PIT speaker port"),
    (AddressSpace::PIO, 0x4d0, 2, "the in-kernel ELCR"),
    (AddressSpace::MMIO, 0xfec0_0000, 0x1000, "the in-kernel I/O APIC"),
    (AddressSpace::MMIO, 0xfee0_0000, 0x1000, "the in-kernel local APIC"),
];

/// Why a device could not be recreated in place.
#[derive(Debug, thiserror::Error)]
pub enum RecreateError {
    /// Its plugin refused to create it (the plugin's words).
    #[error("{0}")]
    Create(String),
    /// The new instance claims other regions.
    #[error("came back claiming {0}")]
    Regions(String),
    /// The new instance has (or lacks) a PCI function the old one lacked (or had).
    #[error("came back with a different PCI function")]
    Pci,
}

/// The address map and the devices.
pub struct Bus {
    pio: RwLock<RangeMap>,
    mmio: RwLock<RangeMap>,
    devices: Vec<DeviceSlot>,
    config_address: Mutex<u32>,
    bars: BarAllocator,
}

impl Default for Bus {
    fn default() -> Self {
        Self::new()
    }
}

impl Bus {
    /// An empty bus with the in-kernel ranges and the PCI host bridge.
    pub fn new() -> Self {
        let bus = Bus {
            pio: RwLock::new(BTreeMap::new()),
            mmio: RwLock::new(BTreeMap::new()),
            devices: Vec::new(),
            config_address: Mutex::new(0),
            bars: BarAllocator::default(),
        };
        for (space, base, len, name) in IN_KERNEL {
            bus.claim(*space, *base, *len, Owner::InKernel(name)).expect("in-kernel ranges are disjoint");
        }
        bus.claim(
            AddressSpace::PIO,
            crate::pci::CONFIG_ADDRESS_PORT.into(),
            crate::pci::CONFIG_PORTS,
            Owner::PciConfig,
        )
        .expect("PCI ports are free");
        bus
    }

    fn owner_name(&self, owner: Owner) -> String {
        match owner {
            Owner::InKernel(name) => name.to_string(),
            Owner::PciConfig => "the PCI host bridge".to_string(),
            Owner::Device { index, .. } => {
                let d = &self.devices[index];
                format!("device {} ({})", d.id, d.plugin)
            }
        }
    }

    /// Port or MMIO map; a space from a later plugin-api (refused when
    /// claimed, see `claim_regions`) reads as MMIO.
    fn map(&self, space: AddressSpace) -> &RwLock<RangeMap> {
        match space {
            AddressSpace::PIO => &self.pio,
            _ => &self.mmio,
        }
    }

    fn claim(&self, space: AddressSpace, base: u64, len: u64, owner: Owner) -> Result<(), BusError> {
        let end = match base.checked_add(len) {
            Some(end) if len > 0 => end,
            _ => {
                return Err(BusError::Invalid {
                    device: self.owner_name(owner),
                    space: space_name(space),
                    base,
                    len,
                })
            }
        };
        let mut map = self.map(space).write().unwrap_or_else(|e| e.into_inner());
        // The only candidate: the last range starting before `end`.
        if let Some((&start, m)) = map.range(..end).next_back() {
            if m.end > base {
                let (lo, hi) = (start.max(base), m.end.min(end) - 1);
                let first = m.owner;
                drop(map);
                return Err(BusError::Overlap {
                    first: self.owner_name(first),
                    second: self.owner_name(owner),
                    space: space_name(space),
                    range: format!("{lo:#x}-{hi:#x}"),
                });
            }
        }
        map.insert(base, Mapping { end, owner });
        Ok(())
    }

    fn release_device(&self, index: usize, bars_only: bool) {
        for space in [AddressSpace::PIO, AddressSpace::MMIO] {
            let mut map = self.map(space).write().unwrap_or_else(|e| e.into_inner());
            map.retain(|_, m| match m.owner {
                Owner::Device { index: d, region } => d != index || (bars_only && region < PCI_BAR_REGION),
                _ => true,
            });
        }
    }

    /// Add a device (and its PCI function, if any) and claim every region
    /// it declares. A PCI function gets the next free slot and addresses
    /// for all its BARs.
    pub fn add_device(
        &mut self,
        id: &str,
        plugin: &str,
        device: DeviceBox,
        pci: Option<PciFunctionBox>,
    ) -> Result<(), BusError> {
        let regions = device.regions();
        let index = self.devices.len();
        let pci = match pci {
            Some(function) => {
                let used = self.devices.iter().filter(|d| d.pci.is_some()).count();
                let slot =
                    u8::try_from(used + 1).ok().filter(|s| *s < crate::pci::SLOTS).ok_or_else(|| {
                        BusError::Pci {
                            device: id.to_string(),
                            reason: "no free PCI slot on bus 0".to_string(),
                        }
                    })?;
                Some(PciSlot {
                    slot,
                    function: Mutex::new(function),
                    mapped: Mutex::new(Vec::new()),
                    firmware: Mutex::new(Vec::new()),
                })
            }
            None => None,
        };
        self.devices.push(DeviceSlot {
            id: id.to_string(),
            plugin: plugin.to_string(),
            device: Mutex::new(device),
            pci,
        });
        let result = self.claim_regions(index, &regions).and_then(|()| self.assign_bars(index));
        if let Err(e) = result {
            // Leave no half-added device behind.
            self.release_device(index, false);
            self.devices.pop();
            return Err(e);
        }
        Ok(())
    }

    fn claim_regions(&self, index: usize, regions: &[ferry_plugin_api::Region]) -> Result<(), BusError> {
        for (i, r) in regions.iter().enumerate() {
            if r.space != AddressSpace::PIO && r.space != AddressSpace::MMIO {
                return Err(BusError::Pci {
                    device: self.devices[index].id.clone(),
                    reason: format!(
                        "region {i} is in address space {}, which this ferry does not know",
                        r.space.0
                    ),
                });
            }
            self.claim(r.space, r.base, r.len, Owner::Device { index, region: i as u32 })?;
        }
        Ok(())
    }

    /// Swap device `index` for a new instance of its plugin (see
    /// [`RecreateError`] for what may go wrong) (a reboot
    /// recreating a device that cannot reset itself). `make` runs after the
    /// old instance is dropped, so host resources it held (a tap, a file
    /// lock) are free for the new one; in between, the slot answers like an
    /// absent device. The new instance must claim the regions the old one
    /// did.
    pub fn recreate_device(
        &self,
        index: usize,
        make: impl FnOnce() -> Result<(DeviceBox, Option<PciFunctionBox>), RecreateError>,
    ) -> Result<(), RecreateError> {
        let slot = &self.devices[index];
        let before: Vec<ferry_plugin_api::Region> = slot.lock().regions().into_iter().collect();
        let old = std::mem::replace(&mut *slot.lock(), vacant::device());
        let old_pci =
            slot.pci.as_ref().map(|p| std::mem::replace(&mut *lock(&p.function), vacant::function()));
        drop(old_pci);
        drop(old);
        let (device, pci) = make()?;
        let after: Vec<ferry_plugin_api::Region> = device.regions().into_iter().collect();
        if after != before {
            return Err(RecreateError::Regions(format!("{after:?}, not {before:?}")));
        }
        match (&slot.pci, pci) {
            (Some(p), Some(function)) => *lock(&p.function) = function,
            (None, None) => {}
            _ => return Err(RecreateError::Pci),
        }
        *slot.lock() = device;
        Ok(())
    }

    /// The devices, in the order they were added.
    pub fn devices(&self) -> &[DeviceSlot] {
        &self.devices
    }

    fn find(map: &RwLock<RangeMap>, addr: u64) -> Option<(u64, Owner)> {
        let map = map.read().unwrap_or_else(|e| e.into_inner());
        let (&start, m) = map.range(..=addr).next_back()?;
        (addr < m.end).then_some((start, m.owner))
    }

    fn fault(&self, index: usize, message: String) -> DeviceFault {
        let d = &self.devices[index];
        DeviceFault { id: d.id.clone(), plugin: d.plugin.clone(), message }
    }

    fn read(&self, space: AddressSpace, addr: u64, data: &mut [u8]) -> Result<(), DeviceFault> {
        match Self::find(self.map(space), addr) {
            Some((start, Owner::Device { index, region })) => {
                let result =
                    self.devices[index].lock().read(region, addr - start, RSliceMut::from_mut_slice(data));
                result.into_result().map_err(|e| self.fault(index, e.into()))
            }
            Some((start, Owner::PciConfig)) => {
                self.config_read((addr - start) as u32, data);
                Ok(())
            }
            _ => {
                // Nothing there: the bus floats high.
                data.fill(0xff);
                Ok(())
            }
        }
    }

    fn write(&self, space: AddressSpace, addr: u64, data: &[u8]) -> Result<(), DeviceFault> {
        match Self::find(self.map(space), addr) {
            Some((start, Owner::Device { index, region })) => {
                let result = self.devices[index].lock().write(region, addr - start, RSlice::from_slice(data));
                result.into_result().map_err(|e| self.fault(index, e.into()))
            }
            Some((start, Owner::PciConfig)) => self.config_write((addr - start) as u32, data),
            _ => Ok(()),
        }
    }

    /// A guest port read.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) -> Result<(), DeviceFault> {
        self.read(AddressSpace::PIO, port.into(), data)
    }

    /// A guest port write.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> Result<(), DeviceFault> {
        self.write(AddressSpace::PIO, port.into(), data)
    }

    /// A guest MMIO read.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> Result<(), DeviceFault> {
        self.read(AddressSpace::MMIO, addr, data)
    }

    /// A guest MMIO write.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> Result<(), DeviceFault> {
        self.write(AddressSpace::MMIO, addr, data)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use abi_stable::{
        sabi_trait::TD_Opaque,
        std_types::{RResult, RVec},
    };
    use ferry_plugin_api::{Device, PluginError, Region, StateBlob};

    /// Remembers the last write; reads return the region index.
    pub(super) struct Fake {
        pub(super) regions: Vec<Region>,
        pub(super) fail: bool,
    }

    impl Device for Fake {
        fn regions(&self) -> RVec<Region> {
            self.regions.iter().copied().collect()
        }
        fn read(
            &mut self,
            region: u32,
            offset: u64,
            mut data: RSliceMut<'_, u8>,
        ) -> RResult<(), PluginError> {
            data.as_mut_slice().fill((region as u8) << 4 | offset as u8);
            RResult::ROk(())
        }
        fn write(&mut self, _: u32, _: u64, _: RSlice<'_, u8>) -> RResult<(), PluginError> {
            if self.fail {
                RResult::RErr(PluginError::other("register jammed"))
            } else {
                RResult::ROk(())
            }
        }
        fn pause(&mut self) -> RResult<(), PluginError> {
            RResult::ROk(())
        }
        fn resume(&mut self) -> RResult<(), PluginError> {
            RResult::ROk(())
        }
        fn save_state(&mut self, _: u32) -> RResult<StateBlob, PluginError> {
            RResult::RErr(PluginError::other("no"))
        }
        fn load_state(&mut self, _: StateBlob) -> RResult<(), PluginError> {
            RResult::RErr(PluginError::other("no"))
        }
    }

    fn pio(base: u64, len: u64) -> Region {
        Region { space: AddressSpace::PIO, base, len }
    }

    pub(super) fn fake(regions: Vec<Region>) -> DeviceBox {
        DeviceBox::from_value(Fake { regions, fail: false }, TD_Opaque)
    }

    #[test]
    fn accesses_reach_the_right_region_and_offset() {
        let mut bus = Bus::new();
        bus.add_device("a", "fake", fake(vec![pio(0x3f8, 8), pio(0x2f8, 8)]), None).unwrap();
        let mut b = [0u8; 1];
        bus.pio_read(0x3fa, &mut b).unwrap();
        assert_eq!(b[0], 0x02);
        bus.pio_read(0x2ff, &mut b).unwrap();
        assert_eq!(b[0], 0x17);
        bus.pio_read(0x400, &mut b).unwrap();
        assert_eq!(b[0], 0xff, "unclaimed port floats high");
    }

    #[test]
    fn overlapping_claims_name_both_devices() {
        let mut bus = Bus::new();
        bus.add_device("com1", "serial", fake(vec![pio(0x3f8, 8)]), None).unwrap();
        let err = bus.add_device("com2", "serial", fake(vec![pio(0x3fc, 8)]), None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "device com1 (serial) and device com2 (serial) both claim I/O ports 0x3fc-0x3ff"
        );
        assert_eq!(bus.devices().len(), 1, "the refused device is not left behind");
        let err = bus.add_device("pic", "x", fake(vec![pio(0x21, 1)]), None).unwrap_err();
        assert!(err.to_string().starts_with("the in-kernel 8259 PIC and device pic (x)"), "{err}");
        // Adjacent ranges are fine.
        bus.add_device("next", "x", fake(vec![pio(0x400, 1), pio(0x3f7, 1)]), None).unwrap();
    }

    #[test]
    fn device_errors_name_the_device() {
        let mut bus = Bus::new();
        bus.add_device(
            "com1",
            "serial-16550",
            DeviceBox::from_value(Fake { regions: vec![pio(0x3f8, 8)], fail: true }, TD_Opaque),
            None,
        )
        .unwrap();
        let err = bus.pio_write(0x3f8, &[1]).unwrap_err();
        assert_eq!(err.to_string(), "device com1 (serial-16550): register jammed");
    }
}
