//! The KVM VM: in-kernel irqchip (8259 pair + I/O APIC + local APICs), the
//! in-kernel PIT, and guest RAM registered as memory slots.

use std::sync::Arc;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use thiserror::Error;

use crate::memory::GuestRam;

/// Addresses KVM needs for its real-mode helpers on Intel, in the MMIO hole.
const TSS_ADDRESS: usize = 0xfffb_d000;
const IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// KVM errors.
#[derive(Debug, Error)]
pub enum KvmError {
    /// /dev/kvm is missing or unusable.
    #[error("cannot open /dev/kvm: {0} (is KVM enabled and are you allowed to use it?)")]
    Open(kvm_ioctls::Error),
    /// A KVM call failed.
    #[error("KVM {what} failed: {source}")]
    Call {
        /// Which call.
        what: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// Too many vCPUs for this host.
    #[error("{requested} vCPUs requested; this host's KVM allows at most {max}")]
    TooManyVcpus {
        /// Asked for.
        requested: usize,
        /// KVM's limit.
        max: usize,
    },
}

fn call(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError::Call { what, source }
}

/// An open VM with its irqchip and PIT.
pub struct Machine {
    /// The KVM system fd.
    pub kvm: Kvm,
    /// The VM fd, shared with device host handles (interrupt lines).
    pub vm: Arc<VmFd>,
}

impl Machine {
    /// Create a VM able to hold `cpus` vCPUs, with `ram` registered.
    ///
    /// RAM goes in before the irqchip: once the VM has one, every memory
    /// slot change waits out a grace period of KVM's (6.5-7.7 ms on these
    /// machines, whatever the size; 0.3 ms for 512 MiB and 1.2 ms for
    /// 2 GiB before it), and restore waits for this one.
    pub fn new(cpus: usize, ram: &GuestRam) -> Result<Self, KvmError> {
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        let max = kvm.get_max_vcpus();
        if cpus > max {
            return Err(KvmError::TooManyVcpus { requested: cpus, max });
        }
        let vm = kvm.create_vm().map_err(call("CREATE_VM"))?;
        let machine = Machine { kvm, vm: Arc::new(vm) };
        machine.set_ram_slots(ram, 0)?;
        let vm = &machine.vm;
        vm.set_tss_address(TSS_ADDRESS).map_err(call("SET_TSS_ADDR"))?;
        vm.set_identity_map_address(IDENTITY_MAP_ADDRESS).map_err(call("SET_IDENTITY_MAP_ADDR"))?;
        vm.create_irq_chip().map_err(call("CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        vm.create_pit2(pit).map_err(call("CREATE_PIT2"))?;
        Ok(machine)
    }

    /// Turn KVM's dirty-page logging of guest RAM on or off.
    pub fn set_dirty_log(&self, ram: &GuestRam, on: bool) -> Result<(), KvmError> {
        self.set_ram_slots(ram, if on { kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES } else { 0 })
    }

    /// Pages the guest wrote since the last call (dirty logging on), as RAM
    /// page indexes (the device dirty bitmap's numbering).
    pub fn dirty_pages(&self, ram: &GuestRam) -> Result<Vec<u64>, KvmError> {
        let mut pages = Vec::new();
        for (slot, r) in ram.ranges().iter().enumerate() {
            let bitmap =
                self.vm.get_dirty_log(slot as u32, r.len as usize).map_err(call("KVM_GET_DIRTY_LOG"))?;
            crate::memory::push_set_bits(bitmap, r.file_offset / 4096, &mut pages);
        }
        Ok(pages)
    }

    fn set_ram_slots(&self, ram: &GuestRam, flags: u32) -> Result<(), KvmError> {
        use vm_memory::{GuestAddress, GuestMemoryBackend};
        for (slot, r) in ram.ranges().iter().enumerate() {
            let host = ram.mem().get_host_address(GuestAddress(r.gpa)).map_err(|_| KvmError::Call {
                what: "SET_USER_MEMORY_REGION",
                source: kvm_ioctls::Error::new(libc::EFAULT),
            })?;
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags,
                guest_phys_addr: r.gpa,
                memory_size: r.len,
                userspace_addr: host as u64,
            };
            // SAFETY: the host range is a live mapping of `r.len` bytes owned
            // by `ram`, which outlives the VM: `Vm` drops the vCPUs first and
            // `VmCore` declares the devices and the VM fd before the RAM
            // (fields drop in declaration order).
            unsafe { self.vm.set_user_memory_region(region) }.map_err(call("SET_USER_MEMORY_REGION"))?;
        }
        Ok(())
    }
}
