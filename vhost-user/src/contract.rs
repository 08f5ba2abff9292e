//! What a destination's backend must offer to take a vhost-user device as
//! the source runs it, and the check itself. The source's device states it
//! as facts (`Device::contract`: the manifest carries them); the
//! destination's plugin checks them against its own backend before the
//! guest pauses, and `ferry compat` against a backend's probe, offline.
//! One function decides for both.

use std::collections::BTreeMap;

use vhost::vhost_user::VhostUserProtocolFeatures;

use crate::{
    features,
    identity::{BackendIdentity, Device, LOG_ALL_BIT, PROTOCOL_FEATURES_BIT},
};

/// VIRTIO_F_VERSION_1.
const VERSION_1_BIT: u64 = 1 << 32;
/// How much of the configuration must match: what the guest's driver read
/// and relies on (virtio-blk: capacity, size_max, seg_max, geometry,
/// blk_size; virtio-fs: the first 24 bytes of the tag).
const CONFIG_CHECKED: usize = 24;

/// What the source's device says about itself and its guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contract {
    /// The device the backend serves.
    pub device: Device,
    /// The source backend's features.
    pub features: u64,
    /// The features the guest's driver accepted (0 before it did).
    pub negotiated: u64,
    /// The source backend's configuration space.
    pub config: Vec<u8>,
    /// The backend keeps state of its own that must move (DEVICE_STATE).
    pub backend_state: bool,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| s.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok())).collect()
}

fn number(facts: &BTreeMap<String, String>, key: &str) -> Result<u64, String> {
    let v = facts.get(key).ok_or_else(|| format!("the source's contract has no {key}"))?;
    u64::from_str_radix(v.trim_start_matches("0x"), 16)
        .map_err(|_| format!("the source's {key} {v:?} is not a number"))
}

impl Contract {
    /// As facts (`name=value`) for the manifest.
    pub fn facts(&self) -> Vec<(String, String)> {
        let device = match self.device {
            Device::Blk => "blk",
            Device::Fs => "fs",
        };
        vec![
            ("vhost-user.device".into(), device.into()),
            ("vhost-user.features".into(), format!("{:#x}", self.features)),
            ("vhost-user.negotiated".into(), format!("{:#x}", self.negotiated)),
            ("vhost-user.config".into(), hex(&self.config)),
            ("vhost-user.backend-state".into(), if self.backend_state { "moves" } else { "none" }.into()),
        ]
    }

    /// Read back from the facts; an error names what is missing or wrong.
    pub fn from_facts(facts: &BTreeMap<String, String>) -> Result<Self, String> {
        let device = match facts.get("vhost-user.device").map(String::as_str) {
            Some(d) => {
                Device::parse(d).ok_or_else(|| format!("the source's device {d:?} is not blk or fs"))?
            }
            None => return Err("the source's contract does not say which device it is".into()),
        };
        let config = facts.get("vhost-user.config").map(String::as_str).unwrap_or("");
        Ok(Contract {
            device,
            features: number(facts, "vhost-user.features")?,
            negotiated: number(facts, "vhost-user.negotiated")?,
            config: unhex(config)
                .ok_or_else(|| format!("the source's configuration {config:?} is not hex"))?,
            backend_state: facts.get("vhost-user.backend-state").is_some_and(|s| s == "moves"),
        })
    }

    /// Can a backend that says `here` take the device? An error is one
    /// line naming each feature it lacks (`backend` names it).
    pub fn check(&self, here: &BackendIdentity, backend: &str) -> Result<(), String> {
        let vhost_only = LOG_ALL_BIT | PROTOCOL_FEATURES_BIT | VERSION_1_BIT;
        let missing = self.negotiated & !here.features & !vhost_only;
        if missing != 0 {
            return Err(format!(
                "vhost-user backend {backend} lacks feature(s) the guest negotiated: {}",
                features::virtio_names(missing, Some(self.device)).join(" ")
            ));
        }
        if self.backend_state && !here.has_protocol(VhostUserProtocolFeatures::DEVICE_STATE) {
            return Err(format!(
                "vhost-user backend {backend} lacks DEVICE_STATE (protocol feature 19), which the source backend's \
                 state needs to move"
            ));
        }
        let here_config = here.config.as_deref().unwrap_or(&[]);
        let n = CONFIG_CHECKED.min(self.config.len()).min(here_config.len());
        if self.config[..n] != here_config[..n] {
            let source = BackendIdentity {
                config: Some(self.config.clone()),
                device: Some(self.device),
                ..here.clone()
            };
            return Err(format!(
                "vhost-user backend {backend}: its configuration differs from the guest's ({} here, {} at the source)",
                here.summary().unwrap_or_else(|| "unreadable".into()),
                source.summary().unwrap_or_else(|| "unreadable".into())
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(features: u64, protocol: u64, capacity: u64) -> BackendIdentity {
        let mut config = capacity.to_le_bytes().to_vec();
        config.resize(60, 0);
        BackendIdentity {
            device: Some(Device::Blk),
            features,
            feature_names: Vec::new(),
            protocol_features: protocol,
            protocol_names: Vec::new(),
            queues: Some(1),
            config: Some(config),
        }
    }

    fn contract(negotiated: u64, backend_state: bool) -> Contract {
        let here = backend(0x1_7500_7e46, 0x8f2b, 8192);
        Contract {
            device: Device::Blk,
            features: here.features,
            negotiated,
            config: here.config.clone().unwrap_or_default(),
            backend_state,
        }
    }

    #[test]
    fn facts_read_back_as_written() {
        let c = contract(0x1_0000_0246, true);
        let facts: BTreeMap<String, String> = c.facts().into_iter().collect();
        assert_eq!(Contract::from_facts(&facts).unwrap(), c);
        let mut broken = facts.clone();
        broken.insert("vhost-user.negotiated".into(), "zz".into());
        assert!(Contract::from_facts(&broken).unwrap_err().contains("vhost-user.negotiated"));
        broken.remove("vhost-user.device");
        assert!(Contract::from_facts(&broken).is_err());
    }

    #[test]
    fn a_backend_lacking_a_negotiated_feature_is_refused_by_name() {
        // FLUSH (9) and DISCARD (13) negotiated; the backend lacks both.
        let c = contract((1 << 32) | (1 << 9) | (1 << 13) | (1 << 1), false);
        let lacking = backend(0x1_7500_7e46 & !(1 << 9) & !(1 << 13), 0x8f2b, 8192);
        let err = c.check(&lacking, "b.sock").unwrap_err();
        assert_eq!(err, "vhost-user backend b.sock lacks feature(s) the guest negotiated: FLUSH DISCARD");
        // A feature the guest did not negotiate may be missing.
        let c = contract((1 << 32) | (1 << 1), false);
        assert!(c.check(&lacking, "b.sock").is_ok());
    }

    #[test]
    fn backend_state_needs_device_state_and_the_configuration_must_match() {
        let c = contract(1 << 32, true);
        let err = c.check(&backend(0x1_7500_7e46, 0x8f2b, 8192), "b.sock").unwrap_err();
        assert!(err.contains("lacks DEVICE_STATE"), "{err}");
        assert!(c.check(&backend(0x1_7500_7e46, 0x8f2b | (1 << 19), 8192), "b.sock").is_ok());
        let err =
            contract(1 << 32, false).check(&backend(0x1_7500_7e46, 0x8f2b, 4096), "b.sock").unwrap_err();
        assert!(err.contains("capacity 4096 sectors (2097152 bytes) here, capacity 8192 sectors"), "{err}");
    }
}
