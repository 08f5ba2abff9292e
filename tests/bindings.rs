//! Host bindings: a disk image's path (and a tap, a console file) belongs
//! to the host, not to the guest. The stream and the snapshot carry the
//! device and the name of its binding, each host gives its own value, and
//! a host that gives none is refused before anything happens: an incoming
//! migration in its plan, before the source pauses; a restore before
//! anything is created. `--bindings from-snapshot|from-source` reuses the
//! writer's values where a host trusts them.

use std::path::{Path, PathBuf};

use ferry_tests::{
    ctl, ferry, kvm_or_skip, migrate, netns::TwoHosts, spawn_ferry, start_with_api, wait_for_incoming,
    wait_tick, Running, TempDir, DEADLINE,
};

/// Writes 8 sectors, ticks on, checks them, exits 9.
const GUEST: &str = "blk-write=0:8:5 ticks=12 blk-verify=0:8:5 exit=9";

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// A disk image at `a/disk.img` and the same file (a hard link: the same
/// storage mounted elsewhere) at `b/disk.img`.
fn two_paths(dir: &Path) -> (PathBuf, PathBuf) {
    let (a, b) = (dir.join("a"), dir.join("b"));
    std::fs::create_dir_all(&a).expect("dir a");
    std::fs::create_dir_all(&b).expect("dir b");
    let (disk_a, disk_b) = (a.join("disk.img"), b.join("disk.img"));
    std::fs::write(&disk_a, vec![0u8; 4 << 20]).expect("disk image");
    std::fs::hard_link(&disk_a, &disk_b).expect("a second path to the image");
    (disk_a, disk_b)
}

