//! Hosts with different releases of a plugin: the `testdev` fixture at
//! state v1, v2 and v3 (tests/fixtures/testdev), each host with one of
//! them. Live migration and snapshot/restore between every pair, both
//! directions; the guest reads the device's registers back afterwards.
//! Downgrades succeed while the v2 feature (turbo) is unused, and are
//! refused before pausing, or aborted with the source resumed, when the
//! guest uses it.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use ferry_tests::{
    ctl, ferry_bin, fixture_plugin_with, free_port, host_cpu, kvm_or_skip, migrate, plugin_dir_copy,
    spawn_ferry, start_with_api, wait_for_path, wait_tick, Running, TempDir, DEADLINE,
};

const WRITES: &str = "dev-write=0:0x11 dev-write=1:0x22 dev-write=0x10:0x33 dev-write=0x17:0x44";
const CHECKS: &str = "dev-check=0:0x11 dev-check=1:0x22 dev-check=0x10:0x33 dev-check=0x17:0x44";

/// Per release: a plugin directory (the workspace's plugins plus testdev vN)
/// and its `ferry plugins --manifest` file.
struct Host {
    plugins: TempDir,
    manifest: PathBuf,
}

fn hosts() -> &'static [Host; 3] {
    static HOSTS: OnceLock<[Host; 3]> = OnceLock::new();
    HOSTS.get_or_init(|| {
        let make = |v: u32| {
            let lib = fixture_plugin_with("testdev", &[&format!("v{v}")]);
            let dir = plugin_dir_copy(&format!("testdev-v{v}"));
            std::fs::copy(&lib, dir.path().join("libtestdev.so")).expect("install testdev");
            let manifest = dir.path().join("host.json");
            let out = Command::new(ferry_bin())
                .args(["plugins", "--manifest", "--plugins"])
                .arg(dir.path())
                .output()
                .expect("ferry plugins --manifest");
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            std::fs::write(&manifest, out.stdout).expect("write manifest");
            // The manifest is not a plugin: keep it out of the plugin dir's *.so.
            Host { plugins: dir, manifest }
        };
        [make(1), make(2), make(3)]
    })
}

/// The machine types in `tests/machines/`: `testdev-1` keeps the test
/// device at its v1 behaviour, `testdev-2` switches turbo on.
fn machine(turbo: bool) -> String {
    let name = if turbo { "testdev-2.toml" } else { "testdev-1.toml" };
    Path::new(env!("CARGO_MANIFEST_DIR")).join("machines").join(name).display().to_string()
}

fn plugins_arg(v: usize) -> String {
    hosts()[v - 1].plugins.path().display().to_string()
}

/// Start a source on release `from` with `cmdline`; returns it and its socket.
fn source(
    dir: &TempDir,
    from: usize,
    turbo: bool,
    cmdline: &str,
    env: &[(&str, &str)],
) -> (Running, PathBuf) {
    let (m, p) = (machine(turbo), plugins_arg(from));
    start_with_api(dir.path(), "src", &["--plugins", &p, "--machine", &m, "--cmdline", cmdline], env)
}

fn migrate_pair(from: usize, to: usize) {
    let dir = TempDir::new(&format!("compat-mig-{from}-{to}"));
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let dst = Running::new(spawn_ferry(&["run", "--plugins", &plugins_arg(to), "--incoming", &uri]));
    ferry_tests::wait_for_incoming(&uri);
    let (mut src, socket) = source(&dir, from, false, &format!("{WRITES} ticks=25 {CHECKS} exit=0"), &[]);
    while wait_tick(&mut src) < 3 {}
    let (ok, text) = migrate(&socket, &uri, &[]);
    assert!(ok, "v{from} -> v{to}:\n{text}");
    let want = match from.cmp(&to) {
        std::cmp::Ordering::Equal => format!("same state v{from}"),
        std::cmp::Ordering::Less => format!("destination upgrades v{from}->v{to}"),
        std::cmp::Ordering::Greater => format!("source downgrades v{from}->v{to}"),
    };
    assert!(text.contains(&format!("device dev0 (testdev {from}.0.0 -> {to}.0.0): {want}")), "{text}");
    assert_eq!(src.finish(DEADLINE).code(), 0);
    let out = dst.finish(DEADLINE);
    assert_eq!(out.code(), 0, "v{from} -> v{to}: the guest's registers:\n{}\n{}", out.stdout, out.stderr);
    assert_eq!(out.stdout.matches("DEV OK").count(), 4, "{}", out.stdout);
}

