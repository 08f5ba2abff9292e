//! 16550 UART on COM1 (I/O base 0x3F8): transmit, and a polled line read
//! for the `echo` token.
//!
//! Register offsets: +0 THR (transmit holding; divisor low when LCR.DLAB=1),
//! +1 IER (divisor high when DLAB=1), +2 FCR, +3 LCR, +4 MCR.
//! The line status register is never polled: under emulation the VMM
//! consumes THR writes synchronously, and each port access costs a VM exit.

use core::fmt::{self, Write};

use crate::io::{inb, outb};
use crate::sync::SpinLock;

const COM1: u16 = 0x3F8;

/// Serialises whole lines between CPUs (BSP and APs).
static LOCK: SpinLock = SpinLock::new();

/// Programs 115200 baud, 8 data bits, no parity, 1 stop bit, FIFOs on,
/// interrupts off.
pub fn init() {
    const SETUP: [(u16, u8); 7] = [
        (1, 0x00), // IER: no UART interrupts
        (3, 0x80), // LCR: DLAB=1 to reach the divisor latch
        (0, 0x01), // DLL: divisor 1 = 115200 baud
        (1, 0x00), // DLM
        (3, 0x03), // LCR: 8N1, DLAB=0
        (2, 0xC7), // FCR: enable + clear FIFOs
        (4, 0x03), // MCR: DTR | RTS
    ];
    for (off, val) in SETUP {
        // SAFETY: COM1 registers; configuration writes have no memory effects.
        unsafe { outb(COM1 + off, val) };
    }
}

/// Writer that pushes bytes straight into THR, one port write per byte.
struct Com1;

impl Write for Com1 {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            // SAFETY: COM1 THR; a byte write only transmits.
            unsafe { outb(COM1, b) };
        }
        Ok(())
    }
}

/// Prints one line (the arguments plus "\n") under the serial lock.
pub fn print_line(args: fmt::Arguments<'_>) {
    let _guard = LOCK.lock();
    let _ = Com1.write_fmt(args);
    let _ = Com1.write_str("\n");
}

/// Prints one line without taking the lock. Only for fatal paths
/// (exceptions, panics) where the lock may already be held by this CPU.
pub fn print_line_unlocked(args: fmt::Arguments<'_>) {
    let _ = Com1.write_fmt(args);
    let _ = Com1.write_str("\n");
}

/// `println!`-style macro writing one line to COM1.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {
        $crate::serial::print_line(format_args!($($arg)*))
    };
}

/// Longest line `echo` reads.
const ECHO_MAX: usize = 8192;
/// LSR polls before `echo` gives up (each is a VM exit, ~14 µs here).
const ECHO_POLLS: u32 = 400_000;

/// Reads one line from COM1 (polling LSR.DR) and prints `ECHO <line>`, or
/// `ECHO TIMEOUT` if no newline arrives in time.
pub fn echo_line() {
    let mut buf = [0u8; ECHO_MAX];
    let mut len = 0;
    let mut polls = 0;
    while polls < ECHO_POLLS {
        // SAFETY: COM1 LSR and RBR; reading RBR only pops the receive FIFO.
        let byte = unsafe {
            if inb(COM1 + 5) & 1 == 0 {
                polls += 1;
                continue;
            }
            inb(COM1)
        };
        if byte == b'\n' || len == ECHO_MAX {
            let text = core::str::from_utf8(&buf[..len]).unwrap_or("<not utf-8>");
            println!("ECHO {}", text);
            return;
        }
        buf[len] = byte;
        len += 1;
    }
    println!("ECHO TIMEOUT");
}

/// Copies `src` up to its first NUL (at most `out.len()` bytes) into `out`,
/// with bytes outside printable ASCII (0x20-0x7E) replaced by `.`.
pub fn printable<'a>(src: &[u8], out: &'a mut [u8]) -> &'a str {
    let mut len = 0;
    for (&b, o) in src.iter().take_while(|&&b| b != 0).zip(out.iter_mut()) {
        *o = if (0x20..0x7F).contains(&b) { b } else { b'.' };
        len += 1;
    }
    // Only ASCII was written.
    core::str::from_utf8(&out[..len]).unwrap_or("")
}

/// A value in tenths, printed with one decimal (`123` prints `12.3`).
pub struct Tenths(pub u64);

impl fmt::Display for Tenths {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.0 / 10, self.0 % 10)
    }
}
