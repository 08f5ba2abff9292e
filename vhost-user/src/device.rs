//! A virtio device whose queues a vhost-user backend serves, on ferry's
//! virtio-pci transport (feature `device`): what the `vhost-user-blk` and
//! `vhost-user-fs` plugins are made of.
//!
//! ```text
//!  guest notify --ioeventfd (KVM)--> kick eventfd ------> backend
//!  guest RAM  <====== memfd, mapped by the backend ======> backend
//!  guest LAPIC <--irqfd (KVM)---- call eventfd (MSI-X) <-- backend
//!  dirty bitmap (ferry's, a memfd) <-- the backend's dirty log
//! ```
//!
//! No request passes through ferry. The backend logs every page it writes
//! into ferry's own device dirty bitmap (it is the backend's log: one bit
//! per 4 KiB page, which for RAM below 3 GiB is indexed as the log is, by
//! guest-physical page), so pre-copy resends them as it resends any
//! device's writes. The device's state is the backend's identity and the
//! features the guest negotiated: a destination backend that lacks one is
//! refused when the state loads.

use std::{path::Path, sync::Mutex};

use ferry_plugin_api::{serde, state::Versioned, HostBox, LogLevel, StopKind};
use ferry_virtio_pci::{Queues, Ring, VirtioDevice, VIRTIO_F_VERSION_1};

use crate::{
    contract::Contract,
    frontend::{Connection, RamRange, RingSpec, SharedRam},
    identity::{Device, LOG_ALL_BIT, PROTOCOL_FEATURES_BIT},
};

/// Connections a plan's check opened, for the `create` that follows (a
/// backend such as virtiofsd serves one connection in its life).
static CHECKED: Mutex<Vec<(String, Connection)>> = Mutex::new(Vec::new());

/// The connection to `socket`: the one a check left, or a new one.
fn connection(kind: Device, socket: &str) -> Result<Connection, String> {
    let mut checked = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(i) = checked.iter().position(|(s, _)| s == socket) {
        let (_, c) = checked.swap_remove(i);
        if !c.hung_up() {
            return Ok(c);
        }
    }
    drop(checked);
    Connection::open(Path::new(socket), kind, MAX_QUEUES).map_err(|e| e.to_string())
}

/// A plan's check (`PluginMod::check`): can the backend bound here as
/// `socket` take the device the source describes in `facts`? The
/// connection is kept for `create`.
pub fn check(kind: Device, socket: &str, facts: &[(String, String)]) -> Result<(), String> {
    let facts: std::collections::BTreeMap<String, String> = facts.iter().cloned().collect();
    let contract = Contract::from_facts(&facts)?;
    if contract.device != kind {
        return Err(format!("the source's device serves {:?}, this plugin {kind:?}", contract.device));
    }
    let conn = connection(kind, socket)?;
    let verdict = contract.check(conn.identity(), socket);
    CHECKED.lock().unwrap_or_else(|e| e.into_inner()).push((socket.to_string(), conn));
    verdict
}

/// The most queues a device takes.
const MAX_QUEUES: usize = 8;
/// Each queue's maximum size.
const QUEUE_SIZE: u16 = 256;

/// The device's state (version 1): the backend's identity and what the
/// guest negotiated.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(crate = "ferry_plugin_api::serde")]
pub struct BackendStateV1 {
    /// The backend's virtio features (GET_FEATURES).
    pub features: u64,
    /// Its protocol features.
    pub protocol_features: u64,
    /// Its configuration space, as the guest read it.
    pub config: Vec<u8>,
    /// The features the guest's driver accepted (0 before DRIVER_OK).
    pub negotiated: u64,
    /// The backend's own state (DEVICE_STATE: virtiofsd's inodes and open
    /// files), opaque to ferry; empty when the backend keeps none or the
    /// guest had not started the device.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend: Vec<u8>,
}

impl BackendStateV1 {
    /// What a backend must offer to take a `kind` device in this state.
    fn contract(&self, kind: Device) -> Contract {
        Contract {
            device: kind,
            features: self.features,
            negotiated: self.negotiated,
            config: self.config.clone(),
            backend_state: !self.backend.is_empty(),
        }
    }
}

impl Versioned for BackendStateV1 {
    const CURRENT: u32 = 1;
    const OLDEST_LOAD: u32 = 1;

    fn load_version(_version: u32, bytes: &[u8]) -> Result<Self, String> {
        ferry_plugin_api::state::decode(bytes)
    }

