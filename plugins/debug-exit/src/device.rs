//! A one-byte port: writing `v` ends the VM, and ferry exits with status `v`.
//! Reads return 0xff (an unused ISA port).

use ferry_plugin_api::{
    sdk::{DescriptorBuilder, PluginDevice, Properties},
    state::{self, NoState},
    AddressSpace, DeviceConfig, HostBox, PluginDescriptor, PluginError, PropertyKind, Region, StateBlob,
    StopKind,
};

pub fn describe() -> PluginDescriptor {
    DescriptorBuilder::new(
        "debug-exit",
        env!("CARGO_PKG_VERSION"),
        "I/O port that ends the VM with the exit status the guest writes",
    )
    .property("port", PropertyKind::INTEGER, Some("0xf4"), "I/O port (one byte)")
    .versioned::<NoState>()
    .build()
}

pub struct DebugExit {
    port: u16,
    host: HostBox,
}

impl DebugExit {
    pub fn create(config: &DeviceConfig, host: HostBox) -> Result<Self, String> {
        let props = Properties::new(config);
        let port = props.integer("port")?;
        let port = u16::try_from(port).map_err(|_| format!("port {port:#x} is above 0xffff"))?;
        Ok(DebugExit { port, host })
    }
}

impl PluginDevice for DebugExit {
    fn regions(&self) -> Vec<Region> {
        vec![Region { space: AddressSpace::PIO, base: self.port.into(), len: 1 }]
    }

    fn read(&mut self, _region: u32, _offset: u64, data: &mut [u8]) -> Result<(), String> {
        data.fill(0xff);
        Ok(())
    }

    fn write(&mut self, _region: u32, _offset: u64, data: &[u8]) -> Result<(), String> {
        let status = data.first().copied().unwrap_or(0);
        self.host.stop_vm(StopKind::EXIT, i32::from(status));
        Ok(())
    }

    /// Nothing to put back: the port holds no state.
    fn reset(&mut self) -> Result<(), PluginError> {
        Ok(())
    }

    fn save_state(&mut self, version: u32) -> Result<StateBlob, String> {
        state::save(&NoState {}, version)
    }

    fn load_state(&mut self, blob: StateBlob) -> Result<(), String> {
        state::load::<NoState>(&blob).map(|_| ())
    }
}
