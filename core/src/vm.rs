//! Building and running one VM: plugins, machine type, RAM, devices, boot
//! or restore, vCPUs, the control API, and the wait for the guest to end.
//!
//! Everything that can be refused is checked before the first vCPU runs:
//! the plugin directory, the machine type against the installed plugins,
//! memory, each device's creation, the address map, and, for a restore,
//! every section of the snapshot.

use std::{
    fs::File,
    io::BufWriter,
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use abi_stable::std_types::RVec;
use ferry_plugin_api::{DeviceConfig, StateBlob};
use kvm_ioctls::VcpuFd;
use thiserror::Error;

use crate::{
    api::{self, ApiRequest},
    boot::{self, cpu, BootError, Entry, Kernel},
    bus::{Bus, BusError},
    host::{DeviceHost, VmServices},
    interrupts::IrqRouter,
    kvm::{KvmError, Machine},
    machine::{self, MachineError, MachineType},
    memory::{GuestRam, MemoryError},
    migration::{
        manifest::{CpuidRecord, DeviceRecord, MachineRecord, Manifest, MANIFEST_VERSION},
        stream::{self, Kind, StreamError},
    },
    plugins::{PluginError, Registry},
    state::{self, StateError, MACHINE_STATE_VERSION, VCPU_STATE_VERSION},
    vcpu::{self, StopEvent, VmControl},
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
    Migrated(crate::migration::live::Status),
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
    /// A snapshot cannot be read or used.
    #[error("snapshot {path}: {message}")]
    Snapshot {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// KVM state.
    #[error(transparent)]
    State(#[from] StateError),
    /// Starting threads, signals, the API socket.
    #[error("{0}")]
    Runtime(String),
    /// The VM stopped because something failed while it ran.
    #[error("{0}")]
    Failed(String),
}

/// Where guest RAM comes from.
enum RamSource<'a> {
    Fresh(u64),
    Memfd(u64, File),
    Snapshot { size: u64, file: &'a File, runs: Vec<(u64, u64, u64)> },
}

/// What a running VM shares between its main loop, the control API and a
/// migration thread.
pub struct VmCore {
    pub(crate) machine: MachineType,
    pub(crate) registry: Registry,
    pub(crate) ram: GuestRam,
    pub(crate) kvm: Machine,
    pub(crate) bus: Arc<Bus>,
    pub(crate) control: Arc<VmControl>,
    pub(crate) cpus: u8,
    pub(crate) msrs: Arc<Vec<u32>>,
    pub(crate) cpuid: Vec<CpuidRecord>,
    /// The live migration in progress or last finished, if any.
    pub(crate) migration: std::sync::Mutex<Option<crate::migration::live::Status>>,
}

/// A built VM: everything created, vCPUs not started yet.
pub struct Vm {
    core: Arc<VmCore>,
    stop_rx: crossbeam_channel::Receiver<StopEvent>,
    vcpus: Vec<VcpuFd>,
}

impl std::ops::Deref for Vm {
    type Target = VmCore;

    fn deref(&self) -> &VmCore {
        &self.core
    }
}

/// What a snapshot wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SnapshotReport {
    /// The file.
    pub path: String,
    /// Its size.
    pub bytes: u64,
    /// Guest RAM bytes stored (non-zero pages).
    pub memory_bytes: u64,
    /// Time the guest was paused, in milliseconds.
    pub paused_ms: f64,
}

fn build(machine: MachineType, plugins: &Path, cpus: Option<u8>, ram: RamSource<'_>) -> Result<Vm, VmError> {
    let registry = Registry::load_dir(plugins)?;
    let plans = machine::resolve(&machine, &registry)?;
    let cpus = cpus.or(machine.cpus).unwrap_or(1);
    if cpus == 0 {
        return Err(VmError::NoCpus);
    }
    let ram = match ram {
        RamSource::Fresh(size) => GuestRam::new(size)?,
        RamSource::Memfd(size, file) => GuestRam::from_memfd(size, file)?,
        RamSource::Snapshot { size, file, runs } => GuestRam::from_snapshot(size, file, &runs)?,
    };
    let kvm = Machine::new(usize::from(cpus))?;
    kvm.register_ram(&ram)?;
    let msrs = Arc::new(kvm.msr_indexes()?);

    let (stop_tx, stop_rx) = crossbeam_channel::unbounded();
    let control = VmControl::new(stop_tx);
    let services = VmServices {
        vm: kvm.vm.clone(),
        control: control.clone(),
        irq: Arc::new(IrqRouter::new(kvm.vm.clone())),
        memory: ram.device_map(),
    };
    let mut bus = Bus::new();
    for plan in &plans {
        let Some(lib) = registry.get(&plan.plugin) else { continue };
        let index = bus.devices().len();
        let host = DeviceHost::new_box(&plan.id, index, services.clone());
        let config = DeviceConfig {
            id: plan.id.as_str().into(),
            properties: plan.properties.iter().cloned().collect::<RVec<_>>(),
        };
        let parts = lib.create(config, host).map_err(|message| VmError::Device {
            id: plan.id.clone(),
            plugin: plan.plugin.clone(),
            message,
        })?;
        bus.add_device(&plan.id, &plan.plugin, parts.device, parts.pci.into_option())?;
    }

    let base_cpuid = &kvm.supported_cpuid;
    let mut vcpus = Vec::with_capacity(usize::from(cpus));
    let mut cpuid = Vec::new();
    for index in 0..cpus {
        let fd =
            kvm.vm.create_vcpu(u64::from(index)).map_err(|source| BootError::Vcpu { cpu: index, source })?;
        let table = cpu::cpuid_for(base_cpuid, index, cpus);
        fd.set_cpuid2(&table).map_err(|source| BootError::Vcpu { cpu: index, source })?;
        if index == 0 {
            cpuid = cpuid_records(&table);
        }
        cpu::setup_lapic(&fd, index)?;
        vcpus.push(fd);
    }
    let core = VmCore {
        machine,
        registry,
        ram,
        kvm,
        bus: Arc::new(bus),
        control,
        cpus,
        msrs,
        cpuid,
        migration: std::sync::Mutex::new(None),
    };
    Ok(Vm { core: Arc::new(core), stop_rx, vcpus })
}

/// Build a VM and load its kernel.
pub fn boot(config: BootConfig) -> Result<Vm, VmError> {
    let memory = config.memory.or(config.machine.memory).unwrap_or(DEFAULT_MEMORY);
    let vm = build(config.machine, &config.plugins, config.cpus, RamSource::Fresh(memory))?;
    let cmdline = match (&config.cmdline, &config.kernel) {
        (Some(c), _) => c.clone(),
        (None, Kernel::TestGuest) => boot::TEST_GUEST_CMDLINE.to_string(),
        (None, Kernel::File(_)) => String::new(),
    };
    let entry = boot::load(&vm.ram, &config.kernel, config.initramfs.as_deref(), &cmdline, vm.cpus)?;
    cpu::write_gdt(&vm.ram, &entry)?;
    match &entry {
        Entry::Pvh(e) => cpu::setup_pvh_bsp(&vm.vcpus[0], e)?,
        Entry::Linux(e) => cpu::setup_linux_bsp(&vm.vcpus[0], e)?,
    }
    crate::log::info(&format!(
        "booting {} on machine type {} with {} vCPU(s), {} of RAM, {} device(s)",
        config.kernel.describe(),
        vm.machine.name,
        vm.cpus,
        crate::memory::human_size(vm.ram.size()),
        vm.bus.devices().len()
    ));
    Ok(vm)
}

/// Everything read from a snapshot before the VM is built.
struct SnapshotContents {
    manifest: Manifest,
    machine: Option<(u32, Vec<u8>)>,
    vcpus: Vec<Option<(u32, Vec<u8>)>>,
    devices: Vec<(String, u32, Vec<u8>)>,
    runs: Vec<(u64, u64, u64)>,
}

fn read_snapshot(file: &File, path: &str, verify_memory: bool) -> Result<SnapshotContents, VmError> {
    let err = |e: StreamError| VmError::Snapshot { path: path.to_string(), message: e.to_string() };
    let bad = |m: String| VmError::Snapshot { path: path.to_string(), message: m };
    let mut r = stream::Reader::new(file).map_err(err)?;
    let h = r.next_header().map_err(err)?;
    if h.kind != Kind::Manifest {
        return Err(bad(format!("section 0 is a {} section; a manifest must come first", h.kind.name())));
    }
    if h.version > MANIFEST_VERSION {
        return Err(bad(format!(
            "manifest v{} is newer than this ferry reads (v{MANIFEST_VERSION})",
            h.version
        )));
    }
    let manifest: Manifest =
        state::decode(&r.payload(&h).map_err(err)?).map_err(|e| bad(format!("section 0 (manifest): {e}")))?;
    if manifest.cpus == 0 || usize::from(manifest.cpus) > boot::mptable::MAX_CPUS as usize {
        return Err(bad(format!("manifest: {} vCPUs", manifest.cpus)));
    }
    let mut contents = SnapshotContents {
        vcpus: vec![None; usize::from(manifest.cpus)],
        manifest,
        machine: None,
        devices: Vec::new(),
        runs: Vec::new(),
    };
    loop {
        let h = r.next_header().map_err(err)?;
        match h.kind {
            Kind::End => break,
            Kind::Manifest => return Err(bad(format!("section {}: a second manifest", h.index))),
            Kind::Hello
            | Kind::Plan
            | Kind::Decision
            | Kind::Pages
            | Kind::ZeroPages
            | Kind::Resumed
            | Kind::Failed
            | Kind::Memfd => {
                return Err(bad(format!(
                    "section {}: a {} message belongs to a live migration",
                    h.index,
                    h.kind.name()
                )))
            }
            Kind::Machine => contents.machine = Some((h.version, r.payload(&h).map_err(err)?)),
            Kind::Vcpu => {
                let n = h.id.strip_prefix("cpu").and_then(|n| n.parse::<usize>().ok());
                let slot = n.and_then(|n| contents.vcpus.get_mut(n)).ok_or_else(|| {
                    bad(format!("section {} (vcpu {}): no such vCPU in the manifest", h.index, h.id))
                })?;
                *slot = Some((h.version, r.payload(&h).map_err(err)?));
            }
            Kind::Device => {
                if !contents.manifest.devices.iter().any(|d| d.id == h.id) {
                    return Err(bad(format!("section {} (device {}): unknown device id", h.index, h.id)));
                }
                let payload = r.payload(&h).map_err(err)?;
                contents.devices.push((h.id.clone(), h.version, payload));
            }
            Kind::Memory => {
                let table = r.payload(&h).map_err(err)?;
                let runs = r.runs(&h, &table, &contents.manifest.ram).map_err(err)?;
                if verify_memory {
                    for (i, run) in runs.iter().enumerate() {
                        r.verify_run(&h, i, run).map_err(err)?;
                    }
                }
                let end =
                    runs.last().map(|l| l.data_at + l.pages * 4096).unwrap_or(h.payload_at + h.payload_len);
                let end = end.div_ceil(4096) * 4096;
                contents.runs = runs.iter().map(|x| (x.gpa, x.pages * 4096, x.data_at)).collect();
                r.skip_to(end.max(h.payload_at + h.payload_len)).map_err(err)?;
            }
        }
    }
    if contents.machine.is_none() {
        return Err(bad("no machine section".into()));
    }
    if let Some(i) = contents.vcpus.iter().position(Option::is_none) {
        return Err(bad(format!("no state for vCPU {i}")));
    }
    for d in &contents.manifest.devices {
        if !contents.devices.iter().any(|(id, _, _)| id == &d.id) {
            return Err(bad(format!("device {}: no state section", d.id)));
        }
    }
    Ok(contents)
}

/// Build a VM from a snapshot: the machine type comes from the file; memory
/// is mapped from it lazily. Every section is checked before the VM runs.
pub fn restore(path: &Path, plugins: &Path, verify_memory: bool) -> Result<Vm, VmError> {
    let shown = path.display().to_string();
    let bad = |m: String| VmError::Snapshot { path: shown.clone(), message: m };
    let file = File::open(path).map_err(|e| bad(format!("cannot open: {e}")))?;
    let c = read_snapshot(&file, &shown, verify_memory)?;
    let m = &c.manifest;
    let machine = m.machine.to_machine_type(m.cpus, m.memory);

    // Versions first: a state this host cannot load is named before any
    // device is created.
    let registry = Registry::load_dir(plugins)?;
    for d in &m.devices {
        let Some(lib) = registry.get(&d.plugin) else {
            return Err(bad(format!(
                "device {}: plugin {} {} is not installed in {}",
                d.id,
                d.plugin,
                d.plugin_version,
                registry.dir.display()
            )));
        };
        let v = lib.descriptor.state;
        if d.state_version < v.oldest_load || d.state_version > v.current {
            return Err(bad(format!(
                "device {}: {} state v{}, this host loads v{}..v{}",
                d.id, d.plugin, d.state_version, v.oldest_load, v.current
            )));
        }
    }
    drop(registry);

    let vm = build(
        machine,
        plugins,
        Some(m.cpus),
        RamSource::Snapshot { size: m.memory, file: &file, runs: c.runs.clone() },
    )?;
    if vm.ram.ranges().iter().map(|r| (r.gpa, r.len)).collect::<Vec<_>>() != m.ram {
        return Err(bad("the memory layout differs from this ferry's for the same size".into()));
    }
    let machine_state = c.machine.clone().expect("checked");
    let vcpus: Vec<(u32, Vec<u8>)> = c.vcpus.iter().map(|v| v.clone().expect("checked")).collect();
    apply_states(&vm, &machine_state, &vcpus, &c.devices).map_err(bad)?;
    crate::log::info(&format!(
        "restored {shown}: machine type {}, {} vCPU(s), {} of RAM",
        vm.machine.name,
        vm.cpus,
        crate::memory::human_size(vm.ram.size())
    ));
    Ok(vm)
}

/// Load machine, vCPU and device state into a freshly built VM, remap the
/// PCI BARs and let the devices run. Errors say which section.
fn apply_states(
    vm: &Vm,
    machine: &(u32, Vec<u8>),
    vcpus: &[(u32, Vec<u8>)],
    devices: &[(String, u32, Vec<u8>)],
) -> Result<(), String> {
    let t0 = std::time::Instant::now();
    let (mv, machine_bytes) = machine;
    if *mv != MACHINE_STATE_VERSION {
        return Err(format!("machine state v{mv}, this ferry loads v{MACHINE_STATE_VERSION}"));
    }
    let ms: state::MachineStateV1 =
        state::decode(machine_bytes).map_err(|e| format!("machine section: {e}"))?;
    state::restore_machine(&vm.kvm.vm, &ms).map_err(|e| format!("machine section: {e}"))?;
    if vcpus.len() != vm.vcpus.len() {
        return Err(format!("{} vCPU sections for {} vCPUs", vcpus.len(), vm.vcpus.len()));
    }
    crate::log::debug(&format!("machine state loaded at {:.2} ms", t0.elapsed().as_secs_f64() * 1e3));
    for (i, (fd, (version, bytes))) in vm.vcpus.iter().zip(vcpus).enumerate() {
        if *version != VCPU_STATE_VERSION {
            return Err(format!("vcpu cpu{i}: state v{version}, this ferry loads v{VCPU_STATE_VERSION}"));
        }
        let st: state::VcpuStateV1 = state::decode(bytes).map_err(|e| format!("vcpu cpu{i}: {e}"))?;
        state::restore_vcpu(fd, &st).map_err(|e| format!("vcpu cpu{i}: {e}"))?;
    }
    crate::log::debug(&format!("vCPU state loaded at {:.2} ms", t0.elapsed().as_secs_f64() * 1e3));
    for slot in vm.bus.devices() {
        let Some((_, version, bytes)) = devices.iter().find(|(id, _, _)| id == &slot.id) else {
            return Err(format!("device {}: no state section", slot.id));
        };
        let blob = StateBlob { version: *version, bytes: bytes.clone().into() };
        let mut dev = slot.device.lock().unwrap_or_else(|e| e.into_inner());
        dev.pause().into_result().map_err(|e| format!("device {}: {e}", slot.id))?;
        dev.load_state(blob)
            .into_result()
            .map_err(|e| format!("device {} ({}): {e}", slot.id, slot.plugin))?;
    }
    vm.bus.refresh_pci();
    vm.set_devices_paused(false)
}

/// This host's plugins, as a migration plan sees them.
pub fn host_plugins(registry: &Registry) -> Vec<crate::migration::plan::HostPlugin> {
    registry
        .plugins()
        .iter()
        .map(|p| crate::migration::plan::HostPlugin {
            name: p.name().to_string(),
            version: p.descriptor.version.to_string(),
            current: p.descriptor.state.current,
            oldest_load: p.descriptor.state.oldest_load,
            oldest_save: p.descriptor.state.oldest_save,
            properties: p.descriptor.properties.iter().map(|q| q.name.to_string()).collect(),
            defaults: p
                .descriptor
                .properties
                .iter()
                .filter_map(|q| q.default.clone().into_option().map(|d| (q.name.to_string(), d.to_string())))
                .collect(),
        })
        .collect()
}

/// The CPUID KVM on this host gives vCPU 0 of a VM with `cpus` vCPUs.
pub fn host_cpuid(cpus: u8) -> Option<Vec<CpuidRecord>> {
    let kvm = kvm_ioctls::Kvm::new().ok()?;
    let base = kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES).ok()?;
    Some(cpuid_records(&cpu::cpuid_for(&base, 0, cpus)))
}

/// The entries of a CPUID table as the manifest records them.
fn cpuid_records(table: &kvm_bindings::CpuId) -> Vec<CpuidRecord> {
    table
        .as_slice()
        .iter()
        .map(|e| CpuidRecord {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        })
        .collect()
}

/// This host's plugin set and CPU, for `ferry plugins --manifest`.
pub fn host_manifest(registry: &Registry) -> crate::migration::plan::HostManifest {
    crate::migration::plan::HostManifest {
        ferry_version: env!("CARGO_PKG_VERSION").to_string(),
        plugin_api: ferry_plugin_api::PLUGIN_API_VERSION.to_string(),
        plugins: host_plugins(registry),
        // As for a multi-vCPU guest, so topology bits never read as missing.
        cpuid: host_cpuid(2).unwrap_or_default(),
    }
}

/// Wait for a live migration on `uri`, plan it against the plugins in
/// `plugins`, receive the VM, and return it ready to run with the link to
/// confirm on. None after a dry run.
pub fn incoming(
    uri: &str,
    plugins: &Path,
) -> Result<Option<(Vm, crate::migration::live::IncomingLink)>, VmError> {
    use crate::migration::{live, plan};
    let fail = |m: String| VmError::Failed(format!("incoming migration: {m}"));
    let registry = Registry::load_dir(plugins)?;
    let host = host_plugins(&registry);
    let accepted = live::accept(uri, |m| {
        // The same computation `ferry compat` uses (host_manifest).
        let cpuid = host_cpuid(2);
        plan::make_plan(m, &host, cpuid.as_deref())
    })
    .map_err(|e| fail(e.to_string()))?;
    drop(registry);
    let Some(mut incoming) = accepted else { return Ok(None) };
    let m = incoming.manifest.clone();
    let mut machine = m.machine.to_machine_type(m.cpus, m.memory);
    // Properties this host's (older) plugins do not know switch on features
    // they lack; the plan allowed them only for downgrades, whose functions
    // refused if the guest used the feature. Leave them out here.
    let registry = Registry::load_dir(plugins)?;
    for d in &mut machine.devices {
        if let Some(lib) = registry.get(&d.plugin) {
            d.properties.retain(|k, _| lib.descriptor.properties.iter().any(|p| p.name.as_str() == k));
        }
    }
    drop(registry);
    let ram = match incoming.memfd.take() {
        Some(file) => RamSource::Memfd(m.memory, file),
        None => RamSource::Fresh(m.memory),
    };
    let vm = match build(machine, plugins, Some(m.cpus), ram) {
        Ok(vm) => vm,
        Err(e) => {
            incoming.link.failed(&e.to_string());
            return Err(e);
        }
    };
    let result = receive_state(&vm, &mut incoming.link);
    match result {
        Ok(()) => Ok(Some((vm, incoming.link))),
        Err(e) => {
            incoming.link.failed(&e);
            Err(fail(e))
        }
    }
}

/// Memory and state from the source, until END; then load the state.
fn receive_state(vm: &Vm, link: &mut crate::migration::live::IncomingLink) -> Result<(), String> {
    use vm_memory::{Bytes, GuestAddress};
    let mut machine = None;
    let mut vcpus: Vec<Option<(u32, Vec<u8>)>> = vec![None; usize::from(vm.cpus)];
    let mut devices = Vec::new();
    loop {
        let (h, payload) = link.receive().map_err(|e| e.to_string())?;
        match h.kind {
            Kind::Pages => {
                if payload.len() < 8 || (payload.len() - 8) % 4096 != 0 {
                    return Err(format!("message {}: malformed pages", h.index));
                }
                let gpa = u64::from_le_bytes(payload[..8].try_into().map_err(|_| "short")?);
                let data = &payload[8..];
                if vm.ram.bytes(gpa, data.len() as u64).is_none() {
                    return Err(format!("message {}: pages at {gpa:#x} outside guest RAM", h.index));
                }
                vm.ram.mem().write_slice(data, GuestAddress(gpa)).map_err(|e| e.to_string())?;
            }
            Kind::ZeroPages => {
                for pair in payload.chunks_exact(16) {
                    let gpa = u64::from_le_bytes(pair[..8].try_into().map_err(|_| "short")?);
                    let n = u64::from_le_bytes(pair[8..].try_into().map_err(|_| "short")?);
                    let len = n.checked_mul(4096).ok_or("zero run overflows")?;
                    if vm.ram.bytes(gpa, len).is_none() {
                        return Err(format!("message {}: zero pages at {gpa:#x} outside guest RAM", h.index));
                    }
                    let zero = [0u8; 4096];
                    for k in 0..n {
                        vm.ram
                            .mem()
                            .write_slice(&zero, GuestAddress(gpa + k * 4096))
                            .map_err(|e| e.to_string())?;
                    }
                }
            }
            Kind::Machine => machine = Some((h.version, payload)),
            Kind::Vcpu => {
                let slot =
                    h.id.strip_prefix("cpu")
                        .and_then(|n| n.parse::<usize>().ok())
                        .and_then(|n| vcpus.get_mut(n))
                        .ok_or_else(|| format!("message {}: no vCPU {}", h.index, h.id))?;
                *slot = Some((h.version, payload));
            }
            Kind::Device => {
                if !vm.bus.devices().iter().any(|d| d.id == h.id) {
                    return Err(format!("message {} (device {}): unknown device id", h.index, h.id));
                }
                devices.push((h.id, h.version, payload));
            }
            Kind::End => break,
            Kind::Decision if payload == b"sync" => {
                link.synced().map_err(|e| format!("answering a sync: {e}"))?
            }
            Kind::Failed => return Err(format!("the source gave up: {}", String::from_utf8_lossy(&payload))),
            other => return Err(format!("message {}: unexpected {}", h.index, other.name())),
        }
    }
    let machine = machine.ok_or("no machine state")?;
    let vcpus: Vec<(u32, Vec<u8>)> = vcpus
        .into_iter()
        .enumerate()
        .map(|(i, v)| v.ok_or_else(|| format!("no state for vCPU {i}")))
        .collect::<Result<_, _>>()?;
    let t = std::time::Instant::now();
    let r = apply_states(vm, &machine, &vcpus, &devices);
    crate::log::info(&format!("incoming: state loaded in {:.2} ms", t.elapsed().as_secs_f64() * 1e3));
    r
}

impl VmCore {
    pub(crate) fn set_devices_paused(&self, paused: bool) -> Result<(), String> {
        for d in self.bus.devices() {
            let mut dev = d.device.lock().unwrap_or_else(|e| e.into_inner());
            let r = if paused { dev.pause() } else { dev.resume() };
            r.into_result().map_err(|e| format!("device {} ({}): {e}", d.id, d.plugin))?;
        }
        Ok(())
    }

    /// Pause vCPUs, then devices.
    pub fn pause(&self) -> Result<(), String> {
        self.control.pause();
        self.set_devices_paused(true)
    }

    /// Resume devices, then vCPUs.
    pub fn resume(&self) -> Result<(), String> {
        self.set_devices_paused(false)?;
        self.control.resume();
        Ok(())
    }

    /// Write a snapshot to `path` (through a temporary file, renamed when
    /// complete). The guest is paused while it is written and resumed after
    /// if it was running.
    pub fn snapshot(&self, path: &Path) -> Result<SnapshotReport, VmError> {
        self.snapshot_for(path, None)
    }

    /// Write a snapshot that the host described by `target` can restore:
    /// each device at the state version the plan gives (downgrades run now,
    /// and refuse if the guest uses what the older version lacks), and the
    /// machine type without the properties the target's plugins do not know.
    pub fn snapshot_for(
        &self,
        path: &Path,
        target: Option<&crate::migration::plan::HostManifest>,
    ) -> Result<SnapshotReport, VmError> {
        let start = Instant::now();
        let was_running = !self.control.is_paused();
        self.pause().map_err(VmError::Runtime)?;
        let result = self.write_snapshot(path, target);
        let paused_ms = start.elapsed().as_secs_f64() * 1e3;
        if was_running {
            self.resume().map_err(VmError::Runtime)?;
        }
        let (bytes, memory_bytes) = result?;
        Ok(SnapshotReport { path: path.display().to_string(), bytes, memory_bytes, paused_ms })
    }

    /// The manifest of this VM, with every device at its plugin's current
    /// state version.
    pub fn manifest(&self) -> Manifest {
        let records = self
            .bus
            .devices()
            .iter()
            .map(|d| {
                let lib = self.registry.get(&d.plugin);
                DeviceRecord {
                    id: d.id.clone(),
                    plugin: d.plugin.clone(),
                    plugin_version: lib.map(|l| l.descriptor.version.to_string()).unwrap_or_default(),
                    state_version: lib.map(|l| l.descriptor.state.current).unwrap_or(0),
                    oldest_save: lib.map(|l| l.descriptor.state.oldest_save).unwrap_or(0),
                }
            })
            .collect();
        Manifest {
            ferry_version: env!("CARGO_PKG_VERSION").to_string(),
            machine: MachineRecord::new(&self.machine),
            devices: records,
            cpus: self.cpus,
            memory: self.ram.size(),
            ram: self.ram.ranges().iter().map(|r| (r.gpa, r.len)).collect(),
            cpuid: self.cpuid.clone(),
        }
    }

    fn write_snapshot(
        &self,
        path: &Path,
        target: Option<&crate::migration::plan::HostManifest>,
    ) -> Result<(u64, u64), VmError> {
        let shown = path.display().to_string();
        let fail = |m: String| VmError::Snapshot { path: shown.clone(), message: m };
        let mut manifest = self.manifest();
        let plan = target.map(|t| crate::migration::plan::make_plan(&manifest, &t.plugins, None));
        if let Some(p) = plan.as_ref().filter(|p| p.refused()) {
            return Err(fail(format!("the target host cannot restore it: {}", p.lines().join("; "))));
        }
        let mut devices = Vec::new();
        for d in self.bus.devices() {
            let lib =
                self.registry.get(&d.plugin).ok_or_else(|| fail(format!("plugin {} vanished", d.plugin)))?;
            let version = match &plan {
                Some(p) => p.write_version(&d.id).unwrap_or(lib.descriptor.state.current),
                None => lib.descriptor.state.current,
            };
            let blob = d
                .device
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .save_state(version)
                .into_result()
                .map_err(|e| fail(format!("device {} ({}): {e}", d.id, d.plugin)))?;
            if let Some(r) = manifest.devices.iter_mut().find(|r| r.id == d.id) {
                r.state_version = blob.version;
            }
            devices.push((d.id.clone(), blob));
        }
        if let Some(t) = target {
            for m in &mut manifest.machine.devices {
                if let Some(p) = t.plugins.iter().find(|p| p.name == m.plugin) {
                    m.properties.retain(|k, _| p.properties.iter().any(|q| q == k));
                }
            }
        }
        let vcpus = self.control.take_vcpu_states();
        let machine = state::save_machine(&self.kvm.vm)?;

        let tmp = path.with_extension("partial");
        let file = File::create(&tmp).map_err(|e| fail(format!("cannot create {}: {e}", tmp.display())))?;
        let write = || -> Result<u64, StreamError> {
            let mut w = stream::Writer::new(BufWriter::new(&file))?;
            let enc = |v: Result<Vec<u8>, StateError>| v.map_err(|e| std::io::Error::other(e.to_string()));
            w.section(Kind::Manifest, "", MANIFEST_VERSION, &enc(state::encode(&manifest))?)?;
            w.section(Kind::Machine, "", MACHINE_STATE_VERSION, &enc(state::encode(&machine))?)?;
            for (i, s) in vcpus.iter().enumerate() {
                let s = s.as_ref().map_err(|e| std::io::Error::other(format!("vCPU {i}: {e}")))?;
                w.section(Kind::Vcpu, &format!("cpu{i}"), VCPU_STATE_VERSION, &enc(state::encode(s))?)?;
            }
            for (id, blob) in &devices {
                w.section(Kind::Device, id, blob.version, blob.bytes.as_slice())?;
            }
            let runs = self.ram.nonzero_runs();
            let data: Vec<(u64, &[u8])> =
                runs.iter().filter_map(|&(gpa, len)| self.ram.bytes(gpa, len).map(|b| (gpa, b))).collect();
            w.memory(&data)?;
            w.finish()?.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            Ok(runs.iter().map(|r| r.1).sum())
        };
        let memory_bytes = write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            fail(e.to_string())
        })?;
        std::fs::rename(&tmp, path).map_err(|e| fail(format!("cannot rename into place: {e}")))?;
        let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        Ok((bytes, memory_bytes))
    }

    /// What `ferry ctl info` shows.
    pub fn info(&self) -> serde_json::Value {
        serde_json::json!({
            "state": if self.control.is_paused() { "paused" } else { "running" },
            "machine": self.machine.name,
            "cpus": self.cpus,
            "memory_bytes": self.ram.size(),
            "devices": self.bus.devices().iter().map(|d| serde_json::json!({
                "id": d.id,
                "plugin": d.plugin,
                "plugin_version": self.registry.get(&d.plugin).map(|p| p.descriptor.version.to_string()),
                "state_version": self.registry.get(&d.plugin).map(|p| p.descriptor.state.current),
            })).collect::<Vec<_>>(),
        })
    }
}

