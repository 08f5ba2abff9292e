//! Local peers: the control API's socket and a `unix:` migration's socket
//! are created owner-only (0600), and a connection from a uid that is not
//! root, ferry's own or one `--api-allow-uid` names is turned away with
//! nothing answered and one logged line, even where the socket file was
//! made world-writable by hand.

use std::{os::unix::fs::PermissionsExt, os::unix::process::CommandExt, path::Path, process::Command};

use ferry_tests::{
    ctl, ferry_bin, kvm_or_skip, spawn_ferry, start_with_api, wait_for_path, Running, TempDir, DEADLINE,
};

/// The uid the tests connect as: nobody.
const OTHER_UID: u32 = 65534;

/// `ferry ctl info` as `OTHER_UID`: whether it got an answer, and what it said.
fn info_as_other(socket: &Path) -> (bool, String) {
    let out = Command::new(ferry_bin())
        .args(["ctl", "--api-socket"])
        .arg(socket)
        .arg("info")
        .uid(OTHER_UID)
        .gid(OTHER_UID)
        .output()
        .expect("run ferry ctl as another uid");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("socket").permissions().mode() & 0o777
}

/// A directory another uid can reach.
fn shared_dir(tag: &str) -> TempDir {
    let dir = TempDir::new(tag);
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod the dir");
    dir
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn the_api_socket_is_owner_only_and_another_uid_is_refused_without_an_answer() {
    if !kvm_or_skip("the_api_socket_is_owner_only_and_another_uid_is_refused_without_an_answer") {
        return;
    }
    if !running_as_root() {
        ferry_tests::skip("the_api_socket_is_owner_only...", "connecting as another uid needs root");
        return;
    }
    let dir = shared_dir("peers");
    let (vm, socket) = start_with_api(dir.path(), "vm", &["--cmdline", "ticks=0"], &[]);
    assert_eq!(mode(&socket), 0o600, "owner-only from the start");
    let (ok, text) = info_as_other(&socket);
    assert!(!ok && text.contains("Permission denied"), "the file mode stops it first: {text}");
    // Made world-writable by hand: the uid check still turns it away.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).expect("chmod the socket");
    let (ok, text) = info_as_other(&socket);
    assert!(!ok, "refused: {text}");
    // Closed unanswered: the client reads an end or a reset, never JSON.
    assert!(text.contains("API answer:") && !text.contains("\"state\""), "nothing was answered: {text}");
    assert!(ctl(&socket, &["info"]).contains("\"state\": \"running\""), "its owner still gets answers");
    ctl(&socket, &["shutdown"]);
    let out = vm.finish(DEADLINE);
    assert_eq!(out.code(), 0, "{}", out.stderr);
    let line = format!("refused a connection: uid {OTHER_UID} (pid ");
    assert!(out.stderr.contains(&line), "one line names the uid:\n{}", out.stderr);
    assert!(
        out.stderr.contains("is not root, ferry's own uid or one --api-allow-uid names"),
        "{}",
        out.stderr
    );
}

#[test]
fn api_allow_uid_lets_that_uid_in() {
    if !kvm_or_skip("api_allow_uid_lets_that_uid_in") {
        return;
    }
    if !running_as_root() {
        ferry_tests::skip("api_allow_uid_lets_that_uid_in", "connecting as another uid needs root");
        return;
    }
    let dir = shared_dir("peers-allow");
    let allow = OTHER_UID.to_string();
    let (vm, socket) =
        start_with_api(dir.path(), "vm", &["--api-allow-uid", &allow, "--cmdline", "ticks=0"], &[]);
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).expect("chmod the socket");
    let (ok, text) = info_as_other(&socket);
    assert!(ok && text.contains("\"state\": \"running\""), "{text}");
    ctl(&socket, &["shutdown"]);
    assert_eq!(vm.finish(DEADLINE).code(), 0);
}

#[test]
fn a_unix_migration_socket_is_owner_only_while_it_waits() {
    if !kvm_or_skip("a_unix_migration_socket_is_owner_only_while_it_waits") {
        return;
    }
    let dir = TempDir::new("peers-incoming");
    let sock = dir.path().join("in.sock");
    let uri = format!("unix:{}", sock.display());
    let dst = Running::new(spawn_ferry(&["run", "--incoming", &uri]));
    assert!(wait_for_path(&sock, DEADLINE), "the destination listens");
    assert_eq!(mode(&sock), 0o600);
    drop(dst);
}
