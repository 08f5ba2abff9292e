//! Building and running one VM: plugins, machine type, RAM, devices, boot,
//! vCPUs, and the wait for the guest to end.
//!
//! Everything that can be refused is checked before the first vCPU runs:
//! the plugin directory, the machine type against the installed plugins,
//! memory, each device's creation, and the address map.

use std::{path::PathBuf, sync::Arc};

use abi_stable::std_types::RVec;
use ferry_plugin_api::DeviceConfig;
use thiserror::Error;

use crate::{
    boot::{self, cpu, BootError, Entry, Kernel},
    bus::{Bus, BusError},
    host::{DeviceHost, VmServices},
    interrupts::IrqRouter,
    kvm::{KvmError, Machine},
    machine::{self, MachineError, MachineType},
    memory::{GuestRam, MemoryError},
    plugins::{PluginError, Registry},
    vcpu::{self, StopEvent, VmControl},
};

/// Memory when neither the command line nor the machine type says.
pub const DEFAULT_MEMORY: u64 = 256 << 20;

/// What to run.
#[derive(Debug, Clone)]
pub struct VmConfig {
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It reset the machine.
    Reset,
    /// It chose an exit status.
    Exit(i32),
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
    DeviceCreate {
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
    /// Starting threads or signal handling failed.
    #[error("{0}")]
    Runtime(String),
    /// The VM stopped because something failed while it ran.
    #[error("{0}")]
    Failed(String),
}

/// Build the VM described by `config`, run it until the guest ends, and
/// report how it ended.
pub fn run(config: VmConfig) -> Result<Outcome, VmError> {
    let registry = Registry::load_dir(&config.plugins)?;
    let plans = machine::resolve(&config.machine, &registry)?;

    let cpus = config.cpus.or(config.machine.cpus).unwrap_or(1);
    if cpus == 0 {
        return Err(VmError::NoCpus);
    }
    let memory = config.memory.or(config.machine.memory).unwrap_or(DEFAULT_MEMORY);
    let ram = GuestRam::new(memory)?;
    let kvm = Machine::new(usize::from(cpus))?;
    kvm.register_ram(&ram)?;

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
        let Some(lib) = registry.get(&plan.plugin) else {
            continue;
        };
        let index = bus.devices().len();
        let host = DeviceHost::new_box(&plan.id, index, services.clone());
        let config = DeviceConfig {
            id: plan.id.as_str().into(),
            properties: plan.properties.iter().cloned().collect::<RVec<_>>(),
        };
        let device = lib.create(config, host).map_err(|message| VmError::DeviceCreate {
            id: plan.id.clone(),
            plugin: plan.plugin.clone(),
            message,
        })?;
        bus.add_device(&plan.id, &plan.plugin, device.device, device.pci.into_option())?;
    }

    let cmdline = match (&config.cmdline, &config.kernel) {
        (Some(c), _) => c.clone(),
        (None, Kernel::TestGuest) => boot::TEST_GUEST_CMDLINE.to_string(),
        (None, Kernel::File(_)) => String::new(),
    };
    let entry = boot::load(&ram, &config.kernel, config.initramfs.as_deref(), &cmdline, cpus)?;
    cpu::write_gdt(&ram, &entry)?;

    let mut vcpus = Vec::with_capacity(usize::from(cpus));
    for index in 0..cpus {
        let fd =
            kvm.vm.create_vcpu(u64::from(index)).map_err(|source| BootError::Vcpu { cpu: index, source })?;
        fd.set_cpuid2(&cpu::cpuid_for(&kvm.supported_cpuid, index, cpus))
            .map_err(|source| BootError::Vcpu { cpu: index, source })?;
        cpu::setup_lapic(&fd, index)?;
        if index == 0 {
            match &entry {
                Entry::Pvh(e) => cpu::setup_pvh_bsp(&fd, e)?,
                Entry::Linux(e) => cpu::setup_linux_bsp(&fd, e)?,
            }
        }
        vcpus.push(fd);
    }

    vcpu::install_kick_handler().map_err(VmError::Runtime)?;
    let bus = Arc::new(bus);
    crate::log::info(&format!(
        "booting {} on machine type {} with {cpus} vCPU(s), {} of RAM, {} device(s)",
        config.kernel.describe(),
        config.machine.name,
        crate::memory::human_size(ram.size()),
        bus.devices().len()
    ));
    let handles = vcpu::spawn(vcpus, bus.clone(), control.clone()).map_err(VmError::Runtime)?;
    let event = stop_rx.recv().unwrap_or(StopEvent::Error("VM control channel closed".to_string()));
    vcpu::join(handles, &control);
    for d in bus.devices() {
        let _ = d.device.lock().map(|mut dev| dev.pause());
    }
    match event {
        StopEvent::Reset => Ok(Outcome::Reset),
        StopEvent::Exit(status) => Ok(Outcome::Exit(status)),
        StopEvent::Error(msg) => Err(VmError::Failed(msg)),
    }
}
