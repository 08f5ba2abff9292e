//! `virtio-rng`: a virtio entropy device fed by the host's getrandom(2).

#[cfg_attr(feature = "fuzzing", allow(dead_code))]
mod device;

#[cfg(not(feature = "fuzzing"))]
ferry_plugin_api::export_plugin! {
    describe: device::describe,
    create: device::create,
}

/// The device as the descriptor-chain fuzz target drives it.
#[cfg(feature = "fuzzing")]
pub use device::Rng;

#[cfg(all(test, not(feature = "fuzzing")))]
mod abi_tests {
    #[test]
    fn the_plugin_works_through_the_abi() {
        ferry_plugin_api::testing::check_through_abi(crate::__ferry_plugin_root_module, &[]);
    }
}
