//! Post-copy between two ferry processes, on the test guest: a guest that
//! dirties memory faster than the link finishes by post-copy with its
//! pattern intact; a link cut during post-copy leaves the guest on the
//! destination waiting for its missing pages, and the migration resumes on
//! a new connection with nothing lost; a cut before the guest resumed on
//! the destination leaves the source running; a guest that ends on the
//! destination during post-copy ends the source's side too.

use std::{path::PathBuf, time::Duration};

use ferry_tests::{
    free_port, kvm_or_skip, migrate, start_with_api, wait_tick, Fault, Finished, Kind, MigrationProxy,
    Running, TempDir, DEADLINE,
};

/// About 100 MB/s dirtied over the 32 MiB guest against a 16 MiB/s link:
/// pre-copy alone never gets the rest under the 300 ms ceiling.
const OUTRUNS: &str = "pattern=8 dirty=26 hz=1000";
const CAP: [&str; 2] = ["--max-bandwidth", "16M"];

fn destination(uri: &str) -> Running {
    // At info level the destination says when post-copy pauses, resumes, completes.
    let vm = Running::new(ferry_tests::spawn_ferry_env(
        &["run", "--incoming", uri, "--insecure-tcp"],
        &[("FERRY_LOG", "info")],
    ));
    ferry_tests::wait_for_incoming(uri);
    vm
}

fn source(dir: &TempDir, cmdline: &str) -> (Running, PathBuf) {
    start_with_api(dir.path(), "src", &["--memory", "32M", "--cmdline", cmdline], &[])
}

/// The value of `key` in a JSON report `ferry ctl migrate` printed.
fn report(text: &str, key: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("\"{key}\": ")))
        .map(|v| v.trim_end_matches(',').trim_matches('"').to_string())
}

