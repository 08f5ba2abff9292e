//! A harness for device unit tests: fake guest RAM with a dirty bitmap (as
//! the core provides), split virtqueues laid out in it, and helpers to post
//! descriptor chains, run a device and read back what it completed.
//!
//! Layout of queue `q`: descriptor table at `0x10000 * (q + 1)`, available
//! ring 0x4000 after it, used ring 0x8000 after it.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{memory::GuestMemory, QueueSlot, Queues};

/// Descriptor flag: the chain continues at `next`.
pub const NEXT: u16 = 1;
/// Descriptor flag: device-writable.
pub const WRITE: u16 = 2;

pub use ferry_plugin_api::testing::FakeRam;

/// One descriptor to post.
#[derive(Debug, Clone, Copy)]
pub struct Desc {
    /// Guest address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// NEXT / WRITE flags.
    pub flags: u16,
    /// Next descriptor index (with NEXT).
    pub next: u16,
}

/// Queues in fake RAM.
pub struct TestQueues {
    /// The RAM (boxed: the mapping points into it).
    pub ram: Box<FakeRam>,
    /// The device's view of it.
    pub mem: GuestMemory,
    slots: Vec<QueueSlot>,
    avail_idx: Vec<u16>,
    completed: Vec<bool>,
}

fn desc_table(q: usize) -> u64 {
    0x10000 * (q as u64 + 1)
}

impl TestQueues {
    /// `ram` bytes of RAM (at least 1 MiB) and queues of the given sizes.
    pub fn new(ram: usize, sizes: &[u16]) -> Self {
        let fake = Box::new(FakeRam::new(ram));
        let mem = crate::memory::from_host(&fake.map()).expect("fake RAM maps");
        let slots = sizes
            .iter()
            .enumerate()
            .map(|(q, &size)| {
                let mut queue = Queue::new(size).expect("queue size");
                let base = desc_table(q);
                queue.set_desc_table_address(Some(base as u32), Some(0));
                queue.set_avail_ring_address(Some((base + 0x4000) as u32), Some(0));
                queue.set_used_ring_address(Some((base + 0x8000) as u32), Some(0));
                queue.set_ready(true);
                QueueSlot { queue, vector: 0, kick: EventFd::new(EFD_NONBLOCK).expect("eventfd") }
            })
            .collect();
        TestQueues {
            ram: fake,
            mem,
            slots,
            avail_idx: vec![0; sizes.len()],
            completed: vec![false; sizes.len()],
        }
    }

    /// Write descriptors at table indexes `first..` and make `head` available.
    pub fn post(&mut self, q: usize, first: u16, descs: &[Desc], head: u16) {
        let base = desc_table(q);
        for (i, d) in descs.iter().enumerate() {
            let at = base + 16 * (u64::from(first) + i as u64);
            self.mem.write_obj(d.addr, GuestAddress(at)).expect("desc");
            self.mem.write_obj(d.len, GuestAddress(at + 8)).expect("desc");
            self.mem.write_obj(d.flags, GuestAddress(at + 12)).expect("desc");
            self.mem.write_obj(d.next, GuestAddress(at + 14)).expect("desc");
        }
        let size = self.slots[q].queue.size();
        let avail = base + 0x4000;
        let slot = u64::from(self.avail_idx[q] % size);
        self.mem.write_obj(head, GuestAddress(avail + 4 + 2 * slot)).expect("ring");
        self.avail_idx[q] = self.avail_idx[q].wrapping_add(1);
        self.mem.write_obj(self.avail_idx[q], GuestAddress(avail + 2)).expect("idx");
    }

    /// Post a simple chain at indexes `first..` (linked with NEXT), head `first`.
    pub fn post_chain(&mut self, q: usize, first: u16, buffers: &[(u64, u32, bool)]) {
        let descs: Vec<Desc> = buffers
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, writable))| Desc {
                addr,
                len,
                flags: if writable { WRITE } else { 0 } | if i + 1 < buffers.len() { NEXT } else { 0 },
                next: first + i as u16 + 1,
            })
            .collect();
        self.post(q, first, &descs, first);
    }

    /// The queues, as a device's `process_queue` gets them.
    pub fn queues(&mut self) -> Queues<'_> {
        Queues { slots: &mut self.slots, mem: &self.mem, completed: &mut self.completed }
    }

    /// The used ring of queue `q`: (id, len) per entry so far.
    pub fn used(&self, q: usize) -> Vec<(u32, u32)> {
        let used = desc_table(q) + 0x8000;
        let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).expect("used idx");
        let size = self.slots[q].queue.size();
        (0..idx)
            .map(|i| {
                let at = used + 4 + 8 * u64::from(i % size);
                (
                    self.mem.read_obj(GuestAddress(at)).expect("id"),
                    self.mem.read_obj(GuestAddress(at + 4)).expect("len"),
                )
            })
            .collect()
    }

    /// Write guest memory.
    pub fn write(&self, addr: u64, bytes: &[u8]) {
        self.mem.write_slice(bytes, GuestAddress(addr)).expect("write");
    }

    /// Read guest memory.
    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).expect("read");
        v
    }
}
