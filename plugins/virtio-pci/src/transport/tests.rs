//! The transport's registers and state, driven as a guest driver would
//! through BAR 0, on a fake host (no KVM).

use ferry_plugin_api::{
    sdk::PluginDevice,
    state::{self, Versioned},
    testing::FakeHost,
    PCI_BAR_REGION,
};

use super::VirtioPci;
use crate::{
    layout::{common, status, COMMON, DEVICE_CFG},
    NoDeviceState, Queues, VirtioDevice, VIRTIO_F_VERSION_1,
};

const ACK_DRIVER: u8 = 1 | 2;

/// Two queues, one feature bit (bit 0), a byte of configuration it keeps
/// as its state (v2; v1 has none and cannot carry a non-zero byte).
struct Dev {
    config: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DevState(u8);

impl Versioned for DevState {
    const CURRENT: u32 = 2;
    const OLDEST_LOAD: u32 = 1;
    const OLDEST_SAVE: u32 = 1;

    fn load_version(version: u32, bytes: &[u8]) -> Result<Self, String> {
        match version {
            1 => Ok(DevState(0)),
            _ => bytes.first().copied().map(DevState).ok_or_else(|| "no byte".to_string()),
        }
    }

    fn save_version(&self, version: u32) -> Result<Vec<u8>, String> {
        match (version, self.0) {
            (1, 0) => Ok(Vec::new()),
            (1, _) => Err("v1 has no configuration byte".into()),
            _ => Ok(vec![self.0]),
        }
    }
}

impl VirtioDevice for Dev {
    type State = DevState;

    fn state(&self) -> DevState {
        DevState(self.config)
    }

    fn set_state(&mut self, state: DevState) -> Result<(), String> {
        self.config = state.0;
        Ok(())
    }

    fn device_type(&self) -> u32 {
        4
    }

    fn pci_class(&self) -> u32 {
        0xff00
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![64, 32]
    }

    fn features(&self) -> u64 {
        1
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(self.config);
    }

    fn write_config(&mut self, _offset: u64, data: &[u8]) {
        self.config = data.first().copied().unwrap_or(0);
    }

