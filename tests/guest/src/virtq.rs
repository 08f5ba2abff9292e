//! Split virtqueues (virtio 1.x) and bounded waiting for the device.
//!
//! Each queue uses one page of the `.dma` block:
//!   +0     descriptor table: size x { le64 addr, le32 len, le16 flags,
//!          le16 next } (flags: 1 NEXT, 2 WRITE = device writes the buffer)
//!   +1024  available ring: le16 flags, le16 idx, le16 ring[size]
//!   +2048  used ring: le16 flags, le16 idx, size x { le32 id, le32 len }
//! Indices are free-running 16-bit counters; ring slot = idx % size.
//! Ring fields are accessed with volatile loads/stores; a full fence comes
//! before publishing the available index and after reading the used one.

use core::sync::atomic::{fence, Ordering};

use crate::interrupts::MSIX_IRQS;
use crate::mmio::Mmio;
use crate::ticks::TICK_IRQS;
use crate::{dma, io, pic_pit, tsc};

/// Largest queue size used (the device may offer more).
pub const MAX_SIZE: u16 = 64;
const AVAIL: u64 = 1024;
const USED: u64 = 2048;
const _: () = assert!(
    16 * MAX_SIZE as u64 <= AVAIL
        && AVAIL + 6 + 2 * MAX_SIZE as u64 <= USED
        && USED + 6 + 8 * MAX_SIZE as u64 <= dma::PAGE as u64
);
pub const DESC_NEXT: u16 = 1;
pub const DESC_WRITE: u16 = 2;

/// PIT IRQ0 rate while waiting: wakes `hlt` at least every 10 ms.
const WAIT_HZ: u64 = 100;
/// Upper bound on wake-ups per wait (guards against an interrupt storm).
const MAX_WAKEUPS: u32 = 100_000;
/// After completion, timer ticks to wait for a late MSI-X interrupt so it
/// is counted for the request that caused it.
const IRQ_GRACE_TICKS: u64 = 2;

pub struct Virtq {
    /// Queue number (written to the notify register).
    index: u16,
    pub size: u16,
    /// Physical address of the queue's page.
    mem: u64,
    notify: Mmio,
    /// Index into `MSIX_IRQS` of the queue's vector.
    irq: usize,
    /// The device accepted an MSI-X vector for this queue.
    pub msix: bool,
    next_avail: u16,
    last_used: u16,
}

impl Virtq {
    /// Sets up the ring memory at `dma_offset` (one page, zeroed here).
    pub fn new(index: u16, size: u16, dma_offset: usize, notify: Mmio, irq: usize) -> Self {
        assert!(size.is_power_of_two() && size <= MAX_SIZE && dma_offset % dma::PAGE == 0);
        // SAFETY: the page belongs to this queue and the device does not
        // use it yet (the queue is not enabled).
        unsafe { dma::words(dma_offset, dma::PAGE / 8) }.fill(0);
        Self {
            index,
            size,
            mem: dma::addr(dma_offset),
            notify,
            irq,
            msix: false,
            next_avail: 0,
            last_used: 0,
        }
    }

    pub fn desc_addr(&self) -> u64 {
        self.mem
    }

    pub fn avail_addr(&self) -> u64 {
        self.mem + AVAIL
    }

    pub fn used_addr(&self) -> u64 {
        self.mem + USED
    }

    /// Writes descriptor `i`; with `DESC_NEXT` it chains to `i + 1`.
    pub fn set_desc(&mut self, i: u16, addr: u64, len: u32, flags: u16) {
        assert!(i < self.size);
        let d = self.mem + u64::from(i) * 16;
        // SAFETY: descriptor `i` lies in this queue's page; the caller only
        // rewrites descriptors the device has returned (or never had).
        unsafe {
            (d as *mut u64).write_volatile(addr);
            ((d + 8) as *mut u32).write_volatile(len);
            ((d + 12) as *mut u16).write_volatile(flags);
            ((d + 14) as *mut u16).write_volatile(i.wrapping_add(1) % self.size);
        }
    }

    /// Puts the chain starting at descriptor `head` into the available
    /// ring (seen by the device after [`Virtq::kick`]).
    pub fn push(&mut self, head: u16) {
        let slot = u64::from(self.next_avail % self.size);
        // SAFETY: the ring entry lies in this queue's page; the device reads
        // entries only up to the published index, which excludes this one.
        unsafe { ((self.avail_addr() + 4 + 2 * slot) as *mut u16).write_volatile(head) };
        self.next_avail = self.next_avail.wrapping_add(1);
    }

    /// Publishes the pushed entries and notifies the device.
    pub fn kick(&mut self) {
        self.publish();
        self.notify();
    }

