//! Moving a VM's state: the stream format, the manifest, the VM's state
//! (`vmstate.rs`: one writer, one reader, for snapshots and migrations),
//! and live migration: the source (`source.rs`), the destination
//! (`destination.rs`), their connection (`link.rs` over `conn.rs`, TLS in
//! `tls.rs`, credentials in `certs.rs`), the page messages (`pages.rs`)
//! and post-copy (`postcopy/`: the source's server, the destination's
//! puller). `backends.rs` checks vhost-user backends in an offline plan.

pub mod backends;
pub mod certs;
pub mod conn;
pub mod converge;
pub mod destination;
pub mod hostinfo;
pub mod inspect;
pub(crate) mod link;
pub mod manifest;
pub mod pages;
pub mod plan;
pub mod postcopy;
pub mod source;
pub mod status;
pub mod stream;
pub mod tls;
pub mod vmstate;
