//! Start-up, dispatch and memory, ferry beside QEMU, one run:
//!
//! 1. process start to the guest's first serial output (the test guest's
//!    `FERRY-GUEST READY` line), median of 7 runs each, ferry and
//!    `qemu-system-x86_64 -accel kvm` booting the same PVH ELF;
//! 2. the host-side cost of one port read dispatched through the bus to a
//!    plugin (debug-exit, loaded from its library) and to the same device
//!    compiled into this binary, beside the round trip of one port-I/O exit
//!    of a minimal KVM guest;
//! 3. ferry's resident memory beside guest RAM (and QEMU's, for scale).
//!
//! ```sh
//! cargo build --release --workspace && cargo bench -p ferry-tests --bench boot
//! ```

use std::{
    io::Read,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use abi_stable::{
    sabi_trait::TD_Opaque,
    std_types::{RResult, RSlice, RSliceMut, RVec},
};
use ferry::bus::Bus;
use ferry_plugin_api::{
    testing::FakeHost, AddressSpace, Device, DeviceBox, DeviceConfig, PluginError, Property, Region,
    StateBlob,
};
use ferry_tests::{bin_dir, qmp::qemu_command, wait_for_path, Running, TempDir};

const RUNS: usize = 7;
const MARKER: &[u8] = b"FERRY-GUEST";

/// Milliseconds from spawning `cmd` until `MARKER` appears on its stdout.
fn time_to_marker(mut cmd: Command) -> Result<f64, String> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut out = child.stdout.take().ok_or("no stdout")?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let result = loop {
        match out.read(&mut buf) {
            Ok(0) | Err(_) => break Err("the guest printed nothing".to_string()),
            Ok(n) => {
                seen.extend_from_slice(&buf[..n]);
                if seen.windows(MARKER.len()).any(|w| w == MARKER) {
                    break Ok(start.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    result
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn qemu_cmd(guest: &std::path::Path, cmdline: &str) -> Command {
    qemu_command(guest, "256M", cmdline)
}

fn ferry_cmd(cmdline: &str) -> Command {
    let mut c = Command::new(bin_dir().join("ferry"));
    c.args(["run", "--memory", "256M", "--cmdline", cmdline]);
    c
}

/// The debug-exit device as if compiled into the core: reads return 0xff.
struct InCore;

impl Device for InCore {
    fn regions(&self) -> RVec<Region> {
        RVec::from(vec![Region { space: AddressSpace::PIO, base: 0xf5, len: 1 }])
    }
    fn read(&mut self, _: u32, _: u64, mut data: RSliceMut<'_, u8>) -> RResult<(), PluginError> {
        data.as_mut_slice().fill(0xff);
        RResult::ROk(())
    }
    fn write(&mut self, _: u32, _: u64, _: RSlice<'_, u8>) -> RResult<(), PluginError> {
        RResult::ROk(())
    }
    fn pause(&mut self) -> RResult<(), PluginError> {
        RResult::ROk(())
    }
    fn resume(&mut self) -> RResult<(), PluginError> {
        RResult::ROk(())
    }
    fn save_state(&mut self, _: u32) -> RResult<StateBlob, PluginError> {
        RResult::RErr(PluginError::other("stateless"))
    }
    fn load_state(&mut self, _: StateBlob) -> RResult<(), PluginError> {
        RResult::RErr(PluginError::other("stateless"))
    }
}

/// Nanoseconds per `bus.pio_read(port)`, best of 5 batches.
fn ns_per_read(bus: &Bus, port: u16) -> Result<f64, String> {
    const N: u32 = 1_000_000;
    let mut best = f64::INFINITY;
    let mut b = [0u8; 1];
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..N {
            bus.pio_read(port, &mut b).map_err(|e| e.to_string())?;
        }
        best = best.min(t.elapsed().as_nanos() as f64 / f64::from(N));
        if b[0] != 0xff {
            return Err(format!("port {port:#x} read {:#x}", b[0]));
        }
    }
    Ok(best)
}

fn dispatch() -> Result<(f64, f64), String> {
    let lib = ferry::plugins::load_one(&bin_dir().join("libdebug_exit.so")).map_err(|e| e.to_string())?;
    let properties = lib
        .descriptor
        .properties
        .iter()
        .map(|s| Property {
            name: s.name.clone(),
            value: s.default.clone().into_option().unwrap_or_default(),
        })
        .collect();
    let host = FakeHost::new(1 << 20);
    let parts = lib.create(DeviceConfig { id: "debug-exit".into(), properties }, host.handle())?;
    let mut bus = Bus::new();
    bus.add_device("debug-exit", "debug-exit", parts.device, None).map_err(|e| e.to_string())?;
    bus.add_device("in-core", "built-in", DeviceBox::from_value(InCore, TD_Opaque), None)
        .map_err(|e| e.to_string())?;
    Ok((ns_per_read(&bus, 0xf4)?, ns_per_read(&bus, 0xf5)?))
}

/// Nanoseconds per port-I/O exit of a one-instruction-loop real-mode guest
/// (`out 0x10, al; jmp $-2`), with nothing dispatched.
fn exit_round_trip() -> Result<f64, String> {
    use kvm_ioctls::{Kvm, VcpuExit};
    const SIZE: usize = 0x10000;
    let kvm = Kvm::new().map_err(|e| format!("/dev/kvm: {e}"))?;
    let vm = kvm.create_vm().map_err(|e| e.to_string())?;
    // SAFETY: a fresh anonymous private mapping; checked for MAP_FAILED.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if mem == libc::MAP_FAILED {
        return Err("mmap failed".into());
    }
    // SAFETY: `mem` is SIZE writable bytes owned here; 0x1000 + 4 < SIZE.
    unsafe {
        std::ptr::copy_nonoverlapping([0xE6u8, 0x10, 0xEB, 0xFC].as_ptr(), mem.cast::<u8>().add(0x1000), 4)
    };
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: SIZE as u64,
        userspace_addr: mem as u64,
    };
    // SAFETY: the mapping outlives the VM (it is never unmapped; the process
    // ends after the benchmark).
    unsafe { vm.set_user_memory_region(region) }.map_err(|e| e.to_string())?;
    let mut vcpu = vm.create_vcpu(0).map_err(|e| e.to_string())?;
    let mut sregs = vcpu.get_sregs().map_err(|e| e.to_string())?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).map_err(|e| e.to_string())?;
    let regs = kvm_bindings::kvm_regs { rip: 0x1000, rflags: 2, ..Default::default() };
    vcpu.set_regs(&regs).map_err(|e| e.to_string())?;
    let mut run = |n: u32| -> Result<f64, String> {
        let t = Instant::now();
        for _ in 0..n {
            match vcpu.run().map_err(|e| e.to_string())? {
                VcpuExit::IoOut(0x10, _) => {}
                other => return Err(format!("unexpected exit {other:?}")),
            }
        }
        Ok(t.elapsed().as_nanos() as f64 / f64::from(n))
    };
    run(1000)?;
    run(20_000)
}

/// VmRSS, RssShmem (ferry's guest RAM), RssFile and RssAnon, in KiB.
fn resident(mut cmd: Command, socket_wait: Option<&std::path::Path>) -> Option<[u64; 4]> {
    let child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().ok()?;
    let pid = child.id();
    let mut vm = Running::new(child);
    if let Some(s) = socket_wait {
        wait_for_path(s, Duration::from_secs(30));
    }
    vm.wait_line("TICK 3", Duration::from_secs(60))?;
    ferry_tests::proc_status_kib(pid, ["VmRSS", "RssShmem", "RssFile", "RssAnon"])
}

/// Two ferry VMs of this build at once, each as in [`resident`]: the
/// memory only each holds (guest RAM left out), in KiB. What the second
/// adds to a host is its private memory; the binary and the libraries it
/// maps are the first one's pages.
fn private_pair() -> Option<[u64; 2]> {
    let start = || {
        let child = Command::new(bin_dir().join("ferry"))
            .args(["run", "--memory", "256M", "--cmdline", "pattern=64 ticks=0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .ok()?;
        let pid = child.id();
        Some((pid, Running::new(child)))
    };
    let (mut a, mut b) = (start()?, start()?);
    a.1.wait_line("TICK 3", Duration::from_secs(60))?;
    b.1.wait_line("TICK 3", Duration::from_secs(60))?;
    let private = |pid| ferry_tests::private_kib_except(pid, "ferry-guest-ram");
    Some([private(a.0)?, private(b.0)?])
}

fn main() {
    let dir = TempDir::new("bench-boot");
    let guest = dir.path().join("guest.elf");
    ferry_tests::write_test_guest(&guest);
    let qemu = ferry_tests::qmp::qemu_installed();
    let mib = |kib: u64| kib as f64 / 1024.0;

    println!("Process start to the guest's first serial output (median of {RUNS}, 256 MiB, 1 vCPU)\n");
    println!("| VMM   | median ms | min ms | max ms |");
    println!("|-------|----------:|-------:|-------:|");
    let row = |name: &str, make: &dyn Fn() -> Command| {
        let runs: Result<Vec<f64>, String> = (0..RUNS).map(|_| time_to_marker(make())).collect();
        match runs {
            Ok(v) => {
                let (lo, hi) =
                    (v.iter().copied().fold(f64::INFINITY, f64::min), v.iter().copied().fold(0.0, f64::max));
                println!("| {name:<5} | {:>9.1} | {lo:>6.1} | {hi:>6.1} |", median(v));
            }
            Err(e) => println!("| {name:<5} | failed: {e} |"),
        }
    };
    row("ferry", &|| ferry_cmd("ready exit=0"));
    if qemu {
        row("qemu", &|| qemu_cmd(&guest, "ready exit=0"));
    }

    println!("\nOne port read, host side (best of 5 x 1M reads through ferry's bus)\n");
    match (dispatch(), exit_round_trip()) {
        (Ok((plugin, in_core)), exit) => {
            println!("| path | ns/access |");
            println!("|------|----------:|");
            println!("| bus -> debug-exit plugin (library, panic guard) | {plugin:>9.1} |");
            println!("| bus -> the same device compiled in | {in_core:>9.1} |");
            match exit {
                Ok(exit) => {
                    println!("| port-I/O exit round trip, minimal KVM guest | {exit:>9.1} |");
                    println!(
                        "\nplugin dispatch adds {:.1} ns = {:.3}% to an exit round trip ({:.3}% for the whole bus dispatch)",
                        plugin - in_core,
                        (plugin - in_core) / exit * 100.0,
                        plugin / exit * 100.0
                    );
                }
                Err(e) => println!("| port-I/O exit round trip | failed: {e} |"),
            }
        }
        (Err(e), _) => println!("dispatch: failed: {e}"),
    }

    println!("\nResident memory with the guest ticking (256 MiB RAM, pattern of 64 MiB written)\n");
    println!("| VMM   | VmRSS MiB | guest RAM resident MiB | VMM's own MiB | own: files (binary, libraries) | own: anonymous |");
    println!("|-------|----------:|-----------------------:|--------------:|-------------------------------:|---------------:|");
    let socket = dir.path().join("rss.sock");
    let mut ferry = Command::new(bin_dir().join("ferry"));
    ferry
        .args(["run", "--memory", "256M", "--api-socket"])
        .arg(&socket)
        .args(["--cmdline", "pattern=64 ticks=0"]);
    match resident(ferry, Some(&socket)) {
        // Guest RAM is a memfd: it is the shared part of the RSS.
        Some([total, shmem, file, anon]) => println!(
            "| ferry | {:>9.1} | {:>22.1} | {:>13.1} | {:>30.1} | {:>14.1} |",
            mib(total),
            mib(shmem),
            mib(total - shmem),
            mib(file),
            mib(anon)
        ),
        None => println!("| ferry | failed |"),
    }
    if qemu {
        // QEMU's RAM is anonymous memory: only the total is comparable.
        match resident(qemu_cmd(&guest, "pattern=64 ticks=0"), None) {
            Some([total, ..]) => {
                println!("| qemu  | {:>9.1} | (anonymous, not separable) | | | |", mib(total))
            }
            None => println!("| qemu  | failed |"),
        }
    } else {
        println!("\nQEMU is not installed (apt-get install qemu-system-x86): ferry's figures only.");
    }
    match private_pair() {
        Some([first, second]) => println!(
            "\nTwo ferry VMs at once, memory only each holds (Private_Clean + Private_Dirty outside guest RAM): \
             {:.1} MiB and {:.1} MiB",
            mib(first),
            mib(second)
        ),
        None => println!("\nTwo ferry VMs at once: failed to start"),
    }
    println!("\nGoal: ferry's own under 5 MiB (Firecracker's published figure for its own).");
}
