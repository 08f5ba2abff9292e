//! Snapshot and restore, ferry beside QEMU, same test guest, one run:
//! snapshot write time and file size, and restore time to a running guest,
//! for 512 MiB, 2 GiB and 16 GiB guests (ferry restores each seven times:
//! the median and the range).
//!
//! ```sh
//! cargo build --release --workspace && cargo bench -p ferry-tests --bench snapshot
//! ```
//!
//! The guest fills 64 MiB with a pattern and ticks. Ferry: `ferry ctl
//! snapshot` (the time the guest was paused, as ferry reports it) and
//! `ferry run --restore` (ferry's own log: milliseconds from process start
//! to the vCPUs starting). QEMU (`qemu-system-x86`): `migrate` to
//! `exec:cat > FILE` over QMP (its reported total time), and `-incoming
//! exec:cat FILE` (time from process start until QMP reports `running`).

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use ferry_tests::{
    bin_dir, ctl,
    qmp::{qemu_command, Qmp},
    wait_for_path, Running, TempDir,
};

const GUEST: &str = "pattern=64 ticks=0";

/// Restores per size; the table gives their median and range.
const RESTORES: usize = 7;

fn ferry_snapshot(dir: &Path, memory: &str) -> Result<(f64, u64, Vec<f64>), String> {
    let socket = dir.join(format!("ferry-{memory}.sock"));
    let snap = dir.join(format!("ferry-{memory}.snap"));
    let ferry = bin_dir().join("ferry");
    let child = Command::new(&ferry)
        .args(["run", "--memory", memory, "--api-socket"])
        .arg(&socket)
        .args(["--cmdline", GUEST])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut vm = Running::new(child);
    if !wait_for_path(&socket, Duration::from_secs(30))
        || vm.wait_line("TICK 2", Duration::from_secs(60)).is_none()
    {
        return Err("ferry guest did not start".into());
    }
    let report = ctl(&socket, &["snapshot", &snap.display().to_string()]);
    ctl(&socket, &["shutdown"]);
    vm.finish(Duration::from_secs(30));
    let field = |k: &str| -> f64 {
        report
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("\"{k}\": ")))
            .and_then(|v| v.trim_end_matches(',').parse().ok())
            .unwrap_or(f64::NAN)
    };
    let size = std::fs::metadata(&snap).map(|m| m.len()).unwrap_or(0);
    let mut restores: Vec<f64> = (0..RESTORES).map(|_| ferry_restore(&ferry, &snap)).collect();
    restores.sort_by(f64::total_cmp);
    let _ = std::fs::remove_file(&snap);
    Ok((field("paused_ms"), size, restores))
}

