//! Moving a VM's state: the stream format, the manifest, snapshots.

pub mod conn;
pub mod hostinfo;
pub mod inspect;
pub mod live;
pub mod manifest;
pub mod plan;
pub mod status;
pub mod stream;
