//! Device state (VMState) for plugins: one serde type per state version a
//! plugin still understands, CBOR bytes, and explicit upgrade (vN -> vN+1)
//! and downgrade (vN+1 -> vN) functions.
//!
//! A plugin implements [`Versioned`] for its current state type:
//! `load_version` decodes bytes of any loadable version and runs the
//! upgrade chain up to the current type; `save_version` encodes the current
//! type, or runs the downgrade chain to an older version, which may fail
//! with a reason that depends on the guest's state ("guest enabled feature
//! X; v1 cannot express it"). [`save`] and [`load`] check the version
//! against the declared range first, so a mismatch reads as
//! "state v3 is newer than this plugin loads (v1..v2)".
//!
//! Derive serde on state types through this crate's re-export, so a plugin
//! needs no serde dependency of its own:
//!
//! ```ignore
//! use ferry_plugin_api::serde;
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! #[serde(crate = "ferry_plugin_api::serde")]
//! struct StateV1 { index: u8, ram: Vec<u8> }
//! ```

use serde::{de::DeserializeOwned, Serialize};

use crate::{StateBlob, StateVersions};

/// Encode a state value as CBOR.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    ciborium::ser::into_writer(value, &mut out).map_err(|e| format!("encoding state: {e}"))?;
    Ok(out)
}

/// Decode a state value from CBOR. Malformed or truncated bytes are an
/// error, never a panic.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    ciborium::de::from_reader(bytes).map_err(|e| format!("decoding state: {e}"))
}

/// A device state type with its version history.
pub trait Versioned: Sized {
    /// The version this type is.
    const CURRENT: u32;
    /// The oldest version `load_version` accepts.
    const OLDEST_LOAD: u32;
    /// The oldest version `save_version` can write (through downgrades).
    const OLDEST_SAVE: u32 = Self::CURRENT;

    /// Decode `bytes` written at `version` (within the declared range) and
    /// upgrade them to the current type.
    fn load_version(version: u32, bytes: &[u8]) -> Result<Self, String>;

    /// Encode at `version` (within the declared range): the current type,
    /// or downgraded, failing with the guest-state reason when the older
    /// version cannot express it.
    fn save_version(&self, version: u32) -> Result<Vec<u8>, String>;
}

/// The descriptor's state versions for `S`.
pub fn versions<S: Versioned>() -> StateVersions {
    StateVersions { current: S::CURRENT, oldest_load: S::OLDEST_LOAD, oldest_save: S::OLDEST_SAVE }
}

/// Checks that `version` is one `versions` can load; the refusal names
/// the range and who reads it (`"this plugin"`): "state v3 is newer than
/// this plugin loads (v1..v2)".
pub fn check_load(versions: StateVersions, version: u32, reader: &str) -> Result<(), String> {
    let StateVersions { current, oldest_load, .. } = versions;
    let which = match version {
        v if v > current => "newer",
        v if v < oldest_load => "older",
        _ => return Ok(()),
    };
    Err(format!("state v{version} is {which} than {reader} loads (v{oldest_load}..v{current})"))
}

/// Checks that `version` is one `versions` can write: "cannot write state
/// v0: this plugin writes v1..v2".
pub fn check_save(versions: StateVersions, version: u32, writer: &str) -> Result<(), String> {
    let StateVersions { current, oldest_save, .. } = versions;
    if version < oldest_save || version > current {
        return Err(format!("cannot write state v{version}: {writer} writes v{oldest_save}..v{current}"));
    }
    Ok(())
}

/// Save `state` at `version`, checking the range first.
pub fn save<S: Versioned>(state: &S, version: u32) -> Result<StateBlob, String> {
    check_save(versions::<S>(), version, "this plugin")?;
    Ok(StateBlob { version, bytes: state.save_version(version)?.into() })
}

/// Load a state blob, checking its version first.
pub fn load<S: Versioned>(blob: &StateBlob) -> Result<S, String> {
    check_load(versions::<S>(), blob.version, "this plugin")?;
    S::load_version(blob.version, blob.bytes.as_slice())
}

/// State for devices that have none (a version-1 empty record).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct NoState {}

impl Versioned for NoState {
    const CURRENT: u32 = 1;
    const OLDEST_LOAD: u32 = 1;

    fn load_version(_version: u32, bytes: &[u8]) -> Result<Self, String> {
        decode(bytes)
    }

    fn save_version(&self, _version: u32) -> Result<Vec<u8>, String> {
        encode(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    struct V1 {
        count: u32,
    }

    /// v2 adds a flag (default off) that v1 cannot express when on.
    #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    struct V2 {
        count: u32,
        turbo: bool,
    }

    impl Versioned for V2 {
        const CURRENT: u32 = 2;
        const OLDEST_LOAD: u32 = 1;
        const OLDEST_SAVE: u32 = 1;

        fn load_version(version: u32, bytes: &[u8]) -> Result<Self, String> {
            match version {
                1 => decode::<V1>(bytes).map(|v| V2 { count: v.count, turbo: false }),
                _ => decode(bytes),
            }
        }

        fn save_version(&self, version: u32) -> Result<Vec<u8>, String> {
            match version {
                1 if self.turbo => Err("guest enabled turbo; v1 cannot express it".into()),
                1 => encode(&V1 { count: self.count }),
                _ => encode(self),
            }
        }
    }

    #[test]
    fn versions_are_checked_before_bytes() {
        let blob = StateBlob { version: 3, bytes: vec![0xff].into() };
        assert_eq!(load::<V2>(&blob).unwrap_err(), "state v3 is newer than this plugin loads (v1..v2)");
        let blob = StateBlob { version: 0, bytes: vec![].into() };
        assert_eq!(load::<V2>(&blob).unwrap_err(), "state v0 is older than this plugin loads (v1..v2)");
        assert!(save(&V2 { count: 1, turbo: false }, 3).unwrap_err().contains("writes v1..v2"));
    }

    #[test]
    fn upgrade_and_downgrade_chains_run() {
        let old = save(&V2 { count: 7, turbo: false }, 1).unwrap();
        assert_eq!(load::<V2>(&old).unwrap(), V2 { count: 7, turbo: false });
        let err = save(&V2 { count: 7, turbo: true }, 1).unwrap_err();
        assert_eq!(err, "guest enabled turbo; v1 cannot express it");
    }

    #[test]
    fn garbage_is_an_error() {
        for bytes in [&[][..], &[0xff, 0xff], &[0xa1, 0x65, b'c']] {
            let blob = StateBlob { version: 2, bytes: bytes.to_vec().into() };
            assert!(load::<V2>(&blob).is_err());
        }
    }
}