fn snapshot_pair(from: usize, to: usize) {
    let dir = TempDir::new(&format!("compat-snap-{from}-{to}"));
    let (mut src, socket) = source(&dir, from, false, &format!("{WRITES} ticks=25 {CHECKS} exit=0"), &[]);
    while wait_tick(&mut src) < 3 {}
    let snap = dir.path().join("vm.snap").display().to_string();
    let target = hosts()[to - 1].manifest.display().to_string();
    ctl(&socket, &["pause"]);
    ctl(&socket, &["snapshot", &snap, "--target", &target]);
    ctl(&socket, &["shutdown"]);
    assert_eq!(src.finish(DEADLINE).code(), 0);
    let out = Running::new(spawn_ferry(&["run", "--plugins", &plugins_arg(to), "--restore", &snap]))
        .finish(DEADLINE);
    assert_eq!(out.code(), 0, "v{from} snapshot on v{to}:\n{}\n{}", out.stdout, out.stderr);
    assert_eq!(out.stdout.matches("DEV OK").count(), 4, "{}", out.stdout);
}

#[test]
fn live_migration_between_every_pair_of_releases() {
    if !kvm_or_skip("live_migration_between_every_pair_of_releases") {
        return;
    }
    for from in 1..=3 {
        for to in 1..=3 {
            migrate_pair(from, to);
        }
    }
}

#[test]
fn snapshot_and_restore_between_every_pair_of_releases() {
    if !kvm_or_skip("snapshot_and_restore_between_every_pair_of_releases") {
        return;
    }
    for from in 1..=3 {
        for to in 1..=3 {
            snapshot_pair(from, to);
        }
    }
}

#[test]
fn downgrades_follow_whether_the_guest_uses_the_new_feature() {
    if !kvm_or_skip("downgrades_follow_whether_the_guest_uses_the_new_feature") {
        return;
    }
    for from in [2usize, 3] {
        // Offered by the machine type, unused by the guest: goes back to v1.
        let dir = TempDir::new("compat-unused");
        let uri = format!("tcp:127.0.0.1:{}", free_port());
        let dst = Running::new(spawn_ferry(&["run", "--plugins", &plugins_arg(1), "--incoming", &uri]));
        ferry_tests::wait_for_incoming(&uri);
        let (mut src, socket) = source(&dir, from, true, &format!("{WRITES} ticks=25 {CHECKS} exit=0"), &[]);
        while wait_tick(&mut src) < 3 {}
        let (ok, text) = migrate(&socket, &uri, &[]);
        assert!(ok, "v{from} -> v1 with turbo unused:\n{text}");
        assert_eq!(src.finish(DEADLINE).code(), 0);
        let out = dst.finish(DEADLINE);
        assert_eq!(out.code(), 0, "{}\n{}", out.stdout, out.stderr);

        // In use: refused before pausing, with the reason; the source goes on.
        let dir = TempDir::new("compat-used");
        let uri = format!("tcp:127.0.0.1:{}", free_port());
        let dst = Running::new(spawn_ferry(&["run", "--plugins", &plugins_arg(1), "--incoming", &uri]));
        ferry_tests::wait_for_incoming(&uri);
        let (mut src, socket) = source(&dir, from, true, &format!("{WRITES} dev-write=0x20:1 ticks=0"), &[]);
        while wait_tick(&mut src) < 3 {}
        let (ok, text) = migrate(&socket, &uri, &[]);
        assert!(!ok, "{text}");
        assert!(
            text.contains(&format!(
                "device dev0 (testdev {from}.0.0 -> 1.0.0): REFUSED: the source cannot downgrade state v{from}->v1 now: \
                 guest enabled turbo; v1 cannot express it"
            )),
            "{text}"
        );
        let t = wait_tick(&mut src);
        assert!(wait_tick(&mut src) > t, "the source keeps running");
        assert_ne!(dst.finish(DEADLINE).code(), 0);
        drop(src);
    }
}

