//! A device that faults: the `faulty-plugin` fixture segfaults, aborts,
//! overflows its stack, loops forever, exits, calls execve or opens a file
//! no property names when the guest reads its data port (`dev-check=0:1`);
//! and a device process that something outside kills.
//!
//! In a device process (`--isolate bad0`) ferry stays up, the guest stops,
//! one line names the device and the cause, `ferry ctl info` answers with
//! the device failed, and `ferry ctl shutdown` ends ferry with status 1.
//! In-process the same faults do what they do to any process; those tests
//! pin today's behaviour so that docs/architecture.md's table stays true.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use ferry_tests::{ctl, kvm_or_skip, spawn_ferry, Finished, Running, TempDir, DEADLINE};

/// The test guest reads the faulty device's data port, which answers 1
/// when nothing goes wrong.
const CMDLINE: &str = "ready dev-check=0:1 exit=0";

/// A plugin directory with the workspace's plugins and the fixture, and a
/// machine type with a console, the debug-exit port and one faulty device.
struct Setup {
    dir: TempDir,
    machine: PathBuf,
}

impl Setup {
    fn new(fault: &str) -> Self {
        let lib = ferry_tests::fixture_plugin("faulty-plugin");
        let dir = ferry_tests::plugin_dir_copy(&format!("fault-{fault}"));
        std::fs::copy(&lib, dir.path().join("faulty-plugin.so")).expect("copy fixture");
        let machine = dir.path().join("m.toml");
        std::fs::write(
            &machine,
            format!(
                "name = \"faulty\"\n\
                 [[device]]\nid = \"com1\"\nplugin = \"serial-16550\"\nproperties = {{ input = \"none\" }}\n\
                 [[device]]\nid = \"debug-exit\"\nplugin = \"debug-exit\"\nproperties = {{ port = 0xf4 }}\n\
                 [[device]]\nid = \"bad0\"\nplugin = \"faulty-plugin\"\nproperties = {{ fault = \"{fault}\" }}\n"
            ),
        )
        .expect("write machine");
        Setup { dir, machine }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("api.sock")
    }

    /// Start ferry on the machine running [`CMDLINE`]; `isolate` is passed
    /// to `--isolate`.
    fn spawn(&self, isolate: Option<&str>) -> Running {
        self.spawn_with(isolate, CMDLINE, &[])
    }

    fn spawn_with(&self, isolate: Option<&str>, cmdline: &str, extra: &[&str]) -> Running {
        let plugins = self.dir.path().display().to_string();
        let machine = self.machine.display().to_string();
        let socket = self.socket().display().to_string();
        let mut args = vec!["run"];
        if let Some(ids) = isolate {
            args.extend(["--isolate", ids]);
        }
        args.extend([
            "--plugins",
            &plugins,
            "--machine",
            &machine,
            "--api-socket",
            &socket,
            "--cmdline",
            cmdline,
        ]);
        args.extend_from_slice(extra);
        let mut vm = Running::new(spawn_ferry(&args));
        assert!(
            vm.wait_line("FERRY-GUEST READY", DEADLINE).is_some(),
            "the guest never got going:\n{}",
            vm.finish(Duration::ZERO).stderr
        );
        // The API socket exists from before the guest starts until ferry
        // ends: a guest whose read goes well exits at once, so the tests
        // that use the API find it on a ferry that stayed up.
        vm
    }
}

/// `GET /vm` (`ferry ctl info`), or None if the API did not answer 200.
fn info(socket: &Path) -> Option<serde_json::Value> {
    match ferry::api::call(socket, "GET", "/vm", None) {
        Ok((200, v)) => Some(v),
        _ => None,
    }
}

/// The entry for device `id` in an `info` answer.
fn device<'a>(info: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    info["devices"]
        .as_array()
        .and_then(|all| all.iter().find(|d| d["id"] == id))
        .unwrap_or_else(|| panic!("no device {id} in {info}"))
}

