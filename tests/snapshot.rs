//! Snapshot and restore with the test guest: the counter carries on from
//! its last value, the memory pattern holds, virtio-blk, virtio-rng, the
//! serial console (both ways), virtio-net and interrupts work after restore, with 1 and
//! 4 vCPUs; ten cycles in a row stay good.

use std::{io::Write, time::Duration};

use ferry_tests::{ctl, kvm_or_skip, spawn_ferry, tick_number, wait_for_path, Running, TempDir, DEADLINE};

/// Start `args`, wait for `TICK <after>` or later, snapshot to `snap`, shut
/// down; returns what the first process printed.
fn run_and_snapshot(dir: &TempDir, args: &[&str], after: u64, snap: &str) -> String {
    let socket = dir.path().join("api.sock");
    let socket_arg = socket.display().to_string();
    let mut all = vec!["run", "--api-socket", &socket_arg];
    all.extend_from_slice(args);
    let mut first = Running::new(spawn_ferry(&all));
    assert!(wait_for_path(&socket, Duration::from_secs(20)), "no API socket");
    loop {
        let line = first.wait_line("TICK", DEADLINE).expect("the guest ticks");
        if tick_number(&line).unwrap_or(0) >= after {
            break;
        }
    }
    // Paused first, so the last tick printed is the snapshot's.
    ctl(&socket, &["pause"]);
    let report = ctl(&socket, &["snapshot", snap]);
    assert!(report.contains("\"paused_ms\""), "{report}");
    ctl(&socket, &["shutdown"]);
    let out = first.finish(DEADLINE);
    assert_eq!(out.code(), 0, "shutdown ends ferry with 0; stderr: {}", out.stderr);
    assert!(out.stdout.lines().any(|l| tick_number(l).is_some()), "ticks before the snapshot");
    out.stdout
}

fn snapshot_and_restore_with(cpus: &str) {
    let dir = TempDir::new(&format!("snap{cpus}"));
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 4 << 20]).expect("disk");
    let disk_arg = format!("path={}", disk.display());
    let snap = dir.path().join("vm.snap").display().to_string();
    let cmdline = "smp pattern=8 blk-write=10:2:3 ticks=40 blk-verify=10:2:3 blk-write=20:1:4 \
                   blk-verify=20:1:4 rng=8 verify echo exit=7";
    let before = run_and_snapshot(
        &dir,
        &["--cpus", cpus, "--disk", &disk_arg, "--rng", "--cmdline", cmdline],
        5,
        &snap,
    );

    // A new process, from the file alone (plus what the user types).
    let mut second = Running::new(spawn_ferry(&["run", "--restore", &snap]));
    second.stdin().expect("stdin").write_all(b"typed after restore\n").expect("type");
    let out = second.finish(DEADLINE);
    assert_eq!(out.code(), 7, "stdout:\n{}\nstderr:\n{}", out.stdout, out.stderr);
    let ticks: Vec<u64> = out.stdout.lines().filter_map(tick_number).collect();
    if let Err(e) = ferry_tests::ticks_carry_on(&before, &out.stdout) {
        panic!("the counter continues: {e}\n{}", out.stdout);
    }
    assert_eq!(ticks.last(), Some(&40), "PIT interrupts keep arriving");
    for want in [
        "BLK VERIFY OK sector=10 count=2",
        "BLK VERIFY OK sector=20 count=1",
        "PATTERN OK pages=2048",
        "ECHO typed after restore",
    ] {
        assert!(out.stdout.contains(want), "'{want}' missing:\n{}", out.stdout);
    }
    let write =
        out.stdout.lines().find(|l| l.starts_with("BLK WRITE sector=20")).expect("blk write after restore");
    assert!(write.contains("status=0") && !write.ends_with("irqs=0"), "MSI-X after restore: {write}");
    assert!(out.stdout.lines().any(|l| l.starts_with("RNG len=8")), "{}", out.stdout);
    if cpus == "4" {
        // The APs were started before the snapshot and stay parked; the
        // BSP's view of them survives.
        assert!(!out.stdout.contains("GUEST EXCEPTION"), "{}", out.stdout);
    }
}