#[test]
fn a_feature_turned_on_during_precopy_aborts_at_stop_and_copy() {
    if !kvm_or_skip("a_feature_turned_on_during_precopy_aborts_at_stop_and_copy") {
        return;
    }
    let dir = TempDir::new("compat-late");
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let dst = Running::new(spawn_ferry(&["run", "--plugins", &plugins_arg(1), "--incoming", &uri]));
    ferry_tests::wait_for_incoming(&uri);
    // Pre-copy lasts about 2.5 s; the guest turns turbo on 1 s in.
    let (mut src, socket) = source(
        &dir,
        2,
        true,
        "ticks=3 ticks=10 dev-write=0x20:1 ticks=0",
        &[("FERRY_MIGRATION_ROUND_DELAY_MS", "100"), ("FERRY_MIGRATION_MIN_ROUNDS", "25")],
    );
    wait_tick(&mut src);
    let (ok, text) = migrate(&socket, &uri, &[]);
    assert!(!ok, "{text}");
    assert!(text.contains("source downgrades v2->v1"), "planned as a downgrade: {text}");
    assert!(text.contains("guest enabled turbo; v1 cannot express it"), "{text}");
    assert!(text.contains("the guest keeps running here"), "{text}");
    let t = wait_tick(&mut src);
    assert!(wait_tick(&mut src) > t, "the source resumed");
    assert_ne!(dst.finish(DEADLINE).code(), 0);
}

/// Golden snapshots: written by each release (tests/golden), checked in;
/// every later build must keep restoring them, the device registers
/// intact, on every host whose CPU can run them. Their names say what
/// wrote them: `testdev-v<release>-<cpu model>-<vendor>.snap`.
const GOLDEN_CMDLINE: &str = "dev-write=0:0x11 dev-write=1:0x22 dev-write=0x10:0x33 dev-write=0x17:0x44 ticks=12 \
                              dev-check=0:0x11 dev-check=1:0x22 dev-check=0x10:0x33 dev-check=0x17:0x44 exit=0";

fn golden_dir() -> PathBuf {
    ferry_tests::repo_root().join("tests").join("golden")
}

/// Every golden file: (path, release that wrote it).
fn goldens() -> Vec<(PathBuf, usize)> {
    let mut files: Vec<(PathBuf, usize)> = std::fs::read_dir(golden_dir())
        .expect("tests/golden")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "snap"))
        .map(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("").to_string();
            let release = name
                .strip_prefix("testdev-v")
                .and_then(|r| r.split('-').next())
                .and_then(|r| r.parse().ok())
                .unwrap_or_else(|| {
                    panic!("{name}: golden files are named testdev-v<release>-<model>-<vendor>.snap")
                });
            (p, release)
        })
        .collect();
    files.sort();
    files
}

