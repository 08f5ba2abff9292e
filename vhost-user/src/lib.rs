//! Ferry's side of vhost-user, the protocol device programs outside any
//! VMM speak (qemu-storage-daemon's vhost-user-blk exports, virtiofsd).
//!
//! What exists: reading a backend's identity (`identity.rs`), what it
//! offers as the protocol lets a frontend ask without taking the device:
//! its virtio features, its vhost-user protocol features, its queue count
//! and its configuration space, with the bits named (`features.rs`).
//! `ferry vhost-user probe SOCKET` prints it. This is the part of a
//! backend that a migration plan compares between two hosts.

pub mod features;
pub mod identity;

pub use identity::{identify, probe, BackendIdentity, Device, ProbeError};
