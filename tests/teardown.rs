//! VMs end cleanly while their disk is busy: the guest writes its virtio
//! disk as fast as it can when ferry is told to shut down, when the guest
//! exits, when an isolated disk's process is killed, and when an incoming
//! migration fails after its VM (devices and all) was built. Each way, 50
//! ends in all per mode (devices in ferry's process, and isolated), and
//! every one must end ferry with its own status and one line, never with
//! a signal: teardown runs devices (their worker threads joined) down
//! before the VM fd and guest RAM (`VmCore`'s field order).

use std::{path::Path, time::Duration};

use ferry_tests::{
    ctl, device_processes, free_port, kvm_or_skip, migrate, spawn_ferry, spawn_ferry_env, wait_for_incoming,
    wait_for_path, Finished, Running, TempDir, DEADLINE,
};

const ENDS_PER_MODE: usize = 50;
/// Writes enough to be still going at every end below.
const BUSY: &str = "ready blk-bench=w:100000 exit=3";

#[derive(Clone, Copy, Debug)]
enum End {
    /// `ferry ctl shutdown`: status 0.
    Shutdown,
    /// The guest writes its disk, then exits 7.
    GuestExit,
    /// The isolated disk's device process is killed: status 1 after
    /// `ferry ctl shutdown`.
    DeviceKilled,
    /// The source of an incoming migration gives up after the destination
    /// built its VM: the destination ends with status 1.
    IncomingFailed,
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// Ended by itself, not by a signal, with `code`; no panic, no signal
/// named in its words.
fn assert_clean(run: &Finished, code: i32, what: &str) {
    assert_eq!(run.signal, None, "{what}: ended by signal {:?}\n{}", run.signal, run.stderr);
    assert_eq!(run.code(), code, "{what}\nstdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    for bad in ["panicked", "SIGSEGV", "SIGABRT", "SIGBUS"] {
        assert!(!run.stderr.contains(bad), "{what}: {bad}\n{}", run.stderr);
    }
}

/// A ferry with a disk, busy writing it, with an API socket.
fn busy(dir: &Path, n: usize, isolate: bool, cmdline: &str) -> (Running, std::path::PathBuf) {
    let disk = dir.join(format!("disk{n}.img"));
    std::fs::write(&disk, vec![0u8; 4 << 20]).expect("disk image");
    let socket = dir.join(format!("vm{n}.sock"));
    let (socket_arg, disk_arg) = (path(&socket), format!("path={}", path(&disk)));
    let mut args = vec!["run", "--api-socket", &socket_arg, "--disk", &disk_arg, "--cmdline", cmdline];
    if isolate {
        args.splice(1..1, ["--isolate", "all"]);
    }
    let mut vm = Running::new(spawn_ferry(&args));
    vm.wait_line("FERRY-GUEST READY", DEADLINE).expect("the guest starts");
    assert!(wait_for_path(&socket, DEADLINE), "no API socket");
    // Into the writes: a varying moment, so ends land on requests at
    // different points.
    std::thread::sleep(Duration::from_millis(20 + (n as u64 * 37) % 150));
    (vm, socket)
}

fn end_once(dir: &Path, n: usize, isolate: bool, end: End) {
    let what = format!("end {n} ({end:?}, isolated: {isolate})");
    match end {
        End::Shutdown => {
            let (vm, socket) = busy(dir, n, isolate, BUSY);
            ctl(&socket, &["shutdown"]);
            assert_clean(&vm.finish(DEADLINE), 0, &what);
        }
        End::GuestExit => {
            let (vm, _) = busy(dir, n, isolate, "ready blk-bench=w:300 exit=7");
            assert_clean(&vm.finish(DEADLINE), 7, &what);
        }
        End::DeviceKilled => {
            let (vm, socket) = busy(dir, n, isolate, BUSY);
            let disk = device_processes(vm.pid()).into_iter().find(|(_, cmd)| cmd.contains("disk0"));
            let (pid, _) = disk.expect("the disk's device process");
            // SAFETY: kill(2) on a child of the ferry under test.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let deadline = std::time::Instant::now() + DEADLINE;
            while !ctl(&socket, &["info"]).contains("\"state\": \"failed\"")
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(ctl(&socket, &["info"]).contains("\"state\": \"failed\""), "{what}: the failure is seen");
            ctl(&socket, &["shutdown"]);
            assert_clean(&vm.finish(DEADLINE), 1, &what);
        }
        End::IncomingFailed => {
            // TCP (plaintext on loopback, as the harness runs it): pre-copy
            // held open by the test knobs, so the cancel lands in it, after
            // the destination built its VM.
            let uri = format!("tcp:127.0.0.1:{}", free_port());
            let mut args = vec!["run", "--incoming", uri.as_str()];
            if isolate {
                args.splice(1..1, ["--isolate", "all"]);
            }
            let dst = Running::new(spawn_ferry(&args));
            wait_for_incoming(&uri);
            let disk = dir.join(format!("src{n}.img"));
            std::fs::write(&disk, vec![0u8; 4 << 20]).expect("disk image");
            let socket = dir.join(format!("src{n}.sock"));
            let (socket_arg, disk_arg) = (path(&socket), format!("path={}", path(&disk)));
            let mut src = Running::new(spawn_ferry_env(
                &["run", "--api-socket", &socket_arg, "--disk", &disk_arg, "--cmdline", BUSY],
                &[("FERRY_MIGRATION_ROUND_DELAY_MS", "50"), ("FERRY_MIGRATION_MIN_ROUNDS", "100")],
            ));
            src.wait_line("FERRY-GUEST READY", DEADLINE).expect("the source starts");
            assert!(wait_for_path(&socket, DEADLINE));
            let mig = std::thread::spawn({
                let socket = socket.clone();
                move || migrate(&socket, &uri, &[])
            });
            std::thread::sleep(Duration::from_millis(400));
            ctl(&socket, &["migrate-cancel"]);
            let (ok, text) = mig.join().expect("migrate");
            assert!(!ok && text.contains("cancelled"), "{what}: {text}");
            assert_clean(&dst.finish(DEADLINE), 1, &what);
            assert!(src.alive(), "{what}: the source keeps running");
            ctl(&socket, &["shutdown"]);
            assert_clean(&src.finish(DEADLINE), 0, &what);
        }
    }
}

fn ends(test: &str, isolate: bool, kinds: &[End]) {
    if !kvm_or_skip(test) {
        return;
    }
    let dir = TempDir::new(test);
    for n in 0..ENDS_PER_MODE {
        end_once(dir.path(), n, isolate, kinds[n % kinds.len()]);
    }
}

#[test]
fn fifty_ends_with_the_disk_busy_in_process() {
    ends(
        "fifty_ends_with_the_disk_busy_in_process",
        false,
        &[End::Shutdown, End::GuestExit, End::IncomingFailed],
    );
}

#[test]
fn fifty_ends_with_the_disk_busy_isolated() {
    ends(
        "fifty_ends_with_the_disk_busy_isolated",
        true,
        &[End::Shutdown, End::GuestExit, End::DeviceKilled, End::IncomingFailed],
    );
}