impl Vm {
    /// Start the vCPUs and run until the guest ends; serve the control API
    /// on `api_socket` meanwhile. For an incoming migration, `confirm`
    /// tells the source the guest runs here now, before the vCPUs start.
    pub fn run(
        mut self,
        api_socket: Option<&Path>,
        confirm: Option<crate::migration::live::IncomingLink>,
    ) -> Result<Outcome, VmError> {
        vcpu::install_kick_handler().map_err(VmError::Runtime)?;
        let served = match api_socket {
            Some(path) => Some(api::serve(path).map_err(VmError::Runtime)?),
            None => None,
        };
        if let Some(mut link) = confirm {
            link.resumed().map_err(|e| {
                VmError::Failed(format!(
                    "incoming migration: cannot confirm to the source ({e}); the guest stays there"
                ))
            })?;
        }
        let vcpus = std::mem::take(&mut self.vcpus);
        let handles = vcpu::spawn(vcpus, self.bus.clone(), self.control.clone(), self.msrs.clone())
            .map_err(VmError::Runtime)?;
        crate::log::info(&format!(
            "vCPUs started {:.1} ms after ferry started",
            crate::log::since_start_ms()
        ));
        let never = crossbeam_channel::never();
        let api = served.as_ref().map(|s| &s.calls).unwrap_or(&never);
        let mut shutdown = false;
        let mut shutdown_answer = false;
        let mut migrated = None;
        let (mig_tx, mig_rx) = crossbeam_channel::unbounded();
        let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut migrating = false;
        // After a completed migration the (paused) source lingers until the
        // report was fetched through the API, or a short while.
        let mut linger = crossbeam_channel::never();
        let event = loop {
            crossbeam_channel::select! {
                recv(self.stop_rx) -> ev => break ev.unwrap_or(StopEvent::Error("VM control channel closed".into())),
                recv(linger) -> _ => self.control.stop(StopEvent::Exit(0)),
                recv(mig_rx) -> done => {
                    migrating = false;
                    let done: Result<crate::migration::live::Status, String> =
                        done.unwrap_or_else(|_| Err("migration thread ended".into()));
                    let mut status = self.migration.lock().unwrap_or_else(|e| e.into_inner());
                    match done {
                        Ok(s) if s.phase == "completed" => {
                            *status = Some(s.clone());
                            migrated = Some(s);
                            linger = crossbeam_channel::after(std::time::Duration::from_secs(2));
                        }
                        Ok(s) => *status = Some(s),
                        Err(e) => {
                            crate::log::warn(&format!("migration failed, the guest keeps running here: {e}"));
                            let s = status.get_or_insert_with(Default::default);
                            s.phase = "failed".into();
                            s.error = Some(e);
                            s.done = true;
                        }
                    }
                }
                recv(api) -> req => {
                    let Ok((req, reply)) = req else { continue };
                    let req_kind = if req == ApiRequest::MigrationStatus { ReqKind::Status } else { ReqKind::Other };
                    let answer = match req {
                        ApiRequest::Pause | ApiRequest::Resume | ApiRequest::Snapshot(..) if migrating => {
                            Err("a migration is running".to_string())
                        }
                        ApiRequest::Info => Ok(self.info()),
                        ApiRequest::Pause => self.pause().map(|()| self.info()),
                        ApiRequest::Resume => self.resume().map(|()| self.info()),
                        ApiRequest::Snapshot(path, target) => self
                            .snapshot_for(&path, target.as_deref())
                            .map(|r| serde_json::to_value(r).unwrap_or_default())
                            .map_err(|e| e.to_string()),
                        ApiRequest::MigrationStatus => Ok(serde_json::to_value(
                            self.migration.lock().unwrap_or_else(|e| e.into_inner()).clone(),
                        )
                        .unwrap_or_default()),
                        ApiRequest::MigrateCancel if migrating => {
                            cancel.store(true, std::sync::atomic::Ordering::SeqCst);
                            Ok(serde_json::json!({"state": "cancelling"}))
                        }
                        ApiRequest::MigrateCancel => Err("no migration is running".to_string()),
                        ApiRequest::Migrate { .. } if migrating => Err("a migration is already running".to_string()),
                        ApiRequest::Migrate { uri, max_downtime_ms, dry_run } => {
                            migrating = true;
                            cancel.store(false, std::sync::atomic::Ordering::SeqCst);
                            *self.migration.lock().unwrap_or_else(|e| e.into_inner()) = Some(crate::migration::live::Status {
                                phase: "handshake".into(),
                                ..Default::default()
                            });
                            let core = self.core.clone();
                            let (tx, cancel) = (mig_tx.clone(), cancel.clone());
                            let opts = crate::migration::live::Options { uri, max_downtime_ms, dry_run };
                            std::thread::Builder::new()
                                .name("migration".into())
                                .spawn(move || {
                                    let r = crate::migration::live::migrate(&core, &opts, &cancel).map_err(|e| e.to_string());
                                    let _ = tx.send(r);
                                })
                                .map(|_| serde_json::json!({"state": "started"}))
                                .map_err(|e| e.to_string())
                        }
                        ApiRequest::Shutdown => {
                            shutdown = true;
                            shutdown_answer = true;
                            // Earlier answers' signals; the next one is this answer's.
                            if let Some(s) = &served {
                                while s.answered.try_recv().is_ok() {}
                            }
                            self.control.stop(StopEvent::Exit(0));
                            Ok(serde_json::json!({"state": "shutting down"}))
                        }
                    };
                    let reported = migrated.is_some() && matches!(req_kind, ReqKind::Status);
                    if reported {
                        // The last answer before ferry exits: wait for it below.
                        shutdown_answer = true;
                        if let Some(s) = &served {
                            while s.answered.try_recv().is_ok() {}
                        }
                    }
                    let _ = reply.send(answer);
                    if reported {
                        self.control.stop(StopEvent::Exit(0));
                    }
                }
            }
        };
        if shutdown_answer {
            // Let the API thread finish writing the last answer.
            if let Some(s) = &served {
                let _ = s.answered.recv_timeout(std::time::Duration::from_secs(2));
            }
        }
        vcpu::join(handles, &self.control);
        let _ = self.set_devices_paused(true);
        if let Some(path) = api_socket {
            let _ = std::fs::remove_file(path);
        }
        if let Some(status) = migrated {
            return Ok(Outcome::Migrated(status));
        }
        match event {
            StopEvent::Exit(_) if shutdown => Ok(Outcome::Shutdown),
            StopEvent::Reset => Ok(Outcome::Reset),
            StopEvent::Exit(status) => Ok(Outcome::Exit(status)),
            StopEvent::Error(msg) => Err(VmError::Failed(msg)),
        }
    }
}

/// Which kind of API request was just answered (for the post-migration linger).
enum ReqKind {
    Status,
    Other,
}
