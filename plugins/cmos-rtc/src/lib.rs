//! `cmos-rtc`: the MC146818 CMOS real-time clock at ports 0x70/0x71, reading
//! the host's date and time (UTC), plus 128 bytes of CMOS RAM.

mod device;

ferry_plugin_api::export_plugin! {
    describe: device::describe,
    create: device::CmosRtc::create,
}
