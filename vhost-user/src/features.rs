//! Names of feature bits: virtio's transport-independent ones, the block
//! and file-system devices' own, and vhost-user's protocol features (from
//! the virtio 1.2 specification and the vhost-user protocol document).

use crate::identity::Device;

/// Feature bits every virtio device may offer, and vhost-user's own bit 30.
const COMMON: &[(u32, &str)] = &[
    (24, "NOTIFY_ON_EMPTY"),
    (26, "LOG_ALL"),
    (27, "ANY_LAYOUT"),
    (28, "RING_INDIRECT_DESC"),
    (29, "RING_EVENT_IDX"),
    (30, "PROTOCOL_FEATURES"),
    (32, "VERSION_1"),
    (33, "ACCESS_PLATFORM"),
    (34, "RING_PACKED"),
    (35, "IN_ORDER"),
    (36, "ORDER_PLATFORM"),
    (37, "SR_IOV"),
    (38, "NOTIFICATION_DATA"),
    (39, "NOTIF_CONFIG_DATA"),
    (40, "RING_RESET"),
];

/// virtio-blk's device feature bits.
const BLK: &[(u32, &str)] = &[
    (0, "BARRIER"),
    (1, "SIZE_MAX"),
    (2, "SEG_MAX"),
    (4, "GEOMETRY"),
    (5, "RO"),
    (6, "BLK_SIZE"),
    (7, "SCSI"),
    (9, "FLUSH"),
    (10, "TOPOLOGY"),
    (11, "CONFIG_WCE"),
    (12, "MQ"),
    (13, "DISCARD"),
    (14, "WRITE_ZEROES"),
    (15, "LIFETIME"),
    (16, "SECURE_ERASE"),
    (17, "ZONED"),
];

/// virtio-fs's device feature bits.
const FS: &[(u32, &str)] = &[(0, "NOTIFICATION")];

/// vhost-user protocol feature bits.
const PROTOCOL: &[(u32, &str)] = &[
    (0, "MQ"),
    (1, "LOG_SHMFD"),
    (2, "RARP"),
    (3, "REPLY_ACK"),
    (4, "NET_MTU"),
    (5, "BACKEND_REQ"),
    (6, "CROSS_ENDIAN"),
    (7, "CRYPTO_SESSION"),
    (8, "PAGEFAULT"),
    (9, "CONFIG"),
    (10, "BACKEND_SEND_FD"),
    (11, "HOST_NOTIFIER"),
    (12, "INFLIGHT_SHMFD"),
    (13, "RESET_DEVICE"),
    (14, "INBAND_NOTIFICATIONS"),
    (15, "CONFIGURE_MEM_SLOTS"),
    (16, "STATUS"),
    (17, "XEN_MMAP"),
    (18, "SHARED_OBJECT"),
    (19, "DEVICE_STATE"),
];

fn names(bits: u64, tables: &[&[(u32, &str)]]) -> Vec<String> {
    (0..64u32)
        .filter(|b| bits & (1u64 << b) != 0)
        .map(|b| {
            tables
                .iter()
                .find_map(|t| t.iter().find(|(n, _)| *n == b).map(|(_, name)| (*name).to_string()))
                .unwrap_or_else(|| format!("bit{b}"))
        })
        .collect()
}

/// The names of the virtio feature bits in `bits` for a `device` backend
/// (an unnamed bit reads `bitN`; device bits stay `bitN` when the device
/// is not said).
pub fn virtio_names(bits: u64, device: Option<Device>) -> Vec<String> {
    match device {
        Some(Device::Blk) => names(bits, &[COMMON, BLK]),
        Some(Device::Fs) => names(bits, &[COMMON, FS]),
        None => names(bits, &[COMMON]),
    }
}

/// The names of the protocol feature bits in `bits`.
pub fn protocol_names(bits: u64) -> Vec<String> {
    names(bits, &[PROTOCOL])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_are_named_by_device_and_unknown_ones_by_number() {
        let bits = (1 << 32) | (1 << 30) | (1 << 9) | (1 << 63);
        assert_eq!(
            virtio_names(bits, Some(Device::Blk)),
            ["FLUSH", "PROTOCOL_FEATURES", "VERSION_1", "bit63"]
        );
        assert_eq!(virtio_names(bits, None), ["bit9", "PROTOCOL_FEATURES", "VERSION_1", "bit63"]);
        assert_eq!(protocol_names((1 << 9) | (1 << 19)), ["CONFIG", "DEVICE_STATE"]);
    }
}
