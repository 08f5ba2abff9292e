//! What device isolation costs, ferry beside QEMU, one run:
//!
//! 1. one guest port read, timed by the test guest with its TSC over `n`
//!    reads (`pio-bench=<port>:<n>`): a port nobody claims (the bare exit
//!    and the VMM's lookup), the debug-exit device in-process, and the same
//!    plugin in a device process (`--isolate debug-exit`), where each read
//!    crosses the control socket; QEMU reads the same unclaimed port and
//!    its own isa-debug-exit device;
//! 2. resident memory of each device process of a VM whose every device is
//!    isolated, split into the guest RAM it touched (shared with ferry),
//!    file-backed pages (the plugin and system libraries) and its own.
//!
//! 3. virtio-blk 4 KiB requests with the disk in-process and isolated,
//!    beside QEMU (the `virtio_blk` benchmark's table).
//!
//! ```sh
//! cargo build --release --workspace && cargo bench -p ferry-tests --bench isolation
//! ```
//!
//! `FERRY_BENCH_READS` sets `n` (default 20000); `FERRY_BENCH_REQUESTS`
//! and `FERRY_BENCH_ROUNDS` the virtio-blk runs (default 2000 requests, 9
//! rounds).

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use ferry_tests::{bin_dir, qmp::qemu_command, wait_for_path, Running, TempDir};

/// A port no device of either VMM claims.
const UNCLAIMED: u16 = 0x512;
/// The debug-exit device's port in both VMMs.
const DEBUG_EXIT: u16 = 0xf4;

/// Nanoseconds per read from a `PIO BENCH` line of `cmd`'s output.
fn ns_per_read(mut cmd: Command) -> Result<f64, String> {
    let out =
        cmd.stdin(Stdio::null()).output().map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    // QEMU's firmware prints without a newline before the guest starts.
    let line = stdout.lines().find_map(|l| l.find("PIO BENCH").map(|at| &l[at..])).ok_or_else(|| {
        let err = String::from_utf8_lossy(&out.stderr);
        format!("no PIO BENCH line: {}", err.lines().last().unwrap_or("").trim())
    })?;
    let field = |key: &str| -> Result<f64, String> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("no {key} in {line}"))
    };
    Ok(field("total_ns=")? / field("n=")?)
}

fn ferry_reads(isolate: Option<&str>, port: u16, n: u64) -> Command {
    let mut c = Command::new(bin_dir().join("ferry"));
    c.arg("run");
    if let Some(ids) = isolate {
        c.args(["--isolate", ids]);
    }
    c.args(["--cmdline", &format!("pio-bench={port:#x}:{n} exit=0")]);
    c
}

/// Start a VM with every device isolated and print each process's memory.
fn device_memory(dir: &Path) {
    let disk = dir.join("disk.img");
    if std::fs::write(&disk, vec![0u8; 16 << 20]).is_err() {
        println!("cannot write a disk image in {}", dir.display());
        return;
    }
    let socket = dir.join("rss.sock");
    let child = Command::new(bin_dir().join("ferry"))
        .args(["run", "--isolate", "all", "--memory", "256M", "--api-socket"])
        .arg(&socket)
        .args(["--disk", &format!("path={}", disk.display()), "--rng", "--cmdline"])
        .arg("pattern=64 blk-write=0:64:1 blk-verify=0:64:1 rng=64 ticks=0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let Ok(child) = child else {
        println!("cannot start ferry");
        return;
    };
    let pid = child.id();
    let mut vm = Running::new(child);
    if !wait_for_path(&socket, Duration::from_secs(60))
        || vm.wait_line("TICK 3", Duration::from_secs(60)).is_none()
    {
        println!("the guest did not get going: {}", vm.finish(Duration::ZERO).stderr);
        return;
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "| process | VmRSS MiB | guest RAM touched (shared) MiB | libraries (file) MiB | own (anon) MiB |"
    );
    println!(
        "|---------|----------:|-------------------------------:|---------------------:|---------------:|"
    );
    let row = |name: &str, pid: u32| match ferry_tests::proc_status_kib(
        pid,
        ["VmRSS", "RssAnon", "RssFile", "RssShmem"],
    ) {
        Some([total, anon, file, shmem]) => println!(
            "| {name} | {:>9.1} | {:>30.1} | {:>20.1} | {:>14.1} |",
            mib(total),
            mib(shmem),
            mib(file),
            mib(anon)
        ),
        None => println!("| {name} | gone |"),
    };
    row("ferry", pid);
    for (kid, id) in ferry_tests::device_processes(pid) {
        row(&format!("device process: {id}"), kid as u32);
    }
}

fn main() {
    let n: u64 = std::env::var("FERRY_BENCH_READS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let dir = TempDir::new("bench-isolation");
    let guest = dir.path().join("guest.elf");
    ferry_tests::write_test_guest(&guest);
    let qemu = ferry_tests::qmp::qemu_installed();

    println!("One guest port read, guest-timed over {n} reads (256 MiB, 1 vCPU)\n");
    println!("| VMM   | port answered by | µs/read |");
    println!("|-------|------------------|--------:|");
    let mut rows: Vec<(&str, &str, Command)> = vec![
        ("ferry", "nobody (bare exit)", ferry_reads(None, UNCLAIMED, n)),
        ("ferry", "debug-exit in-process", ferry_reads(None, DEBUG_EXIT, n)),
        ("ferry", "debug-exit isolated", ferry_reads(Some("debug-exit"), DEBUG_EXIT, n)),
    ];
    if qemu {
        rows.push((
            "qemu",
            "nobody (bare exit)",
            qemu_command(&guest, "256M", &format!("pio-bench={UNCLAIMED:#x}:{n} exit=0")),
        ));
        rows.push((
            "qemu",
            "isa-debug-exit",
            qemu_command(&guest, "256M", &format!("pio-bench={DEBUG_EXIT:#x}:{n} exit=0")),
        ));
    }
    let mut ferry_us = Vec::new();
    for (vmm, what, cmd) in rows {
        match ns_per_read(cmd) {
            Ok(ns) => {
                if vmm == "ferry" {
                    ferry_us.push(ns / 1e3);
                }
                println!("| {vmm:<5} | {what:<16} | {:>7.2} |", ns / 1e3);
            }
            Err(e) => println!("| {vmm:<5} | {what:<16} | failed: {e} |"),
        }
    }
    if let [bare, inproc, isolated] = ferry_us[..] {
        println!(
            "\nin-process dispatch adds {:.2} µs to the bare exit; a device process adds {:.2} µs more (one socket round trip)",
            inproc - bare,
            isolated - inproc
        );
    }
    if !qemu {
        println!("\nQEMU is not installed (apt-get install qemu-system-x86): ferry's figures only.");
    }

    println!(
        "\nResident memory with every device isolated (256 MiB RAM, 64 MiB pattern, disk and rng used)\n"
    );
    device_memory(dir.path());

    println!();
    ferry_tests::blk_bench::table(&guest, dir.path());
}
