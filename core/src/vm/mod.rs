//! Building one VM and running it, split by phase of its life:
//!
//! ```text
//!  boot.rs      machine type + kernel  --+
//!  restore.rs   snapshot file           --+--> build() (here) --> Vm --> run.rs: vCPUs, API, migration
//!  incoming.rs  live migration stream   --+                              snapshot.rs: write a snapshot
//!                                                                             reset.rs: reboot in place
//! ```
//!
//! Everything that can be refused is checked before the first vCPU runs:
//! the plugin directory, the machine type against the installed plugins,
//! memory, each device's creation, the address map, and, for a restore or
//! an incoming migration, every section of the state.

mod boot;
mod incoming;
mod reset;
mod restore;
mod run;
mod snapshot;

use std::{fs::File, path::Path, path::PathBuf, sync::Arc};

use abi_stable::std_types::RVec;
use ferry_plugin_api::DeviceConfig;
use kvm_ioctls::VcpuFd;
use thiserror::Error;

pub use boot::boot;
pub use incoming::incoming;
pub use reset::OnReset;
pub use restore::restore;
pub use snapshot::SnapshotReport;

mod control;

use crate::{
    boot::{cpu as boot_cpu, BootError, Kernel},
    bus::{Bus, BusError},
    cpu::{CpuError, VmCpu},
    host::{DeviceHost, VmServices},
    images::ImageStore,
    interrupts::IrqRouter,
    isolate::{Isolation, Placement},
    kvm::{KvmError, Machine},
    machine::{self, MachineError, MachineType},
    memory::{GuestRam, MemoryError},
    plugins::{PluginError, Registry},
    state::StateError,
    vcpu::{StopEvent, VmControl},
    vmcore::VmCore,
};

/// Memory when neither the command line nor the machine type says.
pub const DEFAULT_MEMORY: u64 = 256 << 20;

/// How to start the guest.
#[derive(Debug, Clone)]
pub struct BootConfig {
    /// The machine type.
    pub machine: MachineType,
    /// The kernel.
    pub kernel: Kernel,
    /// An initramfs to pass.
    pub initramfs: Option<PathBuf>,
    /// Kernel command line (None: the test guest's default, or empty).
    pub cmdline: Option<String>,
    /// vCPU count (None: the machine type's, or 1).
    pub cpus: Option<u8>,
    /// Memory in bytes (None: the machine type's, or 256 MiB).
    pub memory: Option<u64>,
    /// Plugin directory.
    pub plugins: PathBuf,
    /// Which devices run in device processes.
    pub isolation: Isolation,
    /// Where the kernel and initramfs are kept for reboots and moves.
    pub images: ImageStore,
}

/// How the guest ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// It reset the machine.
    Reset,
    /// It chose an exit status.
    Exit(i32),
    /// The control API shut it down.
    Shutdown,
    /// It moved to another host; the report says how.
    Migrated(Box<crate::migration::status::Status>),
}

