//! Booting: a fresh VM with the machine type's devices and CPU model, the
//! kernel and its boot structures loaded, the boot CPU at the kernel's
//! entry. A reboot loads the same image again (`reset.rs`).

use std::path::PathBuf;

use super::{build, open_plugins, BootConfig, RamSource, Vm, VmError, VmMemory, DEFAULT_MEMORY};
use crate::{
    boot::{self, cpu, Entry, Kernel},
    cpu::{HostCpu, VmCpu},
};

/// What a boot loads: read from the files at every boot, so a reboot sees
/// the kernel as it is on disk then.
#[derive(Debug, Clone)]
pub(super) struct BootImage {
    kernel: Kernel,
    initramfs: Option<PathBuf>,
    cmdline: String,
}

/// Build a VM and load its kernel. A CPU model this host cannot give is
/// refused first, naming what is missing, before anything is created.
pub fn boot(config: BootConfig) -> Result<Vm, VmError> {
    let memory = config.memory.or(config.machine.memory).unwrap_or(DEFAULT_MEMORY);
    let cpus = config.cpus.or(config.machine.cpus).unwrap_or(1);
    if cpus == 0 {
        return Err(VmError::NoCpus);
    }
    let host = HostCpu::probe()?;
    let guest_cpu = VmCpu::for_model(config.machine.cpu, &host, cpus)?;
    let registry = open_plugins(&config.plugins, &config.machine)?;
    let memory = VmMemory::new(RamSource::Fresh(memory), cpus, config.isolation.devices.any())?;
    let mut vm = build(config.machine, registry, cpus, guest_cpu, memory, &config.isolation)?;
    let cmdline = match (&config.cmdline, &config.kernel) {
        (Some(c), _) => c.clone(),
        (None, Kernel::TestGuest) => boot::TEST_GUEST_CMDLINE.to_string(),
        (None, Kernel::File(_)) => String::new(),
    };
    let image = BootImage { kernel: config.kernel, initramfs: config.initramfs, cmdline };
    load_image(&vm, &image)?;
    crate::log::info(&format!(
        "booting {} on machine type {} with {} vCPU(s) of cpu {} ({}), {} of RAM, {} device(s)",
        image.kernel.describe(),
        vm.machine.name,
        vm.cpus,
        vm.cpu.model,
        vm.cpu.vendor,
        crate::memory::human_size(vm.ram.size()),
        vm.bus.devices().len()
    ));
    vm.image = Some(image);
    Ok(vm)
}

/// Load `image` into the VM's RAM and put the boot CPU at its entry.
pub(super) fn load_image(vm: &Vm, image: &BootImage) -> Result<(), VmError> {
    let entry = boot::load(&vm.ram, &image.kernel, image.initramfs.as_deref(), &image.cmdline, vm.cpus)?;
    cpu::write_gdt(&vm.ram, &entry)?;
    match &entry {
        Entry::Pvh(e) => cpu::setup_pvh_bsp(&vm.vcpus[0], e)?,
        Entry::Linux(e) => cpu::setup_linux_bsp(&vm.vcpus[0], e)?,
    }
    Ok(())
}