/// Regenerate this host's golden files on the portable model (run by hand
/// with `--ignored` when a release is cut or on a host of a vendor that
/// has none yet; never in CI). Files of other models and vendors are
/// never rewritten.
#[test]
#[ignore]
fn regenerate_golden_snapshots() {
    let vendor = host_cpu().vendor.clone();
    let machine = Path::new(env!("CARGO_MANIFEST_DIR")).join("machines").join("testdev-1-portable.toml");
    for v in 1..=3 {
        let dir = TempDir::new("golden");
        let socket = dir.path().join("src.sock");
        let (s, m, p) = (socket.display().to_string(), machine.display().to_string(), plugins_arg(v));
        let mut src = Running::new(spawn_ferry(&[
            "run",
            "--plugins",
            &p,
            "--api-socket",
            &s,
            "--machine",
            &m,
            "--cmdline",
            GOLDEN_CMDLINE,
        ]));
        assert!(wait_for_path(&socket, DEADLINE));
        while wait_tick(&mut src) < 3 {}
        let out = golden_dir().join(format!("testdev-v{v}-x86-64-v1@1-{vendor}.snap"));
        ctl(&socket, &["pause"]);
        ctl(&socket, &["snapshot", &out.display().to_string()]);
        ctl(&socket, &["shutdown"]);
        src.finish(DEADLINE);
    }
}

#[test]
fn golden_snapshots_of_every_release_still_restore() {
    if !kvm_or_skip("golden_snapshots_of_every_release_still_restore") {
        return;
    }
    let host = host_cpu();
    let files = goldens();
    assert!(files.len() >= 6, "the golden files: {files:?}");
    let mut restored = 0;
    for (file, v) in files {
        let snap = file.display().to_string();
        let report = Command::new(ferry_bin()).args(["inspect", "--json", &snap]).output().expect("inspect");
        assert!(report.status.success(), "{snap} inspects clean");
        let report: serde_json::Value = serde_json::from_slice(&report.stdout).expect("JSON");
        let cpu = &report["cpu"];
        let (vendor, model) = (cpu["vendor"].as_str().unwrap_or(""), cpu["model"].as_str().unwrap_or(""));
        assert!(snap.ends_with(&format!("-{model}-{vendor}.snap")), "{snap} names its model and vendor");
        let tsc_differs = cpu["tsc_khz"].as_u64().zip(host.tsc_khz).is_some_and(|(g, h)| {
            (h as i64 - g as i64).unsigned_abs() * 1_000_000 / g.max(1) > 250 && !host.tsc_scaling
        });
        // The verdict this host must give, checked on the release that wrote it.
        let refusal = if vendor != host.vendor {
            Some(format!(
                "CPU vendor: the snapshot was written with cpu={model} on {vendor}; this host is {}",
                host.vendor
            ))
        } else if tsc_differs {
            Some(format!("TSC frequency: the snapshot was written with cpu={model} on {vendor} at"))
        } else {
            None
        };
        if let Some(line) = refusal {
            let out = Running::new(spawn_ferry(&["run", "--plugins", &plugins_arg(v), "--restore", &snap]))
                .finish(DEADLINE);
            assert_ne!(out.code(), 0, "{snap} on this host: {}", out.stdout);
            assert!(
                out.stderr.contains("nothing was created") && out.stderr.contains(&line),
                "{snap}: {}",
                out.stderr
            );
            ferry_tests::skip(
                &format!("restoring {snap}"),
                &format!(
                    "this host ({}, TSC {} kHz) refuses it, as it must: {line}",
                    host.vendor,
                    host.tsc_khz.map(|k| k.to_string()).unwrap_or_else(|| "unknown".into())
                ),
            );
            continue;
        }
        for release in v..=3 {
            let out =
                Running::new(spawn_ferry(&["run", "--plugins", &plugins_arg(release), "--restore", &snap]))
                    .finish(DEADLINE);
            assert_eq!(out.code(), 0, "golden {snap} on release v{release}:\n{}\n{}", out.stdout, out.stderr);
            assert_eq!(out.stdout.matches("DEV OK").count(), 4, "{}", out.stdout);
            assert!(out.stdout.contains("TICK 12"), "{}", out.stdout);
            restored += 1;
        }
    }
    if restored == 0 {
        ferry_tests::skip(
            "golden_snapshots_of_every_release_still_restore (restores)",
            &format!(
                "no golden file fits this host ({}): run regenerate_golden_snapshots here and check them in",
                host.vendor
            ),
        );
    }
}

