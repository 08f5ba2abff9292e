//! Booting: a fresh VM with the machine type's devices, the kernel and
//! its boot structures loaded, the boot CPU at the kernel's entry.

use super::{build, BootConfig, RamSource, Vm, VmError, DEFAULT_MEMORY};
use crate::boot::{self, cpu, Entry, Kernel};

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