#[test]
fn a_guest_moves_between_namespaces_whose_disk_lives_at_another_path() {
    if !kvm_or_skip("a_guest_moves_between_namespaces_whose_disk_lives_at_another_path") {
        return;
    }
    let Some(hosts) = TwoHosts::new("fbnd0") else { return };
    let dir = TempDir::new("bindings-move");
    let (disk_a, disk_b) = two_paths(dir.path());
    let uri = "tcp:10.200.0.2:7801";
    let bind_b = format!("id=disk0,path={}", path(&disk_b));
    let dst = Running::new(hosts.b.spawn_ferry(&[], &["--incoming", uri, "--disk", &bind_b]));
    std::thread::sleep(std::time::Duration::from_millis(300));
    let socket = dir.path().join("src.sock");
    let disk_arg = format!("path={}", path(&disk_a));
    let mut src = Running::new(
        hosts.a.spawn_ferry(&[], &["--api-socket", &path(&socket), "--disk", &disk_arg, "--cmdline", GUEST]),
    );
    assert!(ferry_tests::wait_for_path(&socket, DEADLINE));
    while wait_tick(&mut src) < 3 {}
    // Host A's path is gone from the world: only host B's value can work.
    std::fs::rename(dir.path().join("a"), dir.path().join("a-gone")).expect("move host A's storage away");
    let (ok, text) = migrate(&socket, uri, &[]);
    assert!(ok, "{text}");
    assert_eq!(src.finish(DEADLINE).code(), 0);
    let out = dst.finish(DEADLINE);
    assert_eq!(out.code(), 9, "{}\n{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("BLK VERIFY OK sector=0 count=8"), "{}", out.stdout);
}

#[test]
fn a_destination_without_the_binding_refuses_in_the_plan_and_the_source_runs_on() {
    if !kvm_or_skip("a_destination_without_the_binding_refuses_in_the_plan_and_the_source_runs_on") {
        return;
    }
    let dir = TempDir::new("bindings-refused");
    let (disk_a, _) = two_paths(dir.path());
    let uri = format!("unix:{}", path(&dir.path().join("in.sock")));
    let dst = Running::new(spawn_ferry(&["run", "--incoming", &uri, "--bindings", "host"]));
    wait_for_incoming(&uri);
    let disk_arg = format!("path={}", path(&disk_a));
    let (mut src, socket) =
        start_with_api(dir.path(), "src", &["--disk", &disk_arg, "--cmdline", "ticks=0"], &[]);
    let before = wait_tick(&mut src);
    let (ok, text) = migrate(&socket, &uri, &[]);
    assert!(!ok, "{text}");
    assert!(text.contains("device disk0 (virtio-blk"), "the plan names the device: {text}");
    assert!(text.contains("REFUSED: host binding path is not supplied on this host"), "{text}");
    assert!(ctl(&socket, &["info"]).contains("\"state\": \"running\""), "never paused");
    assert!(wait_tick(&mut src) > before, "the guest ticks on");
    let out = dst.finish(DEADLINE);
    assert_eq!(out.code(), 1, "the destination ends, refusing: {}", out.stderr);
    ctl(&socket, &["shutdown"]);
    assert_eq!(src.finish(DEADLINE).code(), 0);
}

#[test]
fn a_restore_takes_this_host_s_binding_or_the_snapshot_s_when_told_and_refuses_none() {
    if !kvm_or_skip("a_restore_takes_this_host_s_binding_or_the_snapshot_s_when_told_and_refuses_none") {
        return;
    }
    let dir = TempDir::new("bindings-restore");
    let (disk_a, disk_b) = two_paths(dir.path());
    let disk_arg = format!("path={}", path(&disk_a));
    let (mut src, socket) =
        start_with_api(dir.path(), "src", &["--disk", &disk_arg, "--cmdline", GUEST], &[]);
    while wait_tick(&mut src) < 3 {}
    let snap = dir.path().join("vm.snap");
    ctl(&socket, &["snapshot", &path(&snap)]);
    ctl(&socket, &["shutdown"]);
    src.finish(DEADLINE);

    // The machine type in the file has no path; the writer's value is kept apart.
    let inspect = ferry(&["inspect", "--json", &path(&snap)], DEADLINE);
    let report: serde_json::Value = serde_json::from_str(&inspect.stdout).expect("inspect --json");
    let disk = report["manifest"]["machine"]["devices"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["id"] == "disk0"))
        .cloned()
        .expect("disk0 in the machine type");
    assert!(disk["properties"].get("path").is_none(), "no host path in the machine type: {disk}");
    assert_eq!(report["manifest"]["bindings"]["disk0"]["path"], path(&disk_a).as_str());

    let s = path(&snap);
    let refused = ferry(&["run", "--restore", &s, "--bindings", "host"], DEADLINE);
    assert_eq!(refused.code(), 1);
    assert_eq!(refused.stderr.lines().count(), 1, "one line: {}", refused.stderr);
    assert!(
        refused.stderr.contains("device disk0 (virtio-blk): host binding path is not supplied on this host"),
        "{}",
        refused.stderr
    );
    assert!(!refused.stdout.contains("TICK"), "nothing ran");
    let nosuch = ferry(&["run", "--restore", &s, "--disk", "id=disk9,path=/nonexistent"], DEADLINE);
    assert!(nosuch.stderr.contains("names device disk9, which this VM does not have"), "{}", nosuch.stderr);
    let notbinding = ferry(&["run", "--restore", &s, "--bind", "disk0:readonly=true"], DEADLINE);
    assert!(
        notbinding
            .stderr
            .contains("readonly of device disk0 (virtio-blk), which is not one of its host bindings"),
        "{}",
        notbinding.stderr
    );

    std::fs::rename(dir.path().join("a"), dir.path().join("a-gone")).expect("move the first path away");
    let bound =
        ferry(&["run", "--restore", &s, "--disk", &format!("id=disk0,path={}", path(&disk_b))], DEADLINE);
    assert_eq!(bound.code(), 9, "{}\n{}", bound.stdout, bound.stderr);
    assert!(bound.stdout.contains("BLK VERIFY OK sector=0 count=8"), "{}", bound.stdout);
    // The snapshot's own value points where the image no longer is.
    let reused = ferry(&["run", "--restore", &s, "--bindings", "from-snapshot"], DEADLINE);
    assert_eq!(reused.code(), 1);
    assert!(
        reused.stderr.contains(&format!("cannot open disk image {}", path(&disk_a))),
        "{}",
        reused.stderr
    );
}
