//! Port and MMIO dispatch: which device answers which guest address.
//!
//! Each address space is a sorted map from range start to (end, device,
//! region). Ranges never overlap: inserting one that does is an error that
//! names both claimants. Ranges the in-kernel devices (PIC, PIT, I/O APIC,
//! local APIC) answer are reserved up front, so a plugin cannot claim ports
//! it would never see.

use std::{collections::BTreeMap, fmt, sync::Mutex};

use abi_stable::std_types::{RSlice, RSliceMut};
use ferry_plugin_api::{AddressSpace, DeviceBox};
use thiserror::Error;

/// One device instance on the bus.
pub struct DeviceSlot {
    /// Device id from the machine type.
    pub id: String,
    /// Plugin name.
    pub plugin: String,
    /// The device; the lock serialises vCPU threads.
    pub device: Mutex<DeviceBox>,
}

impl DeviceSlot {
    fn lock(&self) -> std::sync::MutexGuard<'_, DeviceBox> {
        self.device.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Who owns a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    Device { index: usize, region: u32 },
    InKernel(&'static str),
}

#[derive(Debug, Clone, Copy)]
struct Mapping {
    end: u64, // exclusive
    owner: Owner,
}

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
        AddressSpace::Pio => "I/O ports",
        AddressSpace::Mmio => "MMIO",
    }
}

/// In-kernel devices' ranges (KVM irqchip and PIT).
const IN_KERNEL: &[(AddressSpace, u64, u64, &str)] = &[
    (AddressSpace::Pio, 0x20, 2, "the in-kernel 8259 PIC"),
    (AddressSpace::Pio, 0xa0, 2, "the in-kernel 8259 PIC"),
    (AddressSpace::Pio, 0x40, 4, "the in-kernel 8254 PIT"),
    (AddressSpace::Pio, 0x61, 1, "the in-kernel PIT speaker port"),
    (AddressSpace::Pio, 0x4d0, 2, "the in-kernel ELCR"),
    (
        AddressSpace::Mmio,
        0xfec0_0000,
        0x1000,
        "the in-kernel I/O APIC",
    ),
    (
        AddressSpace::Mmio,
        0xfee0_0000,
        0x1000,
        "the in-kernel local APIC",
    ),
];

/// The address map and the devices.
pub struct Bus {
    pio: BTreeMap<u64, Mapping>,
    mmio: BTreeMap<u64, Mapping>,
    devices: Vec<DeviceSlot>,
}

impl Default for Bus {
    fn default() -> Self {
        Self::new()
    }
}

impl Bus {
    /// An empty bus with the in-kernel ranges reserved.
    pub fn new() -> Self {
        let mut bus = Bus {
            pio: BTreeMap::new(),
            mmio: BTreeMap::new(),
            devices: Vec::new(),
        };
        for (space, base, len, name) in IN_KERNEL {
            bus.claim(*space, *base, *len, Owner::InKernel(name))
                .expect("in-kernel ranges are disjoint");
        }
        bus
    }

    fn owner_name(&self, owner: Owner) -> String {
        match owner {
            Owner::InKernel(name) => name.to_string(),
            Owner::Device { index, .. } => {
                let d = &self.devices[index];
                format!("device {} ({})", d.id, d.plugin)
            }
        }
    }

    fn claim(
        &mut self,
        space: AddressSpace,
        base: u64,
        len: u64,
        owner: Owner,
    ) -> Result<(), BusError> {
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
        let map = match space {
            AddressSpace::Pio => &self.pio,
            AddressSpace::Mmio => &self.mmio,
        };
        // The only candidates: the last range starting before `end`.
        if let Some((&start, m)) = map.range(..end).next_back() {
            if m.end > base {
                let (lo, hi) = (start.max(base), m.end.min(end) - 1);
                return Err(BusError::Overlap {
                    first: self.owner_name(m.owner),
                    second: self.owner_name(owner),
                    space: space_name(space),
                    range: format!("{lo:#x}-{hi:#x}"),
                });
            }
        }
        let map = match space {
            AddressSpace::Pio => &mut self.pio,
            AddressSpace::Mmio => &mut self.mmio,
        };
        map.insert(base, Mapping { end, owner });
        Ok(())
    }

    /// Add a device and claim every region it declares.
    pub fn add_device(
        &mut self,
        id: &str,
        plugin: &str,
        device: DeviceBox,
    ) -> Result<(), BusError> {
        let regions = device.regions();
        let index = self.devices.len();
        self.devices.push(DeviceSlot {
            id: id.to_string(),
            plugin: plugin.to_string(),
            device: Mutex::new(device),
        });
        for (i, r) in regions.iter().enumerate() {
            let owner = Owner::Device {
                index,
                region: i as u32,
            };
            if let Err(e) = self.claim(r.space, r.base, r.len, owner) {
                // Leave no half-added device behind.
                self.pio.retain(
                    |_, m| !matches!(m.owner, Owner::Device { index: d, .. } if d == index),
                );
                self.mmio.retain(
                    |_, m| !matches!(m.owner, Owner::Device { index: d, .. } if d == index),
                );
                self.devices.pop();
                return Err(e);
            }
        }
        Ok(())
    }