/// Restore `snap` once: the time from process start to the vCPUs
/// starting, from ferry's log.
fn ferry_restore(ferry: &Path, snap: &Path) -> f64 {
    let Ok(mut restored) = Command::new(ferry)
        .args(["run", "--restore"])
        .arg(snap)
        .env("FERRY_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
    else {
        return f64::NAN;
    };
    let Some(stderr) = restored.stderr.take() else { return f64::NAN };
    let mut err = BufReader::new(stderr);
    let mut restore_ms = f64::NAN;
    let mut line = String::new();
    while err.read_line(&mut line).unwrap_or(0) > 0 {
        if let Some(rest) = line.split("vCPUs started ").nth(1) {
            restore_ms = rest.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
            break;
        }
        line.clear();
    }
    let _ = restored.kill();
    let _ = restored.wait();
    restore_ms
}

fn qemu_cmd(guest: &Path, memory: &str, qmp: &Path) -> Command {
    let mut c = qemu_command(guest, memory, GUEST);
    c.arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn qemu_snapshot(dir: &Path, guest: &Path, memory: &str) -> Result<(f64, u64, f64), String> {
    let qmp_path = dir.join(format!("qemu-{memory}.qmp"));
    let snap = dir.join(format!("qemu-{memory}.snap"));
    let mut vm = Running::new(qemu_cmd(guest, memory, &qmp_path).spawn().map_err(|e| e.to_string())?);
    if vm.wait_line("TICK 2", Duration::from_secs(120)).is_none() {
        // QEMU's firmware banner shares the line with the first output.
        return Err("QEMU guest did not tick".into());
    }
    let mut qmp = Qmp::connect(&qmp_path)?;
    qmp.cmd(&format!(r#"{{"execute":"migrate","arguments":{{"uri":"exec:cat > {}"}}}}"#, snap.display()))?;
    let total_ms = loop {
        let l = qmp.cmd(r#"{"execute":"query-migrate"}"#)?;
        if l.contains("\"completed\"") {
            break l
                .split("\"total-time\": ")
                .nth(1)
                .and_then(|v| v.split([',', '}']).next())
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(f64::NAN);
        }
        if l.contains("\"failed\"") {
            return Err(format!("QEMU migrate failed: {l}"));
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let _ = qmp.cmd(r#"{"execute":"quit"}"#);
    drop(vm);
    let size = std::fs::metadata(&snap).map(|m| m.len()).unwrap_or(0);

    let qmp2 = dir.join(format!("qemu-{memory}-in.qmp"));
    let start = Instant::now();
    let mut cmd = qemu_cmd(guest, memory, &qmp2);
    cmd.arg("-incoming").arg(format!("exec:cat {}", snap.display()));
    let child = Running::new(cmd.spawn().map_err(|e| e.to_string())?);
    let mut q = Qmp::connect(&qmp2)?;
    let restore_ms = loop {
        let l = q.cmd(r#"{"execute":"query-status"}"#)?;
        if l.contains("\"running\": true") {
            break start.elapsed().as_secs_f64() * 1e3;
        }
        if start.elapsed() > Duration::from_secs(60) {
            return Err("QEMU restore did not finish".into());
        }
    };
    let _ = q.cmd(r#"{"execute":"quit"}"#);
    drop(child);
    let _ = std::fs::remove_file(&snap);
    Ok((total_ms, size, restore_ms))
}

fn main() {
    let dir = TempDir::new("bench-snap");
    let guest = dir.path().join("guest.elf");
    ferry_tests::write_test_guest(&guest);
    let qemu = ferry_tests::qmp::qemu_installed();

    println!("Snapshot and restore, test guest with 64 MiB of pattern, ticking\n");
    println!("| VMM   | RAM     | snapshot ms | file size | restore to running ms |");
    println!("|-------|---------|------------:|----------:|----------------------:|");
    let mut medians = Vec::new();
    for memory in ["512M", "2G", "16G"] {
        match ferry_snapshot(dir.path(), memory) {
            Ok((ms, size, restores)) => {
                let median = restores[restores.len() / 2];
                let range = format!("{median:.1} ({:.1}-{:.1})", restores[0], restores[restores.len() - 1]);
                println!("| ferry | {memory:<7} | {ms:>11.1} | {:>9} | {range:>21} |", human(size));
                medians.push(median);
            }
            Err(e) => println!("| ferry | {memory:<7} | failed: {e} |"),
        }
        if qemu {
            match qemu_snapshot(dir.path(), &guest, memory) {
                Ok((ms, size, restore)) => {
                    println!("| qemu  | {memory:<7} | {ms:>11.1} | {:>9} | {restore:>21.1} |", human(size))
                }
                Err(e) => println!("| qemu  | {memory:<7} | failed: {e} |"),
            }
        }
    }
    if let [small, mid, large] = medians[..] {
        println!(
            "\nferry restore to running, median of {RESTORES} (range): 2 GiB / 512 MiB {:.2}, 16 GiB / 512 MiB {:.2}",
            mid / small,
            large / small
        );
    }
    if !qemu {
        println!("\nQEMU is not installed (apt-get install qemu-system-x86): ferry's figures only.");
    }
}

fn human(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}
