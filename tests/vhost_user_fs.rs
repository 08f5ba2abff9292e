//! The vhost-user-fs device: the test guest's minimal FUSE client (INIT,
//! LOOKUP, OPEN, READ) reads a host file through virtiofsd; a file it
//! opened stays open across a live move between two virtiofsd processes
//! sharing the directory (virtiofsd's own state moves through
//! DEVICE_STATE); a destination virtiofsd without DEVICE_STATE is refused
//! in the plan, before the guest pauses, and the guest runs on.

use std::path::Path;

use ferry_tests::{
    ferry, fnv1a, free_port, kvm_or_skip, migrate, spawn_ferry,
    vhost::{plan_refusal, FeatureMask, Virtiofsd},
    wait_for_incoming, wait_for_path, Running, TempDir, DEADLINE,
};

const TEXT: &str = "a file from the host, read through virtio-fs\nsecond line\n";

/// A shared directory holding `hello.txt`, and one virtiofsd on it.
fn setup(tag: &str) -> Option<(TempDir, std::path::PathBuf, Virtiofsd)> {
    let dir = TempDir::new(tag);
    let share = dir.path().join("share");
    std::fs::create_dir_all(&share).expect("share");
    std::fs::write(share.join("hello.txt"), TEXT).expect("file");
    let daemon = Virtiofsd::start(&share, &dir.path().join("a.sock"))?;
    Some((dir, share, daemon))
}

fn read_line() -> String {
    format!(
        "FS READ bytes={} fnv={:08x} text=a file from the host, read through virtio-fs",
        TEXT.len(),
        fnv1a(TEXT.as_bytes())
    )
}

#[test]
fn the_guest_reads_a_host_file_through_virtiofsd() {
    if !kvm_or_skip("the_guest_reads_a_host_file_through_virtiofsd") {
        return;
    }
    let Some((_dir, _share, daemon)) = setup("vufs") else { return };
    let spec = format!("type=fs,socket={}", daemon.socket());
    let out = ferry(
        &["run", "--vhost-user", &spec, "--cmdline", "fs-open=hello.txt fs-read fs-open=absent.txt exit=0"],
        DEADLINE,
    );
    assert_eq!(out.code(), 0, "{}\n{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("FS INIT major=7"), "{}", out.stdout);
    assert!(out.stdout.contains("FS OPEN name=hello.txt"), "{}", out.stdout);
    assert!(out.stdout.contains(&read_line()), "{}", out.stdout);
    // A name the share lacks: the host's ENOENT, as FUSE says it.
    assert!(out.stdout.contains("FS ERROR op=LOOKUP error=-2"), "{}", out.stdout);
}

/// Move a guest that opened and read `hello.txt` to a host whose
/// virtiofsd (on the same directory) hides `hidden_protocol` bits; the
/// guest reads the open file again after a pause. The migration's report
/// and the two ends.
fn move_open_file(
    tag: &str,
    hidden_protocol: u64,
) -> Option<(bool, String, ferry_tests::Finished, ferry_tests::Finished)> {
    let (dir, share, a) = setup(tag)?;
    let b = Virtiofsd::start(&share, &dir.path().join("b.sock"))?;
    let lesser =
        FeatureMask::start_with(Path::new(&b.socket()), &dir.path().join("lesser.sock"), 0, hidden_protocol);
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let bind = format!("id=vfs0,socket={}", lesser.socket());
    let dst = Running::new(spawn_ferry(&["run", "--incoming", &uri, "--vhost-user", &bind]));
    wait_for_incoming(&uri);
    let socket = dir.path().join("src.sock");
    let s = socket.display().to_string();
    let spec = format!("type=fs,socket={}", a.socket());
    let mut src = Running::new(spawn_ferry(&[
        "run",
        "--api-socket",
        &s,
        "--vhost-user",
        &spec,
        "--cmdline",
        "hz=100 fs-open=hello.txt fs-read ticks=30 fs-read exit=0",
    ]));
    assert!(wait_for_path(&socket, DEADLINE));
    src.wait_line("FS READ", DEADLINE).expect("the guest read the file before the move");
    let (ok, text) = migrate(&socket, &uri, &[]);
    Some((ok, text, src.finish(DEADLINE), dst.finish(DEADLINE)))
}

#[test]
fn an_open_file_stays_open_across_a_live_move_between_two_virtiofsd() {
    if !kvm_or_skip("an_open_file_stays_open_across_a_live_move_between_two_virtiofsd") {
        return;
    }
    let Some((ok, text, src, dst)) = move_open_file("vufsmove", 0) else { return };
    assert!(ok, "{text}\n{}", src.stderr);
    assert_eq!(dst.code(), 0, "{}\n{}", dst.stdout, dst.stderr);
    assert_eq!(src.stdout.matches("FS READ").count(), 1, "{}", src.stdout);
    // The handle the source's virtiofsd gave is valid on the destination's:
    // without its state (DEVICE_STATE) the read would fail (EBADF).
    assert!(dst.stdout.contains(&read_line()), "{}\n{}", dst.stdout, dst.stderr);
    assert!(!dst.stdout.contains("FS ERROR"), "{}", dst.stdout);
}

#[test]
fn a_destination_virtiofsd_without_device_state_is_refused_before_the_pause() {
    if !kvm_or_skip("a_destination_virtiofsd_without_device_state_is_refused_before_the_pause") {
        return;
    }
    let Some((ok, text, src, _dst)) = move_open_file("vufsplan", 1 << 19) else { return };
    let refusal = plan_refusal(ok, &text);
    assert!(
        refusal.starts_with("device vfs0 (vhost-user-fs ")
            && refusal.contains("lacks DEVICE_STATE (protocol feature 19)"),
        "{refusal}"
    );
    assert_eq!(src.code(), 0, "the source went on:\n{}\n{}", src.stdout, src.stderr);
    assert_eq!(src.stdout.matches(&read_line()).count(), 2, "{}", src.stdout);
}