/// A host with this build's plugins except `plugin`, which is its previous
/// release (built with the `previous-release` feature) in place of `lib`.
fn previous_release_host(cell: &'static OnceLock<TempDir>, plugin: &str, lib: &str) -> &'static TempDir {
    cell.get_or_init(|| {
        let built = ferry_tests::workspace_plugin_release(plugin, &["previous-release"]);
        let dir = plugin_dir_copy(&format!("{plugin}-old"));
        std::fs::copy(&built, dir.path().join(lib)).expect("install the previous release");
        dir
    })
}

/// A host whose serial-16550 is the previous release (0.1.0, state v1).
fn old_serial_host() -> &'static TempDir {
    static HOST: OnceLock<TempDir> = OnceLock::new();
    previous_release_host(&HOST, "serial-16550", "libserial_16550.so")
}

/// A destination on plugin set `to` waiting on a fresh TCP port, and a
/// source on plugin set `from` running `src_args` with an API socket in
/// `dir`; returns once the source has ticked three times, with the result
/// of asking it to migrate: (source, destination, ok, what ctl printed).
fn migrate_between(
    dir: &TempDir,
    from: &Path,
    to: &Path,
    src_args: &[&str],
) -> (Running, Running, bool, String) {
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let to_arg = to.display().to_string();
    let dst = Running::new(spawn_ferry(&["run", "--plugins", &to_arg, "--incoming", &uri]));
    ferry_tests::wait_for_incoming(&uri);
    let socket = dir.path().join("src.sock");
    let (s, f) = (socket.display().to_string(), from.display().to_string());
    let mut args = vec!["run", "--plugins", &f, "--api-socket", &s];
    args.extend_from_slice(src_args);
    let mut src = Running::new(spawn_ferry(&args));
    assert!(wait_for_path(&socket, DEADLINE));
    while wait_tick(&mut src) < 3 {}
    let (ok, text) = migrate(&socket, &uri, &[]);
    (src, dst, ok, text)
}

#[test]
fn serial_migrates_between_releases_both_ways_while_in_use() {
    if !kvm_or_skip("serial_migrates_between_releases_both_ways_while_in_use") {
        return;
    }
    let new_dir = ferry_tests::bin_dir();
    let old_dir = old_serial_host().path().to_path_buf();
    for (from, to, want) in [
        (&old_dir, &new_dir, "device com1 (serial-16550 0.1.0 -> 0.2.0): destination upgrades v1->v2"),
        (&new_dir, &old_dir, "device com1 (serial-16550 0.2.0 -> 0.1.0): source downgrades v2->v1"),
    ] {
        let dir = TempDir::new("serial-rel");
        // pc-1, the older machine type: the console prints ticks, then reads a line.
        let (src, mut dst, ok, text) =
            migrate_between(&dir, from, to, &["--cmdline", "ticks=20 echo exit=0"]);
        assert!(ok, "{text}");
        assert!(text.contains(want), "{text}");
        assert_eq!(src.finish(DEADLINE).code(), 0);
        std::io::Write::write_all(dst.stdin().expect("stdin"), b"typed on the new host\n").expect("type");
        let out = dst.finish(DEADLINE);
        assert_eq!(out.code(), 0, "{}\n{}", out.stdout, out.stderr);
        assert!(out.stdout.contains("TICK 20"), "{}", out.stdout);
        assert!(out.stdout.contains("ECHO typed on the new host"), "{}", out.stdout);
    }
}

/// A host whose virtio-blk is the previous release (0.1.0, state v1).
fn old_blk_host() -> &'static TempDir {
    static HOST: OnceLock<TempDir> = OnceLock::new();
    previous_release_host(&HOST, "virtio-blk", "libvirtio_blk.so")
}

