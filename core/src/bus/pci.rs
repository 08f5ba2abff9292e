//! The bus's PCI side: configuration cycles through the host bridge's
//! ports (0xCF8 address latch, 0xCFC-0xCFF data) to bus 0's functions,
//! BARs programmed as firmware would and mapped on the MMIO map, and
//! remapped whenever a configuration write moves or disables one. The
//! address decoding and BAR placement are `crate::pci`'s.

use abi_stable::std_types::{RSlice, RSliceMut};
use ferry_plugin_api::{AddressSpace, PciBar, PCI_BAR_REGION};

use super::{lock, Bus, BusError, DeviceFault, Owner};
use crate::pci::{self, ConfigAddress};

impl Bus {
    /// Program every BAR of device `index`'s PCI function, as firmware would,
    /// enable memory decoding and bus mastering, and map the BARs.
    pub(super) fn assign_bars(&mut self, index: usize) -> Result<(), BusError> {
        let Some(pci) = &self.devices[index].pci else { return Ok(()) };
        let mut function = lock(&pci.function);
        let mut bars: Vec<PciBar> = function.bars().into_iter().collect();
        bars.sort_by_key(|b| std::cmp::Reverse(b.size));
        let mut writes = Vec::new();
        for bar in &bars {
            let address = self.bars.allocate(bar.size).ok_or_else(|| BusError::Pci {
                device: self.devices[index].id.clone(),
                reason: format!("BAR {} ({} bytes) does not fit in the PCI MMIO window", bar.index, bar.size),
            })?;
            for (reg, value) in pci::bar_writes(bar, address) {
                writes.push((reg, value.to_le_bytes().to_vec()));
            }
        }
        let mut command = [0u8; 2];
        function.config_read(4, RSliceMut::from_mut_slice(&mut command));
        let command = u16::from_le_bytes(command) | 0x6; // memory space, bus master
        writes.push((4, command.to_le_bytes().to_vec()));
        for (reg, bytes) in &writes {
            let _ = function.config_write(*reg, RSlice::from_slice(bytes));
        }
        drop(function);
        *lock(&pci.firmware) = writes;
        self.remap_bars(index);
        Ok(())
    }

    /// After a reboot reset device `index`: program its PCI function as
    /// firmware did when it was added (the same BAR addresses, decoding
    /// and bus mastering on) and map its BARs again.
    pub fn reprogram_pci(&self, index: usize) {
        let Some(pci) = &self.devices[index].pci else { return };
        let writes = lock(&pci.firmware).clone();
        {
            let mut function = lock(&pci.function);
            for (reg, bytes) in &writes {
                let _ = function.config_write(*reg, RSlice::from_slice(bytes));
            }
        }
        self.remap_bars(index);
    }

    /// Map the BARs device `index` decodes now, dropping the old mappings.
    /// A BAR the guest moved onto another device's range stays unmapped.
    pub(super) fn remap_bars(&self, index: usize) {
        let d = &self.devices[index];
        let Some(pci) = &d.pci else { return };
        let now: Vec<PciBar> =
            lock(&pci.function).bars().into_iter().filter(|b| b.enabled && b.address != 0).collect();
        let mut mapped = lock(&pci.mapped);
        if *mapped == now {
            return;
        }
        self.release_device(index, true);
        mapped.clear();
        for bar in now {
            let owner = Owner::Device { index, region: PCI_BAR_REGION + bar.index };
            match self.claim(AddressSpace::MMIO, bar.address, bar.size, owner) {
                Ok(()) => mapped.push(bar),
                Err(e) => crate::log::warn(&format!("BAR {} of device {} not mapped: {e}", bar.index, d.id)),
            }
        }
    }

    /// Map every PCI function's BARs as they are now (after device state
    /// was loaded, the guest's BAR addresses may differ from fresh ones).
    pub fn refresh_pci(&self) {
        for index in 0..self.devices.len() {
            self.remap_bars(index);
        }
    }

    /// The device at `slot` of bus 0, by index.
    pub(super) fn pci_device(&self, slot: u8) -> Option<usize> {
        self.devices.iter().position(|d| d.pci.as_ref().is_some_and(|p| p.slot == slot))
    }

    /// A read of the configuration ports (offset 0 = 0xCF8).
    pub(super) fn config_read(&self, offset: u32, data: &mut [u8]) {
        let latch = *lock(&self.config_address);
        if offset < 4 {
            let bytes = latch.to_le_bytes();
            for (i, b) in data.iter_mut().enumerate() {
                *b = bytes.get(offset as usize + i).copied().unwrap_or(0xff);
            }
            return;
        }
        data.fill(0xff);
        let Some(a) = ConfigAddress::decode(latch) else { return };
        let register = a.register + (offset - 4);
        if a.bus != 0 || a.function != 0 {
            return;
        }
        if a.device == 0 {
            pci::host_bridge_read(register, data);
        } else if let Some(index) = self.pci_device(a.device) {
            if let Some(pci) = &self.devices[index].pci {
                lock(&pci.function).config_read(register, RSliceMut::from_mut_slice(data));
            }
        }
    }

