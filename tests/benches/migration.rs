//! Live migration, ferry beside QEMU, on the same test guest over the same
//! loopback TCP, default settings, one run: 512 MiB and 2 GiB guests, idle
//! and dirtying about 100 MB/s; total time, downtime, bytes sent. Ferry
//! moves each guest twice, over mutual TLS 1.3 (credentials from `ferry
//! tls init`) and over plaintext TCP (`--insecure-tcp`), and prints the
//! ratio; QEMU's row is its default plaintext TCP.
//!
//! ```sh
//! cargo build --release --workspace && cargo bench -p ferry-tests --bench migration
//! ```
//!
//! The guest fills 64 MiB with a pattern, then ticks; "dirtying" adds 26
//! pages per 1 kHz timer interrupt (about 100 MB/s of dirtied memory).
//! Ferry's figures come from `ferry ctl migrate`'s report (downtime: source
//! paused to the destination's RESUMED); QEMU's from `query-migrate`
//! (`total-time`, `downtime`, `ram.transferred`).

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use ferry_tests::{
    bin_dir, free_port,
    qmp::{qemu_command, Qmp},
    wait_for_path, Running, TempDir,
};

const IDLE: &str = "pattern=64 ticks=0";
const DIRTY: &str = "pattern=64 dirty=26 hz=1000 ticks=0";

/// How ferry's two ends are connected.
enum Transport<'a> {
    /// Plaintext TCP on loopback (`--insecure-tcp`).
    Plain,
    /// Mutual TLS on loopback, both ends using one host's credentials.
    Tls(&'a Path),
    /// A unix socket (the memfd hand-over).
    Unix,
}

struct Figures {
    total_ms: f64,
    downtime_ms: f64,
    bytes: f64,
}

fn field(json: &str, key: &str) -> f64 {
    json.split(&format!("\"{key}\": "))
        .nth(1)
        .and_then(|v| v.split([',', '\n', '}']).next())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

fn spawn(cmd: &mut Command) -> Result<Running, String> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.spawn().map(Running::new).map_err(|e| e.to_string())
}

fn ferry(dir: &Path, memory: &str, guest: &str, transport: &Transport) -> Result<Figures, String> {
    let ferry = bin_dir().join("ferry");
    let (uri, security): (String, Vec<String>) = match transport {
        Transport::Unix => (format!("unix:{}", dir.join(format!("mig-{memory}.sock")).display()), vec![]),
        Transport::Plain => (format!("tcp:127.0.0.1:{}", free_port()), vec!["--insecure-tcp".into()]),
        Transport::Tls(creds) => {
            (format!("tcp:127.0.0.1:{}", free_port()), vec!["--tls-dir".into(), creds.display().to_string()])
        }
    };
    let dst = spawn(Command::new(&ferry).args(["run", "--incoming", &uri]).args(&security))?;
    std::thread::sleep(Duration::from_millis(300));
    let socket = dir.join(format!("src-{memory}.sock"));
    let mut src = spawn(
        Command::new(&ferry)
            .args(["run", "--memory", memory, "--api-socket"])
            .arg(&socket)
            .args(["--cmdline", guest]),
    )?;
    if !wait_for_path(&socket, Duration::from_secs(30))
        || src.wait_line("TICK 2", Duration::from_secs(60)).is_none()
    {
        return Err("ferry guest did not start".into());
    }
    let out = Command::new(&ferry)
        .arg("ctl")
        .arg("--api-socket")
        .arg(&socket)
        .args(["migrate", &uri])
        .args(&security)
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    drop(src);
    drop(dst);
    Ok(Figures {
        total_ms: field(&text, "total_ms"),
        downtime_ms: field(&text, "downtime_ms"),
        bytes: field(&text, "bytes_sent"),
    })
}

fn qemu_cmd(guest_elf: &Path, memory: &str, guest: &str, qmp: &Path) -> Command {
    let mut c = qemu_command(guest_elf, memory, guest);
    c.arg("-qmp").arg(format!("unix:{},server=on,wait=off", qmp.display()));
    c
}

