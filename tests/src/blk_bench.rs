//! virtio-blk 4 KiB requests in ferry (the disk in-process and in a device
//! process of its own, `--isolate disk0`) and in QEMU, on the same test
//! guest and image: requests per second, host CPU per request and the
//! guest-measured notify-to-completion latency. The `virtio_blk` and
//! `isolation` benchmarks print this table.
//!
//! Host CPU per request is the VMM process's user+system time for a run of
//! N requests minus that of a run of N/10, over the difference, so boot and
//! firmware costs cancel out; a device process is ferry's child, reaped by
//! it, so its CPU time reaches `RUSAGE_CHILDREN` with ferry's. Rounds
//! interleave the VMMs, so a slow spell of the machine hits them alike;
//! each row is the median of its rounds, with their range of requests/s.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use crate::{bin_dir, qmp::qemu_command};

#[derive(Debug, Clone, Copy)]
pub struct Sample {
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

/// The median of `v` (not empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Builds a VMM command line for a guest command line.
type MakeCommand<'a> = dyn Fn(&str) -> Command + 'a;

/// Figures for one VMM and one operation: the long run, and CPU per request
/// from the long run minus the short one.
fn measure(make: &MakeCommand<'_>, op: &str, n: u64) -> Result<(Sample, f64), String> {
    measure_at(make, op, n, 1, None).map(|(s, cpu, _)| (s, cpu))
}

/// [`measure`] with `depth` requests in flight; with `backend` (a process
/// id), that process's CPU per request too.
fn measure_at(
    make: &MakeCommand<'_>,
    op: &str,
    n: u64,
    depth: u64,
    backend: Option<u32>,
) -> Result<(Sample, f64, f64), String> {
    let short = (n / 10).max(1);
    let token = |count: u64| match depth {
        1 => format!("blk-bench={op}:{count} exit=0"),
        d => format!("blk-bench={op}:{count}:{d} exit=0"),
    };
    let b0 = backend.map(process_cpu_us).unwrap_or(0.0);
    let small = run(make(&token(short)))?;
    let b1 = backend.map(process_cpu_us).unwrap_or(0.0);
    let big = run(make(&token(n)))?;
    let b2 = backend.map(process_cpu_us).unwrap_or(0.0);
    let per = |a: f64, b: f64| (a - b) / (big.n - small.n) as f64;
    Ok((big, per(big.cpu_us, small.cpu_us), per(b2 - b1, b1 - b0)))
}

/// A running process's user+system CPU time (µs), from /proc (10 ms steps).
fn process_cpu_us(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is 3rd,
    // utime the 14th and stime the 15th of the whole line.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest.split_whitespace().filter_map(|v| v.parse().ok()).collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    // `rest` starts at field 3 (state, not a number, so skipped): utime and
    // stime are fields 14 and 15, the 11th and 12th numbers here.
    f.get(10).zip(f.get(11)).map_or(0.0, |(u, s)| (u + s) / hz * 1e6)
}

/// Requests per run and rounds: `FERRY_BENCH_REQUESTS` (default 2000) and
/// `FERRY_BENCH_ROUNDS` (default 9).
pub fn settings() -> (u64, usize) {
    let n = std::env::var("FERRY_BENCH_REQUESTS").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    let rounds = std::env::var("FERRY_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(9usize);
    (n, rounds.max(1))
}

/// Write a 64 MiB image of real data (not sparse, so reads hit the page
/// cache in every VMM) in `dir`.
fn image(dir: &Path) -> PathBuf {
    let image = dir.join("bench.img");
    let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    let mut data = Vec::with_capacity(64 << 20);
    for _ in 0..64 {
        data.extend_from_slice(&chunk);
    }
    std::fs::write(&image, &data).expect("write image");
    image
}

/// Print the table for ferry, ferry with the disk isolated and (if it is
/// installed) QEMU booting `guest`, with an image in `dir`; then how the
/// isolated disk compares with the in-process one.
pub fn table(guest: &Path, dir: &Path) {
    let (n, rounds) = settings();
    let image = image(dir);
    let qemu = crate::qmp::qemu_installed();
    println!(
        "virtio-blk, 4 KiB requests, one in flight, {n} requests per run, same guest and image, median of {rounds} rounds\n"
    );
    println!("| VMM            | op    | requests/s | range of rounds | host CPU µs/request | notify→completion avg µs | min µs |");
    println!("|----------------|-------|-----------:|----------------:|--------------------:|-------------------------:|-------:|");
    let ferry_make = |t: &str| ferry_cmd(&image, false, t);
    let isolated_make = |t: &str| ferry_cmd(&image, true, t);
    let qemu_make = |t: &str| qemu_cmd(guest, &image, t);
    let mut vmms: Vec<(&str, &MakeCommand<'_>)> =
        vec![("ferry", &ferry_make), ("ferry isolated", &isolated_make)];
    if qemu {
        vmms.push(("qemu", &qemu_make));
    }
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
}

fn qemu_vhost_cmd(guest: &Path, socket: &str, tokens: &str) -> Command {
    let mut c = qemu_command(guest, "256M", tokens);
    c.args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on", "-machine", "memory-backend=mem"])
        .args(["-chardev", &format!("socket,id=c0,path={socket}")])
        .args(["-device", "vhost-user-blk-pci,chardev=c0,num-queues=1,disable-legacy=on"]);
    c
}

fn ferry_vhost_cmd(socket: &str, tokens: &str) -> Command {
    let mut c = Command::new(bin_dir().join("ferry"));
    c.args(["run", "--vhost-user", &format!("type=blk,socket={socket}"), "--cmdline", tokens]);
    c
}

/// Print the vhost-user-blk table: 4 KiB reads and writes, one in flight
/// and 16, through one qemu-storage-daemon (`socket`, process `daemon`)
/// fronted by ferry and by QEMU (if installed), and ferry's own virtio-blk
/// on the same image; then ferry's vhost-user-blk against QEMU's.
pub fn vhost_table(guest: &Path, image: &Path, socket: &str, daemon: u32) {
    let (n, rounds) = settings();
    let qemu = crate::qmp::qemu_installed();
    println!(
        "4 KiB requests, {n} per run, same guest and image, median of {rounds} rounds; VMM CPU is the VMM \
         process's, backend CPU qemu-storage-daemon's (10 ms steps)\n"
    );
    println!("| VMM                      | op    | depth | requests/s | range of rounds | VMM CPU µs/req | backend CPU µs/req | avg µs |");
    println!("|--------------------------|-------|------:|-----------:|----------------:|---------------:|-------------------:|-------:|");
    let own = |t: &str| ferry_cmd(image, false, t);
    let ferry_vhost = |t: &str| ferry_vhost_cmd(socket, t);
    let qemu_vhost = |t: &str| qemu_vhost_cmd(guest, socket, t);
    let mut vmms: Vec<(&str, &MakeCommand<'_>, Option<u32>)> =
        vec![("ferry vhost-user-blk", &ferry_vhost, Some(daemon)), ("ferry virtio-blk (own)", &own, None)];
    if qemu {
        vmms.insert(1, ("qemu vhost-user-blk-pci", &qemu_vhost, Some(daemon)));
    }
    let mut rows: Vec<(&str, &str, u64, f64, f64)> = Vec::new();
    for depth in [1u64, 16] {
        for op in ["r", "w"] {
            let mut samples: Vec<Vec<(f64, f64, f64, f64)>> = vec![Vec::new(); vmms.len()];
            let mut failed: Vec<Option<String>> = vec![None; vmms.len()];
            for _ in 0..rounds {
                for (i, (_, make, backend)) in vmms.iter().enumerate() {
                    match measure_at(*make, op, n, depth, *backend) {
                        Ok((s, cpu, bcpu)) => {
                            samples[i].push((s.n as f64 / (s.total_us / 1e6), cpu, bcpu, s.avg_us))
                        }
                        Err(e) => failed[i] = Some(e.lines().next().unwrap_or("").to_string()),
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            let what = if op == "r" { "read" } else { "write" };
            for (i, (name, _, backend)) in vmms.iter().enumerate() {
                if let Some(e) = &failed[i] {
                    println!("| {name:<24} | {what:<5} | {depth:>5} | failed: {e} |");
                    continue;
                }
                let col = |f: fn(&(f64, f64, f64, f64)) -> f64| median(samples[i].iter().map(f).collect());
                let (rate, cpu, bcpu, avg) = (col(|s| s.0), col(|s| s.1), col(|s| s.2), col(|s| s.3));
                let rates = samples[i].iter().map(|s| s.0);
                let (lo, hi) = (rates.clone().fold(f64::INFINITY, f64::min), rates.fold(0.0, f64::max));
                let range = format!("{lo:.0}-{hi:.0}");
                let bcpu = if backend.is_some() { format!("{bcpu:.1}") } else { "-".into() };
                println!("| {name:<24} | {what:<5} | {depth:>5} | {rate:>10.0} | {range:>15} | {cpu:>14.1} | {bcpu:>18} | {avg:>6.1} |");
                rows.push((name, op, depth, rate, cpu));
            }
        }
    }
    println!();
    let find = |name: &str, op: &str, depth: u64| {
        rows.iter().find(|r| r.0 == name && r.1 == op && r.2 == depth).map(|r| (r.3, r.4))
    };
    for depth in [1u64, 16] {
        for (op, what) in [("r", "reads"), ("w", "writes")] {
            if let (Some((f_rate, f_cpu)), Some((q_rate, q_cpu))) =
                (find("ferry vhost-user-blk", op, depth), find("qemu vhost-user-blk-pci", op, depth))
            {
                println!(
                    "vhost-user-blk, {what}, depth {depth}: ferry {:.1}% of QEMU's requests/s (goal: at least 95%), \
                     VMM CPU per request {:.1} µs vs {:.1} µs ({:+.1}%; goal: at most +5%)",
                    f_rate / q_rate * 100.0,
                    f_cpu,
                    q_cpu,
                    (f_cpu / q_cpu - 1.0) * 100.0
                );
            }
        }
    }
    if !qemu {
        println!("\nQEMU is not installed (apt-get install qemu-system-x86): ferry's figures only.");
    }
}

/// The 64 MiB benchmark image, in `dir` (for the vhost-user table).
pub fn bench_image(dir: &Path) -> PathBuf {
    image(dir)
}
