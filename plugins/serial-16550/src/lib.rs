//! `serial-16550`: a 16550A UART (register model from vm-superio). Guest
//! output goes to ferry's stdout, a file, or a unix socket; input comes from
//! stdin or the socket.

mod backend;
mod device;
mod state;

ferry_plugin_api::export_plugin! {
    describe: device::describe,
    create: device::Serial16550::create,
}

#[cfg(test)]
mod abi_tests {
    use ferry_plugin_api::testing;

    #[test]
    fn the_plugin_works_through_the_abi() {
        testing::check_through_abi(
            crate::__ferry_plugin_root_module,
            &[("output", "none"), ("input", "none")],
        );
    }
}