/// Run the fault in a device process and check containment; returns the
/// failure line for the caller's cause check.
fn contained(fault: &str) -> Option<String> {
    if !kvm_or_skip(&format!("contained_{fault}")) {
        return None;
    }
    let setup = Setup::new(fault);
    let vm = setup.spawn(Some("bad0"));
    Some(check_contained(&setup, vm))
}

/// Wait for bad0's failure and check that ferry contained it; returns the
/// failure line.
fn check_contained(setup: &Setup, mut vm: Running) -> String {
    let socket = setup.socket();
    // The failure shows in `info` (a loop takes the register timeout).
    let start = Instant::now();
    let failed = loop {
        match info(&socket) {
            Some(i) if i["state"] == "failed" => break i,
            _ if start.elapsed() > DEADLINE => {
                panic!("the device never showed as failed:\n{}", vm.finish(Duration::ZERO).stderr)
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let line = failed["failure"].as_str().expect("a failure line").to_string();
    assert!(line.starts_with("device bad0 (faulty-plugin) failed: "), "{line}");
    let bad = device(&failed, "bad0");
    assert_eq!(bad["isolated"], true, "{failed}");
    assert_eq!(bad["failed"].as_str(), Some(line.as_str()), "{failed}");
    assert_eq!(device(&failed, "com1")["failed"], serde_json::Value::Null, "{failed}");
    assert_eq!(device(&failed, "com1")["isolated"], false, "only bad0 was isolated: {failed}");
    // Ferry stays up and keeps answering; the guest stays stopped.
    std::thread::sleep(Duration::from_millis(300));
    assert!(vm.alive(), "ferry ended after the device failed");
    assert_eq!(info(&socket).map(|i| i["state"].clone()), Some("failed".into()), "info answers again");
    let resume = ferry::api::call(&socket, "PUT", "/vm/resume", None);
    assert!(!matches!(resume, Ok((200, _))), "resume of a failed guest was accepted: {resume:?}");
    ctl(&socket, &["shutdown"]);
    let end: Finished = vm.finish(Duration::from_secs(20));
    assert_eq!(end.status, Some(1), "shutdown after a failure exits with status 1:\n{}", end.stderr);
    assert!(!end.stdout.contains("DEV OK"), "the read completed:\n{}", end.stdout);
    let errors: Vec<&str> = end.stderr.lines().filter(|l| l.starts_with("ferry: error:")).collect();
    assert!(
        errors.iter().any(|l| l.contains(&line)),
        "no error line names the failure {line:?}:\n{}",
        end.stderr
    );
    assert!(!socket.exists(), "the API socket is left behind");
    line
}

fn assert_cause(line: Option<String>, cause: &str) {
    if let Some(line) = line {
        assert!(line.contains(cause), "{cause:?} not in {line:?}");
    }
}

#[test]
fn a_segfaulting_device_process_is_contained() {
    assert_cause(contained("segv"), "was killed by SIGSEGV");
}

#[test]
fn an_aborting_device_process_is_contained() {
    assert_cause(contained("abort"), "was killed by SIGABRT");
}

#[test]
fn a_stack_overflow_in_a_device_process_is_contained() {
    assert_cause(
        contained("overflow"),
        "was killed by SIGABRT (its last words: fatal runtime error: stack overflow",
    );
}

#[test]
fn a_device_looping_in_a_register_read_is_killed_at_the_timeout() {
    assert_cause(
        contained("loop"),
        "it did not answer a register read (region 0, offset 0x1) within 2000 ms; ferry killed its process",
    );
}

#[test]
fn a_device_process_that_exits_is_contained() {
    assert_cause(contained("exit"), "exited with status 3");
}

#[test]
fn a_device_process_killed_from_outside_is_contained() {
    if !kvm_or_skip("a_device_process_killed_from_outside_is_contained") {
        return;
    }
    let setup = Setup::new("none");
    let mut vm = setup.spawn_with(Some("bad0"), "ready ticks=0", &[]);
    if vm.wait_line("TICK 2", DEADLINE).is_none() {
        panic!("the guest does not tick: {:?}", vm.finish(Duration::ZERO));
    }
    let [(bad0, _)] = ferry_tests::device_processes(vm.pid())[..] else {
        panic!("one device process, for bad0")
    };
    // SAFETY: kill on a child of the ferry this test started.
    unsafe { libc::kill(bad0, libc::SIGKILL) };
    let line = check_contained(&setup, vm);
    assert!(line.ends_with(&format!("its process {bad0} was killed by SIGKILL")), "{line}");
}

#[test]
fn an_execve_in_a_device_process_is_refused_by_name() {
    assert_cause(contained("execve"), "refused system call execve");
}

#[test]
fn opening_a_file_no_property_names_fails_naming_the_path() {
    assert_cause(contained("open"), "cannot open /etc/passwd: Permission denied");
}

// In-process: today's behaviour, documented in docs/architecture.md.

/// Run the fault in-process until ferry ends (or `deadline`).
fn in_process(fault: &str, deadline: Duration) -> Option<Finished> {
    in_process_with(fault, deadline, &[])
}

/// The same with more arguments (`--seccomp off`).
fn in_process_with(fault: &str, deadline: Duration, extra: &[&str]) -> Option<Finished> {
    if !kvm_or_skip(&format!("in_process_{fault}")) {
        return None;
    }
    no_core_files();
    let setup = Setup::new(fault);
    Some(setup.spawn_with(None, CMDLINE, extra).finish(deadline))
}

/// A ferry this binary starts and a fault kills writes no core file (of
/// its guest RAM, too) wherever the machine would put one.
fn no_core_files() {
    let none = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: setrlimit reads the struct; lowering a limit needs no
    // privilege, and children inherit it.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &none) };
}

#[test]
fn in_process_a_segfault_kills_ferry() {
    if let Some(end) = in_process("segv", DEADLINE) {
        assert_eq!(end.signal, Some(libc::SIGSEGV), "{end:?}");
    }
}

#[test]
fn in_process_an_abort_kills_ferry() {
    if let Some(end) = in_process("abort", DEADLINE) {
        assert_eq!(end.signal, Some(libc::SIGABRT), "{end:?}");
    }
}

#[test]
fn in_process_a_stack_overflow_kills_ferry() {
    if let Some(end) = in_process("overflow", DEADLINE) {
        assert_eq!(end.signal, Some(libc::SIGABRT), "{end:?}");
        assert!(end.stderr.contains("has overflowed its stack"), "{}", end.stderr);
    }
}

#[test]
fn in_process_an_exit_ends_ferry_without_a_word() {
    if let Some(end) = in_process("exit", DEADLINE) {
        assert_eq!(end.status, Some(3), "{end:?}");
        assert!(!end.stderr.contains("error"), "{}", end.stderr);
    }
}

/// ferry's own seccomp filter (on by default) ends ferry at the call, with
/// one line naming the thread and the call, and status 159.
fn assert_seccomp_ends(end: &Finished, call: &str) {
    assert_eq!(end.status, Some(ferry::seccomp::EXIT_STATUS), "{end:?}");
    assert_eq!(end.signal, None, "ended by ferry, not by a bare signal");
    let line =
        format!("ferry: error: thread vcpu0 made a system call its seccomp filter does not allow: {call}");
    let lines: Vec<&str> = end.stderr.lines().filter(|l| l.contains("seccomp")).collect();
    assert_eq!(lines.len(), 1, "one line:\n{}", end.stderr);
    assert!(lines[0].starts_with(&line), "{}", end.stderr);
}

#[test]
fn in_process_an_execve_is_stopped_by_ferry_s_seccomp_filter() {
    if let Some(end) = in_process("execve", DEADLINE) {
        assert_seccomp_ends(&end, "execve (59)");
        assert!(!end.stdout.contains("this process is now /bin/echo"), "{}", end.stdout);
    }
}

#[test]
fn in_process_opening_a_file_on_a_vcpu_thread_is_stopped_by_ferry_s_seccomp_filter() {
    if let Some(end) = in_process("open", DEADLINE) {
        assert_seccomp_ends(&end, "openat (257)");
    }
}

#[test]
fn with_seccomp_off_an_in_process_execve_replaces_ferry() {
    if let Some(end) = in_process_with("execve", DEADLINE, &["--seccomp", "off"]) {
        assert_eq!(end.status, Some(0), "{end:?}");
        assert!(end.stdout.contains("faulty-plugin: this process is now /bin/echo"), "{}", end.stdout);
    }
}

#[test]
fn with_seccomp_log_an_in_process_plugin_opens_any_file() {
    if let Some(end) = in_process_with("open", DEADLINE, &["--seccomp", "log"]) {
        assert_eq!(end.status, Some(0), "{end:?}");
        assert!(end.stdout.contains("DEV OK reg=0x00 value=0x01"), "{}", end.stdout);
    }
}

#[test]
fn in_process_a_loop_in_a_register_read_hangs_the_guest_for_good() {
    if !kvm_or_skip("in_process_a_loop_in_a_register_read_hangs_the_guest_for_good") {
        return;
    }
    let setup = Setup::new("loop");
    let mut vm = setup.spawn(None);
    let socket = setup.socket();
    // The API thread still answers `info`: the vCPU is stuck, not ferry.
    std::thread::sleep(Duration::from_secs(3));
    let running = info(&socket).expect("info answers");
    assert_eq!(running["state"], "running", "{running}");
    // A shutdown cannot stop a vCPU that never returns from the device.
    let mut shutdown = Command::new(ferry_tests::ferry_bin())
        .args(["ctl", "--api-socket"])
        .arg(&socket)
        .arg("shutdown")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run ferry ctl shutdown");
    std::thread::sleep(Duration::from_secs(5));
    assert!(vm.alive(), "ferry ended although its vCPU never came back from the device");
    let _ = shutdown.kill();
    let _ = shutdown.wait();
    let end = vm.finish(Duration::ZERO);
    assert!(!end.stdout.contains("DEV OK"), "the read completed:\n{}", end.stdout);
}

/// A stop and a continue (a debugger attaching, an operator's SIGSTOP)
/// interrupt the device processes' waits; they resume them and carry on.
#[test]
fn stopped_and_continued_device_processes_carry_on() {
    if !kvm_or_skip("stopped_and_continued_device_processes_carry_on") {
        return;
    }
    let dir = TempDir::new("stopcont");
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk");
    let disk_arg = format!("path={}", disk.display());
    let cmdline = "blk-write=1:8:5 ticks=6 blk-verify=1:8:5 rng=8 exit=3";
    let mut vm = Running::new(spawn_ferry(&[
        "run",
        "--isolate",
        "all",
        "--disk",
        &disk_arg,
        "--rng",
        "--cmdline",
        cmdline,
    ]));
    vm.wait_line("TICK 2", DEADLINE).expect("the guest ticks");
    let devices: Vec<i32> = ferry_tests::device_processes(vm.pid()).into_iter().map(|(p, _)| p).collect();
    assert_eq!(devices.len(), 6, "one device process per device");
    for &p in &devices {
        // SAFETY: kill on a child of the ferry this test started.
        unsafe { libc::kill(p, libc::SIGSTOP) };
    }
    std::thread::sleep(Duration::from_millis(200));
    for &p in &devices {
        // SAFETY: as above.
        unsafe { libc::kill(p, libc::SIGCONT) };
    }
    let end = vm.finish(DEADLINE);
    assert_eq!(end.status, Some(3), "stdout:\n{}\nstderr:\n{}", end.stdout, end.stderr);
    assert!(end.stdout.contains("BLK VERIFY OK sector=1 count=8"), "{}", end.stdout);
    assert!(!end.stderr.contains("refused system call"), "{}", end.stderr);
}
