//! What ferry and a device process say to each other, CBOR-encoded, one
//! message per [`wire`](super::wire) send.
//!
//! Two sockets, each with one side asking and the other answering, so
//! neither side ever waits for an answer on the socket it must also serve:
//!
//! ```text
//!  control socket   ferry -> device   Init, then Request ...   (device answers Reply)
//!  host socket      device -> ferry   HostCall ...              (ferry answers HostReply,
//!                                                                except to Log and SetStatus)
//! ```
//!
//! Guest memory, the dirty bitmap, queue notifications and interrupts never
//! cross a socket: RAM and the bitmap are memfds both map, and the device's
//! eventfds are handed to ferry once (`MsiRoute`, `Ioeventfd`) and then
//! signalled in the kernel.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// The first message on the control socket, with the guest RAM memfd and
/// the dirty-bitmap memfd attached (in that order).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Init {
    /// The plugin library to load.
    pub plugin: String,
    /// Device id.
    pub id: String,
    /// Properties, defaults filled in.
    pub properties: Vec<(String, String)>,
    /// RAM ranges: (guest-physical start, length, offset in the memfd).
    pub ram: Vec<(u64, u64, u64)>,
    /// Pages the dirty bitmap covers.
    pub dirty_pages: u64,
    /// The sandbox to enter.
    pub sandbox: SandboxSpec,
}

/// What the device process may do once its sandbox is on.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SandboxSpec {
    /// Files it may open read-write (the device's properties that name one).
    pub files: Vec<String>,
    /// Guest RAM in bytes (the address-space limit is set above it).
    pub ram_bytes: u64,
}

/// The device process's answer to [`Init`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Ready {
    /// The device exists: its regions (space, base, length) and whether it
    /// has a PCI function.
    Device { regions: Vec<(u32, u64, u64)>, pci: bool },
    /// It could not be created; the line says why.
    Failed(String),
}

/// A call on the device, from ferry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    /// `Device::read` of `len` bytes.
    Read { region: u32, offset: u64, len: u32 },
    /// `Device::write`.
    Write {
        region: u32,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// `Device::pause`.
    Pause,
    /// `Device::resume`.
    Resume,
    /// `Device::save_state`.
    SaveState { version: u32 },
    /// `Device::load_state`.
    LoadState {
        version: u32,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// `Device::reset`.
    Reset,
    /// `PciFunction::config_read` of `len` bytes.
    ConfigRead { offset: u32, len: u32 },
    /// `PciFunction::config_write`.
    ConfigWrite {
        offset: u32,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// `PciFunction::bars`.
    Bars,
}

impl Request {
    /// What the call is, for a verdict ("a register read at region 0
    /// offset 0x1").
    pub fn describe(&self) -> String {
        match self {
            Request::Read { region, offset, .. } => {
                format!("a register read (region {region}, offset {offset:#x})")
            }
            Request::Write { region, offset, .. } => {
                format!("a register write (region {region}, offset {offset:#x})")
            }
            Request::Pause => "pause".into(),
            Request::Resume => "resume".into(),
            Request::SaveState { version } => format!("saving its state (v{version})"),
            Request::LoadState { version, .. } => format!("loading its state (v{version})"),
            Request::Reset => "reset".into(),
            Request::ConfigRead { offset, .. } => format!("a PCI configuration read at {offset:#x}"),
            Request::ConfigWrite { offset, .. } => format!("a PCI configuration write at {offset:#x}"),
            Request::Bars => "a BAR query".into(),
        }
    }
}

/// One BAR, as [`ferry_plugin_api::PciBar`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Bar {
    pub index: u32,
    pub size: u64,
    pub address: u64,
    pub is_64bit: bool,
    pub enabled: bool,
}

impl From<&ferry_plugin_api::PciBar> for Bar {
    fn from(b: &ferry_plugin_api::PciBar) -> Self {
        Bar { index: b.index, size: b.size, address: b.address, is_64bit: b.is_64bit, enabled: b.enabled }
    }
}

impl From<Bar> for ferry_plugin_api::PciBar {
    fn from(b: Bar) -> Self {
        ferry_plugin_api::PciBar {
            index: b.index,
            size: b.size,
            address: b.address,
            is_64bit: b.is_64bit,
            enabled: b.enabled,
        }
    }
}

/// The device's answer to a [`Request`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Reply {
    /// Done, nothing to return.
    Done,
    /// Bytes read.
    Bytes(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A saved state.
    State {
        version: u32,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// The BARs.
    Bars(Vec<Bar>),
    /// The call failed: the plugin's error kind and line.
    Failed { kind: u32, message: String },
}

/// A host service the device calls, from the device process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum HostCall {
    /// `Host::set_irq_level`.
    SetIrqLevel { gsi: u32, level: bool },
    /// `Host::stop_vm`. Answered, so the vCPUs are already stopping when
    /// the register write that asked returns, as in-process.
    StopVm { kind: u32, status: i32 },
    /// `Host::log` (posted).
    Log { level: u32, message: String },
    /// `Host::msi_route`; the eventfd is attached. `fd` is its number in
    /// the device process, by which later calls name it.
    MsiRoute { fd: i32, address: u64, data: u32 },
    /// `Host::msi_unroute`.
    MsiUnroute { fd: i32 },
    /// `Host::ioeventfd`; the eventfd is attached.
    Ioeventfd { fd: i32, address: u64 },
    /// `Host::remove_ioeventfd`.
    RemoveIoeventfd { fd: i32, address: u64 },
    /// `Host::set_status` (posted).
    SetStatus(String),
}

impl HostCall {
    /// Does the device wait for an answer?
    pub fn answered(&self) -> bool {
        !matches!(self, HostCall::Log { .. } | HostCall::SetStatus(_))
    }
}

/// Ferry's answer to a [`HostCall`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum HostReply {
    /// Done.
    Done,
    /// The service failed.
    Failed { kind: u32, message: String },
}

/// Encode a message.
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing into a Vec cannot fail; the types here always serialise.
    let _ = ciborium::into_writer(message, &mut out);
    out
}

/// Decode a message, naming what it was meant to be if it is not.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], what: &'static str) -> Result<T, super::IsolateError> {
    ciborium::from_reader(bytes).map_err(|e| super::IsolateError::Malformed { what, reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_garbage_is_named() {
        let r = Request::Write { region: 1, offset: 2, data: vec![3, 4] };
        let back: Request = decode(&encode(&r), "request").expect("decode");
        assert!(matches!(back, Request::Write { region: 1, offset: 2, ref data } if data == &[3, 4]));
        let e = decode::<Request>(&[0xff, 0x00], "request").expect_err("garbage").to_string();
        assert!(e.starts_with("a malformed request message"), "{e}");
    }
}
