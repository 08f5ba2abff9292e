//! Helpers for Ferry's integration tests, by concern: running ferry
//! (`process.rs`), fixtures (`fixtures.rs`), the test guest (`guest.rs`),
//! a stream-cutting migration proxy built on ferry's own stream module
//! (`proxy.rs`), hand-made PVH kernels (`elf.rs`), network namespaces
//! (`netns.rs`), the virtio-blk benchmark (`blk_bench.rs`) and QEMU's QMP
//! (`qmp.rs`). Everything is re-exported here.

pub mod blk_bench;
pub mod elf;
pub mod fixtures;
pub mod fleet;
pub mod guest;
pub mod netns;
pub mod process;
pub mod proxy;
pub mod qmp;
pub mod vhost;

pub use elf::*;
pub use fixtures::*;
pub use guest::*;
pub use process::*;
pub use proxy::*;