    fn save_version(&self, _version: u32) -> Result<Vec<u8>, String> {
        ferry_plugin_api::state::encode(self)
    }
}

/// A vhost-user device.
pub struct VhostUserDevice {
    kind: Device,
    id: String,
    conn: Connection,
    host: HostBox,
    ram: SharedRam,
    config: Vec<u8>,
    queues: usize,
    negotiated: u64,
    failed: bool,
    /// The backend's state as saved at the last stop.
    saved: Vec<u8>,
}

impl VhostUserDevice {
    /// Connect device `id` to the `kind` backend at `socket`.
    pub fn connect(kind: Device, id: &str, socket: &str, host: HostBox) -> Result<Self, String> {
        let fds = host.memory_fds().into_result().map_err(|e| {
            format!("a vhost-user backend maps guest RAM itself, and this host cannot share it: {e}")
        })?;
        // The backend logs by guest-physical page into ferry's bitmap, which
        // counts pages by their offset in the RAM file: the same numbering
        // only where RAM sits at its own offset.
        if fds.ranges.iter().any(|r| r.gpa != r.offset) {
            return Err(
                "vhost-user devices need guest RAM of at most 3 GiB in this ferry (the backend's dirty \
                        log counts guest-physical pages, ferry's bitmap file offsets)"
                    .into(),
            );
        }
        let ram = SharedRam {
            fd: fds.ram,
            ranges: fds
                .ranges
                .iter()
                .map(|r| RamRange { gpa: r.gpa, len: r.len, offset: r.offset, host_addr: r.host_addr })
                .collect(),
            log: Some((fds.dirty_bitmap, fds.dirty_bitmap_len)),
        };
        let probe = connection(kind, socket)?;
        let identity = probe.identity().clone();
        if identity.features & LOG_ALL_BIT == 0
            || !identity.has_protocol(vhost::vhost_user::VhostUserProtocolFeatures::LOG_SHMFD)
        {
            return Err(format!(
                "vhost-user backend {socket} does not log its writes to guest memory (LOG_ALL and LOG_SHMFD): \
                 a live migration could lose them"
            ));
        }
        let config = identity.config.clone().unwrap_or_default();
        let queues = queue_count(kind, &identity.feature_names, &config, identity.queues);
        Ok(VhostUserDevice {
            kind,
            id: id.to_string(),
            conn: probe,
            host,
            ram,
            config,
            queues,
            negotiated: 0,
            failed: false,
            saved: Vec::new(),
        })
    }

    fn fail(&mut self, why: &str) {
        if std::mem::replace(&mut self.failed, true) {
            return;
        }
        let line = match why.starts_with("vhost-user backend ") {
            true => why.to_string(),
            false => format!("vhost-user backend {}: {why}", self.conn.path()),
        };
        if self.host.fail(line.as_str().into()).into_result().is_err() {
            self.host.log(LogLevel::ERROR, line.as_str().into());
            self.host.stop_vm(StopKind::ERROR, 1);
        }
    }
}

