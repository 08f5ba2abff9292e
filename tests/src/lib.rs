//! Helpers for Ferry's integration tests: find the built binaries, run one
//! ferry process per VM with a deadline, and skip loudly without /dev/kvm.

pub mod blk_bench;
pub mod netns;
pub mod qmp;

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
/// neither it nor `--tls-dir` (see [`plaintext_unless_tls`]).
pub fn run_args<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut all = args.to_vec();
    if all.first() == Some(&"run") {
        let incoming_tcp = all.windows(2).any(|w| w[0] == "--incoming" && w[1].starts_with("tcp:"));
        if incoming_tcp && plaintext_unless_tls(&all) {
            all.push("--insecure-tcp");
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

/// A fresh temporary directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Create one whose name includes `tag`.
    pub fn new(tag: &str) -> Self {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("ferry-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The installed plugin libraries (`lib*.so` beside ferry).
pub fn plugin_libs() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(bin_dir())
        .expect("bin dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "so"))
        .collect();
    v.sort();
    v
}

/// A plugin directory holding copies of the installed plugins.
pub fn plugin_dir_copy(tag: &str) -> TempDir {
    let dir = TempDir::new(tag);
    for lib in plugin_libs() {
        std::fs::copy(&lib, dir.path().join(lib.file_name().expect("name"))).expect("copy plugin");
    }
    dir
}

/// The host's current year (UTC), from `date`.
pub fn host_year() -> String {
    let out = Command::new("date").args(["-u", "+%Y"]).output().expect("run date");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Build a fixture plugin under tests/fixtures and return the path of its
/// library.
pub fn fixture_plugin(name: &str) -> PathBuf {
    fixture_plugin_with(name, &[])
}

/// Build a fixture plugin with cargo `features` into target/fixtures and
/// return its library, copied to a path of its own (cargo's JSON messages
/// name the artifact, fresh or rebuilt).
pub fn fixture_plugin_with(name: &str, features: &[&str]) -> PathBuf {
    let manifest = repo_root().join("tests").join("fixtures").join(name).join("Cargo.toml");
    build_plugin(&manifest, None, name, features)
}

/// Build one of the workspace's plugins with `features` (for example its
/// previous release) into target/fixtures; returns its library.
pub fn workspace_plugin_release(package: &str, features: &[&str]) -> PathBuf {
    build_plugin(&repo_root().join("Cargo.toml"), Some(package), package, features)
}

fn build_plugin(manifest: &Path, package: Option<&str>, name: &str, features: &[&str]) -> PathBuf {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let target = repo_root().join("target").join("fixtures");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-j2", "--quiet", "--message-format=json", "--manifest-path"])
        .arg(manifest)
        .arg("--target-dir")
        .arg(&target);
    if let Some(p) = package {
        cmd.arg("-p").arg(p);
    }
    if !features.is_empty() {
        cmd.arg("--features").arg(features.join(","));
    }
    let out = cmd.stderr(Stdio::inherit()).output().expect("run cargo for a fixture");
    assert!(out.status.success(), "building fixture {name} {features:?} failed");
    let artifact = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact")
        .filter(|v| v["target"]["kind"].as_array().is_some_and(|k| k.iter().any(|x| x == "cdylib")))
        .flat_map(|v| v["filenames"].as_array().cloned().unwrap_or_default())
        .filter_map(|f| f.as_str().map(PathBuf::from))
        .find(|p| p.extension().is_some_and(|x| x == "so"))
        .expect("the fixture's shared library");
    let tag = if features.is_empty() { String::new() } else { format!("-{}", features.join("-")) };
    let out = target.join(format!("{name}{tag}.so"));
    // Copied beside it and renamed over it: another test may be copying
    // the previous one right now, and must never see half a library.
    let part = target.join(format!("{name}{tag}.so.{}", std::process::id()));
    std::fs::copy(&artifact, &part).expect("copy fixture");
    std::fs::rename(&part, &out).expect("install fixture");
    out
}

/// Write ferry's bundled test guest (an ELF QEMU boots too) to `path`, for
/// a benchmark's side-by-side runs.
pub fn write_test_guest(path: &Path) {
    let ok = Command::new(ferry_bin()).args(["test-guest", "--output"]).arg(path).status();
    assert!(ok.is_ok_and(|s| s.success()), "build the workspace first (cargo build --release --workspace)");
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
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
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
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        Running { child, lines, seen: Vec::new(), stderr: Some(stderr), start: Instant::now() }
    }

    /// The next stdout line (a trailing `\r` removed), if one comes in time.
    pub fn next_line(&mut self, timeout: Duration) -> Option<String> {
        let line = self.lines.recv_timeout(timeout).ok()?;
        self.seen.push(line.clone());
        Some(line.trim_end_matches('\r').to_string())
    }

    /// Wait for a stdout line starting with `prefix`; returns it.
    pub fn wait_line(&mut self, prefix: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
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
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.seen.push(line);
        }
        let stderr = self.stderr.take().and_then(|h| h.join().ok()).unwrap_or_default();
        let mut stdout = self.seen.join("\n");
        stdout.push('\n');
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
    let out = Command::new(ferry_bin())
        .arg("ctl")
        .arg("--api-socket")
        .arg(socket)
        .arg("migrate")
        .arg(uri)
        .args(extra)
        .args(plaintext.then_some("--insecure-tcp"))
        .output()
        .expect("run ferry ctl migrate");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

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

/// The number in a `TICK <n>` line.
pub fn tick_number(line: &str) -> Option<u64> {
    line.strip_prefix("TICK ").and_then(|n| n.trim().parse().ok())
}

/// Lines starting with `prefix` on the console of the host a guest left
/// (`before`) and of the host it moved to (`after`). A line the guest was
/// printing when it paused (its start before, the rest after) counts once,
/// for `before`: the guest began it there, after doing what it reports.
pub fn count_across_move(before: &str, after: &str, prefix: &str) -> (usize, usize) {
    let count = |out: &str| out.lines().filter(|l| l.starts_with(prefix)).count();
    let tail = before.trim_end_matches('\n').rsplit('\n').next().unwrap_or("");
    let head = after.lines().next().unwrap_or("");
    let split = !tail.is_empty() && !tail.starts_with(prefix) && format!("{tail}{head}").starts_with(prefix);
    (count(before) + usize::from(split), count(after))
}

/// The guest's tick counter carries on from console `before` (the process
/// that paused, snapshotted or moved it) to console `after` (the one that
/// resumed it): `after`'s first TICK follows `before`'s last, or the line
/// between them was split where the guest was paused, mid-line (its start
/// printed before, the rest after). Returns `after`'s first tick.
pub fn ticks_carry_on(before: &str, after: &str) -> Result<u64, String> {
    let last = before.lines().filter_map(tick_number).max().ok_or("no TICK before")?;
    let first = after.lines().find_map(tick_number).ok_or("no TICK after")?;
    if first == last + 1 {
        return Ok(first);
    }
    let tail = before.lines().rev().find(|l| !l.is_empty()).unwrap_or("");
    let head = after.lines().next().unwrap_or("");
    if first == last + 2 && format!("{tail}{head}") == format!("TICK {}", last + 1) {
        return Ok(first);
    }
    Err(format!(
        "the counter goes from {last} to {first} (last line before: `{tail}`, first after: `{head}`)"
    ))
}

/// A free TCP port on loopback (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// What a [`MigrationProxy`] does to the migration stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Cut both connections when the source sends a message of this kind
    /// code (the `nth` one, counting from 1).
    CutAt { kind: u16, nth: usize },
    /// Cut when the destination sends this kind (e.g. RESUMED).
    CutReply { kind: u16 },
    /// Replace the payload of the source's DEVICE message for this device
    /// id with bytes that are not a state (CRCs recomputed).
    SpoilDevice(&'static str),
}

/// Message kind codes of ferry's stream (`core/src/migration/stream.rs`).
pub mod kind {
    /// The manifest.
    pub const HELLO: u16 = 0x10;
    /// Guest pages.
    pub const PAGES: u16 = 0x13;
    /// A vCPU's state.
    pub const VCPU: u16 = 3;
    /// End of state.
    pub const END: u16 = 0xffff;
    /// The destination resumed.
    pub const RESUMED: u16 = 0x15;
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for b in bytes {
        c ^= u32::from(*b);
        for _ in 0..8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0xedb8_8320 } else { c >> 1 };
        }
    }
    !c
}

/// Read one framed message (header, id, payload) from `r`.
fn read_message(r: &mut impl Read) -> Option<(u16, String, Vec<u8>, Vec<u8>)> {
    let mut h = [0u8; 24];
    r.read_exact(&mut h).ok()?;
    let kind = u16::from_le_bytes([h[0], h[1]]);
    let id_len = u16::from_le_bytes([h[2], h[3]]) as usize;
    let len = u64::from_le_bytes(h[8..16].try_into().ok()?) as usize;
    let mut id = vec![0u8; id_len];
    r.read_exact(&mut id).ok()?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).ok()?;
    let mut header = h.to_vec();
    header.extend_from_slice(&id);
    Some((kind, String::from_utf8_lossy(&id).to_string(), header, payload))
}

/// A TCP proxy between a migration source and destination that injects one
/// fault. Source connects to `port()`; it forwards to `target`.
pub struct MigrationProxy {
    port: u16,
    /// Set once the fault was injected.
    pub fired: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl MigrationProxy {
    /// Listen on a free loopback port and forward one connection to `target`.
    pub fn start(target: std::net::SocketAddr, fault: Fault) -> Self {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("proxy listen");
        let port = listener.local_addr().expect("addr").port();
        let fired = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let fired2 = fired.clone();
        std::thread::spawn(move || {
            let Ok((src, _)) = listener.accept() else { return };
            let Ok(dst) = std::net::TcpStream::connect(target) else { return };
            let (mut src_r, mut src_w) = (src.try_clone().expect("clone"), src);
            let (mut dst_r, mut dst_w) = (dst.try_clone().expect("clone"), dst);
            let pair =
                std::sync::Arc::new((src_w.try_clone().expect("clone"), dst_w.try_clone().expect("clone")));
            let cutter = |p: &std::sync::Arc<(std::net::TcpStream, std::net::TcpStream)>| {
                let _ = p.0.shutdown(std::net::Shutdown::Both);
                let _ = p.1.shutdown(std::net::Shutdown::Both);
            };
            let pair2 = pair.clone();
            let fired3 = fired2.clone();
            // Destination -> source.
            std::thread::spawn(move || {
                while let Some((k, _, header, payload)) = read_message(&mut dst_r) {
                    if let Fault::CutReply { kind } = fault {
                        if k == kind {
                            fired3.store(true, Ordering::SeqCst);
                            cutter(&pair2);
                            return;
                        }
                    }
                    if src_w.write_all(&header).and_then(|()| src_w.write_all(&payload)).is_err() {
                        return;
                    }
                }
            });
            // Source -> destination.
            let mut seen = std::collections::HashMap::new();
            while let Some((k, id, mut header, mut payload)) = read_message(&mut src_r) {
                let n = seen.entry(k).or_insert(0usize);
                *n += 1;
                match fault {
                    Fault::CutAt { kind, nth } if k == kind && *n == nth => {
                        fired2.store(true, Ordering::SeqCst);
                        cutter(&pair);
                        return;
                    }
                    Fault::SpoilDevice(dev) if k == 4 && id == dev => {
                        payload = vec![0xff, 0x00, 0x13];
                        header[8..16].copy_from_slice(&(payload.len() as u64).to_le_bytes());
                        header[16..20].copy_from_slice(&crc32(&payload).to_le_bytes());
                        let mut covered = header[..20].to_vec();
                        covered.extend_from_slice(&header[24..]);
                        let c = crc32(&covered);
                        header[20..24].copy_from_slice(&c.to_le_bytes());
                        fired2.store(true, Ordering::SeqCst);
                    }
                    _ => {}
                }
                if dst_w.write_all(&header).and_then(|()| dst_w.write_all(&payload)).is_err() {
                    return;
                }
            }
        });
        MigrationProxy { port, fired }
    }

    /// The port the source should migrate to.
    pub fn port(&self) -> u16 {
        self.port
    }
}

/// ELF class for [`pvh_elf`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElfClass {
    /// ELFCLASS32, EM_386.
    Elf32,
    /// ELFCLASS64, EM_X86_64.
    Elf64,
}

/// Write a PVH kernel: an ELF of `class` with one PT_LOAD per segment
/// `(physical address, bytes, memory size)` and a PT_NOTE holding Xen's
/// PHYS32_ENTRY note for `entry`, as a linker would lay it out.
pub fn pvh_elf(class: ElfClass, segments: &[(u64, &[u8], u64)], entry: u32) -> Vec<u8> {
    let (ehsize, phsize): (u64, u64) = match class {
        ElfClass::Elf32 => (52, 32),
        ElfClass::Elf64 => (64, 56),
    };
    let mut note = Vec::new();
    for v in [4u32, 4, 18] {
        note.extend_from_slice(&v.to_le_bytes());
    }
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&entry.to_le_bytes());
    let phnum = 1 + segments.len() as u64;
    let note_at = ehsize + phnum * phsize;
    let mut data_at = Vec::new();
    let mut at = (note_at + note.len() as u64).div_ceil(16) * 16;
    for (_, bytes, _) in segments {
        data_at.push(at);
        at = (at + bytes.len() as u64).div_ceil(16) * 16;
    }
    let mut f: Vec<u8> = vec![0x7f, b'E', b'L', b'F', if class == ElfClass::Elf32 { 1 } else { 2 }, 1, 1];
    f.resize(16, 0);
    let word = |f: &mut Vec<u8>, v: u64| match class {
        ElfClass::Elf32 => f.extend_from_slice(&(v as u32).to_le_bytes()),
        ElfClass::Elf64 => f.extend_from_slice(&v.to_le_bytes()),
    };
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&(if class == ElfClass::Elf32 { 3u16 } else { 62 }).to_le_bytes());
    f.extend_from_slice(&1u32.to_le_bytes());
    word(&mut f, u64::from(entry));
    word(&mut f, ehsize); // program headers right after the ELF header
    word(&mut f, 0); // no section headers
    f.extend_from_slice(&0u32.to_le_bytes());
    for v in [ehsize as u16, phsize as u16, phnum as u16, 0, 0, 0] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    let mut headers = vec![(4u32, note_at, 0u64, note.len() as u64, note.len() as u64, 4u32)];
    for ((paddr, bytes, memsz), off) in segments.iter().zip(&data_at) {
        headers.push((1, *off, *paddr, bytes.len() as u64, *memsz, 7));
    }
    for (p_type, offset, addr, filesz, memsz, flags) in headers {
        f.extend_from_slice(&p_type.to_le_bytes());
        match class {
            ElfClass::Elf32 => {
                for v in [offset, addr, addr, filesz, memsz, u64::from(flags), 4] {
                    word(&mut f, v);
                }
            }
            ElfClass::Elf64 => {
                f.extend_from_slice(&flags.to_le_bytes());
                for v in [offset, addr, addr, filesz, memsz, 4] {
                    word(&mut f, v);
                }
            }
        }
    }
    f.extend_from_slice(&note);
    for ((_, bytes, _), off) in segments.iter().zip(&data_at) {
        f.resize(*off as usize, 0);
        f.extend_from_slice(bytes);
    }
    f
}

