//! Device isolation: a device can run in a sandboxed process of its own
//! (`ferry run --isolate ID,...|all`) instead of inside ferry, with the same
//! plugin library, unchanged.
//!
//! ```text
//!  ferry (core)                                   device process (`ferry device-process`)
//!  vCPU thread --bus--> RemoteDevice ==control==> serve loop --> plugin's Device / PciFunction
//!                       (proxy.rs)     socket     (process.rs)          |
//!  host thread <==================host socket========================== Host calls (RemoteHost)
//!   (MSI routes, ioeventfds, IRQ lines, log, status, stop)
//!  guest RAM memfd + dirty-bitmap memfd ---- mapped shared by both ----
//!  KVM ioeventfd / irqfd <---- the device's eventfds, passed once (SCM_RIGHTS)
//! ```
//!
//! Isolation is a host policy: it never appears in a machine type, a
//! snapshot or a migration stream, and the device's state bytes are the
//! same either way. Which devices run where is decided here, in one place
//! ([`Placement::create`]), for a VM's first build and for a reboot that
//! recreates a device.

pub mod process;
mod protocol;
mod proxy;
pub mod sandbox;
mod wire;

use std::{fs::File, path::PathBuf, sync::Arc, time::Duration};

use ferry_plugin_api::{DeviceConfig, DeviceParts, HostBox};

use crate::{memory::GuestRam, plugins::PluginLibrary, vcpu::VmControl};

/// How long an isolated device may take to answer a register or PCI
/// configuration access before ferry gives up on it, by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(2000);

/// Device isolation errors: ferry's side (the policy, starting a device
/// process) and the device process's own (before its device runs), each
/// one line.
#[derive(Debug, thiserror::Error)]
pub enum IsolateError {
    /// `--isolate` is not ids separated by commas, or `all`.
    #[error("--isolate '{0}': give device ids separated by commas, or all")]
    Syntax(String),
    /// `--isolate` names a device the VM does not have.
    #[error("--isolate names device {device}, which this VM does not have (its devices: {devices})")]
    NoSuchDevice {
        /// The id named.
        device: String,
        /// The VM's ids, comma separated.
        devices: String,
    },
    /// Guest RAM mapped from a file cannot be shared.
    #[error("isolated devices need guest RAM in a memfd, and this RAM is mapped from a file")]
    RamNotShareable,
    /// A system call on the way failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A message that does not decode.
    #[error("a malformed {what} message: {reason}")]
    Malformed {
        /// Which message.
        what: &'static str,
        /// The decoder's words.
        reason: String,
    },
    /// The device process did not come up (the line says how).
    #[error("{0}")]
    Start(String),
    /// The device process's sockets.
    #[error("{what}: {source}")]
    Wire {
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        source: wire::WireError,
    },
    /// The plugin library, as the device process loaded it.
    #[error(transparent)]
    Plugin(#[from] crate::plugins::PluginError),
    /// The plugin refused to create the device.
    #[error("device {id} ({plugin}): {error}")]
    Create {
        /// Device id.
        id: String,
        /// Plugin name.
        plugin: String,
        /// The plugin's error.
        error: ferry_plugin_api::PluginError,
    },
    /// Its sandbox could not be entered.
    #[error("sandbox: {0}")]
    Sandbox(String),
}

/// Which devices run in device processes (`--isolate`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Isolate {
    /// None: every device in ferry's process.
    #[default]
    Nothing,
    /// Every device.
    All,
    /// These device ids.
    Devices(Vec<String>),
}

impl Isolate {
    /// Parse `--isolate`: `all`, or device ids separated by commas.
    pub fn parse(s: &str) -> Result<Isolate, IsolateError> {
        if s == "all" {
            return Ok(Isolate::All);
        }
        let ids: Vec<String> = s.split(',').map(str::trim).map(String::from).collect();
        if ids.iter().any(String::is_empty) {
            return Err(IsolateError::Syntax(s.to_string()));
        }
        Ok(Isolate::Devices(ids))
    }