/// Why a VM could not be built or ended in failure.
#[derive(Debug, Error)]
pub enum VmError {
    /// Plugin loading.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// Machine type.
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// Guest RAM.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// KVM.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// Kernel and boot structures.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Address map.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// A device refused to be created.
    #[error("device {id} ({plugin}): {message}")]
    Device {
        /// Device id.
        id: String,
        /// Plugin.
        plugin: String,
        /// What it said.
        message: String,
    },
    /// The vCPU count is zero.
    #[error("--cpus must be at least 1")]
    NoCpus,
    /// A snapshot cannot be read, written or used; its kind says which.
    #[error("snapshot {path}: {message}")]
    Snapshot {
        /// The file.
        path: String,
        /// What kind of problem (it chooses the API's status).
        fault: SnapshotFault,
        /// What is wrong.
        message: String,
    },
    /// KVM state.
    #[error(transparent)]
    State(#[from] StateError),
    /// The guest's CPU.
    #[error(transparent)]
    Cpu(#[from] CpuError),
    /// The guest's CPU cannot run on this host (every reason, one per line).
    #[error("this host cannot run the guest's CPU; nothing was created:\n  {}", .0.join("\n  "))]
    CpuRefused(Vec<String>),
    /// vCPU threads and their signal.
    #[error(transparent)]
    Vcpu(#[from] crate::vcpu::VcpuError),
    /// Device processes.
    #[error(transparent)]
    Isolate(#[from] crate::isolate::IsolateError),
    /// A device would not pause or resume.
    #[error(transparent)]
    Devices(#[from] crate::vmcore::DeviceCallError),
    /// The guest is resetting or ending: it cannot be paused for this.
    #[error("the guest is resetting or ending: {0}")]
    Ending(&'static str),
    /// A reboot failed.
    #[error("reboot: {0}")]
    Reboot(#[from] reset::ResetError),
    /// An incoming migration failed.
    #[error("incoming migration: {0}")]
    Incoming(#[from] crate::migration::conn::MigrateError),
    /// The VM stopped because something failed while it ran (a vCPU's
    /// KVM error, a failed device: the line says which).
    #[error("{0}")]
    Stopped(String),
    /// The control API's socket.
    #[error(transparent)]
    Api(#[from] crate::api::ServeError),
    /// ferry's own seccomp filter.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    /// A thread doing part of the work panicked (a bug in ferry).
    #[error("{0} failed: its thread panicked")]
    Helper(&'static str),
}

/// What kind of snapshot problem: the file cannot be used, the guest's
/// state or the target host refuses it now, or the path cannot be
/// created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotFault {
    /// Unreadable, damaged, or not loadable here.
    Unusable,
    /// The guest's state or the target host does not allow it now.
    Refused,
    /// The file cannot be created where asked.
    Path,
}

impl VmError {
    /// The control API's view of this error: its kind chooses the status.
    pub fn to_api(&self) -> crate::api::ApiError {
        use crate::api::ApiError;
        let message = self.to_string();
        match self {
            VmError::Snapshot { fault: SnapshotFault::Refused, .. } => ApiError::Conflict(message),
            VmError::Snapshot { fault: SnapshotFault::Path, .. } => ApiError::BadRequest(message),
            _ => ApiError::Failed(message),
        }
    }
}

/// Where guest RAM comes from.
enum RamSource<'a> {
    Fresh(u64),
    Memfd(u64, File),
    Snapshot { size: u64, file: &'a File, runs: Vec<(u64, u64, u64)> },
}

/// Guest RAM and the KVM VM it is registered with: what every VM starts
/// from. Restore makes it on a second thread while it checks the plugins.
struct VmMemory {
    ram: GuestRam,
    kvm: Machine,
}

impl VmMemory {
    /// Map RAM from `source` and create a VM for `cpus` vCPUs holding it;
    /// with devices in device processes (`shared`), a snapshot's pages are
    /// read into a memfd they can map.
    fn new(source: RamSource<'_>, cpus: u8, shared: bool) -> Result<Self, VmError> {
        let ram = match source {
            RamSource::Fresh(size) => GuestRam::new(size)?,
            RamSource::Memfd(size, file) => GuestRam::from_memfd(size, file)?,
            // A private file mapping cannot be shared, so its pages are read in.
            RamSource::Snapshot { size, file, runs } if shared => {
                GuestRam::from_snapshot_copied(size, file, &runs)?
            }
            RamSource::Snapshot { size, file, runs } => GuestRam::from_snapshot(size, file, &runs)?,
        };
        crate::log::step("build: guest RAM mapped");
        let kvm = Machine::new(usize::from(cpus), &ram)?;
        crate::log::step("build: KVM VM created, RAM registered");
        Ok(VmMemory { ram, kvm })
    }
}

/// A built VM: everything created, vCPUs not started yet.
pub struct Vm {
    // Dropped in this order: the vCPU fds (their threads joined by
    // `run`), what a reboot would need (device configurations, services),
    // then the core, which tears down devices, the VM fd and RAM in that
    // order (see `VmCore`).
    vcpus: Vec<VcpuFd>,
    /// The machine as built, for a reboot (or why it could not be kept).
    reset: Result<reset::ResetPoint, StateError>,
    /// What a reboot loads (None: restored or migrated in).
    image: Option<boot::BootImage>,
    on_reset: OnReset,
    stop_rx: crossbeam_channel::Receiver<StopEvent>,
    core: Arc<VmCore>,
}

impl Vm {
    /// What to do when the guest resets the machine (default: reboot).
    pub fn on_reset(mut self, policy: OnReset) -> Self {
        self.on_reset = policy;
        self
    }
}

impl std::ops::Deref for Vm {
    type Target = VmCore;

    fn deref(&self) -> &VmCore {
        &self.core
    }
}
/// Open the plugins `machine` names from `dir` (the one registry of this
/// process: the VM keeps it).
fn open_plugins(dir: &Path, machine: &MachineType) -> Result<Registry, VmError> {
    let names: Vec<&str> = machine.devices.iter().map(|d| d.plugin.as_str()).collect();
    Ok(Registry::open(dir, &names)?)
}

/// Build a VM of machine type `machine` with `cpus` vCPUs, each given
/// `cpu`, on `memory` (made for `cpus`). Devices are created from the
/// plugins in `registry`; nothing runs yet.
fn build(
    machine: MachineType,
    registry: Registry,
    cpus: u8,
    mut cpu: VmCpu,
    memory: VmMemory,
    isolation: &Isolation,
) -> Result<Vm, VmError> {
    let plans = machine::resolve(&machine, &registry)?;
    if cpus == 0 {
        return Err(VmError::NoCpus);
    }
    let ids: Vec<String> = plans.iter().map(|p| p.id.clone()).collect();
    isolation.devices.check(&ids)?;
    let VmMemory { ram, kvm } = memory;

    let (stop_tx, stop_rx) = crossbeam_channel::unbounded();
    let control = VmControl::new(stop_tx);
    let services = VmServices {
        vm: kvm.vm.clone(),
        control: control.clone(),
        irq: Arc::new(IrqRouter::new(kvm.vm.clone())),
        memory: ram.device_map(),
        files: match ram.device_files() {
            Some(files) => Some(Arc::new(
                files.map_err(|e| crate::memory::MemoryError::Map(format!("sharing guest RAM: {e}")))?,
            )),
            None => None,
        },
        status: Arc::default(),
    };
    let placement = Arc::new(Placement::new(isolation.clone(), &ram, control.clone())?);
    let mut bus = Bus::new();
    let mut configs = Vec::with_capacity(plans.len());
    for plan in &plans {
        let Some(lib) = registry.get(&plan.plugin) else { continue };
        let index = bus.devices().len();
        let host = DeviceHost::new_box(&plan.id, index, services.clone());
        let config = DeviceConfig {
            id: plan.id.as_str().into(),
            properties: plan.properties.iter().cloned().collect::<RVec<_>>(),
        };
        configs.push(config.clone());
        let parts = placement.create(lib, config, host, index).map_err(|e| VmError::Device {
            id: plan.id.clone(),
            plugin: plan.plugin.clone(),
            // The plugin's own words; the device and plugin are named once.
            message: match e {
                crate::isolate::IsolateError::Create { error, .. } => error.message.to_string(),
                other => other.to_string(),
            },
        })?;
        bus.add_device(&plan.id, &plan.plugin, parts.device, parts.pci.into_option())?;
    }

    crate::log::step("build: devices created");
    let mut vcpus = Vec::with_capacity(usize::from(cpus));
    for index in 0..cpus {
        let fd =
            kvm.vm.create_vcpu(u64::from(index)).map_err(|source| BootError::Vcpu { cpu: index, source })?;
        let held = cpu.install(&fd, index)?;
        if index == 0 {
            // What travels is the CPU ferry gave; say where KVM holds more.
            cpu.kvm_rewrote = crate::cpu::rewritten(&crate::cpu::cpuid::for_vcpu(&cpu.cpuid, 0), &held);
        }
        boot_cpu::setup_lapic(&fd, index)?;
        vcpus.push(fd);
    }
    crate::log::step("build: vCPUs created");
    let status = services.status.clone();
    let reset = reset::ResetPoint::capture(&kvm.vm, &vcpus, &cpu.msrs, configs, services, placement.clone());
    let core = VmCore {
        machine,
        registry,
        ram,
        kvm,
        bus: Arc::new(bus),
        control,
        cpus,
        cpu,
        migration: std::sync::Mutex::new(None),
        status,
        reboots: Default::default(),
        failure: Default::default(),
        placement,
        image: Default::default(),
    };
    Ok(Vm { core: Arc::new(core), stop_rx, vcpus, reset, image: None, on_reset: OnReset::default() })
}
