//! Moving a VM's state: the stream format, the manifest, snapshots.

pub mod inspect;
pub mod live;
pub mod manifest;
pub mod plan;
pub mod stream;