    /// Does device `id` run in a device process?
    pub fn wants(&self, id: &str) -> bool {
        match self {
            Isolate::Nothing => false,
            Isolate::All => true,
            Isolate::Devices(ids) => ids.iter().any(|i| i == id),
        }
    }

    /// Is any device isolated?
    pub fn any(&self) -> bool {
        !matches!(self, Isolate::Nothing)
    }

    /// A named id the VM does not have, if any (with the ids it has).
    pub fn check(&self, ids: &[String]) -> Result<(), IsolateError> {
        if let Isolate::Devices(named) = self {
            if let Some(bad) = named.iter().find(|n| !ids.contains(n)) {
                return Err(IsolateError::NoSuchDevice { device: bad.clone(), devices: ids.join(", ") });
            }
        }
        Ok(())
    }
}

/// The host's isolation policy for one VM.
#[derive(Debug, Clone)]
pub struct Isolation {
    /// Which devices.
    pub devices: Isolate,
    /// How long a register access may take.
    pub timeout: Duration,
}

impl Default for Isolation {
    fn default() -> Self {
        Isolation { devices: Isolate::Nothing, timeout: DEFAULT_TIMEOUT }
    }
}

/// Guest RAM as a device process maps it.
pub(crate) struct RamShare {
    memfd: File,
    bitmap: File,
    ranges: Vec<(u64, u64, u64)>,
    pages: u64,
    bytes: u64,
}

/// Where each device of one VM is created: in ferry, or in a device
/// process of its own.
pub struct Placement {
    policy: Isolation,
    share: Option<RamShare>,
    control: Arc<VmControl>,
    exe: PathBuf,
}

impl Placement {
    /// The placement of `policy` for a VM with RAM `ram`. Isolating needs
    /// memfd-backed RAM (a snapshot restored with an isolated device reads
    /// its memory into a memfd).
    pub fn new(policy: Isolation, ram: &GuestRam, control: Arc<VmControl>) -> Result<Self, IsolateError> {
        let io = |what| move |source| IsolateError::Io { what, source };
        let share = if policy.devices.any() {
            let memfd = ram
                .memfd()
                .ok_or(IsolateError::RamNotShareable)?
                .try_clone()
                .map_err(io("sharing guest RAM"))?;
            let bitmap = ram.dirty().memfd().try_clone().map_err(io("sharing the dirty bitmap"))?;
            Some(RamShare {
                memfd,
                bitmap,
                ranges: ram.ranges().iter().map(|r| (r.gpa, r.len, r.file_offset)).collect(),
                pages: ram.dirty().pages(),
                bytes: ram.size(),
            })
        } else {
            None
        };
        let exe = std::env::current_exe().map_err(io("cannot find the ferry binary"))?;
        Ok(Placement { policy, share, control, exe })
    }

    /// Is any device isolated?
    pub fn any(&self) -> bool {
        self.policy.devices.any()
    }

    /// Is device `id` isolated?
    pub fn isolates(&self, id: &str) -> bool {
        self.policy.devices.wants(id)
    }

    /// Create device `config.id` (the `index`-th on the bus) from `lib`,
    /// where the policy says; `host` serves its host calls either way.
    pub fn create(
        &self,
        lib: &PluginLibrary,
        config: DeviceConfig,
        host: HostBox,
        index: usize,
    ) -> Result<DeviceParts, IsolateError> {
        match &self.share {
            Some(share) if self.isolates(config.id.as_str()) => proxy::spawn(proxy::Spawn {
                exe: &self.exe,
                lib,
                config,
                host,
                index,
                share,
                control: self.control.clone(),
                timeout: self.policy.timeout,
            }),
            _ => {
                let id = config.id.to_string();
                lib.create(config, host).map_err(|error| IsolateError::Create {
                    id,
                    plugin: lib.name().to_string(),
                    error,
                })
            }
        }
    }
}
