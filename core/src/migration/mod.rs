//! Moving a VM's state: the stream format, the manifest, snapshots, and
//! live migration with its transports (TLS in `tls.rs`, credentials in
//! `certs.rs`).

pub mod certs;
pub mod conn;
pub mod hostinfo;
pub mod inspect;
pub mod live;
pub mod manifest;
pub mod plan;
pub mod status;
pub mod stream;
pub mod tls;
