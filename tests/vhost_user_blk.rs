//! The vhost-user-blk device: the test guest's own virtio-blk driver
//! against a real qemu-storage-daemon, checked from the host side (the
//! image file), through a live move between two daemons sharing the image,
//! a snapshot restored onto another daemon, and a daemon killed under the
//! guest; the plan refusing, before the pause, a destination backend that
//! lacks a feature the guest negotiated.

use std::{path::Path, time::Duration};

use ferry_tests::{
    blk_pattern_sector, ctl, ferry, fnv1a, free_port, kvm_or_skip, migrate, spawn_ferry, spawn_ferry_env,
    vhost::{plan_refusal, FeatureMask, StorageDaemon},
    wait_for_incoming, wait_for_path, Running, TempDir, DEADLINE,
};

/// Sectors `first..first + count` of the image hold the guest's pattern.
fn assert_pattern(image: &[u8], first: u64, count: u64, seed: u64) {
    for s in first..first + count {
        let at = s as usize * 512;
        assert!(
            image[at..at + 512] == blk_pattern_sector(s, seed)[..],
            "sector {s} of the image is not seed {seed}'s"
        );
    }
}

/// A 4 MiB image and one daemon exporting it (the `tag`'s directory).
fn setup(tag: &str) -> Option<(TempDir, std::path::PathBuf, StorageDaemon)> {
    let dir = TempDir::new(tag);
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![0u8; 4 << 20]).expect("image");
    let daemon = StorageDaemon::start(&image, &dir.path().join("a.sock"))?;
    Some((dir, image, daemon))
}

