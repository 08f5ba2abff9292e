//! Interrupt routing for devices: MSI routes in KVM's GSI routing table,
//! each bound to a device-owned eventfd (irqfd), and MMIO ioeventfds.
//!
//! KVM_SET_GSI_ROUTING replaces the whole table, so the table kept here
//! always starts with the default ISA/IOAPIC routes (GSI 0-15 on the 8259
//! pair and the I/O APIC, 16-23 on the I/O APIC); MSI routes take GSIs
//! from 24 up.

use std::{collections::BTreeMap, mem::ManuallyDrop, os::fd::FromRawFd, sync::Arc, sync::Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

/// First GSI used for MSI routes.
const FIRST_MSI_GSI: u32 = 24;
/// I/O APIC pins.
const IOAPIC_PINS: u32 = 24;
/// Upper bound on MSI routes (KVM allows 4096 routes in all).
const MAX_MSI_ROUTES: usize = 4000;

/// Routing errors.
#[derive(Debug, Error)]
pub enum IrqError {
    /// KVM refused.
    #[error("{what} failed: {source}")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// Out of GSIs.
    #[error("no more MSI routes (limit {MAX_MSI_ROUTES})")]
    Exhausted,
    /// Unknown fd.
    #[error("eventfd {0} has no MSI route")]
    NotRouted(i32),
}

#[derive(Debug, Clone, Copy)]
struct MsiRoute {
    gsi: u32,
    address: u64,
    data: u32,
}

#[derive(Default)]
struct Table {
    /// Keyed by (device index, eventfd number).
    msi: BTreeMap<(usize, i32), MsiRoute>,
    /// (device index, eventfd, address) of registered ioeventfds.
    ioeventfds: Vec<(usize, i32, u64)>,
}

/// Interrupt routes and ioeventfds of one VM.
pub struct IrqRouter {
    vm: Arc<VmFd>,
    table: Mutex<Table>,
}

/// Borrow a device-owned eventfd for one ioctl without taking ownership.
fn borrow_eventfd(fd: i32) -> ManuallyDrop<EventFd> {
    // SAFETY: `fd` is an open descriptor owned by the calling device for
    // the duration of the call; ManuallyDrop keeps us from closing it. KVM
    // checks that it really is an eventfd.
    ManuallyDrop::new(unsafe { EventFd::from_raw_fd(fd) })
}

fn irqchip_entry(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry { gsi, type_: KVM_IRQ_ROUTING_IRQCHIP, ..Default::default() };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

impl IrqRouter {
    /// A router for `vm` (which has an in-kernel irqchip).
    pub fn new(vm: Arc<VmFd>) -> Self {
        IrqRouter { vm, table: Mutex::new(Table::default()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn apply(&self, table: &Table) -> Result<(), IrqError> {
        let mut entries = Vec::new();
        for gsi in 0..16 {
            let (chip, pin) =
                if gsi < 8 { (KVM_IRQCHIP_PIC_MASTER, gsi) } else { (KVM_IRQCHIP_PIC_SLAVE, gsi - 8) };
            entries.push(irqchip_entry(gsi, chip, pin));
        }
        for gsi in 0..IOAPIC_PINS {
            entries.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        }
        for r in table.msi.values() {
            let mut e =
                kvm_irq_routing_entry { gsi: r.gsi, type_: KVM_IRQ_ROUTING_MSI, ..Default::default() };
            e.u.msi.address_lo = r.address as u32;
            e.u.msi.address_hi = (r.address >> 32) as u32;
            e.u.msi.data = r.data;
            entries.push(e);
        }
        let routing = KvmIrqRouting::from_entries(&entries).map_err(|_| IrqError::Exhausted)?;
        self.vm
            .set_gsi_routing(&routing)
            .map_err(|source| IrqError::Kvm { what: "KVM_SET_GSI_ROUTING", source })
    }

    /// Route `fd` of device `device` to an MSI message (new or changed).
    pub fn msi_route(&self, device: usize, fd: i32, address: u64, data: u32) -> Result<(), IrqError> {
        let mut t = self.lock();
        if let Some(r) = t.msi.get_mut(&(device, fd)) {
            r.address = address;
            r.data = data;
            return self.apply(&t);
        }
        if t.msi.len() >= MAX_MSI_ROUTES {
            return Err(IrqError::Exhausted);
        }
        let used: std::collections::BTreeSet<u32> = t.msi.values().map(|r| r.gsi).collect();
        let gsi = (FIRST_MSI_GSI..).find(|g| !used.contains(g)).ok_or(IrqError::Exhausted)?;
        t.msi.insert((device, fd), MsiRoute { gsi, address, data });
        if let Err(e) = self.apply(&t) {
            t.msi.remove(&(device, fd));
            return Err(e);
        }
        let efd = borrow_eventfd(fd);
        if let Err(source) = self.vm.register_irqfd(&efd, gsi) {
            t.msi.remove(&(device, fd));
            let _ = self.apply(&t);
            return Err(IrqError::Kvm { what: "KVM_IRQFD", source });
        }
        Ok(())
    }

    /// Remove the MSI route of `fd`.
    pub fn msi_unroute(&self, device: usize, fd: i32) -> Result<(), IrqError> {
        let mut t = self.lock();
        let r = t.msi.remove(&(device, fd)).ok_or(IrqError::NotRouted(fd))?;
        let efd = borrow_eventfd(fd);
        let _ = self.vm.unregister_irqfd(&efd, r.gsi);
        self.apply(&t)
    }

    /// Signal `fd` on any guest write to MMIO `address`.
    pub fn ioeventfd(&self, device: usize, fd: i32, address: u64) -> Result<(), IrqError> {
        let mut t = self.lock();
        let efd = borrow_eventfd(fd);
        self.vm
            .register_ioevent(&efd, &IoEventAddress::Mmio(address), NoDatamatch)
            .map_err(|source| IrqError::Kvm { what: "KVM_IOEVENTFD", source })?;
        t.ioeventfds.push((device, fd, address));
        Ok(())
    }

    /// Undo `ioeventfd`.
    pub fn remove_ioeventfd(&self, device: usize, fd: i32, address: u64) -> Result<(), IrqError> {
        let mut t = self.lock();
        let efd = borrow_eventfd(fd);
        self.vm
            .unregister_ioevent(&efd, &IoEventAddress::Mmio(address), NoDatamatch)
            .map_err(|source| IrqError::Kvm { what: "KVM_IOEVENTFD (deassign)", source })?;
        t.ioeventfds.retain(|e| *e != (device, fd, address));
        Ok(())
    }

    /// Undo every MSI route and ioeventfd device `device` still holds (it
    /// is about to be dropped and recreated: its eventfds are still open,
    /// and KVM must let go of them before a new instance registers the
    /// same addresses).
    pub fn release_device(&self, device: usize) -> Result<(), IrqError> {
        let mut t = self.lock();
        let routes: Vec<((usize, i32), MsiRoute)> =
            t.msi.iter().filter(|((d, _), _)| *d == device).map(|(k, r)| (*k, *r)).collect();
        for ((_, fd), r) in &routes {
            let _ = self.vm.unregister_irqfd(&borrow_eventfd(*fd), r.gsi);
            t.msi.remove(&(device, *fd));
        }
        let events: Vec<(usize, i32, u64)> = t.ioeventfds.iter().filter(|e| e.0 == device).copied().collect();
        for (_, fd, address) in &events {
            let _ = self.vm.unregister_ioevent(
                &borrow_eventfd(*fd),
                &IoEventAddress::Mmio(*address),
                NoDatamatch,
            );
        }
        t.ioeventfds.retain(|e| e.0 != device);
        if routes.is_empty() {
            Ok(())
        } else {
            self.apply(&t)
        }
    }

    /// The GSI an eventfd is routed to (for tests and diagnostics).
    pub fn gsi_of(&self, device: usize, fd: i32) -> Option<u32> {
        self.lock().msi.get(&(device, fd)).map(|r| r.gsi)
    }
}
