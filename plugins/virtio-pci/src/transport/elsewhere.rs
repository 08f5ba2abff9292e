//! Queues served by another program (a vhost-user backend): the transport
//! keeps the registers and the ring positions, the device's
//! `start_rings`/`stop_rings` talk to the program.
//!
//! A stop is complete only when the program has returned every buffer it
//! took: a backend answers "stop" with the next index it would have taken,
//! while requests it already took may still be completing (qemu-storage-
//! daemon finishes them after it answers). The transport waits until the
//! used ring's index reaches that next available index, so a pause that
//! returns leaves no request in flight and guest memory untouched, and a
//! saved state is complete.

use std::{
    num::Wrapping,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use virtio_queue::QueueT;

use super::State;
use crate::{layout, Ring, VirtioDevice};

/// How long requests already taken may take to complete at a stop.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

impl<D: VirtioDevice> State<D> {
    /// Hand every ready queue to the device's program.
    pub(super) fn start_rings(&mut self) -> Result<(), String> {
        if self.rings_started || !self.device.rings_elsewhere() {
            return Ok(());
        }
        let rings: Vec<Ring<'_>> = self
            .queues
            .iter()
            .enumerate()
            .filter(|(_, s)| s.queue.ready())
            .map(|(index, s)| Ring {
                index,
                size: s.queue.size(),
                desc: s.queue.desc_table(),
                avail: s.queue.avail_ring(),
                used: s.queue.used_ring(),
                next_avail: s.queue.next_avail(),
                kick: &s.kick,
                call: if s.vector == layout::NO_VECTOR { None } else { self.msix.fd(s.vector) },
            })
            .collect();
        self.device.start_rings(self.driver_features, &rings)?;
        self.rings_started = true;
        // Buffers made available while the rings were stopped: the
        // program looks. Completions it finished after a stop raised
        // nothing (libvhost-user closes its call eventfd at the stop): the
        // driver looks. Both are harmless when there is nothing.
        let mut vectors = Vec::new();
        for slot in self.queues.iter().filter(|s| s.queue.ready()) {
            let _ = slot.kick.write(1);
            if slot.vector != layout::NO_VECTOR {
                vectors.push(slot.vector);
            }
        }
        for v in vectors {
            self.msix.signal(v);
        }
        Ok(())
    }

    /// Stop the device's program and wait until every buffer it took is
    /// back; the queues' positions then say exactly where it stopped.
    pub(super) fn stop_rings(&mut self, pausing: bool) -> Result<(), String> {
        if !self.rings_started {
            return Ok(());
        }
        self.rings_started = false;
        let stopped = self.device.stop_rings(pausing)?;
        let deadline = Instant::now() + DRAIN_LIMIT;
        for (q, next_avail) in stopped {
            let Some(slot) = self.queues.get_mut(q) else {
                return Err(format!("the backend stopped queue {q}, which this device does not have"));
            };
            loop {
                let used = slot
                    .queue
                    .used_idx(&self.mem, Ordering::Acquire)
                    .map_err(|e| format!("queue {q}: cannot read the used ring: {e}"))?;
                let outstanding = (Wrapping(next_avail) - used).0;
                if outstanding == 0 {
                    slot.queue.set_next_avail(next_avail);
                    slot.queue.set_next_used(used.0);
                    break;
                }
                if outstanding > slot.queue.size() {
                    return Err(format!(
                        "queue {q}: the backend stopped at {next_avail}, behind the used ring ({})",
                        used.0
                    ));
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "queue {q}: {outstanding} request(s) still with the backend after {} s",
                        DRAIN_LIMIT.as_secs()
                    ));
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        Ok(())
    }
}
