//! Running ferry: the built binaries, one process per VM with a
//! deadline, its console read line by line, the control API through
//! `ferry ctl`, loud skips without /dev/kvm.

use std::{
    io::{Read, Write},
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

/// The directory holding `ferry` and the plugin libraries (target/debug).
pub fn bin_dir() -> PathBuf {
    // Test executables live in target/<profile>/deps/.
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent().and_then(Path::parent).expect("target/<profile>").to_path_buf()
}

/// The ferry binary.
pub fn ferry_bin() -> PathBuf {
    let bin = bin_dir().join("ferry");
    assert!(
        bin.is_file(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        bin.display()
    );
    bin
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

/// Say loudly that `what` was skipped and why: written to the real stderr
/// (not the captured test output), so it shows in every run.
pub fn skip(what: &str, why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIPPED {what}: {why}");
}

/// Start `program` with `args` and piped stdio.
pub fn spawn_command(program: &str, args: &[&str]) -> std::process::Child {
    Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program}: {e}"))
}

/// Is /dev/kvm usable? If not, say so where the test output shows it.
pub fn kvm_or_skip(test: &str) -> bool {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(e) => {
            // Written to the real stderr (not the captured test output), so
            // the skip is visible in every run.
            skip(test, &format!("/dev/kvm is not usable here ({e})"));
            false
        }
    }
}

/// A finished (or killed) ferry process.
#[derive(Debug)]
pub struct Finished {
    /// Exit status, None if killed at the deadline or ended by a signal.
    pub status: Option<i32>,
    /// The signal that ended it (None if it exited, or was killed at the
    /// deadline).
    pub signal: Option<i32>,
    /// Everything on stdout (the guest console).
    pub stdout: String,
    /// Everything on stderr (ferry's messages).
    pub stderr: String,
    /// Wall time.
    pub elapsed: Duration,
}

impl Finished {
    /// The exit status, failing the test with the output if it was killed.
    pub fn code(&self) -> i32 {
        match self.status {
            Some(c) => c,
            None => {
                panic!("ferry did not finish in time\nstdout:\n{}\nstderr:\n{}", self.stdout, self.stderr)
            }
        }
    }
}

/// Run ferry with `args`, kill it after `deadline`.
pub fn ferry(args: &[&str], deadline: Duration) -> Finished {
    ferry_with_stdin(args, None, deadline)
}

/// Start ferry with `args` and piped stdin/stdout/stderr.
pub fn spawn_ferry(args: &[&str]) -> std::process::Child {
    spawn_ferry_env(args, &[])
}

/// Does this test binary run every device in a device process? The
/// binaries whose names end in `_isolated` (tests/Cargo.toml builds boot,
/// virtio, snapshot and migration a second time under such a name) start
/// every `ferry run` with `--isolate all`.
pub fn isolating() -> bool {
    let exe = std::env::current_exe().unwrap_or_default();
    let name = exe.file_name().and_then(|n| n.to_str()).unwrap_or("");
    // cargo names the executable `<test>-<hash>`.
    name.rsplit_once('-').is_some_and(|(test, _)| test.ends_with("_isolated"))
}

/// `args` as this binary runs them: `--isolate all` after `run` when
/// [`isolating`]; `--insecure-tcp` for an `--incoming tcp:` that names
/// neither it nor `--tls-dir` (see [`plaintext_unless_tls`]); and, for a
/// restore or an incoming migration that binds nothing itself, the
/// writer's host bindings (`--bindings from-snapshot|from-source`): tests
/// about something else move guests between hosts that share their files
/// (tests/bindings.rs tests the bindings themselves).
pub fn run_args<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut all = args.to_vec();
    if all.first() == Some(&"run") {
        let incoming_tcp = all.windows(2).any(|w| w[0] == "--incoming" && w[1].starts_with("tcp:"));
        if incoming_tcp && plaintext_unless_tls(&all) {
            all.push("--insecure-tcp");
        }
        let binds =
            all.iter().any(|a| ["--bindings", "--bind", "--disk", "--net", "--vhost-user"].contains(a));
        if !binds && all.contains(&"--incoming") {
            all.extend(["--bindings", "from-source"]);
        } else if !binds && all.contains(&"--restore") {
            all.extend(["--bindings", "from-snapshot"]);
        }
        if isolating() {
            all.splice(1..1, ["--isolate", "all"]);
        }
    }
    all
}

