//! Live migration, ferry beside QEMU, on the same test guest over the same
//! loopback TCP, one run: 512 MiB, 2 GiB and 8 GiB guests, idle, dirtying
//! about 100 MB/s, and outrunning a capped link; total time, downtime,
//! bytes sent, rounds, and what finished it. Ferry moves each guest twice,
//! over mutual TLS 1.3 (credentials from `ferry tls init`) and over
//! plaintext TCP (`--insecure-tcp`), and prints the ratio; QEMU's rows are
//! plaintext TCP. Then bandwidth beside a raw loopback stream, and the
//! same-host memfd hand-over.
//!
//! ```sh
//! cargo build --release --workspace && cargo bench -p ferry-tests --bench migration
//! cargo bench -p ferry-tests --bench migration -- bandwidth   # that table only
//! cargo bench -p ferry-tests --bench migration -- outruns     # one guest's cells only
//! ```
//!
//! The guest fills 64 MiB with a pattern, then ticks; "dirtying" adds 26
//! pages per 1 kHz timer interrupt (about 100 MB/s of dirtied memory);
//! "outruns" dirties as fast over a 64 MiB working set while the link is
//! capped at 32 MiB/s for both VMMs (ferry `--max-bandwidth`, QEMU
//! `max-bandwidth`), so pre-copy alone cannot finish: QEMU runs with its
//! defaults (given up on after 60 s) and with auto-converge; elsewhere
//! QEMU runs with its defaults and with its bandwidth limit lifted.
//! In that cell both VMMs also run post-copy: ferry with `--postcopy`
//! (it switches when pre-copy stops helping), QEMU with `postcopy-ram` on
//! both ends and `migrate-start-postcopy` after its first pass.
//! 512 MiB, 2 GiB and 8 GiB guests. "finished by": pre-copy alone, the
//! vCPU throttle it took, or post-copy with what went after the switch.
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
/// About 100 MB/s dirtied over a 64 MiB working set.
const HOT: &str = "pattern=64 dirty=26 hz=1000 dirty-mib=64 ticks=0";
/// The link cap of the cell whose guest outruns it, MiB/s.
const OUTRUN_CAP_MIB: u64 = 32;

/// The table's guests: name, command line, link cap (MiB/s) if any.
const CELLS: [(&str, &str, Option<u64>); 3] =
    [("idle", IDLE, None), ("dirtying", DIRTY, None), ("outruns", HOT, Some(OUTRUN_CAP_MIB))];

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
    /// Bytes the rate is about: ferry's first pass (every non-zero page),
    /// QEMU's whole migration.
    moved: f64,
    /// Bytes per second of `moved`, end to end (QEMU: its `mbps`).
    rate: f64,
    /// Pre-copy rounds (QEMU: its dirty-sync count).
    rounds: f64,
    /// What finished it: pre-copy alone, or throttled to this percent.
    throttle_pct: f64,
    /// Post-copy finished it (pages sent after the guest moved).
    postcopy_pages: Option<f64>,
}

impl Figures {
    /// The table's "finished by" column.
    fn finished_by(&self) -> String {
        match (self.postcopy_pages, self.throttle_pct > 0.0) {
            (Some(pages), _) => format!("post-copy, {:.0} MiB after", pages * 4096.0 / 1048576.0),
            (None, true) => format!("throttled to {:.0}%", self.throttle_pct),
            (None, false) => "pre-copy".into(),
        }
    }
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
    ferry_with(dir, memory, guest, transport, &[])
}

/// [`ferry`], with `extra` arguments to `ferry ctl migrate`
/// (`--max-bandwidth`, `--postcopy`).
fn ferry_with(
    dir: &Path,
    memory: &str,
    guest: &str,
    transport: &Transport,
    extra: &[&str],
) -> Result<Figures, String> {
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
        .args(extra)
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
        moved: field(&text, "first_pass_bytes"),
        rate: field(&text, "first_pass_bytes") / (field(&text, "first_pass_ms") / 1e3),
        rounds: field(&text, "round"),
        throttle_pct: field(&text, "throttle_pct"),
        postcopy_pages: text.contains("\"mode\": \"post-copy\"").then(|| field(&text, "postcopy_pages")),
    })
}

fn qemu_cmd(guest_elf: &Path, memory: &str, guest: &str, qmp: &Path) -> Command {
    let mut c = qemu_command(guest_elf, memory, guest);
    c.arg("-qmp").arg(format!("unix:{},server=on,wait=off", qmp.display()));
    c
}

