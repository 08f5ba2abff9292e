//! Saved state of a virtio device on the PCI transport (state version 1):
//! the PCI function (command, BAR 0), the common configuration, every
//! queue's registers and ring positions, MSI-X, and the device's own bytes.
//!
//! Requests are processed to completion under the state lock, and a paused
//! device holds that lock's promise, so no request is in flight in the
//! device when it is saved. Buffers the driver made available but the
//! device had not taken yet stay in the available ring in guest memory; on
//! load the transport kicks every ready queue, so they are served after
//! resume: nothing is lost.

use ferry_plugin_api::serde;

use crate::msix::MsixStateV1;

/// One queue.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(crate = "ferry_plugin_api::serde")]
pub struct QueueStateV1 {
    pub size: u16,
    pub ready: bool,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub vector: u16,
}

/// The whole device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(crate = "ferry_plugin_api::serde")]
pub struct VirtioStateV1 {
    pub command: u16,
    pub bar0: u32,
    pub status: u8,
    pub driver_features: u64,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub queue_select: u16,
    pub config_vector: u16,
    pub isr: u8,
    pub activated: bool,
    pub queues: Vec<QueueStateV1>,
    pub msix: MsixStateV1,
    pub device: Vec<u8>,
}
