//! The common configuration registers (virtio 1.x, 4.1.4.3): feature
//! negotiation, the status byte, queue selection and each queue's size,
//! vector and ring addresses (frozen once the queue is enabled).

use virtio_queue::QueueT;

use super::{read_le, value_of, State};
use crate::{
    layout::{self, common, status},
    QueueSlot, VirtioDevice, VIRTIO_F_VERSION_1,
};

impl<D: VirtioDevice> State<D> {
    fn selected(&mut self) -> Option<&mut QueueSlot> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    pub(super) fn common_read(&mut self, offset: u64, data: &mut [u8]) {
        let v: u64 = match offset {
            common::DEVICE_FEATURE_SELECT => self.device_feature_select.into(),
            common::DEVICE_FEATURE => match self.device_feature_select {
                0 => self.device_features & 0xffff_ffff,
                1 => self.device_features >> 32,
                _ => 0,
            },
            common::DRIVER_FEATURE_SELECT => self.driver_feature_select.into(),
            common::DRIVER_FEATURE => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            common::CONFIG_MSIX_VECTOR => self.config_vector.into(),
            common::NUM_QUEUES => self.queues.len() as u64,
            common::DEVICE_STATUS => self.status.into(),
            common::CONFIG_GENERATION => 0,
            common::QUEUE_SELECT => self.queue_select.into(),
            _ => {
                let Some(q) = self.selected() else {
                    read_le(&[], data);
                    return;
                };
                let state = q.queue.state();
                match offset {
                    common::QUEUE_SIZE => state.size.into(),
                    common::QUEUE_MSIX_VECTOR => q.vector.into(),
                    common::QUEUE_ENABLE => u64::from(state.ready),
                    common::QUEUE_NOTIFY_OFF => u64::from(self.queue_select),
                    common::QUEUE_DESC_LO => state.desc_table & 0xffff_ffff,
                    common::QUEUE_DESC_HI => state.desc_table >> 32,
                    common::QUEUE_DRIVER_LO => state.avail_ring & 0xffff_ffff,
                    common::QUEUE_DRIVER_HI => state.avail_ring >> 32,
                    common::QUEUE_DEVICE_LO => state.used_ring & 0xffff_ffff,
                    common::QUEUE_DEVICE_HI => state.used_ring >> 32,
                    _ => 0,
                }
            }
        };
        read_le(&v.to_le_bytes(), data);
    }

    pub(super) fn common_write(&mut self, offset: u64, data: &[u8]) -> Result<(), String> {
        let v = value_of(data);
        match offset {
            common::DEVICE_FEATURE_SELECT => self.device_feature_select = v as u32,
            common::DRIVER_FEATURE_SELECT => self.driver_feature_select = v as u32,
            common::DRIVER_FEATURE if self.status & status::FEATURES_OK == 0 => {
                match self.driver_feature_select {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | (v & 0xffff_ffff),
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
                    _ => {}
                }
            }
            common::CONFIG_MSIX_VECTOR => {
                self.config_vector = if (v as usize) < self.msix.len() { v as u16 } else { layout::NO_VECTOR }
            }
            common::DEVICE_STATUS => return self.set_status(v as u8),
            common::QUEUE_SELECT => self.queue_select = v as u16,
            _ => {
                let msix_len = self.msix.len();
                let activated = self.activated;
                let Some(q) = self.selected() else { return Ok(()) };
                // Queue registers are frozen once the queue is enabled.
                let enabled = q.queue.ready();
                match offset {
                    common::QUEUE_SIZE if !enabled => q.queue.set_size(v as u16),
                    common::QUEUE_MSIX_VECTOR => {
                        q.vector = if (v as usize) < msix_len { v as u16 } else { layout::NO_VECTOR }
                    }
                    common::QUEUE_ENABLE if v == 1 && !activated => q.queue.set_ready(true),
                    common::QUEUE_DESC_LO if !enabled => q.queue.set_desc_table_address(Some(v as u32), None),
                    common::QUEUE_DESC_HI if !enabled => q.queue.set_desc_table_address(None, Some(v as u32)),
                    common::QUEUE_DRIVER_LO if !enabled => {
                        q.queue.set_avail_ring_address(Some(v as u32), None)
                    }
                    common::QUEUE_DRIVER_HI if !enabled => {
                        q.queue.set_avail_ring_address(None, Some(v as u32))
                    }
                    common::QUEUE_DEVICE_LO if !enabled => {
                        q.queue.set_used_ring_address(Some(v as u32), None)
                    }
                    common::QUEUE_DEVICE_HI if !enabled => {
                        q.queue.set_used_ring_address(None, Some(v as u32))
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    fn set_status(&mut self, new: u8) -> Result<(), String> {
        if new == 0 {
            self.reset();
            return Ok(());
        }
        let mut new = new;
        if new & status::FEATURES_OK != 0 && self.status & status::FEATURES_OK == 0 {
            let unknown = self.driver_features & !self.device_features;
            if unknown != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                // The driver must accept only what we offer, and VERSION_1.
                new &= !status::FEATURES_OK;
            }
        }
        let newly_ok = new & status::DRIVER_OK != 0 && self.status & status::DRIVER_OK == 0;
        self.status = new;
        if newly_ok {
            self.activate()?;
        }
        Ok(())
    }
}