fn qemu(dir: &Path, guest_elf: &Path, memory: &str, guest: &str) -> Result<Figures, String> {
    let port = free_port();
    let (qs, qd) = (dir.join(format!("qs-{memory}.qmp")), dir.join(format!("qd-{memory}.qmp")));
    let _dst =
        spawn(qemu_cmd(guest_elf, memory, guest, &qd).arg("-incoming").arg(format!("tcp:127.0.0.1:{port}")))?;
    let mut src = spawn(&mut qemu_cmd(guest_elf, memory, guest, &qs))?;
    if src.wait_line("TICK 2", Duration::from_secs(120)).is_none() {
        return Err("QEMU guest did not tick".into());
    }
    let mut q = Qmp::connect(&qs)?;
    q.cmd(&format!(r#"{{"execute":"migrate","arguments":{{"uri":"tcp:127.0.0.1:{port}"}}}}"#))?;
    loop {
        let l = q.cmd(r#"{"execute":"query-migrate"}"#)?;
        if l.contains("\"status\": \"completed\"") {
            let total = field(&l, "total-time");
            let down = field(&l, "downtime");
            let bytes = l
                .split("\"transferred\": ")
                .nth(1)
                .and_then(|v| v.split([',', '}']).next())
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(f64::NAN);
            let _ = q.cmd(r#"{"execute":"quit"}"#);
            return Ok(Figures { total_ms: total, downtime_ms: down, bytes });
        }
        if l.contains("\"failed\"") {
            return Err(format!("QEMU migration failed: {l}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn main() {
    let dir = TempDir::new("bench-mig");
    let guest_elf = dir.path().join("guest.elf");
    ferry_tests::write_test_guest(&guest_elf);
    let have_qemu = ferry_tests::qmp::qemu_installed();
    let fleet = dir.path().join("tls");
    let made = Command::new(bin_dir().join("ferry"))
        .args(["tls", "init"])
        .arg(&fleet)
        .args(["--host", "127.0.0.1"])
        .output()
        .map_err(|e| e.to_string())
        .and_then(
            |o| if o.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&o.stderr).into()) },
        );
    if let Err(e) = made {
        println!("ferry tls init failed: {e}");
        return;
    }
    let creds = fleet.join("127.0.0.1");
    println!("Live migration over loopback TCP, test guest with 64 MiB of pattern\n");
    println!("| VMM   | transport | RAM  | guest    | total ms | downtime ms | MiB sent |");
    println!("|-------|-----------|------|----------|---------:|------------:|---------:|");
    let mut ratios = Vec::new();
    for memory in ["512M", "2G"] {
        for (name, guest) in [("idle", IDLE), ("dirtying", DIRTY)] {
            let tls = ferry(dir.path(), memory, guest, &Transport::Tls(&creds));
            let plain = ferry(dir.path(), memory, guest, &Transport::Plain);
            if let (Ok(t), Ok(p)) = (&tls, &plain) {
                ratios.push(format!(
                    "{memory} {name}: total {:.2}x, downtime {:.2}x",
                    t.total_ms / p.total_ms,
                    t.downtime_ms / p.downtime_ms
                ));
            }
            let mut rows: Vec<(&str, &str, Result<Figures, String>)> =
                vec![("ferry", "TLS 1.3", tls), ("ferry", "plaintext", plain)];
            if have_qemu {
                rows.push(("qemu", "plaintext", qemu(dir.path(), &guest_elf, memory, guest)));
            }
            for (vmm, via, r) in rows {
                match r {
                    Ok(f) => println!(
                        "| {vmm:<5} | {via:<9} | {memory:<4} | {name:<8} | {:>8.1} | {:>11.1} | {:>8.1} |",
                        f.total_ms,
                        f.downtime_ms,
                        f.bytes / 1048576.0
                    ),
                    Err(e) => println!("| {vmm:<5} | {via:<9} | {memory:<4} | {name:<8} | failed: {e} |"),
                }
            }
        }
    }
    println!("\nFerry over TLS / over plaintext (goal: within 1.10x):");
    for r in &ratios {
        println!("  {r}");
    }
    println!("\nSame host, unix socket, RAM memfd handed over (no copy):\n");
    println!("| VMM   | RAM  | guest    | total ms | downtime ms | MiB sent |");
    println!("|-------|------|----------|---------:|------------:|---------:|");
    for memory in ["512M", "2G"] {
        match ferry(dir.path(), memory, DIRTY, &Transport::Unix) {
            Ok(f) => println!(
                "| ferry | {memory:<4} | dirtying | {:>8.1} | {:>11.1} | {:>8.2} |",
                f.total_ms,
                f.downtime_ms,
                f.bytes / 1048576.0
            ),
            Err(e) => println!("| ferry | {memory:<4} | dirtying | failed: {e} |"),
        }
    }
    if !have_qemu {
        println!("\nQEMU is not installed (apt-get install qemu-system-x86): ferry's figures only.");
    }
}