#[test]
fn the_guest_s_disk_checks_pass_against_qemu_storage_daemon() {
    if !kvm_or_skip("the_guest_s_disk_checks_pass_against_qemu_storage_daemon") {
        return;
    }
    let dir = TempDir::new("vublk");
    let image = dir.path().join("disk.img");
    let mut disk = vec![0u8; 4 << 20];
    let host_data: Vec<u8> = (0..2048u32).map(|i| (i * 7 + 3) as u8).collect();
    disk[100 * 512..104 * 512].copy_from_slice(&host_data);
    std::fs::write(&image, &disk).expect("image");
    let Some(daemon) = StorageDaemon::start(&image, &dir.path().join("a.sock")) else { return };
    let spec = format!("type=blk,socket={}", daemon.socket());
    let out = ferry(
        &[
            "run",
            "--vhost-user",
            &spec,
            "--cmdline",
            "blk-id blk-write=8:3:77 blk-flush blk-read=100:4 blk-verify=8:3:77 exit=0",
        ],
        DEADLINE,
    );
    assert_eq!(out.code(), 0, "{}\n{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("BLK ID vblk0 status=0") || out.stdout.contains("BLK ID "), "{}", out.stdout);
    assert!(out.stdout.contains("BLK VERIFY OK sector=8 count=3"), "{}", out.stdout);
    let read = out.stdout.lines().find(|l| l.starts_with("BLK READ sector=100")).expect("a read line");
    assert!(
        read.contains(&format!("fnv={:08x}", fnv1a(&host_data))),
        "the guest read the host's bytes: {read}"
    );
    assert_pattern(&std::fs::read(&image).expect("image"), 8, 3, 77);
}

/// A read by the backend lands in guest memory during pre-copy: only the
/// backend's dirty log (ferry's device bitmap) says so. With it the
/// destination has the data; with the device bitmap ignored (a test knob)
/// the guest's check fails: the log is what carries it.
fn backend_read_during_precopy(ignore_device_dirty: bool) -> Option<ferry_tests::Finished> {
    let (dir, image, a) = setup("vudma")?;
    let b = StorageDaemon::start(&image, &dir.path().join("b.sock"))?;
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let bind = format!("id=vblk0,socket={}", b.socket());
    let dst = Running::new(spawn_ferry(&["run", "--incoming", &uri, "--vhost-user", &bind]));
    wait_for_incoming(&uri);
    let socket = dir.path().join("src.sock");
    let s = socket.display().to_string();
    let mut env = vec![("FERRY_MIGRATION_ROUND_DELAY_MS", "100"), ("FERRY_MIGRATION_MIN_ROUNDS", "25")];
    if ignore_device_dirty {
        env.push(("FERRY_MIGRATION_IGNORE_DEVICE_DIRTY", "1"));
    }
    let spec = format!("type=blk,socket={}", a.socket());
    let mut src = Running::new(spawn_ferry_env(
        &[
            "run",
            "--api-socket",
            &s,
            "--vhost-user",
            &spec,
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
    assert!(read.is_some(), "the backend wrote during pre-copy, on the source");
    let src_out = src.finish(DEADLINE);
    assert!(!src_out.stdout.contains("BLK DMA OK"), "the check ran on the destination");
    Some(dst.finish(DEADLINE))
}

#[test]
fn a_backend_write_to_guest_memory_during_precopy_is_resent() {
    if !kvm_or_skip("a_backend_write_to_guest_memory_during_precopy_is_resent") {
        return;
    }
    let Some(out) = backend_read_during_precopy(false) else { return };
    assert_eq!(out.code(), 0, "stdout:\n{}\nstderr:\n{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("BLK DMA OK sector=300 count=8"), "{}", out.stdout);
}

#[test]
fn without_the_backend_s_dirty_log_the_check_fails() {
    if !kvm_or_skip("without_the_backend_s_dirty_log_the_check_fails") {
        return;
    }
    let Some(out) = backend_read_during_precopy(true) else { return };
    assert_eq!(out.code(), 2, "stdout:\n{}\nstderr:\n{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("BLK DMA BAD sector=300"), "{}", out.stdout);
}

/// Phases of writing and verifying 8 sectors each, 16 sectors apart.
const PHASES: u64 = 24;

fn io_cmdline() -> String {
    let mut c = String::from("hz=100");
    for i in 0..PHASES {
        c += &format!(" blk-write={}:8:{} blk-verify={}:8:{} ticks=2", i * 16, i + 1, i * 16, i + 1);
    }
    c + " exit=0"
}

#[test]
fn a_live_move_during_disk_io_keeps_every_block() {
    if !kvm_or_skip("a_live_move_during_disk_io_keeps_every_block") {
        return;
    }
    let Some((dir, image, a)) = setup("vumove") else { return };
    let Some(b) = StorageDaemon::start(&image, &dir.path().join("b.sock")) else { return };
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let bind = format!("id=vblk0,socket={}", b.socket());
    let dst = Running::new(spawn_ferry(&["run", "--incoming", &uri, "--vhost-user", &bind]));
    wait_for_incoming(&uri);
    let socket = dir.path().join("src.sock");
    let s = socket.display().to_string();
    let spec = format!("type=blk,socket={}", a.socket());
    let cmdline = io_cmdline();
    let mut src =
        Running::new(spawn_ferry(&["run", "--api-socket", &s, "--vhost-user", &spec, "--cmdline", &cmdline]));
    assert!(wait_for_path(&socket, DEADLINE));
    src.wait_line("BLK VERIFY OK sector=48", DEADLINE).expect("disk I/O before the move");
    let (ok, text) = migrate(&socket, &uri, &[]);
    assert!(ok, "{text}");
    let src_out = src.finish(DEADLINE);
    let dst_out = dst.finish(DEADLINE);
    assert_eq!(dst_out.code(), 0, "{}\n{}", dst_out.stdout, dst_out.stderr);
    let all = src_out.stdout.clone() + &dst_out.stdout;
    assert!(!all.contains("BAD") && !all.contains("TIMEOUT"), "{all}");
    assert!(
        dst_out.stdout.contains("BLK VERIFY OK"),
        "the guest did disk I/O after the move:\n{}",
        dst_out.stdout
    );
    let verified = all.lines().filter(|l| l.starts_with("BLK VERIFY OK")).count() as u64;
    assert_eq!(verified, PHASES, "{all}");
    let bytes = std::fs::read(&image).expect("image");
    for i in 0..PHASES {
        assert_pattern(&bytes, i * 16, 8, i + 1);
    }
}

/// Boot the test guest on `daemon`'s disk with `cmdline`, wait for
/// `line`, then snapshot it into `DIR/vm.snap` and end it; the snapshot's
/// path.
fn snapshot_after(dir: &TempDir, daemon: &StorageDaemon, cmdline: &str, line: &str) -> String {
    let socket = dir.path().join("src.sock");
    let s = socket.display().to_string();
    let spec = format!("type=blk,socket={}", daemon.socket());
    let mut vm =
        Running::new(spawn_ferry(&["run", "--api-socket", &s, "--vhost-user", &spec, "--cmdline", cmdline]));
    assert!(wait_for_path(&socket, DEADLINE));
    vm.wait_line(line, DEADLINE).unwrap_or_else(|| panic!("no {line:?} before the snapshot"));
    let snap = dir.path().join("vm.snap").display().to_string();
    ctl(&socket, &["pause"]);
    ctl(&socket, &["snapshot", &snap]);
    ctl(&socket, &["shutdown"]);
    let _ = vm.finish(DEADLINE);
    snap
}

#[test]
fn a_snapshot_restores_onto_another_daemon() {
    if !kvm_or_skip("a_snapshot_restores_onto_another_daemon") {
        return;
    }
    let Some((dir, image, mut a)) = setup("vusnap") else { return };
    let snap = snapshot_after(
        &dir,
        &a,
        "hz=100 blk-write=40:8:9 blk-verify=40:8:9 ticks=300 blk-verify=40:8:9 blk-write=60:8:10 blk-verify=60:8:10 exit=0",
        "BLK VERIFY OK sector=40",
    );
    a.kill();

    // Another daemon on the same image; the guest goes on there: its earlier
    // blocks read back, and a new write reaches the image.
    let Some(b) = StorageDaemon::start(&image, &dir.path().join("b.sock")) else { return };
    let bind = format!("id=vblk0,socket={}", b.socket());
    let out = ferry(&["run", "--restore", &snap, "--vhost-user", &bind], DEADLINE);
    assert_eq!(out.code(), 0, "{}\n{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("BLK VERIFY OK sector=40 count=8"), "{}", out.stdout);
    assert!(out.stdout.contains("BLK VERIFY OK sector=60 count=8"), "{}", out.stdout);
    let bytes = std::fs::read(&image).expect("image");
    assert_pattern(&bytes, 40, 8, 9);
    assert_pattern(&bytes, 60, 8, 10);
}

#[test]
fn a_killed_daemon_stops_the_guest_with_one_line_and_the_api_answers() {
    if !kvm_or_skip("a_killed_daemon_stops_the_guest_with_one_line_and_the_api_answers") {
        return;
    }
    let Some((dir, _image, mut a)) = setup("vukill") else { return };
    let socket = dir.path().join("vm.sock");
    let s = socket.display().to_string();
    let spec = format!("type=blk,socket={}", a.socket());
    let cmdline = io_cmdline();
    let mut vm =
        Running::new(spawn_ferry(&["run", "--api-socket", &s, "--vhost-user", &spec, "--cmdline", &cmdline]));
    assert!(wait_for_path(&socket, DEADLINE));
    vm.wait_line("BLK VERIFY OK sector=16", DEADLINE).expect("disk I/O before the kill");
    a.kill();
    let failed = (0..200)
        .find_map(|_| {
            std::thread::sleep(Duration::from_millis(50));
            let info: serde_json::Value = serde_json::from_str(&ctl(&socket, &["info"])).ok()?;
            (info["state"] == "failed").then_some(info)
        })
        .unwrap_or_else(|| panic!("the VM did not stop:\n{}", vm.seen()));
    let line = failed["failure"].as_str().expect("a failure line").to_string();
    assert!(
        line.starts_with(&format!("device vblk0 failed: vhost-user backend {}: ", a.socket())),
        "the line names the device and the backend: {line}"
    );
    ctl(&socket, &["shutdown"]);
    let out = vm.finish(DEADLINE);
    eprintln!("failure: {line}");
    assert!(out.stderr.contains(&line), "{}", out.stderr);
    assert!(!out.stdout.contains("BLK VERIFY BAD"), "{}", out.stdout);
}

/// A move to a host whose backend offers less: `hidden` feature bits are
/// cleared from what the destination's backend says (an older backend,
/// played by a masking proxy in front of another daemon). The source's
/// guest writes and checks its disk throughout; returns the migration's
/// report and the source's and destination's ends.
fn move_to_lesser_backend(
    tag: &str,
    hidden: u64,
) -> Option<(bool, String, ferry_tests::Finished, ferry_tests::Finished)> {
    let (dir, image, a) = setup(tag)?;
    let b = StorageDaemon::start(&image, &dir.path().join("b.sock"))?;
    let lesser = FeatureMask::start(Path::new(&b.socket()), &dir.path().join("lesser.sock"), hidden);
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let bind = format!("id=vblk0,socket={}", lesser.socket());
    let dst = Running::new(spawn_ferry(&["run", "--incoming", &uri, "--vhost-user", &bind]));
    wait_for_incoming(&uri);
    let socket = dir.path().join("src.sock");
    let s = socket.display().to_string();
    let spec = format!("type=blk,socket={}", a.socket());
    let cmdline = io_cmdline();
    let mut src =
        Running::new(spawn_ferry(&["run", "--api-socket", &s, "--vhost-user", &spec, "--cmdline", &cmdline]));
    assert!(wait_for_path(&socket, DEADLINE));
    src.wait_line("BLK VERIFY OK sector=16", DEADLINE).expect("disk I/O before the move");
    let (ok, text) = migrate(&socket, &uri, &[]);
    let src_out = src.finish(DEADLINE);
    let dst_out = dst.finish(DEADLINE);
    Some((ok, text, src_out, dst_out))
}

#[test]
fn the_plan_refuses_a_backend_lacking_a_negotiated_feature_and_the_source_runs_on() {
    if !kvm_or_skip("the_plan_refuses_a_backend_lacking_a_negotiated_feature_and_the_source_runs_on") {
        return;
    }
    // The test guest's driver accepts VIRTIO_BLK_F_CONFIG_WCE (bit 11).
    let Some((ok, text, src, _dst)) = move_to_lesser_backend("vuplan", 1 << 11) else { return };
    let refusal = plan_refusal(ok, &text);
    assert!(
        refusal.starts_with("device vblk0 (vhost-user-blk ")
            && refusal.ends_with("lacks feature(s) the guest negotiated: CONFIG_WCE"),
        "{refusal}"
    );
    assert_eq!(src.code(), 0, "the source went on:\n{}\n{}", src.stdout, src.stderr);
    let verified = src.stdout.lines().filter(|l| l.starts_with("BLK VERIFY OK")).count() as u64;
    assert_eq!(verified, PHASES, "every phase ran on the source:\n{}", src.stdout);
}

#[test]
fn a_backend_lacking_only_features_the_guest_left_alone_takes_the_guest() {
    if !kvm_or_skip("a_backend_lacking_only_features_the_guest_left_alone_takes_the_guest") {
        return;
    }
    // DISCARD (bit 13): offered by the source's daemon, not accepted by the
    // test guest's driver.
    let Some((ok, text, src, dst)) = move_to_lesser_backend("vuplanok", 1 << 13) else { return };
    assert!(ok, "{text}\n{}", src.stderr);
    assert_eq!(dst.code(), 0, "{}\n{}", dst.stdout, dst.stderr);
    let all = src.stdout + &dst.stdout;
    let verified = all.lines().filter(|l| l.starts_with("BLK VERIFY OK")).count() as u64;
    assert_eq!(verified, PHASES, "{all}");
}

#[test]
fn ferry_compat_gives_the_plan_s_verdict_offline_from_a_snapshot_and_a_probe() {
    if !kvm_or_skip("ferry_compat_gives_the_plan_s_verdict_offline_from_a_snapshot_and_a_probe") {
        return;
    }
    let Some((dir, image, a)) = setup("vucompat") else { return };
    let Some(b) = StorageDaemon::start(&image, &dir.path().join("b.sock")) else { return };
    let lesser = FeatureMask::start(Path::new(&b.socket()), &dir.path().join("lesser.sock"), 1 << 11);
    // The guest as it runs: snapshotted once its driver negotiated.
    let snap = snapshot_after(&dir, &a, "blk-write=8:1:1 blk-verify=8:1:1 ticks=1000000", "BLK VERIFY OK");

    let write = |args: &[&str], name: &str| -> String {
        let out = ferry(args, DEADLINE);
        assert_eq!(out.code(), 0, "{args:?}: {}", out.stderr);
        let path = dir.path().join(name);
        std::fs::write(&path, out.stdout).expect("write");
        path.display().to_string()
    };
    let host = write(&["plugins", "--manifest"], "host.json");
    let full = write(&["vhost-user", "probe", &b.socket(), "--device", "blk", "--json"], "full.json");
    let less = write(&["vhost-user", "probe", &lesser.socket(), "--device", "blk", "--json"], "lesser.json");
    let compat = |probe: &str| {
        let backend = format!("vblk0={probe}");
        ferry(&["compat", "--from", &host, "--to", &host, "--guest", &snap, "--backend", &backend], DEADLINE)
    };
    let refused = compat(&less);
    assert_ne!(refused.code(), 0, "{}", refused.stdout);
    assert!(
        refused.stdout.lines().any(|l| l.starts_with("device vblk0 (vhost-user-blk ")
            && l.ends_with(&format!(
                "REFUSED: vhost-user backend {less} lacks feature(s) the guest negotiated: CONFIG_WCE"
            ))),
        "{}",
        refused.stdout
    );
    let taken = compat(&full);
    assert_eq!(taken.code(), 0, "{}\n{}", taken.stdout, taken.stderr);
    assert!(
        taken.stdout.contains("device vblk0 (vhost-user-blk 0.1.0 -> 0.1.0): same state v1"),
        "{}",
        taken.stdout
    );
    // Without a probe the device is said to be unchecked, not passed.
    let unchecked = ferry(&["compat", "--from", &host, "--to", &host, "--guest", &snap], DEADLINE);
    assert!(
        unchecked.stdout.contains("device vblk0: its vhost-user backend was not checked"),
        "{}",
        unchecked.stdout
    );
}
