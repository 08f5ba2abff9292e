//! Ferry's side of vhost-user, the protocol device programs outside any
//! VMM speak (qemu-storage-daemon's vhost-user-blk exports, virtiofsd).
//!
//! What exists: reading a backend's identity (`identity.rs`), what it
//! offers as the protocol lets a frontend ask without taking the device:
//! its virtio features, its vhost-user protocol features, its queue count
//! and its configuration space, with the bits named (`features.rs`).
//! `ferry vhost-user probe SOCKET` prints it. This is the part of a
//! backend that a migration plan compares between two hosts.
//!
//! A device's connection to its backend (`frontend.rs`): the setup at the
//! driver's DRIVER_OK (features, memory table by memfd, dirty log, rings
//! with their kick and call eventfds), and stopping and starting the rings
//! around a pause.

pub mod contract;
#[cfg(feature = "device")]
pub mod device;
pub mod features;
pub mod frontend;
pub mod identity;

pub use frontend::{Connection, FrontendError, RamRange, RingSpec, SharedRam};
pub use identity::{identify, probe, BackendIdentity, Device, ProbeError};