    /// Publishes the pushed entries (the device may see them from now on,
    /// but is only told by [`Virtq::notify`]).
    pub fn publish(&mut self) {
        fence(Ordering::SeqCst);
        // SAFETY: avail.idx lies in this queue's page; only the driver
        // writes it.
        unsafe { ((self.avail_addr() + 2) as *mut u16).write_volatile(self.next_avail) };
        fence(Ordering::SeqCst);
    }

    /// Writes the queue's notify register (one VM exit).
    pub fn notify(&mut self) {
        self.notify.write16(0, self.index);
    }

    fn used_idx(&self) -> u16 {
        // SAFETY: used.idx lies in this queue's page; the device updates it
        // with an aligned 16-bit store, so the load sees old or new.
        let idx = unsafe { ((self.used_addr() + 2) as *const u16).read_volatile() };
        fence(Ordering::SeqCst);
        idx
    }

    /// Takes the next used element: `(descriptor id, bytes written)`.
    pub fn pop(&mut self) -> Option<(u16, u32)> {
        if self.used_idx() == self.last_used {
            return None;
        }
        let e = self.used_addr() + 4 + 8 * u64::from(self.last_used % self.size);
        // SAFETY: the element lies in this queue's page and the device
        // finished writing it before it advanced used.idx (fence above).
        let (id, len) =
            unsafe { ((e as *const u32).read_volatile(), ((e + 4) as *const u32).read_volatile()) };
        self.last_used = self.last_used.wrapping_add(1);
        Some(((id % u32::from(self.size)) as u16, len))
    }

    /// Interrupts taken so far on this queue's MSI-X vector.
    pub fn irqs(&self) -> u64 {
        MSIX_IRQS[self.irq].load(Ordering::SeqCst)
    }

    /// Waits until the device has used every published entry (then
    /// [`Virtq::pop`] returns them). `irqs_before` is [`Virtq::irqs`] from
    /// before the kick: with MSI-X, the wait also lasts until the interrupt
    /// arrived (or two more timer ticks passed). False on timeout.
    pub fn wait_idle(&mut self, timeout_ms: u64, irqs_before: u64) -> bool {
        self.wait_idle_with(&mut Deadline::start(timeout_ms), irqs_before).is_some()
    }

    /// [`Virtq::wait_idle`] bounded by the caller's running `deadline`.
    /// Returns the TSC read as soon as the used index was first seen to
    /// reach the published one (before any wait for the interrupt); `None`
    /// on timeout. An MSI-X interrupt ends the `hlt` at once, so the
    /// completion is seen without waiting for a timer tick.
    pub fn wait_idle_with(&mut self, deadline: &mut Deadline, irqs_before: u64) -> Option<u64> {
        // (TSC, timer ticks) when the completion was first seen.
        let mut done: Option<(u64, u64)> = None;
        loop {
            if self.used_idx() == self.next_avail {
                let (tsc, at) = *done.get_or_insert_with(|| (tsc::read(), deadline.ticks()));
                if !self.msix || self.irqs() != irqs_before || deadline.ticks() - at >= IRQ_GRACE_TICKS {
                    return Some(tsc);
                }
            }
            if !deadline.sleep() {
                let finished = self.used_idx() == self.next_avail;
                return finished.then(|| done.map_or_else(tsc::read, |(tsc, _)| tsc));
            }
        }
    }
}

/// Bounds a `sti; hlt` wait: while it lives, the PIT raises IRQ0 at
/// 100 Hz (counted in `TICK_IRQS`) so `hlt` always wakes up.
pub struct Deadline {
    start: u64,
    limit: u64,
    wakeups: u32,
}

impl Deadline {
    pub fn start(timeout_ms: u64) -> Self {
        pic_pit::pit_set_periodic(WAIT_HZ);
        pic_pit::pic_unmask_irq0_only();
        Self { start: TICK_IRQS.load(Ordering::SeqCst), limit: timeout_ms * WAIT_HZ / 1000, wakeups: 0 }
    }

    /// Starts a new time and wake-up budget (the timer keeps running).
    pub fn restart(&mut self) {
        self.start = TICK_IRQS.load(Ordering::SeqCst);
        self.wakeups = 0;
    }

    /// Timer ticks since the start.
    pub fn ticks(&self) -> u64 {
        TICK_IRQS.load(Ordering::SeqCst) - self.start
    }

    /// Halts until the next interrupt; false (without halting) once the
    /// time or the wake-up budget is used up.
    pub fn sleep(&mut self) -> bool {
        if self.ticks() >= self.limit || self.wakeups >= MAX_WAKEUPS {
            return false;
        }
        self.wakeups += 1;
        io::wait_for_interrupt();
        true
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        pic_pit::pic_mask_all();
    }
}
