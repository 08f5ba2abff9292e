//! Ferry test guest: a tiny bare-metal x86_64 program booted through the
//! PVH entry point. It reads a command line of tokens and performs each
//! action in order, printing machine-readable lines on COM1 (see README.md
//! for the exact contract).

#![no_std]
#![no_main]

mod blk;
mod blk_bench;
mod blk_dma_check;
mod boot;
mod bootinfo;
mod calibrate;
mod cmdline;
mod cpuid;
mod dma;
mod fs;
mod interrupts;
mod io;
mod lapic;
mod mmio;
mod mptable;
mod net;
mod pattern;
mod pci;
mod pic_pit;
mod pio_bench;
mod rng;
mod reboot;
mod rtc;
#[macro_use]
mod serial;
mod smp;
mod sync;
mod testdev;
mod ticks;
mod tsc;
mod virtio;
mod virtq;

use core::sync::atomic::Ordering;

use cmdline::Token;

/// Size of the buffer the loader's command line is copied into.
const CMDLINE_MAX: usize = 4096;

/// Settings that tokens change for the tokens after them.
struct Settings {
    seed: u64,
    hz: u64,
    dirty: u64,
    /// This boot's number (`boot`), 0 if not counted.
    boots: u8,
    /// virtio devices, initialised on first use.
    devices: virtio::Devices,
}

/// Rust entry point, called by `pvh_start32` in long mode on the boot stack.
#[no_mangle]
pub extern "C" fn main(start_info: u64) -> ! {
    reboot::note_entry();
    serial::init();
    interrupts::init();
    pic_pit::pic_init();

    // Copy everything out of the loader's structures before any token can
    // write to RAM (the trampoline page, the pattern region).
    let mut raw = [0u8; CMDLINE_MAX];
    let len = bootinfo::parse(start_info, &mut raw);
    boot::extend_identity_map(bootinfo::MEM.max_end.load(Ordering::Relaxed));
    mptable::discover();

    let mut settings = Settings { seed: 1, hz: 100, dirty: 0, boots: 0, devices: virtio::Devices::new() };
    for tok in cmdline::effective(&raw[..len]).split_ascii_whitespace() {
        run_token(cmdline::parse_token(tok), &mut settings);
    }
    println!("GUEST DONE");
    io::halt_forever()
}

fn run_token(token: Token<'_>, settings: &mut Settings) {
    match token {
        Token::Ready => {
            let t = rtc::now();
            println!(
                "FERRY-GUEST READY cpus={} rtc={:04}-{:02}-{:02}T{:02}:{:02}:{:02} mem={}MiB",
                mptable::cpu_count(),
                t.year,
                t.month,
                t.day,
                t.hour,
                t.minute,
                t.second,
                bootinfo::total_mib()
            );
        }
        Token::Seed(seed) => settings.seed = seed,
        Token::Pattern(mib) => pattern::report(pattern::fill(mib, settings.seed)),
        Token::Verify => pattern::report(pattern::verify()),
        Token::Smp => smp::start_aps(),
        Token::Hz(hz) => settings.hz = hz,
        Token::Dirty(pages) => settings.dirty = pages,
        Token::DirtyMib(mib) => ticks::DIRTY_SPAN_MIB.store(mib, Ordering::Relaxed),
        Token::Ticks(n) => ticks::run(settings.hz, n, settings.dirty),
        Token::Exit(code) => io::debug_exit(code as u8),
        Token::Reset => io::i8042_reset(),
        Token::Boot => settings.boots = reboot::count(),
        Token::Fresh => reboot::report_fresh(),
        Token::RebootUntil(n) => reboot::until(n, settings.boots),
        Token::BlkBoots(sector) => reboot::blk_boots(&mut settings.devices.blk, sector, settings.boots),
        Token::Echo => serial::echo_line(),
        Token::Initrd => bootinfo::report_initrd(),
        Token::DevWrite(reg, value) => testdev::write(reg, value),
        Token::DevCheck(reg, value) => testdev::check(reg, value),
        Token::Cpuid(leaf) => cpuid::report(leaf),
        Token::Pci => pci::report(),
        Token::Calibrate => calibrate::run(),
        Token::PioBench(port, n) => pio_bench::run(port, n),
        Token::Blk(op) => blk::run(&mut settings.devices.blk, op),
        Token::Rng(n) => rng::run(&mut settings.devices.rng, n),
        Token::FsOpen(name) => fs::open(&mut settings.devices.fs, name),
        Token::FsRead => fs::read(&mut settings.devices.fs),
        Token::NetSend(n) => net::send(&mut settings.devices.net, n),
        Token::NetRecv(n) => net::recv(&mut settings.devices.net, n),
        Token::Unknown(tok) => println!("GUEST: unknown token {}", tok),
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    serial::print_line_unlocked(format_args!("GUEST PANIC {}", info));
    io::debug_exit(0x7E);
    io::halt_forever()
}
