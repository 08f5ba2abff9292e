//! `virtio-rng`: a virtio entropy device fed by the host's getrandom(2).

mod device;

ferry_plugin_api::export_plugin! {
    describe: device::describe,
    create: device::create,
}

#[cfg(test)]
mod abi_tests {
    #[test]
    fn the_plugin_works_through_the_abi() {
        ferry_plugin_api::testing::check_through_abi(crate::__ferry_plugin_root_module, &[]);
    }
}
