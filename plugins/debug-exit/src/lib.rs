//! `debug-exit`: an I/O port that ends the VM with an exit status the guest
//! writes. Tests end their guests this way.

mod device;

ferry_plugin_api::export_plugin! {
    describe: device::describe,
    create: device::DebugExit::create,
}

#[cfg(test)]
mod abi_tests {
    use ferry_plugin_api::{state::NoState, testing};

    #[test]
    fn state_round_trips_and_the_plugin_works_through_the_abi() {
        testing::check_round_trip(&[NoState {}]);
        testing::check_through_abi(crate::__ferry_plugin_root_module, &[]);
    }
}
