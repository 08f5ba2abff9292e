//! `i8042`: the PS/2 controller's command port, enough for a guest to reset
//! the machine (command 0xFE on port 0x64). A reset ends the VM cleanly.

mod device;

ferry_plugin_api::export_plugin! {
    describe: device::describe,
    create: device::I8042::create,
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
