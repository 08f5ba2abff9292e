//! vhost-user backends as ferry sees them before it uses one: `ferry
//! vhost-user probe` against a real qemu-storage-daemon export (Debian's
//! qemu-system-common, which `.ci/run` installs) reads its features,
//! protocol features, queue count and configuration; a backend that
//! accepts and never answers, or a socket nobody listens on, is one line
//! naming it, within the probe's deadline.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use ferry_tests::{ferry_bin, vhost::StorageDaemon, TempDir};

fn probe(args: &[&str]) -> (bool, String) {
    let out = Command::new(ferry_bin()).args(["vhost-user", "probe"]).args(args).output().expect("ferry");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn a_qemu_storage_daemon_export_says_what_it_offers() {
    let dir = TempDir::new("vhost-probe");
    let (image, socket) = (dir.path().join("disk.img"), dir.path().join("blk.sock"));
    std::fs::write(&image, vec![0u8; 4 << 20]).expect("image");
    let Some(_daemon) = StorageDaemon::start(&image, &socket) else { return };
    let s = socket.display().to_string();
    let (ok, text) = probe(&[&s, "--device", "blk", "--json"]);
    assert!(ok, "{text}");
    let id: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let names = |key: &str| -> Vec<String> {
        id[key]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
            .unwrap_or_default()
    };
    for want in ["VERSION_1", "PROTOCOL_FEATURES", "LOG_ALL", "FLUSH"] {
        assert!(names("feature_names").iter().any(|n| n == want), "{want}: {text}");
    }
    // 7.2: dirty logging through shared memory, its configuration space,
    // and no device state.
    for want in ["LOG_SHMFD", "CONFIG", "MQ"] {
        assert!(names("protocol_names").iter().any(|n| n == want), "{want}: {text}");
    }
    assert!(!names("protocol_names").iter().any(|n| n == "DEVICE_STATE"), "{text}");
    assert_eq!(id["queues"], 1, "num-queues=1: {text}");
    let config: Vec<u8> = id["config"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_u64().map(|b| b as u8)).collect())
        .unwrap_or_default();
    assert_eq!(config.get(0..8), Some(&8192u64.to_le_bytes()[..]), "capacity in sectors: {text}");

    // It listens again after a client leaves: a second probe, for people.
    let (ok, text) = probe(&[&s, "--device", "blk"]);
    assert!(ok, "{text}");
    assert!(text.contains("config: capacity 8192 sectors (4194304 bytes)"), "{text}");
    assert!(text.lines().next().is_some_and(|l| l.starts_with("features 0x")), "{text}");
}

#[test]
fn a_silent_backend_or_no_backend_is_one_line_naming_it() {
    let dir = TempDir::new("vhost-silent");
    let socket = dir.path().join("silent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).expect("listen");
    let held = std::thread::spawn(move || {
        listener.accept().map(|(conn, _)| {
            std::thread::sleep(Duration::from_secs(15));
            drop(conn);
        })
    });
    let s = socket.display().to_string();
    let started = Instant::now();
    let (ok, text) = probe(&[&s]);
    assert!(!ok, "{text}");
    assert_eq!(
        text.trim(),
        format!("ferry: error: vhost-user backend {s}: GET_FEATURES: no answer within 5 s")
    );
    assert!(started.elapsed() < Duration::from_secs(12), "the deadline holds: {:?}", started.elapsed());
    drop(held);

    let gone = dir.path().join("nobody.sock").display().to_string();
    let (ok, text) = probe(&[&gone]);
    assert!(!ok);
    assert!(
        text.trim().starts_with(&format!("ferry: error: vhost-user backend {gone}: cannot connect:")),
        "{text}"
    );
    assert_eq!(text.trim().lines().count(), 1, "{text}");
}
