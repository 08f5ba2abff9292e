//! Booting: a fresh VM with the machine type's devices and CPU model, the
//! kernel and its boot structures loaded, the boot CPU at the kernel's
//! entry. The kernel and initramfs are kept in the image store by their
//! hash (`images.rs`), so a reboot loads the same bytes again (`reset.rs`)
//! and they travel with the guest; a guest restored or migrated in adopts
//! its own image here when this host's store holds it.

use std::path::PathBuf;

use super::{build, open_plugins, BootConfig, RamSource, Vm, VmError, VmMemory, DEFAULT_MEMORY};
use crate::{
    boot::{self, cpu, Entry, Kernel},
    cpu::{HostCpu, VmCpu},
    images::{BootRecord, ImageError, ImageStore},
    vmcore::GuestImage,
};

/// What a boot loads. A reboot loads it again: from the image store, or,
/// where the store could not keep it, from the files as they are then.
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
    match keep(&image, &config.images) {
        Ok(record) => adopt_image(&mut vm, Some(&record), &config.images),
        Err(e) => {
            crate::log::warn(&format!(
                "{e}: the guest reboots from its files as they are then, and cannot reboot after a move"
            ));
            vm.image = Some(image);
        }
    }
    Ok(vm)
}

/// Put the image's kernel and initramfs in `store`: what travels with the
/// guest.
fn keep(image: &BootImage, store: &ImageStore) -> Result<BootRecord, ImageError> {
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|source| ImageError::Store { path: path.display().to_string(), source })
    };
    let kernel = match &image.kernel {
        Kernel::TestGuest => store.put(boot::TEST_GUEST)?,
        Kernel::File(path) => store.put(&read(path)?)?,
    };
    let initramfs = image.initramfs.as_ref().map(|path| store.put(&read(path)?)).transpose()?;
    Ok(BootRecord { kernel, initramfs, cmdline: image.cmdline.clone() })
}

/// Make `record` the image `vm` reboots into and carries on its moves, if
/// `store` holds every file it names; otherwise say the guest cannot
/// reboot here and why.
pub(super) fn adopt_image(vm: &mut Vm, record: Option<&BootRecord>, store: &ImageStore) {
    let Some(record) = record else {
        crate::log::info(
            "the guest's boot image did not come with it (written by an older ferry): a reset ends it",
        );
        return;
    };
    let paths = || -> Result<BootImage, ImageError> {
        let missing = store.missing(record);
        if let Some(first) = missing.first() {
            return Err(ImageError::Bad {
                image: first.short(),
                message: format!("not in this host's image store {}", store.dir().display()),
            });
        }
        Ok(BootImage {
            kernel: Kernel::File(store.path(&record.kernel)?),
            initramfs: record.initramfs.as_ref().map(|i| store.path(i)).transpose()?,
            cmdline: record.cmdline.clone(),
        })
    };
    match paths() {
        Ok(image) => {
            vm.image = Some(image);
            // Set once, right after the VM was built: nothing else sets it.
            let _ = vm.core.image.set(GuestImage { store: store.clone(), record: record.clone() });
        }
        Err(e) => crate::log::warn(&format!("{e}: the guest cannot reboot here, a reset ends it")),
    }
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
