//! Where everything sits: the PCI configuration space of a virtio-pci
//! (modern, virtio 1.x) function, and BAR 0.
//!
//! ```text
//!  config space                            BAR 0 (32 KiB, 32-bit memory)
//!  0x00 vendor 1af4, device 1040 + type    0x0000 common configuration
//!  0x04 command / status (cap list)        0x1000 ISR status
//!  0x08 revision 1, class code             0x2000 device-specific configuration
//!  0x10 BAR 0                              0x3000 notifications (4 bytes per queue)
//!  0x2c subsystem 1af4 / type              0x4000 MSI-X table (16 bytes per vector)
//!  0x34 capability pointer -> 0x40         0x5000 MSI-X pending bit array
//!  0x40 virtio cap: common   -> 0x50
//!  0x50 virtio cap: notify   -> 0x64
//!  0x64 virtio cap: ISR      -> 0x74
//!  0x74 virtio cap: device   -> 0x84
//!  0x84 MSI-X capability     -> end
//! ```

/// Red Hat / virtio vendor id.
pub const VENDOR: u16 = 0x1af4;
/// Modern device ids are 0x1040 + virtio device type.
pub const DEVICE_BASE: u16 = 0x1040;

/// BAR 0 size.
pub const BAR0_SIZE: u64 = 0x8000;
/// Common configuration offset in BAR 0.
pub const COMMON: u64 = 0x0000;
/// Common configuration length.
pub const COMMON_LEN: u64 = 0x38;
/// ISR status offset.
pub const ISR: u64 = 0x1000;
/// Device configuration offset.
pub const DEVICE_CFG: u64 = 0x2000;
/// Device configuration window.
pub const DEVICE_CFG_LEN: u64 = 0x1000;
/// Notification area offset.
pub const NOTIFY: u64 = 0x3000;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_MULTIPLIER: u32 = 4;
/// MSI-X table offset.
pub const MSIX_TABLE: u64 = 0x4000;
/// MSI-X pending bit array offset.
pub const MSIX_PBA: u64 = 0x5000;

/// Capability offsets in configuration space.
pub const CAP_COMMON: usize = 0x40;
/// Notify capability.
pub const CAP_NOTIFY: usize = 0x50;
/// ISR capability.
pub const CAP_ISR: usize = 0x64;
/// Device configuration capability.
pub const CAP_DEVICE: usize = 0x74;
/// MSI-X capability.
pub const CAP_MSIX: usize = 0x84;

/// "No MSI-X vector".
pub const NO_VECTOR: u16 = 0xffff;

/// Common configuration registers (offsets in the common area).
pub mod common {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC_LO: u64 = 0x20;
    pub const QUEUE_DESC_HI: u64 = 0x24;
    pub const QUEUE_DRIVER_LO: u64 = 0x28;
    pub const QUEUE_DRIVER_HI: u64 = 0x2c;
    pub const QUEUE_DEVICE_LO: u64 = 0x30;
    pub const QUEUE_DEVICE_HI: u64 = 0x34;
}

/// Device status bits.
pub mod status {
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
}

/// Build the read-only image of configuration space (BAR 0 and the
/// writable bits are patched in by the transport).
pub fn config_space(device_type: u32, class: u32, queues: u16) -> [u8; 256] {
    let mut c = [0u8; 256];
    let put16 = |c: &mut [u8; 256], at: usize, v: u16| c[at..at + 2].copy_from_slice(&v.to_le_bytes());
    let put32 = |c: &mut [u8; 256], at: usize, v: u32| c[at..at + 4].copy_from_slice(&v.to_le_bytes());
    put16(&mut c, 0x00, VENDOR);
    put16(&mut c, 0x02, DEVICE_BASE + device_type as u16);
    put16(&mut c, 0x06, 0x0010); // status: capability list
    c[0x08] = 1; // revision 1: a modern-only device
    c[0x09] = class as u8;
    c[0x0a] = (class >> 8) as u8;
    c[0x0b] = (class >> 16) as u8;
    put16(&mut c, 0x2c, VENDOR);
    put16(&mut c, 0x2e, device_type as u16);
    c[0x34] = CAP_COMMON as u8;

    let virtio_cap =
        |c: &mut [u8; 256], at: usize, next: usize, len: u8, cfg_type: u8, offset: u64, length: u64| {
            c[at] = 0x09; // vendor-specific
            c[at + 1] = next as u8;
            c[at + 2] = len;
            c[at + 3] = cfg_type;
            c[at + 4] = 0; // BAR 0
            c[at + 8..at + 12].copy_from_slice(&(offset as u32).to_le_bytes());
            c[at + 12..at + 16].copy_from_slice(&(length as u32).to_le_bytes());
        };
    virtio_cap(&mut c, CAP_COMMON, CAP_NOTIFY, 16, 1, COMMON, COMMON_LEN);
    virtio_cap(&mut c, CAP_NOTIFY, CAP_ISR, 20, 2, NOTIFY, u64::from(queues) * u64::from(NOTIFY_MULTIPLIER));
    put32(&mut c, CAP_NOTIFY + 16, NOTIFY_MULTIPLIER);
    virtio_cap(&mut c, CAP_ISR, CAP_DEVICE, 16, 3, ISR, 1);
    virtio_cap(&mut c, CAP_DEVICE, CAP_MSIX, 16, 4, DEVICE_CFG, DEVICE_CFG_LEN);

    c[CAP_MSIX] = 0x11;
    c[CAP_MSIX + 1] = 0;
    put16(&mut c, CAP_MSIX + 2, queues); // table size - 1: queues + 1 config vector
    put32(&mut c, CAP_MSIX + 4, MSIX_TABLE as u32); // BIR 0
    put32(&mut c, CAP_MSIX + 8, MSIX_PBA as u32);
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_list_is_well_formed() {
        let c = config_space(2, 0x018000, 1);
        let mut at = c[0x34] as usize;
        let mut seen = Vec::new();
        while at != 0 {
            seen.push((c[at], c.get(at + 3).copied().unwrap_or(0)));
            at = c[at + 1] as usize;
        }
        assert_eq!(seen, vec![(0x09, 1), (0x09, 2), (0x09, 3), (0x09, 4), (0x11, 0)]);
        assert_eq!(u16::from_le_bytes([c[2], c[3]]), 0x1042);
        assert_eq!(u16::from_le_bytes([c[CAP_MSIX + 2], c[CAP_MSIX + 3]]) + 1, 2, "one queue + config");
    }
}
