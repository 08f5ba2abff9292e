//! `virtio-net`: a virtio network device on a host tap interface.

#[cfg_attr(feature = "fuzzing", allow(dead_code))]
mod device;
mod tap;

#[cfg(not(feature = "fuzzing"))]
ferry_plugin_api::export_plugin! {
    describe: device::describe,
    create: device::create,
}

/// The device as the descriptor-chain fuzz target drives it.
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    pub use crate::device::{fuzzing_net as net, Net};
}