#[test]
fn snapshot_and_restore_with_one_vcpu() {
    if kvm_or_skip("snapshot_and_restore_with_one_vcpu") {
        snapshot_and_restore_with("1");
    }
}

#[test]
fn snapshot_and_restore_with_four_vcpus() {
    if kvm_or_skip("snapshot_and_restore_with_four_vcpus") {
        snapshot_and_restore_with("4");
    }
}

#[test]
fn ten_snapshot_restore_cycles_in_a_row() {
    if !kvm_or_skip("ten_snapshot_restore_cycles_in_a_row") {
        return;
    }
    let dir = TempDir::new("cycles");
    let socket = dir.path().join("api.sock");
    let socket_arg = socket.display().to_string();
    let snap = |i: usize| dir.path().join(format!("cycle{i}.snap")).display().to_string();
    let mut before =
        run_and_snapshot(&dir, &["--cmdline", "pattern=16 ticks=100 verify exit=5"], 3, &snap(0));
    for i in 1..=10 {
        let previous = snap(i - 1);
        let mut vm = Running::new(spawn_ferry(&["run", "--restore", &previous, "--api-socket", &socket_arg]));
        assert!(wait_for_path(&socket, Duration::from_secs(20)), "cycle {i}: no API socket");
        vm.wait_line("TICK", DEADLINE).expect("ticks after restore");
        let first = ferry_tests::ticks_carry_on(&before, &vm.seen())
            .unwrap_or_else(|e| panic!("cycle {i}: the counter continues: {e}"));
        let target = first + 2;
        while vm.wait_line("TICK", DEADLINE).and_then(|l| tick_number(&l)).expect("ticks") < target {}
        ctl(&socket, &["pause"]);
        ctl(&socket, &["snapshot", &snap(i)]);
        ctl(&socket, &["shutdown"]);
        let out = vm.finish(DEADLINE);
        assert_eq!(out.code(), 0, "cycle {i}: {}", out.stderr);
        assert!(!out.stdout.contains("BAD"), "cycle {i}: pattern broke:\n{}", out.stdout);
        before = out.stdout;
    }
    let end = Running::new(spawn_ferry(&["run", "--restore", &snap(10)])).finish(DEADLINE);
    assert_eq!(end.code(), 5, "stdout:\n{}\nstderr:\n{}", end.stdout, end.stderr);
    assert!(end.stdout.contains("PATTERN OK pages=4096"), "{}", end.stdout);
    assert!(end.stdout.contains("TICK 100"));
}

