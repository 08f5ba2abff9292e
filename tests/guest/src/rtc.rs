//! MC146818-compatible CMOS RTC: index port 0x70, data port 0x71.
//!
//! Time registers: 0x00 seconds, 0x02 minutes, 0x04 hours, 0x07 day of
//! month, 0x08 month, 0x09 year (two digits), 0x32 century (as set by
//! firmware/VMMs). Status A (0x0A) bit 7 = update in progress: the time
//! registers may be inconsistent while it is set. Status B (0x0B) bit 2 =
//! binary values (else BCD), bit 1 = 24-hour mode (else 12-hour with the
//! PM flag in bit 7 of the hour register).

use crate::io::{inb, outb};

const INDEX: u16 = 0x70;
const DATA: u16 = 0x71;

#[derive(Clone, Copy, PartialEq, Eq)]
pub struct DateTime {
    pub year: u16,
    pub month: u8,
    pub day: u8,
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
}

/// Reads CMOS register `reg` (NMIs stay enabled: bit 7 of the index is 0).
pub fn read_cmos(reg: u8) -> u8 {
    // SAFETY: selecting a CMOS register and reading it has no memory effects.
    unsafe {
        outb(INDEX, reg & 0x7F);
        inb(DATA)
    }
}

/// Writes CMOS register `reg` (NMIs stay enabled).
pub fn write_cmos(reg: u8, value: u8) {
    // SAFETY: selecting a CMOS register and writing it has no memory effects.
    unsafe {
        outb(INDEX, reg & 0x7F);
        outb(DATA, value);
    }
}

/// Raw register snapshot: sec, min, hour, day, month, year, century.
fn snapshot() -> [u8; 7] {
    // Bounded wait for "update in progress" to clear (it lasts < 2 ms).
    for _ in 0..10_000 {
        if read_cmos(0x0A) & 0x80 == 0 {
            break;
        }
        core::hint::spin_loop();
    }
    [0x00, 0x02, 0x04, 0x07, 0x08, 0x09, 0x32].map(read_cmos)
}

fn from_bcd(v: u8) -> u8 {
    (v & 0x0F) + (v >> 4) * 10
}

/// Reads the current date and time. Two identical consecutive snapshots
/// are required so a rollover between register reads cannot tear the value.
pub fn now() -> DateTime {
    let mut raw = snapshot();
    for _ in 0..5 {
        let again = snapshot();
        if again == raw {
            break;
        }
        raw = again;
    }
    let status_b = read_cmos(0x0B);
    let binary = status_b & 0x04 != 0;
    let h24 = status_b & 0x02 != 0;
    let conv = |v: u8| if binary { v } else { from_bcd(v) };

    let [sec, min, hour_raw, day, month, year, century] = raw;
    let pm = hour_raw & 0x80 != 0;
    let mut hour = conv(hour_raw & 0x7F);
    if !h24 {
        // 12-hour clock: 12 AM is 0h, 1-11 PM are 13-23h.
        hour %= 12;
        if pm {
            hour += 12;
        }
    }
    let century = match conv(century) {
        c @ 19..=99 => c,
        _ => 20, // register absent or unset
    };
    DateTime {
        year: u16::from(century) * 100 + u16::from(conv(year)),
        month: conv(month),
        day: conv(day),
        hour,
        minute: conv(min),
        second: conv(sec),
    }
}
