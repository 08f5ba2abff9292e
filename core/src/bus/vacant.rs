//! What a device slot holds while its device is recreated: nothing
//! answers (reads all-ones, writes ignored), as for an empty slot.

use abi_stable::{
    sabi_trait::TD_Opaque,
    std_types::{RResult, RSlice, RSliceMut, RVec},
};
use ferry_plugin_api::{
    Device, DeviceBox, PciBar, PciFunction, PciFunctionBox, PluginError, Region, StateBlob,
};

struct Vacant;

impl Device for Vacant {
    fn regions(&self) -> RVec<Region> {
        RVec::new()
    }
    fn read(&mut self, _: u32, _: u64, mut data: RSliceMut<'_, u8>) -> RResult<(), PluginError> {
        data.as_mut_slice().fill(0xff);
        RResult::ROk(())
    }
    fn write(&mut self, _: u32, _: u64, _: RSlice<'_, u8>) -> RResult<(), PluginError> {
        RResult::ROk(())
    }
    fn pause(&mut self) -> RResult<(), PluginError> {
        RResult::ROk(())
    }
    fn resume(&mut self) -> RResult<(), PluginError> {
        RResult::ROk(())
    }
    fn save_state(&mut self, _: u32) -> RResult<StateBlob, PluginError> {
        RResult::RErr(PluginError::other("the device is being recreated"))
    }
    fn load_state(&mut self, _: StateBlob) -> RResult<(), PluginError> {
        RResult::RErr(PluginError::other("the device is being recreated"))
    }
}

impl PciFunction for Vacant {
    fn config_read(&mut self, _: u32, mut data: RSliceMut<'_, u8>) {
        data.as_mut_slice().fill(0xff);
    }
    fn config_write(&mut self, _: u32, _: RSlice<'_, u8>) -> RResult<(), PluginError> {
        RResult::ROk(())
    }
    fn bars(&self) -> RVec<PciBar> {
        RVec::new()
    }
}

pub(super) fn device() -> DeviceBox {
    DeviceBox::from_value(Vacant, TD_Opaque)
}

pub(super) fn function() -> PciFunctionBox {
    PciFunctionBox::from_value(Vacant, TD_Opaque)
}