/// The suite's transport policy: ferry refuses a tcp: migration that
/// chooses neither mutual TLS (`--tls-dir`) nor `--insecure-tcp`. Tests
/// about something other than the transport move VMs over loopback or
/// their own namespaces, so the harness passes `--insecure-tcp` for them;
/// a test that names `--tls-dir` or `--insecure-tcp` itself is left as it
/// is (tests/tls.rs runs the TLS cases, and the refusal of neither).
pub fn plaintext_unless_tls(args: &[&str]) -> bool {
    !args.iter().any(|a| *a == "--tls-dir" || *a == "--insecure-tcp")
}

/// Start ferry with `args` and extra environment variables.
pub fn spawn_ferry_env(args: &[&str], env: &[(&str, &str)]) -> std::process::Child {
    Command::new(ferry_bin())
        .envs(env.iter().copied())
        .args(run_args(args))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ferry")
}

/// Run ferry with `args`, writing `input` to its stdin (then closing it),
/// kill it after `deadline`.
pub fn ferry_with_stdin(args: &[&str], input: Option<&[u8]>, deadline: Duration) -> Finished {
    let mut child = spawn_ferry(args);
    if let Some(mut stdin) = child.stdin.take() {
        if let Some(bytes) = input {
            let _ = stdin.write_all(bytes);
        }
    }
    wait_ferry(child, deadline)
}

/// Wait for `child` to end, killing it `deadline` after the call; returns
/// its exit status and the signal that ended it (both None if killed at
/// the deadline).
fn wait_or_kill(child: &mut std::process::Child, deadline: Duration) -> (Option<i32>, Option<i32>) {
    let called = Instant::now();
    loop {
        if let Some(st) = child.try_wait().expect("wait for ferry") {
            return (st.code(), st.signal());
        }
        if called.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return (None, None);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Collect a started ferry's output and status, killing it after `deadline`.
pub fn wait_ferry(mut child: std::process::Child, deadline: Duration) -> Finished {
    let start = Instant::now();
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let (status, signal) = wait_or_kill(&mut child, deadline);
    Finished {
        status,
        signal,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
        elapsed: start.elapsed(),
    }
}

/// Fields of `/proc/PID/status` given in KiB (`VmRSS`, `RssShmem`, ...),
/// in the order asked; None if the process or a field is missing.
pub fn proc_status_kib<const N: usize>(pid: u32, fields: [&str; N]) -> Option<[u64; N]> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let mut out = [0; N];
    for (slot, name) in out.iter_mut().zip(fields) {
        *slot = status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())?;
    }
    Some(out)
}

/// The memory only process `pid` holds, in KiB, from `/proc/PID/smaps`:
/// its Private_Clean and Private_Dirty pages outside mappings whose name
/// contains `except` (a VMM's guest RAM). A page of a file that another
/// process maps too (the same binary, the same library) is shared, not
/// private: with two VMMs of one build running, this is what the second
/// one costs. None if the process is gone.
pub fn private_kib_except(pid: u32, except: &str) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut skipping = false;
    let mut total = 0;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // A mapping's header: "start-end perms offset dev inode [name]".
            skipping = line.contains(except);
        } else if !skipping && (first == "Private_Clean:" || first == "Private_Dirty:") {
            total += words.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    Some(total)
}

/// The device processes ferry `pid` started (`ferry device-process
/// --device ID`), with the device id each serves.
pub fn device_processes(pid: u32) -> Vec<(i32, String)> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter_map(|p: i32| {
            let cmdline = std::fs::read_to_string(format!("/proc/{p}/cmdline")).ok()?;
            let args: Vec<&str> = cmdline.split('\0').collect();
            if !args.contains(&"device-process") {
                return None;
            }
            let id = args.iter().position(|a| *a == "--device").and_then(|at| args.get(at + 1));
            Some((p, id.unwrap_or(&"?").to_string()))
        })
        .collect()
}

/// A running ferry (or any child) whose stdout is read line by line as it
/// comes, so a test can act when the guest reaches a point.
pub struct Running {
    child: std::process::Child,
    /// Lines, each with whether a newline ended it (the last may not).
    lines: std::sync::mpsc::Receiver<(String, bool)>,
    seen: Vec<String>,
    /// The last line seen had no newline (the process ended mid-line).
    unterminated: bool,
    stderr: Option<std::thread::JoinHandle<String>>,
    start: Instant,
}