/// Queues to offer: the configuration's count where the device has one
/// (virtio-blk with MQ, virtio-fs), capped by what the backend serves.
fn queue_count(kind: Device, feature_names: &[String], config: &[u8], served: Option<u64>) -> usize {
    let u16_at = |o: usize| config.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| config.get(o..o + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let said = match kind {
        Device::Blk if feature_names.iter().any(|n| n == "MQ") => u16_at(34).map(usize::from),
        Device::Blk => Some(1),
        // virtio-fs: one hiprio queue, then num_request_queues.
        Device::Fs => u32_at(36).map(|n| n as usize + 1),
    };
    let served = served.map_or(MAX_QUEUES, |n| usize::try_from(n).unwrap_or(MAX_QUEUES));
    said.unwrap_or(1).clamp(1, MAX_QUEUES).min(served.max(1))
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u32 {
        match self.kind {
            Device::Blk => 2,
            Device::Fs => 26,
        }
    }

    fn pci_class(&self) -> u32 {
        0x01_80_00 // mass storage, other: both a disk and a file system
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; self.queues]
    }

    fn features(&self) -> u64 {
        // The backend's device and ring features; not the vhost-user ones
        // (LOG_ALL, PROTOCOL_FEATURES), nor the packed ring (the transport
        // is split-ring) or legacy NOTIFY_ON_EMPTY.
        let vhost_only = LOG_ALL_BIT | PROTOCOL_FEATURES_BIT | (1 << 24);
        (self.conn.identity().features & 0xffff_ffff & !vhost_only) | VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset).ok().and_then(|o| self.config.get(o + i)).copied().unwrap_or(0);
        }
    }

    fn activate(&mut self, features: u64) -> Result<(), String> {
        self.negotiated = features;
        Ok(())
    }

    fn process_queue(&mut self, _queue: usize, _queues: &mut Queues<'_>) -> Result<(), String> {
        Ok(()) // the backend serves the queues
    }

    fn backend_fds(&self) -> Vec<std::os::fd::RawFd> {
        vec![self.conn.socket_fd()]
    }

    fn process_backend(&mut self, _index: usize, _queues: &mut Queues<'_>) -> Result<(), String> {
        if self.conn.hung_up() {
            self.fail("hung up (the backend process ended or closed its socket)");
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.negotiated = 0;
        self.conn.reset();
    }

    fn rings_elsewhere(&self) -> bool {
        true
    }

    fn start_rings(&mut self, features: u64, rings: &[Ring<'_>]) -> Result<(), String> {
        let specs: Vec<RingSpec<'_>> = rings
            .iter()
            .map(|r| RingSpec {
                index: r.index,
                size: r.size,
                desc: r.desc,
                avail: r.avail,
                used: r.used,
                next_avail: r.next_avail,
                kick: r.kick,
                call: r.call,
            })
            .collect();
        let started = self.conn.start(features, &self.ram, &specs).map_err(|e| e.to_string());
        if let Err(e) = &started {
            self.fail(e);
        }
        started
    }

    fn stop_rings(&mut self, pausing: bool) -> Result<Vec<(usize, u16)>, String> {
        let stopped = self.conn.stop().map_err(|e| e.to_string())?;
        // Every ring is stopped: the backend's own state is what it is
        // until they start again, so a pause reads it now, for a save.
        self.saved.clear();
        if pausing && self.conn.has_state() && !stopped.is_empty() {
            self.saved = self.conn.save_state().map_err(|e| e.to_string())?;
        }
        Ok(stopped)
    }

    type State = BackendStateV1;

    fn state(&self) -> BackendStateV1 {
        let identity = self.conn.identity();
        BackendStateV1 {
            features: identity.features,
            protocol_features: identity.protocol_features,
            config: self.config.clone(),
            negotiated: self.negotiated,
            backend: self.saved.clone(),
        }
    }

    fn set_state(&mut self, state: BackendStateV1) -> Result<(), String> {
        // The plan checked this before the pause; a source that changed
        // since (or a state from elsewhere) is checked again.
        state
            .contract(self.kind)
            .check(self.conn.identity(), self.conn.path())
            .map_err(|e| format!("device {}: {e}", self.id))?;
        if !state.backend.is_empty() {
            self.conn.load_state(&state.backend).map_err(|e| format!("device {}: {e}", self.id))?;
        }
        self.negotiated = state.negotiated;
        Ok(())
    }

    fn contract(&self) -> Option<Vec<(String, String)>> {
        let mut contract = self.state().contract(self.kind);
        // A started device of a backend with state moves it (the bytes are
        // read only at the pause).
        contract.backend_state = self.conn.has_state() && self.negotiated != 0;
        Some(contract.facts())
    }
}

/// What a vhost-user device plugin says about itself: `name`, its
/// `version`, one line; its socket is a binding.
pub fn describe(name: &str, version: &str, description: &str) -> ferry_plugin_api::PluginDescriptor {
    ferry_plugin_api::sdk::DescriptorBuilder::new(name, version, description)
        .binding("socket", None, "the backend's vhost-user socket (a host binding)")
        .needs("Host::memory_fds")
        .versioned::<BackendStateV1>()
        .build()
}

/// A plugin's `create`: the `kind` device on the backend its `socket`
/// binding names.
pub fn create(
    kind: Device,
    config: &ferry_plugin_api::DeviceConfig,
    host: HostBox,
) -> Result<ferry_virtio_pci::VirtioPci<VhostUserDevice>, String> {
    let socket = ferry_plugin_api::sdk::Properties::new(config).string("socket")?;
    let device = VhostUserDevice::connect(kind, config.id.as_str(), socket, host.clone())?;
    ferry_virtio_pci::VirtioPci::new(device, host)
}

/// A plugin's `check`: the backend its `socket` binding names, against the
/// source's contract.
pub fn check_config(
    kind: Device,
    config: &ferry_plugin_api::DeviceConfig,
    contract: &[(String, String)],
) -> Result<(), String> {
    let socket = ferry_plugin_api::sdk::Properties::new(config).string("socket")?;
    check(kind, socket, contract)
}
