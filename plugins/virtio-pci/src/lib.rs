//! The virtio-pci (modern, virtio 1.x) transport that Ferry's virtio device
//! plugins link. One implementation: a device plugin provides only its
//! device type, features, configuration and queue processing
//! ([`VirtioDevice`]); this crate provides the PCI function, BAR 0, the
//! common configuration, MSI-X, ioeventfd notifications and a worker thread
//! that pauses and resumes on the core's request.
//!
//! ```text
//!   guest driver ---notify write---> ioeventfd (in KVM) ---> worker thread
//!                                                              | VirtioDevice::process_queue
//!   guest memory <-- vm-memory (marks the core's dirty bitmap) -+
//!   guest LAPIC  <-- irqfd (in KVM) <--- MSI-X eventfd <--------+ used buffers
//! ```

mod layout;
mod memory;
mod msix;
mod state;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod transport;
mod worker;

use std::os::fd::RawFd;

use ferry_plugin_api::state::Versioned;

pub use memory::{from_host as guest_memory_from_host, DirtyMarker, GuestMemory};
pub use transport::VirtioPci;
pub use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};

/// Feature bit: a virtio 1.x device (always offered and required).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// What a virtio device plugin implements; the transport does the rest.
pub trait VirtioDevice: Send + 'static {
    /// Virtio device type (1 net, 2 block, 4 entropy, ...).
    fn device_type(&self) -> u32;

    /// PCI class code (class << 16 | subclass << 8 | prog-if).
    fn pci_class(&self) -> u32;

    /// Maximum size of each queue; the length is the queue count.
    fn queue_max_sizes(&self) -> Vec<u16>;

    /// Device feature bits (VIRTIO_F_VERSION_1 is added by the transport).
    fn features(&self) -> u64;

    /// Read the device-specific configuration.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Write the device-specific configuration.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    /// The driver set DRIVER_OK with these features.
    fn activate(&mut self, _features: u64) -> Result<(), String> {
        Ok(())
    }

    /// The driver notified queue `queue`: take buffers, complete them.
    fn process_queue(&mut self, queue: usize, queues: &mut Queues<'_>) -> Result<(), String>;

    /// Host file descriptors to wait on (a tap device, ...), watched
    /// edge-triggered for input while the device is active.
    fn backend_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }

    /// Backend fd `index` (position in `backend_fds`) became readable.
    fn process_backend(&mut self, _index: usize, _queues: &mut Queues<'_>) -> Result<(), String> {
        Ok(())
    }

    /// The driver reset the device.
    fn reset(&mut self) {}

    /// What a destination must offer to take the device as it runs now
    /// (plugin-api's `Device::contract`); `None`: nothing beyond versions.
    fn contract(&self) -> Option<Vec<(String, String)>> {
        None
    }

    /// Are the queues served by another program (a vhost-user backend)
    /// rather than by `process_queue`? Then the worker does not watch the
    /// queues' notifications: the transport hands each ready queue's
    /// layout and eventfds to [`VirtioDevice::start_rings`] when the driver
    /// sets DRIVER_OK and when the device resumes, and asks
    /// [`VirtioDevice::stop_rings`] where each stopped when it pauses.
    fn rings_elsewhere(&self) -> bool {
        false
    }

    /// Start serving `rings` elsewhere, with the features the driver
    /// accepted.
    fn start_rings(&mut self, _features: u64, _rings: &[Ring<'_>]) -> Result<(), String> {
        Ok(())
    }

    /// Stop every started ring: when this returns the other program takes
    /// no new buffers. The next available index of each ring, by queue
    /// index. Buffers it took and has not returned yet are waited for by
    /// the transport. `pausing`: the device pauses (its state may be saved
    /// next), rather than resets or loads a state.
    fn stop_rings(&mut self, _pausing: bool) -> Result<Vec<(usize, u16)>, String> {
        Ok(Vec::new())
    }

    /// The device's own state, beyond the transport's: a type with its
    /// version history (plugin-api's `Versioned`). Its versions are the
    /// plugin's state versions (declare them with
    /// `DescriptorBuilder::versioned::<Self::State>()`); the transport's
    /// part of the state is the same in each. A device with none uses
    /// [`NoDeviceState`].
    type State: Versioned;

    /// The device's state now, for snapshots and migration. Called while
    /// the device is paused; the transport writes it at the version asked
    /// (a downgrade may refuse with the reason).
    fn state(&self) -> Self::State;

    /// Put back a state (any loadable version, already upgraded to
    /// `State`). Called while the device is paused.
    fn set_state(&mut self, state: Self::State) -> Result<(), String>;
}

