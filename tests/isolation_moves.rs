//! Isolation is the host's choice, not the guest's: a guest using
//! virtio-blk and virtio-net moves live from a host running its devices
//! in-process to one running every device in a device process
//! (`--isolate all`), and back, each host in its own network namespace;
//! a snapshot holds the same device state bytes either way and restores
//! on the other kind of host.

use std::{path::Path, time::Duration};

use ferry_tests::{
    ctl, kvm_or_skip, migrate, netns::TwoHosts, spawn_ferry, tick_number, wait_for_path, Running, TempDir,
    DEADLINE,
};

/// Rounds of: write 8 sectors, read them back, send a frame, tick.
const ROUNDS: usize = 40;

/// The guest's program: every round uses the disk and the network; at the
/// end every round's sectors are checked again, on the last host.
fn cmdline() -> String {
    let mut s = "pattern=8 ".to_string();
    for r in 0..ROUNDS {
        let sector = 64 + 8 * r;
        s += &format!("blk-write={sector}:8:{r} blk-verify={sector}:8:{r} net-send=1 ticks=2 ");
    }
    for r in 0..ROUNDS {
        s += &format!("blk-verify={}:8:{r} ", 64 + 8 * r);
    }
    s + "verify exit=9"
}

/// Lines of `out` that start with `prefix`.
fn count(out: &str, prefix: &str) -> usize {
    out.lines().filter(|l| l.starts_with(prefix)).count()
}

/// The guest's console over the hosts it ran on, in order: each host's
/// output without the newline the harness ends it with, so that a line
/// split by a move is whole again (and a whole one merely runs on into the
/// next host's first line).
fn console(outputs: &[&str]) -> String {
    outputs.iter().map(|o| o.strip_suffix('\n').unwrap_or(o)).collect()
}

#[test]
fn a_guest_moves_to_an_isolating_host_and_back_with_blk_and_net_in_use() {
    if !kvm_or_skip("a_guest_moves_to_an_isolating_host_and_back_with_blk_and_net_in_use") {
        return;
    }
    let Some(hosts) = TwoHosts::new("ftap6") else { return };
    let dir = TempDir::new("isomoves");
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 4 << 20]).expect("disk");
    let disk_arg = format!("path={}", disk.display());
    let net_arg = "tap=ftap6,mac=52:54:00:12:34:5a";
    let (to_b, to_a) = ("tcp:10.200.0.2:7796", "tcp:10.200.0.1:7797");
    let (sock_a, sock_b) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let (sa, sb) = (sock_a.display().to_string(), sock_b.display().to_string());

    // Host B isolates every device; host A runs them in-process.
    let on_b = hosts.b.capture("ftap6", 1, DEADLINE);
    let b = Running::new(
        hosts.b.spawn_ferry(&[], &["--isolate", "all", "--incoming", to_b, "--api-socket", &sb]),
    );
    std::thread::sleep(Duration::from_millis(500));
    let cmdline = cmdline();
    let mut a = Running::new(hosts.a.spawn_ferry(
        &[],
        &["--api-socket", &sa, "--disk", &disk_arg, "--net", net_arg, "--cmdline", &cmdline],
    ));
    assert!(wait_for_path(&sock_a, DEADLINE), "no API socket on host A");
    for _ in 0..3 {
        a.wait_line("NET SENT 1", DEADLINE).expect("the guest sends on host A");
    }
    let (ok, text) = migrate(&sock_a, to_b, &[]);
    assert!(ok, "in-process -> isolating failed:\n{text}");
    let a_out = a.finish(DEADLINE);
    assert_eq!(a_out.code(), 0, "host A ends after the move: {}", a_out.stderr);

    // Back to a fresh in-process ferry on host A, once the guest has used
    // both devices on B.
    let mut b = b;
    assert!(wait_for_path(&sock_b, DEADLINE), "no API socket on host B");
    for _ in 0..3 {
        b.wait_line("NET SENT 1", DEADLINE).expect("the guest sends on host B");
    }
    let info = ferry_tests::ctl(&sock_b, &["info"]);
    assert!(!info.contains("\"isolated\": false"), "host B isolates every device:\n{info}");
    let back_on_a = hosts.a.capture("ftap6", 1, DEADLINE);
    let a2 = Running::new(hosts.a.spawn_ferry(&[], &["--incoming", to_a]));
    std::thread::sleep(Duration::from_millis(500));
    let (ok, text) = migrate(&sock_b, to_a, &[]);
    assert!(ok, "isolating -> in-process failed:\n{text}");
    let b_out = b.finish(DEADLINE);
    assert_eq!(b_out.code(), 0, "host B ends after the move: {}", b_out.stderr);
    let end = a2.finish(DEADLINE);
    assert_eq!(end.code(), 9, "stdout:\n{}\nstderr:\n{}", end.stdout, end.stderr);

    // Each host did disk and network work; nothing was lost or repeated.
    for (host, out) in [("A", &a_out.stdout), ("B", &b_out.stdout), ("A again", &end.stdout)] {
        assert!(count(out, "NET SENT 1 ") > 0, "no frame sent on host {host}:\n{out}");
        assert!(count(out, "BLK VERIFY OK") > 0, "no sectors checked on host {host}:\n{out}");
    }
    // The whole console, for totals: a line the source had half printed
    // when the guest paused is finished by the destination.
    let all = console(&[&a_out.stdout, &b_out.stdout, &end.stdout]);
    assert_eq!(all.matches("BLK VERIFY BAD").count() + all.matches("BLK TIMEOUT").count(), 0, "{all}");
    assert_eq!(all.matches("NET SENT 1 ").count(), ROUNDS, "the guest sent each frame once:\n{all}");
    assert!(end.stdout.contains("PATTERN OK pages=2048"), "{}", end.stdout);
    assert_eq!(
        all.matches("BLK VERIFY OK").count(),
        2 * ROUNDS,
        "every round checked twice, the last ones on A"
    );
    assert_eq!(on_b.join().expect("capture B").len(), 1, "frames left through host B's tap");
    assert_eq!(
        back_on_a.join().expect("capture A").len(),
        1,
        "frames left through host A's tap after the move back"
    );
}

