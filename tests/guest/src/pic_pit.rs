//! 8259A PIC pair and 8254 PIT.
//!
//! PIC: master command/data 0x20/0x21, slave 0xA0/0xA1. Initialisation is
//! ICW1 (0x11: edge, cascade, ICW4 follows), ICW2 (vector base), ICW3
//! (master: slave on IRQ2 = bit mask 0x04; slave: cascade identity 2),
//! ICW4 (0x01: 8086 mode). Afterwards the data port is the mask register
//! (bit set = masked). EOI is command 0x20 on the command port.
//!
//! PIT: input clock 1.193182 MHz; channel 0 data port 0x40 drives IRQ0;
//! command port 0x43. Command 0x34 = channel 0, lobyte/hibyte access,
//! mode 2 (rate generator); 0x00 = latch channel 0's count for reading.
//! Channel 0 is also polled as a clock: by `smp` and to calibrate the TSC.

use crate::io::{inb, outb};

/// Vector of IRQ0 after remapping (IRQ n -> 0x20 + n).
pub const IRQ_BASE: u8 = 0x20;
pub const PIT_HZ: u64 = 1_193_182;

const PIC1_CMD: u16 = 0x20;
const PIC1_DATA: u16 = 0x21;
const PIC2_CMD: u16 = 0xA0;
const PIC2_DATA: u16 = 0xA1;
const PIT_CH0: u16 = 0x40;
const PIT_CMD: u16 = 0x43;

fn write(port: u16, val: u8) {
    // SAFETY: only called with PIC/PIT ports; these devices do no DMA.
    unsafe { outb(port, val) }
}

fn read(port: u16) -> u8 {
    // SAFETY: as for `write`.
    unsafe { inb(port) }
}

/// Remaps the PICs to vectors 0x20-0x2F and masks every line.
pub fn pic_init() {
    write(PIC1_CMD, 0x11);
    write(PIC2_CMD, 0x11);
    write(PIC1_DATA, IRQ_BASE);
    write(PIC2_DATA, IRQ_BASE + 8);
    write(PIC1_DATA, 0x04);
    write(PIC2_DATA, 0x02);
    write(PIC1_DATA, 0x01);
    write(PIC2_DATA, 0x01);
    pic_mask_all();
}

/// Unmasks only IRQ0 (PIT).
pub fn pic_unmask_irq0_only() {
    write(PIC1_DATA, 0xFE);
    write(PIC2_DATA, 0xFF);
}

pub fn pic_mask_all() {
    write(PIC1_DATA, 0xFF);
    write(PIC2_DATA, 0xFF);
}

/// Programs channel 0 as a periodic rate generator. `hz` is clamped to
/// 19..=10_000 (19 Hz is the 16-bit divisor limit; the upper cap keeps
/// an emulated machine able to keep up); returns the divisor used.
pub fn pit_set_periodic(hz: u64) -> u16 {
    let divisor = (PIT_HZ / hz.clamp(19, 10_000)) as u16;
    set_channel0(divisor);
    divisor
}

fn set_channel0(divisor: u16) {
    let [lo, hi] = divisor.to_le_bytes();
    write(PIT_CMD, 0x34);
    write(PIT_CH0, lo);
    write(PIT_CH0, hi);
}

fn read_channel0() -> u16 {
    write(PIT_CMD, 0x00);
    let lo = read(PIT_CH0);
    let hi = read(PIT_CH0);
    u16::from_le_bytes([lo, hi])
}

/// Polls the free-running PIT channel 0 (interrupts are not needed, so
/// this works with IRQ0 masked). Polls must come at least every ~50 ms.
pub struct Stopwatch {
    last: u16,
    elapsed: u64,
    /// Consecutive polls that saw the same count.
    unchanged: u32,
}

impl Stopwatch {
    /// Reprograms channel 0 with the maximum period (65536 counts).
    pub fn start() -> Self {
        set_channel0(0);
        Self { last: read_channel0(), elapsed: 0, unchanged: 0 }
    }

    /// Microseconds elapsed since [`Stopwatch::start`].
    pub fn elapsed_us(&mut self) -> u64 {
        self.elapsed_counts() * 1_000_000 / PIT_HZ
    }

    /// PIT counts (1/`PIT_HZ` s) elapsed since [`Stopwatch::start`]. The
    /// count is sampled by the latch command, the first port access.
    pub fn elapsed_counts(&mut self) -> u64 {
        let now = read_channel0();
        // The count runs downwards and wraps from 1 to 65536 (read as 0).
        if now == self.last {
            self.unchanged = self.unchanged.saturating_add(1);
        } else {
            self.unchanged = 0;
        }
        self.elapsed += u64::from(self.last.wrapping_sub(now));
        self.last = now;
        self.elapsed
    }

    /// Waits until `us` microseconds have passed since start. Gives up early
    /// if the PIT does not count at all (see [`Stopwatch::stuck`]).
    pub fn wait_until_us(&mut self, us: u64) {
        while self.elapsed_us() < us && !self.stuck() {
            core::hint::spin_loop();
        }
    }

    /// True if the count did not move for 10000 polls in a row. A poll is
    /// three port accesses (microseconds at least) while the PIT counts at
    /// 1.19 MHz, so a working PIT always moves between polls.
    pub fn stuck(&self) -> bool {
        self.unchanged > 10_000
    }
}