/// One ready queue, as [`VirtioDevice::start_rings`] gets it.
pub struct Ring<'a> {
    /// Queue index.
    pub index: usize,
    /// Size the driver chose.
    pub size: u16,
    /// Descriptor table, available ring and used ring (guest-physical).
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// Where to start taking buffers.
    pub next_avail: u16,
    /// Signalled by the driver's notifications (an ioeventfd).
    pub kick: &'a vmm_sys_util::eventfd::EventFd,
    /// Raises the queue's MSI-X vector (an irqfd once routed); `None`
    /// when the driver gave the queue no vector.
    pub call: Option<&'a vmm_sys_util::eventfd::EventFd>,
}

/// The state of a virtio device that keeps none beyond the transport's:
/// version 1, no bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NoDeviceState;

impl Versioned for NoDeviceState {
    const CURRENT: u32 = 1;
    const OLDEST_LOAD: u32 = 1;

    fn load_version(_version: u32, _bytes: &[u8]) -> Result<Self, String> {
        Ok(NoDeviceState)
    }

    fn save_version(&self, _version: u32) -> Result<Vec<u8>, String> {
        Ok(Vec::new())
    }
}

/// One virtqueue and its notification eventfd.
pub struct QueueSlot {
    /// The split virtqueue (rust-vmm virtio-queue).
    pub queue: Queue,
    /// MSI-X vector for used-buffer notifications.
    vector: u16,
    /// Signalled by the guest's notify writes (ioeventfd or MMIO).
    kick: vmm_sys_util::eventfd::EventFd,
}

/// The queues and guest memory a device works on while processing.
pub struct Queues<'a> {
    slots: &'a mut [QueueSlot],
    mem: &'a GuestMemory,
    completed: &'a mut [bool],
}

impl<'a> Queues<'a> {
    /// Guest memory (writes mark the dirty bitmap).
    pub fn mem(&self) -> &'a GuestMemory {
        self.mem
    }

    /// Number of queues.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// No queues.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Is queue `q` set up by the driver?
    pub fn ready(&self, q: usize) -> bool {
        self.slots.get(q).is_some_and(|s| s.queue.ready())
    }

    /// The next available descriptor chain of queue `q`.
    pub fn pop(&mut self, q: usize) -> Option<DescriptorChain<&'a GuestMemory>> {
        let mem = self.mem;
        let slot = self.slots.get_mut(q)?;
        if !slot.queue.ready() {
            return None;
        }
        slot.queue.pop_descriptor_chain(mem)
    }

    /// Put a chain back (nothing could be done with it yet).
    pub fn undo_pop(&mut self, q: usize) {
        if let Some(slot) = self.slots.get_mut(q) {
            slot.queue.go_to_previous_position();
        }
    }

    /// Return chain `head` to the driver with `len` bytes written.
    pub fn complete(&mut self, q: usize, head: u16, len: u32) -> Result<(), String> {
        let slot = self.slots.get_mut(q).ok_or_else(|| format!("no queue {q}"))?;
        slot.queue.add_used(self.mem, head, len).map_err(|e| format!("queue {q}: {e}"))?;
        self.completed[q] = true;
        Ok(())
    }
}
