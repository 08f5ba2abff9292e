//! The i8042 model comes from vm-superio; this file wires its reset event to
//! the core (`stop_vm(RESET)`: the core reboots the guest or ends, as the
//! host chose) and maps ports 0x60 and 0x64 onto it.

use ferry_plugin_api::{
    sdk::{DescriptorBuilder, PluginDevice},
    state::{self, NoState},
    AddressSpace, DeviceConfig, HostBox, PluginDescriptor, PluginError, Region, StateBlob, StopKind,
};
use vm_superio::{I8042Device, Trigger};

/// vm-superio's register offsets: data at base + 0, command/status at base + 4.
const DATA_PORT: u16 = 0x60;
const COMMAND_PORT: u16 = 0x64;
const COMMAND_OFFSET: u8 = 4;

pub fn describe() -> PluginDescriptor {
    DescriptorBuilder::new(
        "i8042",
        env!("CARGO_PKG_VERSION"),
        "PS/2 controller command port: guest reset (0xFE) reboots or ends the VM",
    )
    .versioned::<NoState>()
    .build()
}

/// Reset requests end the VM with status 0.
struct ResetToHost(HostBox);

impl Trigger for ResetToHost {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.stop_vm(StopKind::RESET, 0);
        Ok(())
    }
}

pub struct I8042 {
    inner: I8042Device<ResetToHost>,
    host: HostBox,
}

impl I8042 {
    pub fn create(_config: &DeviceConfig, host: HostBox) -> Result<Self, String> {
        Ok(I8042 { inner: I8042Device::new(ResetToHost(host.clone())), host })
    }
}

fn offset_of(region: u32) -> u8 {
    if region == 0 {
        0
    } else {
        COMMAND_OFFSET
    }
}

impl PluginDevice for I8042 {
    fn regions(&self) -> Vec<Region> {
        vec![
            Region { space: AddressSpace::PIO, base: DATA_PORT.into(), len: 1 },
            Region { space: AddressSpace::PIO, base: COMMAND_PORT.into(), len: 1 },
        ]
    }

    fn read(&mut self, region: u32, _offset: u64, data: &mut [u8]) -> Result<(), String> {
        let value = self.inner.read(offset_of(region));
        data.fill(value);
        Ok(())
    }

    fn write(&mut self, region: u32, _offset: u64, data: &[u8]) -> Result<(), String> {
        if let Some(&value) = data.first() {
            let _ = self.inner.write(offset_of(region), value);
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<(), PluginError> {
        self.inner = I8042Device::new(ResetToHost(self.host.clone()));
        Ok(())
    }

    fn save_state(&mut self, version: u32) -> Result<StateBlob, String> {
        state::save(&NoState {}, version)
    }

    fn load_state(&mut self, blob: StateBlob) -> Result<(), String> {
        state::load::<NoState>(&blob).map(|_| ())
    }
}
