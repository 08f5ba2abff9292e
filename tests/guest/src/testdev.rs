//! The `testdev` fixture device (tests/fixtures/testdev): an index port at
//! 0x510 and a data port at 0x511, 8-bit registers.

use crate::io::{inb, outb};

const INDEX: u16 = 0x510;
const DATA: u16 = 0x511;

/// `dev-write=<reg>:<value>`: write a register; prints `DEV WRITE reg=0x<r> value=0x<v>`.
pub fn write(reg: u8, value: u8) {
    // SAFETY: the test device's ports; writes only change its registers.
    unsafe {
        outb(INDEX, reg);
        outb(DATA, value);
    }
    crate::println!("DEV WRITE reg={:#04x} value={:#04x}", reg, value);
}

/// `dev-check=<reg>:<value>`: read a register back; prints `DEV OK reg=.. value=..`
/// or `DEV BAD reg=.. want=.. got=..` and exits with status 2.
pub fn check(reg: u8, want: u8) {
    // SAFETY: the test device's ports; reads have no side effects.
    let got = unsafe {
        outb(INDEX, reg);
        inb(DATA)
    };
    if got == want {
        crate::println!("DEV OK reg={:#04x} value={:#04x}", reg, got);
    } else {
        crate::println!("DEV BAD reg={:#04x} want={:#04x} got={:#04x}", reg, want, got);
        crate::io::debug_exit(2);
    }
}