impl Running {
    /// Take over a child started with piped stdout and stderr.
    pub fn new(mut child: std::process::Child) -> Self {
        let out = child.stdout.take().expect("piped stdout");
        let mut err = child.stderr.take().expect("piped stderr");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut reader = std::io::BufReader::new(out);
            loop {
                let mut line = String::new();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let terminated = line.ends_with('\n');
                if terminated {
                    line.pop();
                }
                if tx.send((line, terminated)).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        Running {
            child,
            lines,
            seen: Vec::new(),
            unterminated: false,
            stderr: Some(stderr),
            start: Instant::now(),
        }
    }

    fn record(&mut self, (line, terminated): (String, bool)) -> String {
        self.unterminated = !terminated;
        self.seen.push(line.clone());
        line
    }

    /// The next stdout line (a trailing `\r` removed), if one comes in time.
    pub fn next_line(&mut self, timeout: Duration) -> Option<String> {
        let got = self.lines.recv_timeout(timeout).ok()?;
        let line = self.record(got);
        Some(line.trim_end_matches('\r').to_string())
    }

    /// Wait for a stdout line starting with `prefix`; returns it.
    pub fn wait_line(&mut self, prefix: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.lines.recv_timeout(left) {
                Ok(got) => {
                    let line = self.record(got);
                    if line.starts_with(prefix) {
                        return Some(line);
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// Every stdout line read so far, joined.
    pub fn seen(&self) -> String {
        self.seen.join("\n")
    }

    /// Its stdin.
    pub fn stdin(&mut self) -> Option<&mut std::process::ChildStdin> {
        self.child.stdin.as_mut()
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Is the process still there (not yet ended)?
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Wait for the end (killing it if it has not ended `deadline` after
    /// this call) and collect everything. `elapsed` counts from the start.
    pub fn finish(mut self, deadline: Duration) -> Finished {
        let (status, signal) = wait_or_kill(&mut self.child, deadline);
        while let Ok(got) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.record(got);
        }
        let stderr = self.stderr.take().and_then(|h| h.join().ok()).unwrap_or_default();
        // As the process wrote it: a line it ended in the middle stays open,
        // so a guest's line that goes on on its next host joins up.
        let mut stdout = self.seen.join("\n");
        if !self.unterminated {
            stdout.push('\n');
        }
        Finished { status, signal, stdout, stderr, elapsed: self.start.elapsed() }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Wait until a ferry started with `--incoming tcp:127.0.0.1:PORT` takes
/// connections (it ignores one that ends before its first byte), up to a
/// minute: loading plugins can take a while on a loaded machine. Other
/// URIs get a fixed 300 ms.
pub fn wait_for_incoming(uri: &str) {
    let Some(addr) = uri.strip_prefix("tcp:127.0.0.1:").map(|port| format!("127.0.0.1:{port}")) else {
        std::thread::sleep(Duration::from_millis(300));
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(&addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Run `ferry ctl --api-socket SOCKET ARGS...`; returns its stdout, failing
/// the test if it fails.
pub fn ctl(socket: &Path, args: &[&str]) -> String {
    let out = Command::new(ferry_bin())
        .arg("ctl")
        .arg("--api-socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("run ferry ctl");
    assert!(
        out.status.success(),
        "ferry ctl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// `ferry ctl --api-socket SOCKET migrate URI EXTRA...`; returns whether
/// it succeeded and everything it printed (stdout, then stderr).
/// A tcp: URI gets `--insecure-tcp` unless `extra` chooses the transport
/// ([`plaintext_unless_tls`]).
pub fn migrate(socket: &Path, uri: &str, extra: &[&str]) -> (bool, String) {
    let plaintext = uri.starts_with("tcp:") && plaintext_unless_tls(extra);
    let child = Command::new(ferry_bin())
        .arg("ctl")
        .arg("--api-socket")
        .arg(socket)
        .arg("migrate")
        .arg(uri)
        .args(extra)
        .args(plaintext.then_some("--insecure-tcp"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ferry ctl migrate");
    // A migration that never ends fails the test instead of hanging it.
    let out = wait_ferry(child, MIGRATE_DEADLINE);
    let mut text = out.stdout + &out.stderr;
    if out.status.is_none() && out.signal.is_none() {
        text += &format!(
            "\n(ferry ctl migrate was killed after {} s without an answer)",
            MIGRATE_DEADLINE.as_secs()
        );
    }
    (out.status == Some(0), text)
}

/// A number from `ferry ctl migrate`'s JSON report (`"key": value`), as
/// [`migrate`] returns it.
pub fn report_num(text: &str, key: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("\"{key}\": ")))
        .and_then(|v| v.trim_end_matches(',').parse().ok())
}

/// How long [`migrate`] waits for `ferry ctl migrate` to end.
const MIGRATE_DEADLINE: Duration = Duration::from_secs(180);

/// Wait until `path` exists (a socket ferry creates).
pub fn wait_for_path(path: &Path, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// A free TCP port on loopback (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}