/// Run `cmdline` with a disk and an rng (every device isolated or none),
/// pause at `TICK 3` or later, and snapshot to `snap`.
fn snapshot(dir: &Path, isolate: bool, disk: &str, snap: &Path) {
    let socket = dir.join(if isolate { "iso.sock" } else { "inproc.sock" });
    let (s, f) = (socket.display().to_string(), snap.display().to_string());
    let mut args = vec!["run"];
    if isolate {
        args.extend(["--isolate", "all"]);
    }
    args.extend(["--api-socket", &s, "--disk", disk, "--rng", "--cmdline", SNAPSHOT_CMDLINE]);
    let mut vm = Running::new(spawn_ferry(&args));
    assert!(wait_for_path(&socket, DEADLINE), "no API socket");
    while vm.wait_line("TICK", DEADLINE).and_then(|l| tick_number(&l)).expect("the guest ticks") < 3 {}
    ctl(&socket, &["pause"]);
    ctl(&socket, &["snapshot", &f]);
    ctl(&socket, &["shutdown"]);
    let out = vm.finish(DEADLINE);
    assert_eq!(out.code(), 0, "{}", out.stderr);
}

/// The guest before the snapshot writes sectors and takes random bytes;
/// after it, it checks the sectors and asks for more.
const SNAPSHOT_CMDLINE: &str = "blk-write=10:2:3 rng=8 ticks=8 blk-verify=10:2:3 rng=8 exit=7";

/// Each device section's bytes, by device id.
fn device_sections(snap: &Path) -> Vec<(String, Vec<u8>)> {
    let out = std::process::Command::new(ferry_tests::ferry_bin())
        .args(["inspect", "--json"])
        .arg(snap)
        .output()
        .expect("run ferry inspect");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("inspect --json");
    let bytes = std::fs::read(snap).expect("read snapshot");
    report["sections"]
        .as_array()
        .expect("sections")
        .iter()
        .filter(|s| s["kind"] == "device")
        .map(|s| {
            let (at, len) = (
                s["offset"].as_u64().expect("offset") as usize,
                s["length"].as_u64().expect("length") as usize,
            );
            (s["id"].as_str().expect("id").to_string(), bytes[at..at + len].to_vec())
        })
        .collect()
}

#[test]
fn a_snapshot_holds_the_same_device_state_either_way_and_restores_on_the_other_kind_of_host() {
    if !kvm_or_skip(
        "a_snapshot_holds_the_same_device_state_either_way_and_restores_on_the_other_kind_of_host",
    ) {
        return;
    }
    let dir = TempDir::new("isosnap");
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 4 << 20]).expect("disk");
    let disk_arg = format!("path={}", disk.display());
    let (inproc, isolated) = (dir.path().join("inproc.snap"), dir.path().join("isolated.snap"));
    snapshot(dir.path(), false, &disk_arg, &inproc);
    snapshot(dir.path(), true, &disk_arg, &isolated);

    // The same guest at the same point: every device but the clock (whose
    // state is the time it was saved) saved the same bytes.
    let (a, b) = (device_sections(&inproc), device_sections(&isolated));
    let ids: Vec<&str> = a.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, b.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(), "the same devices");
    assert!(ids.contains(&"disk0") && ids.contains(&"rng0"), "{ids:?}");
    for ((id, x), (_, y)) in a.iter().zip(&b) {
        if id != "rtc" {
            assert!(x == y, "device {id}: {} bytes in-process, {} isolated, not the same", x.len(), y.len());
        }
    }

    // Each file restores on the other kind of host.
    for (snap, isolate) in [(&isolated, false), (&inproc, true)] {
        let f = snap.display().to_string();
        let mut args = vec!["run", "--restore", &f];
        if isolate {
            args.extend(["--isolate", "all"]);
        }
        let out = Running::new(spawn_ferry(&args)).finish(DEADLINE);
        assert_eq!(out.code(), 7, "restore of {f} (isolating: {isolate}):\n{}\n{}", out.stdout, out.stderr);
        assert!(out.stdout.contains("BLK VERIFY OK sector=10 count=2"), "{}", out.stdout);
        assert!(out.stdout.contains("TICK 8") && out.stdout.contains("RNG len=8"), "{}", out.stdout);
    }
}