/// virtio-net across a snapshot: the guest sends before it, and after a
/// restore in a new process on the same tap it sends again and receives
/// what the host injects.
#[test]
fn snapshot_and_restore_with_a_network_device() {
    if !kvm_or_skip("snapshot_and_restore_with_a_network_device") {
        return;
    }
    let Some(ns) = ferry_tests::netns::NetNs::with_tap("ftap2") else { return };
    let dir = TempDir::new("snapnet");
    let capture = ns.capture("ftap2", 5, Duration::from_secs(60));
    let inject = ns.injector("ftap2");
    let socket = dir.path().join("api.sock");
    let (s, snap) = (socket.display().to_string(), dir.path().join("vm.snap").display().to_string());
    let in_ns = |args: &[&str]| Running::new(ns.spawn_ferry(&[], args));
    let mut first = in_ns(&[
        "--api-socket",
        &s,
        "--net",
        "tap=ftap2,mac=52:54:00:12:34:58",
        "--cmdline",
        "net-send=2 ticks=20 net-send=3 net-recv=2 exit=0",
    ]);
    assert!(wait_for_path(&socket, Duration::from_secs(20)), "no API socket");
    first.wait_line("TICK 3", DEADLINE).expect("the guest ticks");
    ctl(&socket, &["pause"]);
    assert!(ctl(&socket, &["snapshot", &snap]).contains("\"paused_ms\""));
    ctl(&socket, &["shutdown"]);
    let out = first.finish(DEADLINE);
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert!(out.stdout.contains("NET SENT 2 mac=52:54:00:12:34:58"), "{}", out.stdout);

    let mut second = in_ns(&["--restore", &snap]);
    assert!(second.wait_line("NET RECV READY", DEADLINE).is_some(), "the restored guest never listened");
    for i in 0..2 {
        inject(format!("HOST-FRAME {i}").as_bytes());
    }
    let out = second.finish(DEADLINE);
    assert_eq!(out.code(), 0, "stdout:\n{}\nstderr:\n{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("NET SENT 3 mac=52:54:00:12:34:58"), "{}", out.stdout);
    for i in 0..2 {
        let want = format!("NET RECV len=60 ethertype=88b5 payload=HOST-FRAME {i}");
        assert!(out.stdout.contains(&want), "{want} missing:\n{}", out.stdout);
    }
    let frames = capture.join().expect("capture");
    assert_eq!(frames.len(), 5, "2 frames before the snapshot and 3 after the restore reached the tap");
    assert!(frames.iter().all(|f| f[6..12] == [0x52, 0x54, 0x00, 0x12, 0x34, 0x58]));
}

/// The guest's receive ring fills with unsolicited frames (the test's and,
/// IPv6 on, the kernel's), the guest transmits while one more frame waits
/// in the device, and a snapshot is taken with the ring full again: every
/// frame the guest reports, before the snapshot and after the restore, is
/// one that was sent to it, once, never one of its own.
#[test]
fn unsolicited_frames_across_a_snapshot_arrive_once_and_intact() {
    if !kvm_or_skip("unsolicited_frames_across_a_snapshot_arrive_once_and_intact") {
        return;
    }
    let Some(ns) = ferry_tests::netns::NetNs::with_tap_and_ipv6("ftap3") else { return };
    let dir = TempDir::new("snapflood");
    let stream = ns.inject_stream("ftap3", "s", Duration::from_millis(25));
    let socket = dir.path().join("api.sock");
    let (s, snap) = (socket.display().to_string(), dir.path().join("vm.snap").display().to_string());
    let in_ns = |args: &[&str]| Running::new(ns.spawn_ferry(&[], args));
    let cmdline = "net-send=1 ticks=10 net-send=3 net-recv=5 ticks=10 net-send=2 net-recv=20 exit=0";
    let mut first =
        in_ns(&["--api-socket", &s, "--net", "tap=ftap3,mac=52:54:00:12:34:59", "--cmdline", cmdline]);
    assert!(wait_for_path(&socket, Duration::from_secs(20)), "no API socket");
    if first.wait_line("NET RECV DONE", DEADLINE).is_none() {
        panic!("the first receive did not complete:\n{}", first.finish(DEADLINE).stdout);
    }
    for _ in 0..5 {
        first.wait_line("TICK", DEADLINE).expect("ticks while the ring fills again");
    }
    ctl(&socket, &["pause"]);
    ctl(&socket, &["snapshot", &snap]);
    ctl(&socket, &["shutdown"]);
    let before = first.finish(DEADLINE);
    let after = Running::new(ns.spawn_ferry(&[], &["--restore", &snap])).finish(DEADLINE);
    let sent = stream.stop();
    assert_eq!(after.code(), 0, "stdout:\n{}\nstderr:\n{}", after.stdout, after.stderr);
    match ferry_tests::netns::check_received(&[&before.stdout, &after.stdout], &sent) {
        Ok(n) => assert!(n >= 25, "the guest reported {n} test frames"),
        Err(e) => panic!("{e}\nbefore:\n{}\nafter:\n{}", before.stdout, after.stdout),
    }
}
