//! Live migration between two ferry processes ("hosts"), on the test guest:
//! the counter continues, the memory pattern holds, devices work after the
//! move; plans refused before pausing; faults in every phase leave the
//! source guest running, and a later migration of it succeeds.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use ferry_tests::{
    ferry_bin, free_port, kvm_or_skip, migrate, plugin_dir_copy, spawn_ferry, start_with_api, wait_for_path,
    wait_tick, Fault, Finished, Kind, MigrationProxy, Running, TempDir, DEADLINE,
};

struct Source {
    vm: Running,
    socket: PathBuf,
}

fn source(dir: &TempDir, name: &str, args: &[&str]) -> Source {
    let (vm, socket) = start_with_api(dir.path(), name, args, &[]);
    Source { vm, socket }
}

fn destination(uri: &str, plugins: Option<&Path>) -> Running {
    let mut args = vec!["run".to_string(), "--incoming".to_string(), uri.to_string()];
    if let Some(p) = plugins {
        args.push("--plugins".into());
        args.push(p.display().to_string());
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let vm = Running::new(spawn_ferry(&argv));
    ferry_tests::wait_for_incoming(uri);
    vm
}

/// A number in `ferry ctl migrate`'s JSON report.
fn report_u64(report: &str, key: &str) -> Option<u64> {
    report
        .lines()
        .find_map(|l| l.trim().strip_prefix(&format!("\"{key}\": ")))
        .and_then(|v| v.trim_end_matches(',').parse().ok())
}

/// Wait until the VM behind `socket` reports its migration ended (after
/// a cancel); returns that report.
fn migration_ended(socket: &Path) -> serde_json::Value {
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let (_, v) = ferry::api::call(socket, "GET", "/vm/migration", None).expect("status");
        if v["done"] == true {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "the cancel ends the migration: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Migrate a ticking guest and check both sides.
fn migrate_and_check(src_args: &[&str], uri: &str, expect_exit: i32, after: &[&str]) -> (Finished, Finished) {
    let (src, dst, _) = migrate_with(src_args, uri, &[], expect_exit, after);
    (src, dst)
}

/// [`migrate_and_check`] with `ctl_args` for `ferry ctl migrate`; also
/// returns its report.
fn migrate_with(
    src_args: &[&str],
    uri: &str,
    ctl_args: &[&str],
    expect_exit: i32,
    after: &[&str],
) -> (Finished, Finished, String) {
    let dir = TempDir::new("mig");
    let dst = destination(uri, None);
    let mut src = source(&dir, "src", src_args);
    while wait_tick(&mut src.vm) < 3 {}
    let (ok, text) = migrate(&src.socket, uri, ctl_args);
    assert!(ok, "migration failed:\n{text}");
    assert!(text.contains("\"phase\": \"completed\""), "{text}");
    assert!(text.contains("same state v1"), "the plan is printed:\n{text}");
    let src_out = src.vm.finish(DEADLINE);
    assert_eq!(src_out.code(), 0, "the source ends after the move: {}", src_out.stderr);
    assert!(src_out.stderr.contains("ferry: migrated: total"), "{}", src_out.stderr);
    let dst_out = dst.finish(DEADLINE);
    if let Err(e) = ferry_tests::ticks_carry_on(&src_out.stdout, &dst_out.stdout) {
        panic!("the counter continues on the destination: {e}");
    }
    assert_eq!(dst_out.code(), expect_exit, "stdout:\n{}\nstderr:\n{}", dst_out.stdout, dst_out.stderr);
    for want in after {
        assert!(dst_out.stdout.contains(want), "'{want}' missing on the destination:\n{}", dst_out.stdout);
    }
    (src_out, dst_out, text)
}

#[test]
fn idle_guest_over_tcp_with_one_vcpu() {
    if !kvm_or_skip("idle_guest_over_tcp_with_one_vcpu") {
        return;
    }
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    migrate_and_check(
        &["--cmdline", "pattern=8 ticks=40 verify exit=9"],
        &uri,
        9,
        &["PATTERN OK pages=2048", "TICK 40"],
    );
}

#[test]
fn idle_guest_over_tcp_with_four_vcpus() {
    if !kvm_or_skip("idle_guest_over_tcp_with_four_vcpus") {
        return;
    }
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    migrate_and_check(
        &["--cpus", "4", "--cmdline", "smp pattern=8 ticks=40 verify exit=9"],
        &uri,
        9,
        &["PATTERN OK pages=2048", "TICK 40"],
    );
}

#[test]
fn guest_dirtying_memory_over_tcp() {
    if !kvm_or_skip("guest_dirtying_memory_over_tcp") {
        return;
    }
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    migrate_and_check(
        &["--cmdline", "pattern=16 dirty=64 hz=100 ticks=40 verify exit=9"],
        &uri,
        9,
        &["PATTERN OK pages=4096", "TICK 40"],
    );
}

#[test]
fn a_guest_that_outruns_a_capped_link_is_throttled_and_arrives_intact() {
    if !kvm_or_skip("a_guest_that_outruns_a_capped_link_is_throttled_and_arrives_intact") {
        return;
    }
    // About 100 MB/s dirtied over an 8 MiB dirty region, against 16 MiB/s:
    // pre-copy alone never gets the rest under the 300 ms ceiling.
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let (src, _, report) = migrate_with(
        &["--memory", "32M", "--cmdline", "pattern=8 dirty=26 hz=1000 ticks=120 verify exit=9"],
        &uri,
        &["--max-bandwidth", "16M"],
        9,
        &["PATTERN OK pages=2048", "TICK 120"],
    );
    let throttle = report_u64(&report, "throttle_pct").unwrap_or(0);
    assert!(throttle >= 20, "the vCPUs were throttled: {throttle}%\n{report}");
    assert!(src.stderr.contains("faster than the link carries it"), "the source says so:\n{}", src.stderr);
}

#[test]
fn a_cancelled_throttled_migration_lets_the_vcpus_run_freely_again() {
    if !kvm_or_skip("a_cancelled_throttled_migration_lets_the_vcpus_run_freely_again") {
        return;
    }
    use ferry::api::call;
    let dir = TempDir::new("throttle-cancel");
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let dst = destination(&uri, None);
    let mut src =
        source(&dir, "src", &["--memory", "32M", "--cmdline", "pattern=8 dirty=26 hz=1000 ticks=0"]);
    wait_tick(&mut src.vm);
    let get = |path: &str| call(&src.socket, "GET", path, None).expect("an answer").1;
    let body = serde_json::json!({ "uri": uri, "insecure_tcp": true, "max_bandwidth": 16u64 << 20 });
    let (code, _) = call(&src.socket, "PUT", "/vm/migrate", Some(&body)).expect("an answer");
    assert_eq!(code, 200, "started");
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let info = get("/vm");
        if info["throttle_pct"].as_u64().unwrap_or(0) >= 30 {
            break;
        }
        let m = get("/vm/migration");
        assert!(m["done"] != true, "the migration ended before the throttle reached 30%: {m}");
        assert!(std::time::Instant::now() < deadline, "no throttle: {info}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(call(&src.socket, "PUT", "/vm/migrate-cancel", None).expect("an answer").0, 200);
    let m = migration_ended(&src.socket);
    assert_eq!(m["phase"], "failed", "{m}");
    assert!(m["throttle_pct"].as_u64().unwrap_or(0) >= 30, "the report keeps the highest throttle: {m}");
    let info = get("/vm");
    assert_eq!(info["throttle_pct"], 0, "the vCPUs are no longer throttled: {info}");
    assert_eq!(info["state"], "running", "{info}");
    let before = wait_tick(&mut src.vm);
    assert!(wait_tick(&mut src.vm) > before, "the guest still ticks here");
    drop(dst);
}

#[test]
fn same_host_over_a_unix_socket_hands_the_memfd_over() {
    if !kvm_or_skip("same_host_over_a_unix_socket_hands_the_memfd_over") {
        return;
    }
    let dir = TempDir::new("migunix");
    let uri = format!("unix:{}", dir.path().join("mig.sock").display());
    let dst = destination(&uri, None);
    let mut src = source(&dir, "src", &["--cmdline", "pattern=32 dirty=16 ticks=40 verify exit=9"]);
    while wait_tick(&mut src.vm) < 3 {}
    let (ok, text) = migrate(&src.socket, &uri, &[]);
    assert!(ok, "{text}");
    let bytes = report_u64(&text, "bytes_sent").expect("bytes_sent in the report");
    assert!(bytes < 1 << 20, "32 MiB of pattern, yet only state crossed the socket: {bytes} bytes");
    let src_out = src.vm.finish(DEADLINE);
    let out = dst.finish(DEADLINE);
    ferry_tests::ticks_carry_on(&src_out.stdout, &out.stdout).expect("the counter continues");
    assert_eq!(out.code(), 9, "{}", out.stderr);
    assert!(out.stdout.contains("PATTERN OK pages=8192"), "{}", out.stdout);
}

#[test]
fn virtio_blk_keeps_working_after_the_move() {
    if !kvm_or_skip("virtio_blk_keeps_working_after_the_move") {
        return;
    }
    let dir = TempDir::new("migblk");
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 4 << 20]).expect("disk");
    let d = format!("path={}", disk.display());
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    migrate_and_check(
        &["--disk", &d, "--rng", "--cmdline", "pattern=8 blk-write=10:2:3 ticks=30 blk-verify=10:2:3 blk-write=20:1:4 blk-verify=20:1:4 rng=8 verify exit=9"],
        &uri,
        9,
        &["BLK VERIFY OK sector=10 count=2", "BLK VERIFY OK sector=20 count=1", "RNG len=8", "PATTERN OK pages=2048"],
    );
}

/// The source keeps running after a failed migration, and a later one succeeds.
fn still_running_then_migrates(mut src: Source) {
    let before = wait_tick(&mut src.vm);
    let after = wait_tick(&mut src.vm);
    assert!(after > before, "the source guest keeps ticking");
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let dst = destination(&uri, None);
    let (ok, text) = migrate(&src.socket, &uri, &[]);
    assert!(ok, "the later migration succeeds:\n{text}");
    assert_eq!(src.vm.finish(DEADLINE).code(), 0);
    drop(dst);
}

#[test]
fn a_plan_with_a_missing_plugin_is_refused_before_pausing() {
    if !kvm_or_skip("a_plan_with_a_missing_plugin_is_refused_before_pausing") {
        return;
    }
    let dir = TempDir::new("migrefuse");
    let plugins = plugin_dir_copy("migrefuse-plugins");
    std::fs::remove_file(plugins.path().join("libcmos_rtc.so")).expect("remove");
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let dst = destination(&uri, Some(plugins.path()));
    let mut src = source(&dir, "src", &["--cmdline", "pattern=8 ticks=0"]);
    wait_tick(&mut src.vm);
    let (ok, text) = migrate(&src.socket, &uri, &[]);
    assert!(!ok, "refused:\n{text}");
    assert!(
        text.contains("device rtc (cmos-rtc 0.1.0 -> (not installed)): REFUSED: plugin cmos-rtc is not installed on the destination"),
        "{text}"
    );
    let dst_out = dst.finish(DEADLINE);
    assert_ne!(dst_out.code(), 0, "the destination exits non-zero");
    assert!(dst_out.stderr.contains("REFUSED"), "{}", dst_out.stderr);
    still_running_then_migrates(src);
}

#[test]
fn a_dry_run_prints_the_plan_and_moves_nothing() {
    if !kvm_or_skip("a_dry_run_prints_the_plan_and_moves_nothing") {
        return;
    }
    let dir = TempDir::new("migdry");
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let dst = destination(&uri, None);
    let mut src = source(&dir, "src", &["--cmdline", "ticks=0"]);
    wait_tick(&mut src.vm);
    let (ok, text) = migrate(&src.socket, &uri, &["--dry-run"]);
    assert!(ok && text.contains("device com1 (serial-16550 0.2.0 -> 0.2.0): same state v2"), "{text}");
    assert!(text.contains("\"phase\": \"dry-run\""), "{text}");
    assert_eq!(dst.finish(DEADLINE).code(), 0);
    still_running_then_migrates(src);
}

/// What the destination does after the fault.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Then {
    /// It exits non-zero, never having run the guest.
    Exits,
    /// RESUMED was lost: it runs the guest too (the documented window).
    Runs,
    /// Nothing reached it (the connection closed before a byte): it keeps
    /// waiting, and takes the next migration.
    Waits,
}

fn fault(fault: Fault, then: Then) {
    let dir = TempDir::new("migfault");
    let port = free_port();
    let mut dst = destination(&format!("tcp:127.0.0.1:{port}"), None);
    let proxy = MigrationProxy::start(format!("127.0.0.1:{port}").parse().expect("addr"), fault);
    let mut src = source(&dir, "src", &["--cmdline", "pattern=8 dirty=16 ticks=0"]);
    wait_tick(&mut src.vm);
    let (ok, text) = migrate(&src.socket, &format!("tcp:127.0.0.1:{}", proxy.port()), &[]);
    assert!(proxy.fired.load(std::sync::atomic::Ordering::SeqCst), "the fault was injected");
    assert!(!ok, "the migration fails:\n{text}");
    assert!(text.contains("the guest keeps running here"), "{text}");
    match then {
        Then::Runs => {
            dst.wait_line("TICK", DEADLINE);
            drop(dst);
        }
        Then::Exits => {
            let out = dst.finish(DEADLINE);
            assert_ne!(out.code(), 0, "the destination exits non-zero: {}", out.stderr);
            assert!(!out.stdout.contains("TICK"), "the destination never ran the guest: {}", out.stdout);
        }
        Then::Waits => {
            let t = wait_tick(&mut src.vm);
            assert!(wait_tick(&mut src.vm) > t, "the source guest keeps ticking");
            let (ok, text) = migrate(&src.socket, &format!("tcp:127.0.0.1:{port}"), &[]);
            assert!(ok, "the same destination takes the next migration:\n{text}");
            assert_eq!(src.vm.finish(DEADLINE).code(), 0);
            dst.wait_line("TICK", DEADLINE).expect("the guest runs on the destination");
            return;
        }
    }
    still_running_then_migrates(src);
}

#[test]
fn cut_during_the_handshake() {
    if kvm_or_skip("cut_during_the_handshake") {
        fault(Fault::CutAt { kind: Kind::Hello, nth: 1 }, Then::Waits);
    }
}

#[test]
fn cut_during_the_first_pass() {
    if kvm_or_skip("cut_during_the_first_pass") {
        fault(Fault::CutAt { kind: Kind::Pages, nth: 2 }, Then::Exits);
    }
}

#[test]
fn cut_during_stop_and_copy() {
    if kvm_or_skip("cut_during_stop_and_copy") {
        fault(Fault::CutAt { kind: Kind::Vcpu, nth: 1 }, Then::Exits);
    }
}

#[test]
fn cut_before_the_confirm() {
    if kvm_or_skip("cut_before_the_confirm") {
        fault(Fault::CutReply { kind: Kind::Resumed }, Then::Runs);
    }
}

#[test]
fn the_destination_refuses_a_device_section() {
    if kvm_or_skip("the_destination_refuses_a_device_section") {
        fault(Fault::SpoilDevice("rtc"), Then::Exits);
    }
}

#[test]
fn the_destination_is_killed_during_precopy() {
    if !kvm_or_skip("the_destination_is_killed_during_precopy") {
        return;
    }
    let dir = TempDir::new("migkill");
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let dst = destination(&uri, None);
    let socket = dir.path().join("src.sock");
    let s = socket.display().to_string();
    // Long pre-copy (25 rounds, 100 ms apart), so the kill lands in it.
    let vm = Running::new(ferry_tests::spawn_ferry_env(
        &["run", "--api-socket", &s, "--cmdline", "pattern=8 dirty=16 ticks=0"],
        &[("FERRY_MIGRATION_ROUND_DELAY_MS", "100"), ("FERRY_MIGRATION_MIN_ROUNDS", "25")],
    ));
    assert!(wait_for_path(&socket, DEADLINE));
    let mut src = Source { vm, socket: socket.clone() };
    wait_tick(&mut src.vm);
    let sock2 = socket.clone();
    let uri2 = uri.clone();
    let migration = std::thread::spawn(move || migrate(&sock2, &uri2, &[]));
    // Wait for round 3 of pre-copy, then kill the destination.
    let start = std::time::Instant::now();
    loop {
        let (_, status) = ferry::api::call(&socket, "GET", "/vm/migration", None).expect("status");
        let round = status.get("round").and_then(|r| r.as_u64()).unwrap_or(0);
        if status.get("phase").and_then(|p| p.as_str()) == Some("precopy") && round >= 3 {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "pre-copy never reached round 3: {status}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = dst.pid();
    // SAFETY: a plain kill(2) of our own child.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let _ = dst.finish(DEADLINE);
    let (ok, text) = migration.join().expect("migration thread");
    assert!(!ok, "{text}");
    assert!(text.contains("the guest keeps running here"), "{text}");
    still_running_then_migrates(src);
}

#[test]
fn between_two_hosts_over_tcp_with_frames_before_and_after() {
    if !kvm_or_skip("between_two_hosts_over_tcp_with_frames_before_and_after") {
        return;
    }
    let Some(hosts) = ferry_tests::netns::TwoHosts::new("ftap0") else { return };
    let dir = TempDir::new("mig2hosts");
    let uri = "tcp:10.200.0.2:7790";
    let capture_a = hosts.a.capture("ftap0", 2, Duration::from_secs(60));
    let capture_b = hosts.b.capture("ftap0", 3, Duration::from_secs(90));
    let dst = Running::new(hosts.b.spawn_ferry(&[], &["--incoming", uri]));
    std::thread::sleep(Duration::from_millis(300));
    let socket = dir.path().join("src.sock");
    let s = socket.display().to_string();
    let mut src = Running::new(hosts.a.spawn_ferry(
        &[],
        &[
            "--api-socket",
            &s,
            "--net",
            "tap=ftap0,mac=52:54:00:12:34:56",
            "--cmdline",
            "pattern=8 net-send=2 ticks=30 net-send=3 verify exit=9",
        ],
    ));
    assert!(wait_for_path(&socket, DEADLINE));
    while wait_tick(&mut src) < 3 {}
    let (ok, text) = migrate(&socket, uri, &[]);
    assert!(ok, "{text}");
    let src_out = src.finish(DEADLINE);
    assert_eq!(src_out.code(), 0, "{}", src_out.stderr);
    let dst_out = dst.finish(DEADLINE);
    ferry_tests::ticks_carry_on(&src_out.stdout, &dst_out.stdout).expect("the counter continues");
    assert_eq!(dst_out.code(), 9, "{}\n{}", dst_out.stdout, dst_out.stderr);
    assert!(dst_out.stdout.contains("PATTERN OK pages=2048"));
    let a = capture_a.join().expect("capture A");
    let b = capture_b.join().expect("capture B");
    assert_eq!(a.len(), 2, "frames before the move left through host A's tap");
    assert_eq!(b.len(), 3, "frames after the move leave through host B's tap");
    assert!(b.iter().all(|f| f[6..12] == [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]), "same guest MAC on host B");
}

/// A virtio-blk read lands in guest memory during pre-copy. KVM's dirty log
/// does not see device writes; the device dirty bitmap does. With it the
/// guest finds the data on the destination; without it (a test knob), the
/// destination has the stale page and the guest's check fails.
fn device_write_during_precopy(ignore_device_dirty: bool) -> Finished {
    let dir = TempDir::new("migdma");
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 4 << 20]).expect("disk");
    let d = format!("path={}", disk.display());
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let dst = destination(&uri, None);
    let socket = dir.path().join("src.sock");
    let s = socket.display().to_string();
    let mut env = vec![("FERRY_MIGRATION_ROUND_DELAY_MS", "100"), ("FERRY_MIGRATION_MIN_ROUNDS", "25")];
    if ignore_device_dirty {
        env.push(("FERRY_MIGRATION_IGNORE_DEVICE_DIRTY", "1"));
    }
    // Write the sectors, tick a little, then: zero a buffer, wait 1 s, read
    // the sectors into it (device write), wait 3 s, check it.
    let mut src = Running::new(ferry_tests::spawn_ferry_env(
        &[
            "run",
            "--api-socket",
            &s,
            "--disk",
            &d,
            "--cmdline",
            "blk-write=300:8:7 ticks=3 blk-dma-check=300:8:7:100:300 exit=0",
        ],
        &env,
    ));
    assert!(wait_for_path(&socket, DEADLINE));
    src.wait_line("TICK 3", DEADLINE).expect("ticks");
    let migration = std::thread::spawn(move || migrate(&socket, &uri, &[]));
    let read = src.wait_line("BLK DMA READ", DEADLINE);
    let (ok, text) = migration.join().expect("migration thread");
    assert!(ok, "{text}");
    assert!(read.is_some(), "the device wrote during pre-copy, on the source");
    let src_out = src.finish(DEADLINE);
    assert!(!src_out.stdout.contains("BLK DMA OK"), "the check ran on the destination");
    dst.finish(DEADLINE)
}

#[test]
fn device_writes_during_precopy_are_resent() {
    if !kvm_or_skip("device_writes_during_precopy_are_resent") {
        return;
    }
    let out = device_write_during_precopy(false);
    assert_eq!(out.code(), 0, "stdout:\n{}\nstderr:\n{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("BLK DMA OK sector=300 count=8"), "{}", out.stdout);
}

#[test]
fn without_the_device_dirty_mark_the_check_fails() {
    if !kvm_or_skip("without_the_device_dirty_mark_the_check_fails") {
        return;
    }
    let out = device_write_during_precopy(true);
    assert_eq!(out.code(), 2, "stdout:\n{}\nstderr:\n{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("BLK DMA BAD sector=300"), "{}", out.stdout);
}

/// The plan's device lines, each once (a refusal is printed as the plan
/// and again in the error).
fn device_lines(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for l in text.lines().filter(|l| l.starts_with("device ")) {
        if !lines.iter().any(|x| x == l) {
            lines.push(l.to_string());
        }
    }
    lines
}

fn host_manifest(plugins: &Path, out: &Path) {
    let o = Command::new(ferry_bin())
        .args(["plugins", "--manifest", "--plugins"])
        .arg(plugins)
        .output()
        .expect("ferry plugins");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::write(out, o.stdout).expect("write manifest");
}

#[test]
fn compat_prints_the_plan_the_live_handshake_gives() {
    if !kvm_or_skip("compat_prints_the_plan_the_live_handshake_gives") {
        return;
    }
    let dir = TempDir::new("compat");
    let full = plugin_dir_copy("compat-full");
    let partial = plugin_dir_copy("compat-partial");
    std::fs::remove_file(partial.path().join("libcmos_rtc.so")).expect("remove");
    let (a, b) = (dir.path().join("a.json"), dir.path().join("b.json"));
    host_manifest(full.path(), &a);
    host_manifest(partial.path(), &b);
    for (to_dir, to_json) in [(full.path(), &a), (partial.path(), &b)] {
        let offline = Command::new(ferry_bin())
            .arg("compat")
            .arg("--from")
            .arg(&a)
            .arg("--to")
            .arg(to_json)
            .output()
            .expect("ferry compat");
        let offline_lines = device_lines(&String::from_utf8_lossy(&offline.stdout));
        assert_eq!(offline_lines.len(), 4, "{offline:?}");
        let uri = format!("tcp:127.0.0.1:{}", free_port());
        let dst = destination(&uri, Some(to_dir));
        let full_arg = full.path().display().to_string();
        let mut src = source(&dir, "compat-src", &["--plugins", &full_arg, "--cmdline", "ticks=0"]);
        wait_tick(&mut src.vm);
        let (_, live) = migrate(&src.socket, &uri, &["--dry-run"]);
        assert_eq!(device_lines(&live), offline_lines, "offline and live plans agree");
        assert_eq!(offline.status.success(), !live.contains("REFUSED"));
        drop(dst);
        drop(src);
    }
}

/// The guest sends a frame every 100 ms while it moves from host A to
/// host B, with pre-copy held open for about 1.5 s: every frame leaves
/// exactly once, through A's tap before the switch-over and B's after.
#[test]
fn between_two_hosts_with_frames_flowing_during_the_move() {
    if !kvm_or_skip("between_two_hosts_with_frames_flowing_during_the_move") {
        return;
    }
    const FRAMES: usize = 30;
    let Some(hosts) = ferry_tests::netns::TwoHosts::new("ftap1") else { return };
    let dir = TempDir::new("migflow");
    let uri = "tcp:10.200.0.2:7791";
    let capture_a = hosts.a.capture("ftap1", FRAMES, Duration::from_secs(15));
    let capture_b = hosts.b.capture("ftap1", FRAMES, Duration::from_secs(15));
    let dst = Running::new(hosts.b.spawn_ferry(&[], &["--incoming", uri]));
    std::thread::sleep(Duration::from_millis(300));
    let socket = dir.path().join("src.sock");
    let s = socket.display().to_string();
    let cmdline = "pattern=8 ".to_string() + &"net-send=1 ticks=1 ".repeat(FRAMES) + "verify exit=9";
    let mut src = Running::new(hosts.a.spawn_ferry(
        &["FERRY_MIGRATION_ROUND_DELAY_MS=100", "FERRY_MIGRATION_MIN_ROUNDS=15"],
        &["--api-socket", &s, "--net", "tap=ftap1,mac=52:54:00:12:34:57", "--cmdline", &cmdline],
    ));
    assert!(wait_for_path(&socket, DEADLINE));
    for _ in 0..3 {
        src.wait_line("NET SENT 1", DEADLINE).expect("the guest sends on host A");
    }
    let (ok, text) = migrate(&socket, uri, &[]);
    assert!(ok, "{text}");
    let src_out = src.finish(DEADLINE);
    assert_eq!(src_out.code(), 0, "{}", src_out.stderr);
    let dst_out = dst.finish(DEADLINE);
    assert_eq!(dst_out.code(), 9, "{}\n{}", dst_out.stdout, dst_out.stderr);
    assert!(dst_out.stdout.contains("PATTERN OK pages=2048"));
    let (on_a, on_b) = ferry_tests::count_across_move(&src_out.stdout, &dst_out.stdout, "NET SENT 1 ");
    assert!(on_a >= 3 + 5, "the guest kept sending during pre-copy ({on_a} frames on A)");
    assert!(on_b > 0, "the guest sends on B after the move");
    assert_eq!(on_a + on_b, FRAMES, "the guest sent each frame once");
    let a = capture_a.join().expect("capture A");
    let b = capture_b.join().expect("capture B");
    assert_eq!(
        (a.len(), b.len()),
        (on_a, on_b),
        "every frame sent left once, through the host it was sent on"
    );
}

/// The API's statuses: 409 for what the VM's state does not allow now,
/// 400 for a bad request, 404 for no such endpoint.
#[test]
fn the_api_says_conflict_when_the_vm_is_busy() {
    if !kvm_or_skip("the_api_says_conflict_when_the_vm_is_busy") {
        return;
    }
    use ferry::api::call;
    let dir = TempDir::new("api409");
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let dst = destination(&uri, None);
    let socket = dir.path().join("src.sock");
    let s = socket.display().to_string();
    let slow = [("FERRY_MIGRATION_ROUND_DELAY_MS", "100"), ("FERRY_MIGRATION_MIN_ROUNDS", "50")];
    let mut src = Running::new(ferry_tests::spawn_ferry_env(
        &["run", "--api-socket", &s, "--cmdline", "ticks=0"],
        &slow,
    ));
    assert!(wait_for_path(&socket, DEADLINE));
    wait_tick(&mut src);
    let status = |method: &str, path: &str, body: Option<serde_json::Value>| {
        let (code, v) = call(&socket, method, path, body.as_ref()).expect("an answer");
        (code, v["error"].as_str().unwrap_or("").to_string())
    };
    assert_eq!(status("PUT", "/vm/migrate-cancel", None), (409, "no migration is running".into()));
    let bare = status("PUT", "/vm/migrate", Some(serde_json::json!({ "uri": uri })));
    assert!(bare.0 == 400 && bare.1.contains("needs --tls-dir"), "tcp: without a choice: {bare:?}");
    let (code, _) =
        status("PUT", "/vm/migrate", Some(serde_json::json!({ "uri": uri, "insecure_tcp": true })));
    assert_eq!(code, 200, "started");
    assert_eq!(status("PUT", "/vm/pause", None), (409, "a migration is running".into()));
    assert_eq!(
        status("PUT", "/vm/migrate", Some(serde_json::json!({ "uri": uri, "insecure_tcp": true }))),
        (409, "a migration is already running".into())
    );
    let snap = dir.path().join("x.snap").display().to_string();
    assert_eq!(status("PUT", "/vm/snapshot", Some(serde_json::json!({ "path": snap }))).0, 409);
    assert_eq!(status("PUT", "/vm/migrate-cancel", None).0, 200);
    migration_ended(&socket);
    let (code, e) =
        status("PUT", "/vm/snapshot", Some(serde_json::json!({ "path": "/nonexistent/dir/x.snap" })));
    assert_eq!(code, 400, "{e}");
    assert!(e.contains("cannot create /nonexistent/dir/x.partial"), "{e}");
    assert_eq!(status("PUT", "/vm/migrate", Some(serde_json::json!({ "uri": "udp:1:2" }))).0, 400);
    assert_eq!(status("GET", "/nope", None).0, 404);
    assert_eq!(status("GET", "/vm/pause", None).0, 405);
    assert!(wait_tick(&mut src) > 0, "the guest still runs");
    drop(dst);
}

/// Unsolicited frames (the test's, and the kernel's with IPv6 on) flow at
/// the guest on both hosts while it moves, its receive ring full and a
/// frame waiting in the device as it transmits: every frame it reports,
/// on either host, is one that was sent to it, once, never its own.
#[test]
fn unsolicited_frames_during_a_move_arrive_once_and_intact() {
    if !kvm_or_skip("unsolicited_frames_during_a_move_arrive_once_and_intact") {
        return;
    }
    let Some(hosts) = ferry_tests::netns::TwoHosts::with_ipv6("ftap4") else { return };
    let dir = TempDir::new("migflood");
    let uri = "tcp:10.200.0.2:7792";
    let on_a = hosts.a.inject_stream("ftap4", "a", Duration::from_millis(25));
    let on_b = hosts.b.inject_stream("ftap4", "b", Duration::from_millis(25));
    let dst = Running::new(hosts.b.spawn_ferry(&[], &["--incoming", uri]));
    std::thread::sleep(Duration::from_millis(300));
    let socket = dir.path().join("src.sock");
    let s = socket.display().to_string();
    let cmdline = "net-send=1 ticks=10 net-send=3 net-recv=5 ticks=10 net-send=2 net-recv=20 exit=0";
    let mut src = Running::new(hosts.a.spawn_ferry(
        &[],
        &["--api-socket", &s, "--net", "tap=ftap4,mac=52:54:00:12:34:5a", "--cmdline", cmdline],
    ));
    assert!(wait_for_path(&socket, DEADLINE));
    src.wait_line("NET RECV DONE", DEADLINE).expect("the first receive completes on A");
    for _ in 0..5 {
        src.wait_line("TICK", DEADLINE).expect("ticks while the ring fills again");
    }
    let (ok, text) = migrate(&socket, uri, &[]);
    assert!(ok, "{text}");
    let src_out = src.finish(DEADLINE);
    let dst_out = dst.finish(DEADLINE);
    let mut sent = on_a.stop();
    sent.extend(on_b.stop());
    assert_eq!(dst_out.code(), 0, "stdout:\n{}\nstderr:\n{}", dst_out.stdout, dst_out.stderr);
    match ferry_tests::netns::check_received(&[&src_out.stdout, &dst_out.stdout], &sent) {
        Ok(n) => assert!(n >= 25, "the guest reported {n} test frames"),
        Err(e) => panic!("{e}\non A:\n{}\non B:\n{}", src_out.stdout, dst_out.stdout),
    }
    assert!(
        dst_out.stdout.contains("HOST-FRAME b"),
        "frames sent on B reach the guest there: {}",
        dst_out.stdout
    );
}
