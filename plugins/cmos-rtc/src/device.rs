//! Register model. The clock always follows the host clock (UTC): writes to
//! the time registers are kept in CMOS RAM but do not move the clock. Status
//! register B selects BCD or binary and 12 or 24-hour format, as on hardware.
//! The update-in-progress bit always reads 0 and no periodic, alarm or update
//! interrupts are raised.

use std::time::{SystemTime, UNIX_EPOCH};

use ferry_plugin_api::{
    sdk::{DescriptorBuilder, PluginDevice, Properties},
    serde,
    state::{self, Versioned},
    AddressSpace, DeviceConfig, HostBox, PluginDescriptor, PluginError, PropertyKind, Region, StateBlob,
};

/// State v1: the index register and the CMOS RAM (which holds the status
/// registers). The clock itself is the host's and is not saved.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(crate = "ferry_plugin_api::serde")]
pub struct RtcStateV1 {
    index: u8,
    ram: Vec<u8>,
}

impl Versioned for RtcStateV1 {
    const CURRENT: u32 = 1;
    const OLDEST_LOAD: u32 = 1;

    fn load_version(_version: u32, bytes: &[u8]) -> Result<Self, String> {
        let s: RtcStateV1 = state::decode(bytes)?;
        if s.ram.len() != 128 {
            return Err(format!("CMOS RAM of {} bytes, expected 128", s.ram.len()));
        }
        Ok(s)
    }

    fn save_version(&self, _version: u32) -> Result<Vec<u8>, String> {
        state::encode(self)
    }
}

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_STATUS_A: u8 = 0x0a;
const REG_STATUS_B: u8 = 0x0b;
const REG_STATUS_C: u8 = 0x0c;
const REG_STATUS_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

const STATUS_B_24H: u8 = 0x02;
const STATUS_B_BINARY: u8 = 0x04;
const STATUS_D_VALID_RAM: u8 = 0x80;
/// 32.768 kHz time base, 1024 Hz rate: what firmware programs.
const STATUS_A_DEFAULT: u8 = 0x26;

pub fn describe() -> PluginDescriptor {
    DescriptorBuilder::new(
        "cmos-rtc",
        env!("CARGO_PKG_VERSION"),
        "MC146818 CMOS real-time clock with the host's date and time (UTC)",
    )
    .property("port", PropertyKind::INTEGER, Some("0x70"), "index port; data is port + 1")
    .versioned::<RtcStateV1>()
    .build()
}

pub struct CmosRtc {
    port: u16,
    index: u8,
    ram: [u8; 128],
}

impl CmosRtc {
    pub fn create(config: &DeviceConfig, _host: HostBox) -> Result<Self, String> {
        let port = Properties::new(config).integer("port")?;
        let port = u16::try_from(port)
            .ok()
            .filter(|p| *p < u16::MAX)
            .ok_or_else(|| format!("port {port:#x} does not leave room for the data port"))?;
        let mut ram = [0u8; 128];
        ram[usize::from(REG_STATUS_A)] = STATUS_A_DEFAULT;
        ram[usize::from(REG_STATUS_B)] = STATUS_B_24H;
        Ok(CmosRtc { port, index: 0, ram })
    }

    fn read_register(&self, index: u8, now: &DateTime) -> u8 {
        let status_b = self.ram[usize::from(REG_STATUS_B)];
        let encode = |v: u8| {
            if status_b & STATUS_B_BINARY != 0 {
                v
            } else {
                to_bcd(v)
            }
        };
        match index {
            REG_SECONDS => encode(now.second),
            REG_MINUTES => encode(now.minute),
            REG_HOURS => {
                if status_b & STATUS_B_24H != 0 {
                    encode(now.hour)
                } else {
                    let pm = if now.hour >= 12 { 0x80 } else { 0 };
                    let h12 = match now.hour % 12 {
                        0 => 12,
                        h => h,
                    };
                    encode(h12) | pm
                }
            }
            REG_WEEKDAY => encode(now.weekday),
            REG_DAY => encode(now.day),
            REG_MONTH => encode(now.month),
            REG_YEAR => encode((now.year % 100) as u8),
            REG_CENTURY => encode((now.year / 100) as u8),
            REG_STATUS_C => 0,
            REG_STATUS_D => STATUS_D_VALID_RAM,
            other => self.ram[usize::from(other & 0x7f)],
        }
    }

    fn write_register(&mut self, index: u8, value: u8) {
        match index {
            REG_STATUS_A => self.ram[usize::from(index)] = value & 0x7f,
            REG_STATUS_C | REG_STATUS_D => {}
            other => self.ram[usize::from(other & 0x7f)] = value,
        }
    }
}

impl PluginDevice for CmosRtc {
    fn regions(&self) -> Vec<Region> {
        vec![Region { space: AddressSpace::PIO, base: self.port.into(), len: 2 }]
    }

    fn read(&mut self, _region: u32, offset: u64, data: &mut [u8]) -> Result<(), String> {
        let value = if offset == 0 { self.index } else { self.read_register(self.index, &DateTime::now()) };
        data.fill(value);
        Ok(())
    }