/// Wait until the source's migration reaches `phase`.
fn wait_phase(socket: &std::path::Path, phase: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let (_, v) = ferry::api::call(socket, "GET", "/vm/migration", None).expect("status");
        if v["phase"] == phase {
            return v;
        }
        assert!(v["done"] != true, "the migration ended before {phase}: {v}");
        assert!(std::time::Instant::now() < deadline, "never reached {phase}: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn check_arrived(src: Finished, dst: Finished, ticks: &str) {
    assert_eq!(src.code(), 0, "the source ends after the move: {}", src.stderr);
    assert!(src.stderr.contains("ferry: migrated: total"), "{}", src.stderr);
    assert!(src.stderr.contains("post-copy:"), "the source's last line says post-copy:\n{}", src.stderr);
    ferry_tests::ticks_carry_on(&src.stdout, &dst.stdout).expect("the counter continues on the destination");
    assert_eq!(dst.code(), 9, "stdout:\n{}\nstderr:\n{}", dst.stdout, dst.stderr);
    for want in ["PATTERN OK pages=2048", ticks] {
        assert!(dst.stdout.contains(want), "'{want}' missing on the destination:\n{}", dst.stdout);
    }
    assert!(dst.stderr.contains("post-copy complete"), "{}", dst.stderr);
}

#[test]
fn a_guest_that_outruns_the_link_finishes_by_postcopy_with_its_pattern_intact() {
    if !kvm_or_skip("a_guest_that_outruns_the_link_finishes_by_postcopy_with_its_pattern_intact") {
        return;
    }
    let dir = TempDir::new("postcopy");
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let dst = destination(&uri);
    let (mut src, socket) = source(&dir, &format!("{OUTRUNS} ticks=120 verify exit=9"));
    while wait_tick(&mut src) < 3 {}
    let (ok, text) = migrate(&socket, &uri, &[CAP[0], CAP[1], "--postcopy"]);
    assert!(ok, "migration failed:\n{text}");
    assert_eq!(report(&text, "mode").as_deref(), Some("post-copy"), "{text}");
    let pages: u64 = report(&text, "postcopy_pages").and_then(|v| v.parse().ok()).unwrap_or(0);
    assert!(pages > 0, "pages moved after the switch-over:\n{text}");
    let downtime: f64 = report(&text, "downtime_ms").and_then(|v| v.parse().ok()).unwrap_or(f64::MAX);
    assert!(downtime < 1000.0, "the pause ends without waiting for memory: {downtime} ms\n{text}");
    check_arrived(src.finish(DEADLINE), dst.finish(DEADLINE), "TICK 120");
}

#[test]
fn a_link_cut_during_postcopy_pauses_it_and_it_resumes_on_a_new_connection() {
    if !kvm_or_skip("a_link_cut_during_postcopy_pauses_it_and_it_resumes_on_a_new_connection") {
        return;
    }
    let dir = TempDir::new("postcopy-cut");
    let port = free_port();
    let dst = destination(&format!("tcp:127.0.0.1:{port}"));
    let proxy = MigrationProxy::start(
        format!("127.0.0.1:{port}").parse().expect("addr"),
        Fault::CutInPostcopy { nth: 8 },
    );
    let (mut src, socket) = source(&dir, &format!("{OUTRUNS} ticks=150 verify exit=9"));
    while wait_tick(&mut src) < 3 {}
    let (sock, via) = (socket.clone(), format!("tcp:127.0.0.1:{}", proxy.port()));
    let first = std::thread::spawn(move || migrate(&sock, &via, &[CAP[0], CAP[1], "--postcopy"]));
    let paused = wait_phase(&socket, "postcopy-paused");
    assert!(proxy.fired.load(std::sync::atomic::Ordering::SeqCst), "the cut came in post-copy");
    assert!(paused["postcopy_pages_left"].as_u64().unwrap_or(0) > 0, "pages wait on the source: {paused}");
    // Nothing else takes it back: a cancel is refused while the guest is away.
    let (code, _) = ferry::api::call(&socket, "PUT", "/vm/migrate-cancel", None).expect("an answer");
    assert_eq!(code, 409, "a post-copy cannot be cancelled");
    std::thread::sleep(Duration::from_millis(300));
    let (ok, text) = migrate(&socket, &format!("tcp:127.0.0.1:{port}"), &["--resume"]);
    assert!(ok, "the resume went through:\n{text}");
    let (ok, text) = first.join().expect("the first ctl");
    let (src, dst) = (src.finish(DEADLINE), dst.finish(DEADLINE));
    assert!(
        ok,
        "the migration completes after the resume:\n{text}\nsource:\n{}\ndestination:\n{}",
        src.stderr, dst.stderr
    );
    assert_eq!(report(&text, "mode").as_deref(), Some("post-copy"), "{text}");
    assert!(dst.stderr.contains("post-copy paused"), "the destination says it waits:\n{}", dst.stderr);
    assert!(dst.stderr.contains("post-copy resumed"), "{}", dst.stderr);
    check_arrived(src, dst, "TICK 150");
}

#[test]
fn a_cut_as_postcopy_begins_leaves_the_source_running() {
    if !kvm_or_skip("a_cut_as_postcopy_begins_leaves_the_source_running") {
        return;
    }
    let dir = TempDir::new("postcopy-early");
    let port = free_port();
    let dst = destination(&format!("tcp:127.0.0.1:{port}"));
    let proxy = MigrationProxy::start(
        format!("127.0.0.1:{port}").parse().expect("addr"),
        Fault::CutAt { kind: Kind::Stale, nth: 1 },
    );
    let (mut src, socket) = source(&dir, &format!("{OUTRUNS} ticks=0"));
    wait_tick(&mut src);
    let (ok, text) =
        migrate(&socket, &format!("tcp:127.0.0.1:{}", proxy.port()), &[CAP[0], CAP[1], "--postcopy"]);
    assert!(proxy.fired.load(std::sync::atomic::Ordering::SeqCst), "the cut came as post-copy began");
    assert!(!ok, "{text}");
    assert!(text.contains("the guest keeps running here"), "{text}");
    let out = dst.finish(DEADLINE);
    assert_ne!(out.code(), 0, "the destination exits: {}", out.stderr);
    assert!(!out.stdout.contains("TICK"), "it never ran the guest: {}", out.stdout);
    let t = wait_tick(&mut src);
    assert!(wait_tick(&mut src) > t, "the source guest keeps ticking");
}

#[test]
fn a_guest_that_ends_on_the_destination_during_postcopy_ends_the_source_too() {
    if !kvm_or_skip("a_guest_that_ends_on_the_destination_during_postcopy_ends_the_source_too") {
        return;
    }
    let dir = TempDir::new("postcopy-ends");
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let dst_socket = dir.path().join("dst.sock");
    let dst = Running::new(ferry_tests::spawn_ferry_env(
        &["run", "--incoming", &uri, "--insecure-tcp", "--api-socket", &dst_socket.display().to_string()],
        &[("FERRY_LOG", "info")],
    ));
    ferry_tests::wait_for_incoming(&uri);
    let (mut src, socket) = source(&dir, &format!("{OUTRUNS} ticks=0"));
    wait_tick(&mut src);
    // A slow link: the stale pages take seconds, the shutdown comes first.
    let (sock, to) = (socket.clone(), uri.clone());
    let first = std::thread::spawn(move || migrate(&sock, &to, &["--max-bandwidth", "4M", "--postcopy"]));
    wait_phase(&socket, "postcopy");
    ferry_tests::ctl(&dst_socket, &["shutdown"]);
    let (ok, text) = first.join().expect("the ctl");
    let (src, dst) = (src.finish(DEADLINE), dst.finish(DEADLINE));
    assert!(
        ok,
        "the source ends with its report:\n{text}\nsource:\n{}\ndestination:\n{}",
        src.stderr, dst.stderr
    );
    assert_eq!(report(&text, "mode").as_deref(), Some("post-copy"), "{text}");
    assert_eq!(src.code(), 0, "{}", src.stderr);
    assert!(src.stderr.contains("the guest ended on the destination with"), "{}", src.stderr);
    assert_eq!(dst.code(), 0, "{}", dst.stderr);
}
