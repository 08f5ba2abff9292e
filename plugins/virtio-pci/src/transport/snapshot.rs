//! The transport's saved state (`crate::state`'s types): every register
//! the driver set, each queue's ring positions, MSI-X, and the device's own
//! state at the version asked (the device's `Versioned` state type
//! converts). Loading checks the queue count and sizes, then kicks every
//! ready queue so buffers made available before the save are served.

use ferry_plugin_api::state::Versioned;
use virtio_queue::QueueT;

use super::State;
use crate::{
    layout,
    state::{QueueStateV1, VirtioStateV1},
    VirtioDevice,
};

impl<D: VirtioDevice> State<D> {
    pub(super) fn save(&self, version: u32) -> Result<VirtioStateV1, String> {
        Ok(VirtioStateV1 {
            command: self.command,
            bar0: self.bar0,
            status: self.status,
            driver_features: self.driver_features,
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            queue_select: self.queue_select,
            config_vector: self.config_vector,
            isr: self.isr,
            activated: self.activated,
            queues: self
                .queues
                .iter()
                .map(|q| {
                    let s = q.queue.state();
                    QueueStateV1 {
                        size: s.size,
                        ready: s.ready,
                        desc: s.desc_table,
                        avail: s.avail_ring,
                        used: s.used_ring,
                        next_avail: s.next_avail,
                        next_used: s.next_used,
                        vector: q.vector,
                    }
                })
                .collect(),
            msix: self.msix.snapshot(),
            device: self.device.state().save_version(version)?,
        })
    }

    pub(super) fn restore(&mut self, version: u32, s: &VirtioStateV1) -> Result<(), String> {
        if s.queues.len() != self.queues.len() {
            return Err(format!(
                "state has {} queues, this device has {}",
                s.queues.len(),
                self.queues.len()
            ));
        }
        self.stop_rings(false)?;
        self.unregister_notifies();
        self.command = s.command & 0x0406;
        self.bar0 = s.bar0 & !(layout::BAR0_SIZE as u32 - 1);
        self.status = s.status;
        self.driver_features = s.driver_features & self.device_features;
        self.device_feature_select = s.device_feature_select;
        self.driver_feature_select = s.driver_feature_select;
        self.queue_select = s.queue_select;
        self.config_vector = s.config_vector;
        self.isr = s.isr;
        for (slot, q) in self.queues.iter_mut().zip(&s.queues) {
            if q.size > slot.queue.max_size() || (q.size != 0 && !q.size.is_power_of_two()) {
                return Err(format!("queue size {} (max {})", q.size, slot.queue.max_size()));
            }
            slot.queue.reset();
            slot.queue.set_size(q.size);
            slot.queue.set_desc_table_address(Some(q.desc as u32), Some((q.desc >> 32) as u32));
            slot.queue.set_avail_ring_address(Some(q.avail as u32), Some((q.avail >> 32) as u32));
            slot.queue.set_used_ring_address(Some(q.used as u32), Some((q.used >> 32) as u32));
            slot.queue.set_next_avail(q.next_avail);
            slot.queue.set_next_used(q.next_used);
            slot.queue.set_ready(q.ready);
            slot.vector = q.vector;
        }
        self.msix.restore(&s.msix)?;
        self.device.set_state(D::State::load_version(version, &s.device)?)?;
        self.activated = s.activated;
        if self.activated {
            self.register_notifies()?;
            // Served from where the saved rings stopped.
            self.serve_queues()?;
        }
        Ok(())
    }
}