    fn write(&mut self, _region: u32, offset: u64, data: &[u8]) -> Result<(), String> {
        let Some(&value) = data.first() else {
            return Ok(());
        };
        if offset == 0 {
            // Bit 7 is the NMI mask on real chipsets; it selects no register.
            self.index = value & 0x7f;
        } else {
            self.write_register(self.index, value);
        }
        Ok(())
    }

    /// A machine reset does not reach the battery-backed chip: CMOS RAM
    /// (and the guest's settings in it) stays; only the index register is
    /// cleared.
    fn reset(&mut self) -> Result<(), PluginError> {
        self.index = 0;
        Ok(())
    }

    fn save_state(&mut self, version: u32) -> Result<StateBlob, String> {
        state::save(&RtcStateV1 { index: self.index, ram: self.ram.to_vec() }, version)
    }

    fn load_state(&mut self, blob: StateBlob) -> Result<(), String> {
        let s = state::load::<RtcStateV1>(&blob)?;
        self.index = s.index & 0x7f;
        self.ram.copy_from_slice(&s.ram);
        Ok(())
    }
}

fn to_bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

/// A UTC calendar date and time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DateTime {
    year: u32,
    month: u8,
    day: u8,
    /// 1 = Sunday, as the RTC counts.
    weekday: u8,
    hour: u8,
    minute: u8,
    second: u8,
}

impl DateTime {
    fn now() -> Self {
        let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        Self::from_unix(secs)
    }

    /// Days-to-civil conversion over the proleptic Gregorian calendar, using
    /// 400-year eras (146097 days each).
    fn from_unix(secs: u64) -> Self {
        let days = secs / 86_400;
        let rem = secs % 86_400;
        let z = days + 719_468; // days since 0000-03-01
        let era = z / 146_097;
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + u64::from(month <= 2);
        DateTime {
            year: year as u32,
            month: month as u8,
            day: day as u8,
            weekday: ((days + 4) % 7 + 1) as u8, // 1970-01-01 was a Thursday
            hour: (rem / 3600) as u8,
            minute: (rem / 60 % 60) as u8,
            second: (rem % 60) as u8,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rtc() -> CmosRtc {
        let mut ram = [0u8; 128];
        ram[usize::from(REG_STATUS_B)] = STATUS_B_24H;
        CmosRtc { port: 0x70, index: 0, ram }
    }

    #[test]
    fn unix_time_converts_to_calendar() {
        // 2026-11-27 23:23:17 UTC, a Friday.
        let dt = DateTime::from_unix(1_795_821_797);
        assert_eq!(
            dt,
            DateTime { year: 2026, month: 11, day: 27, weekday: 6, hour: 23, minute: 23, second: 17 }
        );
        // Leap day.
        let leap = DateTime::from_unix(951_782_400); // 2000-02-29 00:00:00
        assert_eq!((leap.year, leap.month, leap.day), (2000, 2, 29));
    }

    #[test]
    fn registers_read_bcd_by_default_and_binary_on_request() {
        let dt = DateTime::from_unix(1_795_821_797);
        let mut rtc = rtc();
        assert_eq!(rtc.read_register(REG_YEAR, &dt), 0x26);
        assert_eq!(rtc.read_register(REG_CENTURY, &dt), 0x20);
        assert_eq!(rtc.read_register(REG_HOURS, &dt), 0x23);
        rtc.write_register(REG_STATUS_B, STATUS_B_24H | STATUS_B_BINARY);
        assert_eq!(rtc.read_register(REG_YEAR, &dt), 26);
        assert_eq!(rtc.read_register(REG_MONTH, &dt), 11);
        rtc.write_register(REG_STATUS_B, STATUS_B_BINARY);
        assert_eq!(rtc.read_register(REG_HOURS, &dt), 11 | 0x80, "11 pm in 12-hour mode");
    }

    #[test]
    fn index_port_selects_the_register() {
        let mut rtc = rtc();
        rtc.write(0, 0, &[0x80 | 0x40]).unwrap();
        rtc.write(0, 1, &[0x5a]).unwrap();
        let mut out = [0u8];
        rtc.read(0, 1, &mut out).unwrap();
        assert_eq!(out[0], 0x5a);
        rtc.write(0, 0, &[REG_STATUS_D]).unwrap();
        rtc.read(0, 1, &mut out).unwrap();
        assert_eq!(out[0], STATUS_D_VALID_RAM);
    }
}

#[cfg(test)]
mod state_tests {
    use super::*;
    use ferry_plugin_api::testing;

    #[test]
    fn state_round_trips_and_bad_ram_is_refused() {
        let mut ram = vec![0u8; 128];
        ram[0x0b] = 0x06;
        ram[0x40] = 0x5a;
        testing::check_round_trip(&[RtcStateV1 { index: 0x40, ram }]);
        let bad = state::encode(&RtcStateV1 { index: 0, ram: vec![0; 3] }).unwrap();
        let err = state::load::<RtcStateV1>(&StateBlob { version: 1, bytes: bad.into() }).unwrap_err();
        assert!(err.contains("3 bytes"), "{err}");
    }
}
