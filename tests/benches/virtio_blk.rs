//! virtio-blk, ferry beside QEMU, on the same test guest and the same image
//! file, in one run: requests per second and host CPU time per request for
//! 4 KiB reads and writes, and the guest-measured notify-to-completion
//! latency. Ferry runs twice: the disk device in-process, and in a device
//! process of its own (`--isolate disk0`), whose CPU time is counted too.
//!
//! ```sh
//! cargo build --release --workspace && cargo bench -p ferry-tests --bench virtio_blk
//! ```
//!
//! `FERRY_BENCH_REQUESTS` sets the request count (default 2000),
//! `FERRY_BENCH_ROUNDS` the rounds (default 9; every row is the median of
//! its rounds, with the range of requests/s beside it, and the rounds
//! interleave the VMMs). Host CPU
//! per request is the VMM process's user+system time for a run of N
//! requests minus that of a run of N/10, over the difference, so boot and
//! firmware costs cancel out. QEMU (Debian's `qemu-system-x86`) runs the
//! same guest ELF (`ferry test-guest`) with a modern-only virtio-blk-pci on
//! the same raw image; without it, only ferry's figures are printed.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use ferry_tests::{bin_dir, qmp::qemu_command, TempDir};

#[derive(Debug, Clone, Copy)]
struct Sample {
    total_us: f64,
    avg_us: f64,
    min_us: f64,
    cpu_us: f64,
    n: u64,
}

fn children_cpu_us() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn field(line: &str, key: &str) -> Option<f64> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)).and_then(|v| v.parse().ok())
}

/// Run one VMM command; returns the BLK BENCH figures and the process's CPU time.
fn run(mut cmd: Command) -> Result<Sample, String> {
    let before = children_cpu_us();
    let out =
        cmd.stdin(Stdio::null()).output().map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    let cpu_us = children_cpu_us() - before;
    let stdout = String::from_utf8_lossy(&out.stdout);
    // QEMU's firmware prints without a newline before the guest starts.
    let line = stdout.lines().find_map(|l| l.find("BLK BENCH").map(|at| &l[at..])).ok_or_else(|| {
        format!("no BLK BENCH line; stdout:\n{stdout}\nstderr:\n{}", String::from_utf8_lossy(&out.stderr))
    })?;
    if field(line, "status_errors=").unwrap_or(1.0) != 0.0 {
        return Err(format!("requests failed: {line}"));
    }
    Ok(Sample {
        total_us: field(line, "total_us=").ok_or("total_us")?,
        avg_us: field(line, "avg_us=").ok_or("avg_us")?,
        min_us: field(line, "min_us=").ok_or("min_us")?,
        n: field(line, "n=").ok_or("n")? as u64,
        cpu_us,
    })
}

fn ferry_cmd(image: &Path, isolate: bool, tokens: &str) -> Command {
    let mut c = Command::new(bin_dir().join("ferry"));
    c.arg("run");
    if isolate {
        // The device process is ferry's child, reaped by it: its CPU time
        // reaches RUSAGE_CHILDREN with ferry's.
        c.args(["--isolate", "disk0"]);
    }
    c.args(["--disk", &format!("path={}", image.display()), "--cmdline", tokens]);
    c
}