    /// A write to the configuration ports.
    pub(super) fn config_write(&self, offset: u32, data: &[u8]) -> Result<(), DeviceFault> {
        if offset == 0 && data.len() == 4 {
            *lock(&self.config_address) = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            return Ok(());
        }
        if offset < 4 {
            return Ok(()); // partial writes of CONFIG_ADDRESS are not config cycles
        }
        let latch = *lock(&self.config_address);
        let Some(a) = ConfigAddress::decode(latch) else { return Ok(()) };
        if a.bus != 0 || a.function != 0 || a.device == 0 {
            return Ok(());
        }
        let Some(index) = self.pci_device(a.device) else { return Ok(()) };
        let Some(pci) = &self.devices[index].pci else { return Ok(()) };
        let register = a.register + (offset - 4);
        let result = lock(&pci.function).config_write(register, RSlice::from_slice(data));
        result.into_result().map_err(|e| self.fault(index, e.into()))?;
        self.remap_bars(index);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use abi_stable::{
        sabi_trait::TD_Opaque,
        std_types::{RResult, RSlice, RSliceMut, RVec},
    };
    use ferry_plugin_api::{PciBar, PciFunction, PciFunctionBox, PluginError, PCI_BAR_REGION};

    use super::super::tests::fake;
    use crate::{bus::Bus, pci};

    /// A PCI function with one 4 KiB memory BAR, decoding when memory space
    /// is enabled (command bit 1), like a real header.
    struct FakePci {
        bar: u32,
        command: u16,
    }

    impl PciFunction for FakePci {
        fn config_read(&mut self, offset: u32, mut data: RSliceMut<'_, u8>) {
            let mut space = [0u8; 64];
            space[0..4].copy_from_slice(&0x1042_1af4u32.to_le_bytes());
            space[4..6].copy_from_slice(&self.command.to_le_bytes());
            space[0x10..0x14].copy_from_slice(&self.bar.to_le_bytes());
            for (i, b) in data.as_mut_slice().iter_mut().enumerate() {
                *b = space.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn config_write(&mut self, offset: u32, data: RSlice<'_, u8>) -> RResult<(), PluginError> {
            let d = data.as_slice();
            match (offset, d.len()) {
                (4, 2) => self.command = u16::from_le_bytes([d[0], d[1]]),
                (0x10, 4) => self.bar = u32::from_le_bytes([d[0], d[1], d[2], d[3]]) & !0xfff,
                _ => {}
            }
            RResult::ROk(())
        }
        fn bars(&self) -> RVec<PciBar> {
            vec![PciBar {
                index: 0,
                size: 0x1000,
                address: u64::from(self.bar),
                is_64bit: false,
                enabled: self.command & 2 != 0,
            }]
            .into()
        }
    }

    fn config_addr(slot: u8, reg: u32) -> [u8; 4] {
        (0x8000_0000u32 | u32::from(slot) << 11 | reg).to_le_bytes()
    }

    #[test]
    fn pci_functions_get_a_slot_bars_and_follow_bar_moves() {
        let mut bus = Bus::new();
        let function = PciFunctionBox::from_value(FakePci { bar: 0, command: 0 }, TD_Opaque);
        bus.add_device("blk0", "fake", fake(vec![]), Some(function)).unwrap();

        // Slot 0 is the host bridge, the device is slot 1.
        let mut id = [0u8; 4];
        bus.pio_write(0xcf8, &config_addr(0, 0)).unwrap();
        bus.pio_read(0xcfc, &mut id).unwrap();
        assert_eq!(u32::from_le_bytes(id), 0x1237_8086);
        bus.pio_write(0xcf8, &config_addr(1, 0)).unwrap();
        bus.pio_read(0xcfc, &mut id).unwrap();
        assert_eq!(u32::from_le_bytes(id), 0x1042_1af4);
        bus.pio_write(0xcf8, &config_addr(2, 0)).unwrap();
        bus.pio_read(0xcfc, &mut id).unwrap();
        assert_eq!(id, [0xff; 4], "empty slot");

        // The BAR was assigned and is mapped: region PCI_BAR_REGION + 0.
        let mut b = [0u8; 1];
        bus.mmio_read(pci::MMIO_WINDOW_START + 5, &mut b).unwrap();
        assert_eq!(b[0], ((PCI_BAR_REGION as u8) << 4) | 5);

        // The guest moves the BAR: the old address goes dead, the new one answers.
        bus.pio_write(0xcf8, &config_addr(1, 0x10)).unwrap();
        bus.pio_write(0xcfc, &0xd000_0000u32.to_le_bytes()).unwrap();
        bus.mmio_read(pci::MMIO_WINDOW_START + 5, &mut b).unwrap();
        assert_eq!(b[0], 0xff);
        bus.mmio_read(0xd000_0005, &mut b).unwrap();
        assert_eq!(b[0], ((PCI_BAR_REGION as u8) << 4) | 5);

        // Memory space off: unmapped.
        bus.pio_write(0xcf8, &config_addr(1, 4)).unwrap();
        bus.pio_write(0xcfc, &0u16.to_le_bytes()).unwrap();
        bus.mmio_read(0xd000_0005, &mut b).unwrap();
        assert_eq!(b[0], 0xff);
    }
}