#[test]
fn virtio_blk_migrates_between_releases_both_ways_while_in_use() {
    if !kvm_or_skip("virtio_blk_migrates_between_releases_both_ways_while_in_use") {
        return;
    }
    let new_dir = ferry_tests::bin_dir();
    let old_dir = old_blk_host().path().to_path_buf();
    for (from, to, want) in [
        (&old_dir, &new_dir, "device disk0 (virtio-blk 0.1.0 -> 0.2.0): destination upgrades v1->v2"),
        (&new_dir, &old_dir, "device disk0 (virtio-blk 0.2.0 -> 0.1.0): source downgrades v2->v1"),
    ] {
        let dir = TempDir::new("blk-rel");
        let disk = dir.path().join("disk.img");
        std::fs::write(&disk, vec![0u8; 4 << 20]).expect("disk");
        let d = format!("path={}", disk.display());
        // pc-1 (no config-wce): the disk is written before and after the move.
        let cmdline = "blk-write=10:2:3 ticks=20 blk-verify=10:2:3 blk-write=20:1:4 blk-verify=20:1:4 exit=0";
        let (src, dst, ok, text) = migrate_between(&dir, from, to, &["--disk", &d, "--cmdline", cmdline]);
        assert!(ok, "{text}");
        assert!(text.contains(want), "{text}");
        assert_eq!(src.finish(DEADLINE).code(), 0);
        let out = dst.finish(DEADLINE);
        assert_eq!(out.code(), 0, "{}\n{}", out.stdout, out.stderr);
        for line in ["BLK VERIFY OK sector=10 count=2", "BLK VERIFY OK sector=20 count=1"] {
            assert!(out.stdout.contains(line), "{}", out.stdout);
        }
    }
}

#[test]
fn virtio_blk_downgrade_is_refused_once_the_guest_negotiated_the_cache_switch() {
    if !kvm_or_skip("virtio_blk_downgrade_is_refused_once_the_guest_negotiated_the_cache_switch") {
        return;
    }
    let dir = TempDir::new("blk-wce");
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 4 << 20]).expect("disk");
    let d = format!("path={},config-wce=on", disk.display());
    let cmdline = "blk-write=10:2:3 ticks=12 blk-verify=10:2:3 exit=0";
    let (mut src, dst, ok, text) = migrate_between(
        &dir,
        &ferry_tests::bin_dir(),
        old_blk_host().path(),
        &["--disk", &d, "--cmdline", cmdline],
    );
    assert!(!ok, "{text}");
    assert!(
        text.contains(
            "device disk0 (virtio-blk 0.2.0 -> 0.1.0): REFUSED: the source cannot downgrade state v2->v1 now: \
             guest negotiated VIRTIO_BLK_F_CONFIG_WCE; v1 cannot express it"
        ),
        "{text}"
    );
    let t = wait_tick(&mut src);
    assert!(wait_tick(&mut src) > t, "the source keeps running");
    let out = src.finish(DEADLINE);
    assert_eq!(out.code(), 0, "{}\n{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("BLK VERIFY OK sector=10 count=2"), "{}", out.stdout);
    assert_ne!(dst.finish(DEADLINE).code(), 0);
}