fn qemu_cmd(guest: &Path, image: &Path, tokens: &str) -> Command {
    let mut c = qemu_command(guest, "256M", tokens);
    c.arg("-drive")
        .arg(format!("file={},format=raw,if=none,id=d0", image.display()))
        .args(["-device", "virtio-blk-pci,drive=d0,disable-legacy=on"]);
    c
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Builds a VMM command line for a guest command line.
type MakeCommand<'a> = dyn Fn(&str) -> Command + 'a;

/// Figures for one VMM and one operation: the long run, and CPU per request
/// from the long run minus the short one.
fn measure(make: &MakeCommand<'_>, op: &str, n: u64) -> Result<(Sample, f64), String> {
    let short = (n / 10).max(1);
    let small = run(make(&format!("blk-bench={op}:{short} exit=0")))?;
    let big = run(make(&format!("blk-bench={op}:{n} exit=0")))?;
    let cpu_per_req = (big.cpu_us - small.cpu_us) / (big.n - small.n) as f64;
    Ok((big, cpu_per_req))
}

fn main() {
    let n: u64 = std::env::var("FERRY_BENCH_REQUESTS").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    let rounds: usize =
        std::env::var("FERRY_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(9).max(1);
    let dir = TempDir::new("bench-blk");
    let image: PathBuf = dir.path().join("bench.img");
    // 64 MiB of real data (not sparse), so reads hit the page cache in both VMMs.
    let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    let mut data = Vec::with_capacity(64 << 20);
    for _ in 0..64 {
        data.extend_from_slice(&chunk);
    }
    std::fs::write(&image, &data).expect("write image");
    let guest = dir.path().join("guest.elf");
    ferry_tests::write_test_guest(&guest);

    let qemu = ferry_tests::qmp::qemu_installed();
    println!(
        "virtio-blk, 4 KiB requests, one in flight, {n} requests per run, same guest and image, median of {rounds} rounds\n"
    );
    println!("| VMM            | op    | requests/s | range of rounds | host CPU µs/request | notify→completion avg µs | min µs |");
    println!("|----------------|-------|-----------:|----------------:|--------------------:|-------------------------:|-------:|");
    let ferry_make = |t: &str| ferry_cmd(&image, false, t);
    let isolated_make = |t: &str| ferry_cmd(&image, true, t);
    let qemu_make = |t: &str| qemu_cmd(&guest, &image, t);
    let mut vmms: Vec<(&str, &MakeCommand<'_>)> =
        vec![("ferry", &ferry_make), ("ferry isolated", &isolated_make)];
    if qemu {
        vmms.push(("qemu", &qemu_make));
    }
    // Rounds interleave the VMMs, so a slow spell of the machine hits them
    // alike; each row is the median of its rounds.
    let mut medians: Vec<(&str, &str, f64, f64, f64)> = Vec::new();
    for op in ["r", "w"] {
        let mut samples: Vec<Vec<(f64, f64, f64, f64)>> = vec![Vec::new(); vmms.len()];
        let mut failed: Vec<Option<String>> = vec![None; vmms.len()];
        for _ in 0..rounds {
            for (i, (_, make)) in vmms.iter().enumerate() {
                match measure(*make, op, n) {
                    Ok((s, cpu)) => {
                        samples[i].push((s.n as f64 / (s.total_us / 1e6), cpu, s.avg_us, s.min_us))
                    }
                    Err(e) => failed[i] = Some(e.lines().next().unwrap_or("").to_string()),
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        for (i, (name, _)) in vmms.iter().enumerate() {
            let what = if op == "r" { "read" } else { "write" };
            if let Some(e) = &failed[i] {
                println!("| {name:<14} | {what:<5} | failed: {e} |");
                continue;
            }
            let col = |f: fn(&(f64, f64, f64, f64)) -> f64| median(samples[i].iter().map(f).collect());
            let (rate, cpu, avg, min) = (col(|s| s.0), col(|s| s.1), col(|s| s.2), col(|s| s.3));
            let rates = samples[i].iter().map(|s| s.0);
            let (lo, hi) = (rates.clone().fold(f64::INFINITY, f64::min), rates.fold(0.0, f64::max));
            medians.push((name, op, rate, avg, min));
            let range = format!("{lo:.0}-{hi:.0}");
            println!(
                "| {name:<14} | {what:<5} | {rate:>10.0} | {range:>15} | {cpu:>19.1} | {avg:>24.1} | {min:>6.1} |"
            );
        }
    }
    let find =
        |name: &str, op: &str| medians.iter().find(|r| r.0 == name && r.1 == op).map(|r| (r.2, r.3, r.4));
    println!();
    for (op, what) in [("r", "reads"), ("w", "writes")] {
        if let (Some((inproc, lat_in, min_in)), Some((iso, lat_iso, min_iso))) =
            (find("ferry", op), find("ferry isolated", op))
        {
            println!(
                "isolated disk0, {what}: {:.1}% of in-process requests/s (goal: within 5%), latency avg {:+.1} µs, min {:+.1} µs",
                iso / inproc * 100.0,
                lat_iso - lat_in,
                min_iso - min_in
            );
        }
    }
    if !qemu {
        println!("\nQEMU is not installed (apt-get install qemu-system-x86): ferry's figures only.");
    }
    println!("\nThe guest's instructions are emulated on hosts with a nested, emulating KVM; the");
    println!("guest-side driver cost is the same for both VMMs, the difference is the VMM's.");
}
