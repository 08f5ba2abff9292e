//! virtio-blk's state versions (the transport's part of the state is
//! apart, the same in each):
//!
//! | version | release | device state |
//! |---|---|---|
//! | v1 | 0.1 | none (no bytes) |
//! | v2 | 0.2 | whether the guest negotiated VIRTIO_BLK_F_CONFIG_WCE, and the cache mode it chose |
//!
//! v1 upgrades to "not negotiated, writeback" (what a 0.1 device did); a
//! downgrade to v1 is refused while the guest has negotiated the switch,
//! which v1 cannot express.

use ferry_plugin_api::{
    serde,
    state::{self, Versioned},
};

/// State v2 as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(crate = "ferry_plugin_api::serde")]
struct BlkStateV2 {
    wce_negotiated: bool,
    writeback: u8,
}

/// The device's state in this release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkState {
    /// The guest negotiated VIRTIO_BLK_F_CONFIG_WCE.
    pub wce_negotiated: bool,
    /// 1 writeback (flush on request), 0 writethrough.
    pub writeback: u8,
}

impl Default for BlkState {
    /// A device the guest has not set up: writeback, nothing negotiated.
    fn default() -> Self {
        BlkState { wce_negotiated: false, writeback: 1 }
    }
}

impl Versioned for BlkState {
    /// The previous release (the `previous-release` feature, which
    /// compatibility tests install on an "older" host) writes v1.
    #[cfg(feature = "previous-release")]
    const CURRENT: u32 = 1;
    #[cfg(not(feature = "previous-release"))]
    const CURRENT: u32 = 2;
    const OLDEST_LOAD: u32 = 1;
    const OLDEST_SAVE: u32 = 1;

    fn load_version(version: u32, bytes: &[u8]) -> Result<Self, String> {
        match version {
            1 => Ok(BlkState::default()),
            _ => {
                let v2: BlkStateV2 = state::decode(bytes)?;
                Ok(BlkState { wce_negotiated: v2.wce_negotiated, writeback: u8::from(v2.writeback != 0) })
            }
        }
    }

    fn save_version(&self, version: u32) -> Result<Vec<u8>, String> {
        match version {
            1 if self.wce_negotiated => {
                Err("guest negotiated VIRTIO_BLK_F_CONFIG_WCE; v1 cannot express it".to_string())
            }
            1 => Ok(Vec::new()),
            _ => {
                state::encode(&BlkStateV2 { wce_negotiated: self.wce_negotiated, writeback: self.writeback })
            }
        }
    }
}

#[cfg(all(test, not(feature = "previous-release")))]
mod tests {
    use super::*;

    #[test]
    fn v2_round_trips_and_v1_upgrades_to_the_default() {
        let s = BlkState { wce_negotiated: true, writeback: 0 };
        assert_eq!(BlkState::load_version(2, &s.save_version(2).unwrap()).unwrap(), s);
        assert_eq!(BlkState::load_version(1, &[]).unwrap(), BlkState::default());
        assert_eq!(
            s.save_version(1).unwrap_err(),
            "guest negotiated VIRTIO_BLK_F_CONFIG_WCE; v1 cannot express it"
        );
        assert_eq!(BlkState::default().save_version(1).unwrap(), Vec::<u8>::new());
        assert_eq!(state::versions::<BlkState>().current, 2);
    }
}