/// `ferry fleet` over the three release hosts and one without the test
/// device: every ordered pair gets the verdict `ferry compat` gives, and
/// the host without the plugin is named with its reason.
#[test]
fn ferry_fleet_gives_every_pair_of_hosts_the_plan_compat_gives() {
    let dir = TempDir::new("fleet");
    let mut files = Vec::new();
    for (v, h) in hosts().iter().enumerate() {
        let named = dir.path().join(format!("v{}.json", v + 1));
        std::fs::copy(&h.manifest, &named).expect("copy manifest");
        files.push(named);
    }
    // A fourth host: v1's plugin set without testdev.
    let without = plugin_dir_copy("fleet-without-testdev");
    let _ = std::fs::remove_file(without.path().join("libtestdev.so"));
    let bare = dir.path().join("bare.json");
    let out =
        Command::new(ferry_bin()).args(["plugins", "--manifest", "--plugins"]).arg(without.path()).output();
    let out = out.expect("ferry plugins --manifest");
    std::fs::write(&bare, out.stdout).expect("write manifest");
    files.push(bare);
    let out = Command::new(ferry_bin())
        .arg("fleet")
        .args(&files)
        .args(["--machine", &machine(false), "--json"])
        .output()
        .expect("ferry fleet");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let m = &report["machines"][0];
    assert_eq!(m["runs_on"], serde_json::json!(["v1", "v2", "v3"]), "{m}");
    assert!(m["not_on"][0][1].as_str().unwrap_or("").contains("testdev"), "the reason names the plugin: {m}");
    let verdict = |from: &str, to: &str| {
        m["moves"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["from"] == from && p["to"] == to))
            .map(|p| p["verdict"].as_str().unwrap_or("").to_string())
            .unwrap_or_default()
    };
    assert_eq!(verdict("v1", "v3"), "upgrade");
    assert_eq!(verdict("v3", "v1"), "downgrade");
    assert_eq!(verdict("bare", "v1"), "not-on-source");
    let refused =
        m["moves"].as_array().and_then(|a| a.iter().find(|p| p["from"] == "v2" && p["to"] == "bare"));
    let reasons = refused.map(|p| p["reasons"].to_string()).unwrap_or_default();
    assert!(
        reasons.contains("device") && reasons.contains("testdev"),
        "the refusal names the device: {reasons}"
    );
    // Every pair among the three releases agrees with `ferry compat`.
    for from in 1..=3 {
        for to in (1..=3).filter(|&t| t != from) {
            let compat = Command::new(ferry_bin())
                .arg("compat")
                .arg("--from")
                .arg(&files[from - 1])
                .arg("--to")
                .arg(&files[to - 1])
                .args(["--machine", &machine(false)])
                .output()
                .expect("ferry compat");
            let text = String::from_utf8_lossy(&compat.stdout);
            let fleet = verdict(&format!("v{from}"), &format!("v{to}"));
            assert_eq!(compat.status.success(), fleet != "refused", "v{from} -> v{to}: {fleet} vs\n{text}");
            let word = match fleet.as_str() {
                "upgrade" => "destination upgrades",
                "downgrade" => "source downgrades",
                "same" => "same state",
                other => other,
            };
            assert!(text.contains(word), "v{from} -> v{to}: fleet says {fleet}, compat:\n{text}");
        }
    }
    // The table a person reads names the hosts and the verdicts.
    let table =
        Command::new(ferry_bin()).arg("fleet").args(&files).args(["--machine", &machine(false)]).output();
    let table = String::from_utf8_lossy(&table.expect("ferry fleet").stdout).to_string();
    for want in ["runs on v1, v2, v3", "not on bare", "upgrade", "downgrade", "REFUSED", "v2 -> bare: device"]
    {
        assert!(table.contains(want), "'{want}' missing:\n{table}");
    }
}

/// `ferry plugins --labels`: every line keeps Kubernetes' label syntax
/// (NFD's local source takes them as they are), and says what a scheduler
/// needs: the machine types, the state versions the plugin loads.
#[test]
fn ferry_plugins_labels_keep_the_label_syntax_and_name_machines_and_states() {
    let out =
        Command::new(ferry_bin()).args(["plugins", "--labels", "--plugins"]).arg(plugins_arg(3)).output();
    let out = out.expect("ferry plugins --labels");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() > 10, "{text}");
    for l in &lines {
        assert_eq!(ferry::fleet::labels::check(l), None, "{l}");
        assert!(l.starts_with("ferry.dev/"), "{l}");
    }
    assert!(lines.contains(&"ferry.dev/plugin.testdev.loads=1-3"), "{text}");
    assert!(lines.iter().any(|l| l.starts_with("ferry.dev/machine.") && l.ends_with("=true")), "{text}");
    assert!(lines.iter().any(|l| l.starts_with("ferry.dev/cpu.vendor=")), "{text}");
}