/// How QEMU is set up for a cell.
#[derive(Clone, Copy)]
enum QemuLink {
    /// Its defaults (128 MiB/s bandwidth limit in 7.2, no auto-converge).
    Defaults,
    /// Its bandwidth limit lifted.
    Unlimited,
    /// Capped at this many MiB/s, its other defaults kept.
    Capped(u64),
    /// Capped, with auto-converge (its vCPU throttling) on.
    CappedAutoConverge(u64),
    /// Capped, switched to post-copy (`postcopy-ram`,
    /// `migrate-start-postcopy`) after its first pass.
    CappedPostcopy(u64),
}

/// How long a QEMU migration may take before the bench calls it
/// unfinished (it never gives up by itself).
const QEMU_GIVE_UP: Duration = Duration::from_secs(60);

/// QEMU's migration of `guest`, its link set up as `link`.
fn qemu(dir: &Path, guest_elf: &Path, memory: &str, guest: &str, link: QemuLink) -> Result<Figures, String> {
    let port = free_port();
    let (qs, qd) = (dir.join(format!("qs-{memory}.qmp")), dir.join(format!("qd-{memory}.qmp")));
    let _dst =
        spawn(qemu_cmd(guest_elf, memory, guest, &qd).arg("-incoming").arg(format!("tcp:127.0.0.1:{port}")))?;
    const POSTCOPY_RAM: &str = r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"postcopy-ram","state":true}]}}"#;
    let postcopy = matches!(link, QemuLink::CappedPostcopy(_));
    if postcopy {
        // Both ends must have the capability before the migration starts.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut d = loop {
            match Qmp::connect(&qd) {
                Ok(d) => break d,
                Err(e) if std::time::Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        d.cmd(POSTCOPY_RAM)?;
    }
    let mut src = spawn(&mut qemu_cmd(guest_elf, memory, guest, &qs))?;
    if src.wait_line("TICK 2", Duration::from_secs(120)).is_none() {
        return Err("QEMU guest did not tick".into());
    }
    let mut q = Qmp::connect(&qs)?;
    let set_bandwidth = |q: &mut Qmp, bytes: u64| {
        q.cmd(&format!(r#"{{"execute":"migrate-set-parameters","arguments":{{"max-bandwidth":{bytes}}}}}"#))
    };
    match link {
        QemuLink::Defaults => {}
        QemuLink::Unlimited => set_bandwidth(&mut q, 1 << 40).map(drop)?,
        QemuLink::Capped(mib) => set_bandwidth(&mut q, mib << 20).map(drop)?,
        QemuLink::CappedAutoConverge(mib) => {
            set_bandwidth(&mut q, mib << 20)?;
            q.cmd(r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"auto-converge","state":true}]}}"#)?;
        }
        QemuLink::CappedPostcopy(mib) => {
            set_bandwidth(&mut q, mib << 20)?;
            q.cmd(POSTCOPY_RAM)?;
        }
    }
    let mut switched = false;
    let started = std::time::Instant::now();
    // QEMU reports its throttle only while the migration runs.
    let mut throttle_pct = 0.0f64;
    q.cmd(&format!(r#"{{"execute":"migrate","arguments":{{"uri":"tcp:127.0.0.1:{port}"}}}}"#))?;
    loop {
        let l = q.cmd(r#"{"execute":"query-migrate"}"#)?;
        let throttle = field(&l, "cpu-throttle-percentage");
        if throttle > throttle_pct {
            throttle_pct = throttle;
        }
        // After the first pass (its second dirty sync), as ferry's policy
        // switches when pre-copy stops helping.
        if postcopy && !switched && field(&l, "dirty-sync-count") >= 2.0 {
            q.cmd(r#"{"execute":"migrate-start-postcopy"}"#)?;
            switched = true;
        }
        if l.contains("\"status\": \"completed\"") {
            let total = field(&l, "total-time");
            let down = match field(&l, "downtime") {
                // QEMU 7.2's post-copy now and then reports a downtime
                // longer than the whole migration (5,409,650 ms in a 4.6 s
                // one, once): not a figure.
                d if d > total => {
                    eprintln!(
                        "qemu {memory}: reported downtime {d} ms of a {total} ms migration, shown as n/a"
                    );
                    f64::NAN
                }
                d => d,
            };
            let bytes = l
                .split("\"transferred\": ")
                .nth(1)
                .and_then(|v| v.split([',', '}']).next())
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(f64::NAN);
            let rate = field(&l, "mbps") * 1e6 / 8.0;
            let rounds = field(&l, "dirty-sync-count");
            let _ = q.cmd(r#"{"execute":"quit"}"#);
            return Ok(Figures {
                total_ms: total,
                downtime_ms: down,
                bytes,
                moved: bytes,
                rate,
                rounds,
                throttle_pct,
                // QEMU 7.x: ram.postcopy-bytes, what went after the switch.
                postcopy_pages: switched.then(|| field(&l, "postcopy-bytes") / 4096.0),
            });
        }
        if l.contains("\"failed\"") {
            return Err(format!("QEMU migration failed: {l}"));
        }
        if started.elapsed() > QEMU_GIVE_UP {
            let _ = q.cmd(r#"{"execute":"migrate_cancel"}"#);
            let _ = q.cmd(r#"{"execute":"quit"}"#);
            return Err(format!(
                "not finished after {} s ({} sync rounds; QEMU does not give up by itself)",
                QEMU_GIVE_UP.as_secs(),
                field(&l, "dirty-sync-count")
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Where a raw stream's reader puts what it reads.
#[derive(Clone, Copy)]
enum Sink {
    /// One 1 MiB buffer, reused: the link alone.
    Buffer,
    /// A fresh memfd of the stream's size, written in order: the link
    /// plus what any destination VMM must do, put the bytes into RAM it
    /// has not touched before.
    FreshMemory,
}

/// Bytes per second of one raw TCP stream on loopback in this process:
/// `bytes` of non-zero data written in 1 MiB pieces, read in 1 MiB
/// pieces into `sink`, from connect until the reader has the last byte.
fn raw_loopback(bytes: u64, sink: Sink) -> Result<f64, String> {
    use std::io::{Read, Write};
    use std::os::unix::fs::FileExt;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let memory = match sink {
        Sink::Buffer => None,
        Sink::FreshMemory => {
            // SAFETY: memfd_create with a NUL-terminated name; the fd is
            // checked and owned by the File.
            let fd = unsafe { libc::memfd_create(c"ferry-bench-raw".as_ptr(), libc::MFD_CLOEXEC) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error().to_string());
            }
            // SAFETY: a fresh fd nothing else owns.
            let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            file.set_len(bytes).map_err(|e| e.to_string())?;
            Some(file)
        }
    };
    let reader = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        loop {
            match s.read(&mut buf)? {
                0 => return Ok(got),
                n => {
                    if let Some(m) = &memory {
                        m.write_all_at(&buf[..n], got)?;
                    }
                    got += n as u64;
                }
            }
        }
    });
    let start = std::time::Instant::now();
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    let piece = vec![0x5au8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(piece.len() as u64) as usize;
        s.write_all(&piece[..n]).map_err(|e| e.to_string())?;
        left -= n as u64;
    }
    drop(s);
    let got = reader.join().map_err(|_| "reader panicked".to_string())?.map_err(|e| e.to_string())?;
    if got != bytes {
        return Err(format!("raw stream carried {got} of {bytes} bytes"));
    }
    Ok(bytes as f64 / start.elapsed().as_secs_f64())
}

/// Bandwidth: a 2 GiB guest with 1.5 GiB of non-zero memory, moved by
/// ferry (plaintext and TLS; the first pass's rate, end to end) and by
/// QEMU with its bandwidth limit lifted, beside one raw loopback TCP
/// stream of the same size measured in the same run.
fn bandwidth(dir: &Path, guest_elf: &Path, creds: &Path, have_qemu: bool) {
    const FULL: &str = "pattern=1536 ticks=0";
    println!("\nBandwidth: 2 GiB guest, 1.5 GiB of it non-zero, idle\n");
    println!("| what                       | MiB moved | ms     | MiB/s  | of raw | of raw, guest up |");
    println!("|----------------------------|----------:|-------:|-------:|-------:|-----------------:|");
    // The same stream while the guest to be moved runs here: the
    // emulated guest keeps one of this machine's cores busy (it verifies
    // its pattern every second), as it does while a VMM moves it.
    let beside =
        spawn(Command::new(bin_dir().join("ferry")).args(["run", "--memory", "2G", "--cmdline", FULL]))
            .and_then(|mut guest| match guest.wait_line("TICK 2", Duration::from_secs(120)) {
                Some(_) => raw_loopback(1536 << 20, Sink::FreshMemory),
                None => Err("the guest did not tick".into()),
            });
    let (raw, fresh, same) =
        match (raw_loopback(1536 << 20, Sink::Buffer), raw_loopback(1536 << 20, Sink::FreshMemory), beside) {
            (Ok(r), Ok(f), Ok(b)) => (r, f, b),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                println!("raw loopback stream failed: {e}");
                return;
            }
        };
    let row = |what: &str, bytes: f64, rate: f64| {
        println!(
            "| {what:<26} | {:>9.0} | {:>6.0} | {:>6.0} | {:>5.0}% | {:>15.0}% |",
            bytes / 1048576.0,
            bytes / rate * 1e3,
            rate / 1048576.0,
            rate / raw * 100.0,
            rate / same * 100.0
        )
    };
    row("raw TCP stream (1 MiB I/O)", 1536.0 * 1048576.0, raw);
    row("raw, into fresh memfd", 1536.0 * 1048576.0, fresh);
    row("raw, fresh memfd, guest up", 1536.0 * 1048576.0, same);
    for (name, transport) in
        [("ferry plaintext, 1st pass", Transport::Plain), ("ferry TLS 1.3, 1st pass", Transport::Tls(creds))]
    {
        match ferry(dir, "2G", FULL, &transport) {
            Ok(f) => row(name, f.moved, f.rate),
            Err(e) => println!("| {name:<26} | failed: {e} |"),
        }
    }
    if have_qemu {
        match qemu(dir, guest_elf, "2G", FULL, QemuLink::Unlimited) {
            Ok(f) => row("qemu, no bandwidth limit", f.moved, f.rate),
            Err(e) => println!("| qemu, no bandwidth limit   | failed: {e} |"),
        }
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
    // `cargo bench --bench migration -- bandwidth`: that table only.
    if std::env::args().any(|a| a == "bandwidth") {
        bandwidth(dir.path(), &guest_elf, &creds, have_qemu);
        return;
    }
    // `cargo bench --bench migration -- outruns`: that guest's cells only.
    let only = CELLS.iter().map(|c| c.0).find(|name| std::env::args().any(|a| a == *name));
    println!("Live migration over loopback TCP, test guest with 64 MiB of pattern\n");
    println!("| VMM   | setup         | RAM  | guest    | total ms | downtime ms | MiB sent | rounds | finished by              |");
    println!("|-------|---------------|------|----------|---------:|------------:|---------:|-------:|--------------------------|");
    let mut ratios = Vec::new();
    for memory in ["512M", "2G", "8G"] {
        for (name, guest, cap) in CELLS.into_iter().filter(|(name, ..)| only.is_none_or(|o| o == *name)) {
            let cap_arg = cap.map(|mib| format!("{mib}M"));
            let capped: Vec<&str> = cap_arg.iter().flat_map(|c| ["--max-bandwidth", c.as_str()]).collect();
            let run = |t: &Transport| ferry_with(dir.path(), memory, guest, t, &capped);
            let (tls, plain) = (run(&Transport::Tls(&creds)), run(&Transport::Plain));
            if let (Ok(t), Ok(p)) = (&tls, &plain) {
                ratios.push(format!(
                    "{memory} {name}: total {:.2}x, downtime {:.2}x",
                    t.total_ms / p.total_ms,
                    t.downtime_ms / p.downtime_ms
                ));
            }
            let mut rows: Vec<(&str, &str, Result<Figures, String>)> =
                vec![("ferry", "TLS 1.3", tls), ("ferry", "plaintext", plain)];
            if cap.is_some() {
                let postcopy = [capped.as_slice(), &["--postcopy"]].concat();
                rows.push((
                    "ferry",
                    "post-copy",
                    ferry_with(dir.path(), memory, guest, &Transport::Plain, &postcopy),
                ));
            }
            if have_qemu {
                let setups = match cap {
                    None => vec![("defaults", QemuLink::Defaults), ("no limit", QemuLink::Unlimited)],
                    Some(mib) => vec![
                        ("defaults", QemuLink::Capped(mib)),
                        ("auto-converge", QemuLink::CappedAutoConverge(mib)),
                        ("post-copy", QemuLink::CappedPostcopy(mib)),
                    ],
                };
                for (setup, link) in setups {
                    rows.push(("qemu", setup, qemu(dir.path(), &guest_elf, memory, guest, link)));
                }
            }
            for (vmm, setup, r) in rows {
                match r {
                    Ok(f) => println!(
                        "| {vmm:<5} | {setup:<13} | {memory:<4} | {name:<8} | {:>8.1} | {:>11} | {:>8.1} | {:>6.0} | {:<24} |",
                        f.total_ms,
                        match f.downtime_ms {
                            d if d.is_nan() => "n/a".to_string(),
                            d => format!("{d:.1}"),
                        },
                        f.bytes / 1048576.0,
                        f.rounds,
                        f.finished_by()
                    ),
                    Err(e) => println!("| {vmm:<5} | {setup:<13} | {memory:<4} | {name:<8} | failed: {e} |"),
                }
            }
        }
    }
    if only.is_some() {
        return;
    }
    println!("\nFerry over TLS / over plaintext (goal: within 1.10x):");
    for r in &ratios {
        println!("  {r}");
    }
    bandwidth(dir.path(), &guest_elf, &creds, have_qemu);
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