    /// The devices, in the order they were added.
    pub fn devices(&self) -> &[DeviceSlot] {
        &self.devices
    }

    fn find(map: &BTreeMap<u64, Mapping>, addr: u64) -> Option<(u64, Owner)> {
        let (&start, m) = map.range(..=addr).next_back()?;
        (addr < m.end).then_some((start, m.owner))
    }

    fn fault(&self, index: usize, message: String) -> DeviceFault {
        let d = &self.devices[index];
        DeviceFault {
            id: d.id.clone(),
            plugin: d.plugin.clone(),
            message,
        }
    }

    fn read(
        &self,
        map: &BTreeMap<u64, Mapping>,
        addr: u64,
        data: &mut [u8],
    ) -> Result<(), DeviceFault> {
        match Self::find(map, addr) {
            Some((start, Owner::Device { index, region })) => {
                let result = self.devices[index].lock().read(
                    region,
                    addr - start,
                    RSliceMut::from_mut_slice(data),
                );
                result
                    .into_result()
                    .map_err(|e| self.fault(index, e.into()))
            }
            _ => {
                // Nothing there: the bus floats high.
                data.fill(0xff);
                Ok(())
            }
        }
    }

    fn write(
        &self,
        map: &BTreeMap<u64, Mapping>,
        addr: u64,
        data: &[u8],
    ) -> Result<(), DeviceFault> {
        match Self::find(map, addr) {
            Some((start, Owner::Device { index, region })) => {
                let result = self.devices[index].lock().write(
                    region,
                    addr - start,
                    RSlice::from_slice(data),
                );
                result
                    .into_result()
                    .map_err(|e| self.fault(index, e.into()))
            }
            _ => Ok(()),
        }
    }

    /// A guest port read.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) -> Result<(), DeviceFault> {
        self.read(&self.pio, port.into(), data)
    }

    /// A guest port write.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> Result<(), DeviceFault> {
        self.write(&self.pio, port.into(), data)
    }

    /// A guest MMIO read.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> Result<(), DeviceFault> {
        self.read(&self.mmio, addr, data)
    }

    /// A guest MMIO write.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> Result<(), DeviceFault> {
        self.write(&self.mmio, addr, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use abi_stable::{
        sabi_trait::TD_Opaque,
        std_types::{RResult, RString, RVec},
    };
    use ferry_plugin_api::{Device, Region, StateBlob};

    /// Remembers the last write; reads return the region index.
    struct Fake {
        regions: Vec<Region>,
        fail: bool,
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
        ) -> RResult<(), RString> {
            data.as_mut_slice().fill((region as u8) << 4 | offset as u8);
            RResult::ROk(())
        }
        fn write(&mut self, _: u32, _: u64, _: RSlice<'_, u8>) -> RResult<(), RString> {
            if self.fail {
                RResult::RErr("register jammed".into())
            } else {
                RResult::ROk(())
            }
        }
        fn pause(&mut self) -> RResult<(), RString> {
            RResult::ROk(())
        }
        fn resume(&mut self) -> RResult<(), RString> {
            RResult::ROk(())
        }
        fn save_state(&mut self, _: u32) -> RResult<StateBlob, RString> {
            RResult::RErr("no".into())
        }
        fn load_state(&mut self, _: StateBlob) -> RResult<(), RString> {
            RResult::RErr("no".into())
        }
    }

    fn pio(base: u64, len: u64) -> Region {
        Region {
            space: AddressSpace::Pio,
            base,
            len,
        }
    }

    fn fake(regions: Vec<Region>) -> DeviceBox {
        DeviceBox::from_value(
            Fake {
                regions,
                fail: false,
            },
            TD_Opaque,
        )
    }

    #[test]
    fn accesses_reach_the_right_region_and_offset() {
        let mut bus = Bus::new();
        bus.add_device("a", "fake", fake(vec![pio(0x3f8, 8), pio(0x2f8, 8)]))
            .unwrap();
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
        bus.add_device("com1", "serial", fake(vec![pio(0x3f8, 8)]))
            .unwrap();
        let err = bus
            .add_device("com2", "serial", fake(vec![pio(0x3fc, 8)]))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "device com1 (serial) and device com2 (serial) both claim I/O ports 0x3fc-0x3ff"
        );
        assert_eq!(
            bus.devices().len(),
            1,
            "the refused device is not left behind"
        );
        let err = bus
            .add_device("pic", "x", fake(vec![pio(0x21, 1)]))
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("the in-kernel 8259 PIC and device pic (x)"),
            "{err}"
        );
        // Adjacent ranges are fine.
        bus.add_device("next", "x", fake(vec![pio(0x400, 1), pio(0x3f7, 1)]))
            .unwrap();
    }

    #[test]
    fn device_errors_name_the_device() {
        let mut bus = Bus::new();
        bus.add_device(
            "com1",
            "serial-16550",
            DeviceBox::from_value(
                Fake {
                    regions: vec![pio(0x3f8, 8)],
                    fail: true,
                },
                TD_Opaque,
            ),
        )
        .unwrap();
        let err = bus.pio_write(0x3f8, &[1]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "device com1 (serial-16550): register jammed"
        );
    }
}
