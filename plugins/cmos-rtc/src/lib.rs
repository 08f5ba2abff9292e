//! `cmos-rtc`: the MC146818 CMOS real-time clock at ports 0x70/0x71, reading
//! the host's date and time (UTC), plus 128 bytes of CMOS RAM.

mod device;

ferry_plugin_api::export_plugin! {
    describe: device::describe,
    create: device::CmosRtc::create,
}

#[cfg(test)]
mod abi_tests {
    use ferry_plugin_api::testing;

    #[test]
    fn state_and_abi() {
        testing::check_through_abi(crate::__ferry_plugin_root_module, &[]);
    }
}