    fn process_queue(&mut self, _queue: usize, _queues: &mut Queues<'_>) -> Result<(), String> {
        Ok(())
    }
}

fn device() -> VirtioPci<Dev> {
    VirtioPci::new(Dev { config: 0 }, FakeHost::new(1 << 20).handle()).expect("a device")
}

fn read(d: &mut VirtioPci<Dev>, offset: u64, len: usize) -> u64 {
    let mut data = vec![0u8; len];
    d.read(PCI_BAR_REGION, COMMON + offset, &mut data).expect("read");
    data.iter().rev().fold(0, |v, b| v << 8 | u64::from(*b))
}

fn write(d: &mut VirtioPci<Dev>, offset: u64, value: u64, len: usize) {
    d.write(PCI_BAR_REGION, COMMON + offset, &value.to_le_bytes()[..len]).expect("write");
}

#[test]
fn features_are_offered_in_two_halves_with_version_1() {
    let mut d = device();
    write(&mut d, common::DEVICE_FEATURE_SELECT, 0, 4);
    assert_eq!(read(&mut d, common::DEVICE_FEATURE, 4), 1);
    write(&mut d, common::DEVICE_FEATURE_SELECT, 1, 4);
    assert_eq!(read(&mut d, common::DEVICE_FEATURE, 4), VIRTIO_F_VERSION_1 >> 32);
    assert_eq!(read(&mut d, common::NUM_QUEUES, 2), 2);
}

#[test]
fn features_ok_holds_only_for_offered_features_with_version_1() {
    let mut d = device();
    write(&mut d, common::DEVICE_STATUS, u64::from(ACK_DRIVER), 1);
    // Without VERSION_1 the device does not accept FEATURES_OK.
    write(&mut d, common::DRIVER_FEATURE_SELECT, 0, 4);
    write(&mut d, common::DRIVER_FEATURE, 1, 4);
    write(&mut d, common::DEVICE_STATUS, u64::from(ACK_DRIVER | status::FEATURES_OK), 1);
    assert_eq!(read(&mut d, common::DEVICE_STATUS, 1) as u8 & status::FEATURES_OK, 0);
    // A bit it never offered: refused too.
    write(&mut d, common::DRIVER_FEATURE_SELECT, 1, 4);
    write(&mut d, common::DRIVER_FEATURE, (VIRTIO_F_VERSION_1 >> 32) | 2, 4);
    write(&mut d, common::DEVICE_STATUS, u64::from(ACK_DRIVER | status::FEATURES_OK), 1);
    assert_eq!(read(&mut d, common::DEVICE_STATUS, 1) as u8 & status::FEATURES_OK, 0);
    // What it offered: accepted, and the driver's features freeze.
    write(&mut d, common::DRIVER_FEATURE, VIRTIO_F_VERSION_1 >> 32, 4);
    write(&mut d, common::DEVICE_STATUS, u64::from(ACK_DRIVER | status::FEATURES_OK), 1);
    assert_ne!(read(&mut d, common::DEVICE_STATUS, 1) as u8 & status::FEATURES_OK, 0);
    write(&mut d, common::DRIVER_FEATURE, 0, 4);
    assert_eq!(read(&mut d, common::DRIVER_FEATURE, 4), VIRTIO_F_VERSION_1 >> 32, "frozen after FEATURES_OK");
}

#[test]
fn queue_registers_follow_the_selector_and_reset_clears_them() {
    let mut d = device();
    write(&mut d, common::QUEUE_SELECT, 1, 2);
    assert_eq!(read(&mut d, common::QUEUE_SIZE, 2), 32, "queue 1's maximum");
    write(&mut d, common::QUEUE_SIZE, 16, 2);
    write(&mut d, common::QUEUE_DESC_LO, 0x4000, 4);
    write(&mut d, common::QUEUE_SELECT, 0, 2);
    assert_eq!(read(&mut d, common::QUEUE_SIZE, 2), 64, "queue 0 untouched");
    write(&mut d, common::QUEUE_SELECT, 1, 2);
    assert_eq!((read(&mut d, common::QUEUE_SIZE, 2), read(&mut d, common::QUEUE_DESC_LO, 4)), (16, 0x4000));
    write(&mut d, common::QUEUE_SELECT, 9, 2);
    assert_eq!(read(&mut d, common::QUEUE_SIZE, 2), 0, "no such queue reads zero");
    write(&mut d, common::DEVICE_STATUS, 0, 1);
    write(&mut d, common::QUEUE_SELECT, 1, 2);
    assert_eq!(read(&mut d, common::QUEUE_DESC_LO, 4), 0, "a device reset clears the queue");
}

#[test]
fn state_carries_registers_and_the_device_state_at_the_version_asked() {
    let mut d = device();
    write(&mut d, common::QUEUE_SELECT, 1, 2);
    write(&mut d, common::QUEUE_SIZE, 16, 2);
    write(&mut d, common::QUEUE_DESC_LO, 0x4000, 4);
    d.pause().expect("pause");
    let v1 = d.save_state(1).expect("v1 while the configuration byte is zero");
    d.write(PCI_BAR_REGION, DEVICE_CFG, &[7]).expect("config write");
    let err = d.save_state(1).expect_err("v1 cannot carry the byte");
    assert!(err.contains("v1 has no configuration byte"), "{err}");
    let v2 = d.save_state(2).expect("v2");
    assert_eq!(
        d.save_state(3).expect_err("newer than it writes"),
        "cannot write state v3: this plugin writes v1..v2"
    );

    let mut e = device();
    e.pause().expect("pause");
    e.load_state(v2).expect("load v2");
    write(&mut e, common::QUEUE_SELECT, 1, 2);
    assert_eq!((read(&mut e, common::QUEUE_SIZE, 2), read(&mut e, common::QUEUE_DESC_LO, 4)), (16, 0x4000));
    let mut byte = [0u8; 1];
    e.read(PCI_BAR_REGION, DEVICE_CFG, &mut byte).expect("config read");
    assert_eq!(byte, [7], "the device's own state came back");
    e.load_state(v1).expect("v1 upgrades");
    e.read(PCI_BAR_REGION, DEVICE_CFG, &mut byte).expect("config read");
    assert_eq!(byte, [0]);
    let future = ferry_plugin_api::StateBlob { version: 3, bytes: Vec::new().into() };
    assert_eq!(e.load_state(future).expect_err("v3"), "state v3 is newer than this plugin loads (v1..v2)");
    assert_eq!(state::versions::<NoDeviceState>().current, 1);
}