/// The bundled test guest rewritten as an ELF of `class`: the same
/// segments and PVH entry (its entry is 32-bit code either way).
pub fn test_guest_as(class: ElfClass) -> Vec<u8> {
    let file = ferry::boot::TEST_GUEST;
    let image = ferry::boot::elf::parse(file).expect("the test guest is a PVH ELF");
    let entry = u32::try_from(image.pvh_entry.expect("PVH note")).expect("a 32-bit entry");
    let segments: Vec<(u64, &[u8], u64)> = image
        .segments
        .iter()
        .map(|s| (s.paddr, &file[s.offset as usize..(s.offset + s.filesz) as usize], s.memsz))
        .collect();
    pvh_elf(class, &segments, entry)
}

#[cfg(test)]
mod tests {
    use super::{count_across_move, ticks_carry_on};

    #[test]
    fn a_line_split_at_the_pause_counts_once_where_it_began() {
        assert_eq!(count_across_move("NET SENT 1 a\n", "NET SENT 1 b\n", "NET SENT 1 "), (1, 1));
        assert_eq!(count_across_move("NET SENT 1 a\nNET S", "ENT 1 b\nTICK 2\n", "NET SENT 1 "), (2, 0));
        assert_eq!(count_across_move("NET SENT 1 a\nNET S\n", "ENT 1 b\n", "NET SENT 1 "), (2, 0));
        assert_eq!(count_across_move("TICK 1\n", "NET SENT 1 b\n", "NET SENT 1 "), (0, 1));
        assert_eq!(count_across_move("NET SENT 1 ", "b\n", "NET SENT 1 "), (1, 0));
    }

    #[test]
    fn ticks_carry_on_across_a_line_split_at_the_pause() {
        assert_eq!(ticks_carry_on("TICK 2\nTICK 3\n", "TICK 4\n"), Ok(4));
        assert_eq!(ticks_carry_on("TICK 3\nTIC\n", "K 4\nTICK 5\n"), Ok(5));
        assert!(ticks_carry_on("TICK 3\n", "TICK 5\n").is_err(), "a lost tick");
        assert!(ticks_carry_on("TICK 3\nTIC\n", "TICK 5\n").is_err(), "a lost tick after a partial line");
        assert!(ticks_carry_on("TICK 3\n", "TICK 3\n").is_err(), "a repeated tick");
    }
}
