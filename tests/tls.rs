//! Migration over TCP is mutual TLS 1.3 unless both ends say
//! `--insecure-tcp`: credentials from `ferry tls init`, a migration between
//! two network namespaces, every kind of wrong peer turned away before any
//! state moves while the source guest keeps running and the destination
//! keeps waiting, plaintext reported loudly, and neither choice refused.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::Duration,
};

use ferry_tests::{
    ctl, ferry, ferry_bin, free_port, kvm_or_skip, migrate, netns::TwoHosts, spawn_ferry, spawn_ferry_env,
    start_with_api, ticks_carry_on, wait_for_incoming, wait_for_path, wait_tick, Running, TempDir, DEADLINE,
};

/// `ferry tls init DIR --host H...`; returns each host's TLS directory.
fn tls_init(dir: &Path, hosts: &[&str]) -> Vec<PathBuf> {
    let mut cmd = Command::new(ferry_bin());
    cmd.args(["tls", "init"]).arg(dir);
    for h in hosts {
        cmd.args(["--host", h]);
    }
    let out = cmd.output().expect("run ferry tls init");
    assert!(out.status.success(), "ferry tls init: {}", String::from_utf8_lossy(&out.stderr));
    hosts.iter().map(|h| dir.join(h)).collect()
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// A guest that ticks for a long time, with its API socket.
fn source(dir: &Path, name: &str) -> (Running, PathBuf) {
    start_with_api(dir, name, &["--cmdline", "ticks=0"], &[])
}

#[test]
fn tls_init_writes_owner_only_keys_and_refuses_to_overwrite() {
    let dir = TempDir::new("tlsinit");
    let fleet = dir.path().join("fleet");
    let hosts = tls_init(&fleet, &["a.example", "10.1.2.3"]);
    for host in &hosts {
        for (file, mode) in [
            ("ca-cert.pem", 0o644),
            ("server-cert.pem", 0o644),
            ("server-key.pem", 0o600),
            ("client-cert.pem", 0o644),
            ("client-key.pem", 0o600),
        ] {
            let meta = std::fs::metadata(host.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_eq!(meta.permissions().mode() & 0o777, mode, "{}", host.join(file).display());
        }
    }
    assert_eq!(
        std::fs::metadata(fleet.join("ca-key.pem")).expect("CA key").permissions().mode() & 0o777,
        0o600
    );
    let ca_before = std::fs::read(fleet.join("ca-key.pem")).expect("CA key");
    let again = ferry(&["tls", "init", &path(&fleet), "--host", "b.example"], DEADLINE);
    assert_eq!(again.code(), 1);
    assert!(again.stderr.contains("holds a CA already"), "{}", again.stderr);
    assert_eq!(std::fs::read(fleet.join("ca-key.pem")).expect("CA key"), ca_before, "nothing overwritten");
    let bad = ferry(&["tls", "init", &path(&dir.path().join("f2")), "--host", "../x"], DEADLINE);
    assert_eq!(bad.code(), 1);
    assert!(bad.stderr.contains("'../x' is not a DNS name or an IP address"), "{}", bad.stderr);
    assert!(!dir.path().join("f2").exists(), "a refused init writes nothing");
}

#[test]
fn tcp_without_a_transport_choice_is_refused_on_both_ends() {
    if !kvm_or_skip("tcp_without_a_transport_choice_is_refused_on_both_ends") {
        return;
    }
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    // Not through the harness (which adds --insecure-tcp).
    let out = Command::new(ferry_bin()).args(["run", "--incoming", &uri]).output().expect("ferry run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.trim()
            == "ferry: error: a tcp: migration needs --tls-dir DIR (mutual TLS) or, to move the VM \
                          unencrypted and unauthenticated, --insecure-tcp",
        "{stderr}"
    );
    let dir = TempDir::new("tlsnone");
    let (mut src, socket) = source(dir.path(), "src");
    let out = Command::new(ferry_bin())
        .args(["ctl", "--api-socket", &path(&socket), "migrate", &uri])
        .output()
        .expect("ferry ctl migrate");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs --tls-dir DIR"));
    let both = Command::new(ferry_bin())
        .args(["ctl", "--api-socket", &path(&socket), "migrate", "unix:/tmp/x.sock", "--insecure-tcp"])
        .output()
        .expect("ferry ctl migrate");
    assert!(String::from_utf8_lossy(&both.stderr).contains("are for tcp: migrations"));
    let t = wait_tick(&mut src);
    assert!(wait_tick(&mut src) > t, "the guest runs on");
}

#[test]
fn insecure_tcp_works_and_says_so_on_both_ends() {
    if !kvm_or_skip("insecure_tcp_works_and_says_so_on_both_ends") {
        return;
    }
    let dir = TempDir::new("tlsplain");
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let mut dst = Running::new(spawn_ferry(&["run", "--incoming", &uri, "--insecure-tcp"]));
    wait_for_incoming(&uri);
    let (mut src, socket) = source(dir.path(), "src");
    wait_tick(&mut src);
    let (ok, text) = migrate(&socket, &uri, &["--insecure-tcp"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("\"transport\": \"PLAINTEXT TCP (--insecure-tcp: unencrypted, unauthenticated)\""),
        "{text}"
    );
    assert!(text.contains("ferry: warning: this migration went over PLAINTEXT TCP"), "{text}");
    let src = src.finish(DEADLINE);
    assert!(src.stderr.contains("over plaintext TCP (--insecure-tcp)"), "source log: {}", src.stderr);
    dst.wait_line("TICK", DEADLINE).expect("the guest ticks on the destination");
    let dst = dst.finish(Duration::from_secs(1));
    assert!(dst.stderr.contains("over plaintext TCP (--insecure-tcp)"), "destination log: {}", dst.stderr);
}

#[test]
fn tls_migration_between_two_namespaces() {
    if !kvm_or_skip("tls_migration_between_two_namespaces") {
        return;
    }
    let Some(hosts) = TwoHosts::new("ftls1") else { return };
    let dir = TempDir::new("tls2hosts");
    let creds = tls_init(&dir.path().join("fleet"), &["10.200.0.1", "10.200.0.2"]);
    let uri = format!("tcp:10.200.0.2:{}", 7700 + std::process::id() % 200);
    let dst = Running::new(hosts.b.spawn_ferry(
        &["FERRY_LOG=info"],
        &["--incoming", &uri, "--tls-dir", &path(&creds[1]), "--tls-allow", "10.200.0.1"],
    ));
    std::thread::sleep(Duration::from_millis(500));
    let socket = dir.path().join("src.sock");
    let mut src =
        Running::new(hosts.a.spawn_ferry(&[], &["--api-socket", &path(&socket), "--cmdline", "ticks=0"]));
    assert!(wait_for_path(&socket, DEADLINE), "no API socket");
    wait_tick(&mut src);
    let (ok, text) = migrate(&socket, &uri, &["--tls-dir", &path(&creds[0])]);
    assert!(ok, "{text}");
    assert!(text.contains("\"transport\": \"mutual TLS 1.3\""), "{text}");
    assert!(!text.contains("PLAINTEXT"), "{text}");
    let src = src.finish(DEADLINE);
    assert_eq!(src.code(), 0, "{}", src.stderr);
    let mut dst = dst;
    dst.wait_line("TICK", DEADLINE).expect("the guest ticks on host B");
    let dst = dst.finish(Duration::from_secs(1));
    ticks_carry_on(&src.stdout, &dst.stdout).expect("the guest carries on where it was");
    assert!(
        dst.stderr.contains("authenticated by mutual TLS 1.3 (its certificate is valid for '10.200.0.1')"),
        "{}",
        dst.stderr
    );
}

/// A TLS client with the fleet's CA and no certificate of its own: the
/// destination asks for one and ends the handshake.
fn connect_without_certificate(creds: &Path, port: u16) -> String {
    use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(creds.join("ca-cert.pem")).expect("CA") {
        roots.add(cert.expect("a CA certificate")).expect("a CA certificate");
    }
    let config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    let name = ServerName::try_from("dst").expect("a name");
    let conn = rustls::ClientConnection::new(Arc::new(config), name).expect("a TLS client");
    let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    use std::io::{Read, Write};
    let wrote = tls.write_all(b"FERRY").and_then(|()| tls.flush());
    let mut buf = [0u8; 16];
    match (wrote, tls.read(&mut buf)) {
        (Err(e), _) | (_, Err(e)) => e.to_string(),
        (Ok(()), Ok(n)) => format!("the destination answered {n} bytes"),
    }
}

#[test]
fn wrong_peers_are_refused_before_any_state_moves() {
    if !kvm_or_skip("wrong_peers_are_refused_before_any_state_moves") {
        return;
    }
    let dir = TempDir::new("tlsrefuse");
    let fleet = tls_init(&dir.path().join("fleet"), &["dst", "src", "intruder"]);
    let other = tls_init(&dir.path().join("other"), &["src"]);
    // The other fleet's client credentials, with a CA that trusts this
    // fleet's destination: only the destination's check can turn it away.
    let foreign = dir.path().join("foreign");
    std::fs::create_dir(&foreign).expect("mkdir");
    std::fs::copy(fleet[1].join("ca-cert.pem"), foreign.join("ca-cert.pem")).expect("copy");
    for f in ["client-cert.pem", "client-key.pem"] {
        std::fs::copy(other[0].join(f), foreign.join(f)).expect("copy");
    }
    let port = free_port();
    let uri = format!("tcp:127.0.0.1:{port}");
    let mut dst = Running::new(spawn_ferry_env(
        &["run", "--incoming", &uri, "--tls-dir", &path(&fleet[0]), "--tls-allow", "src"],
        &[("FERRY_LOG", "info")],
    ));
    wait_for_incoming(&uri);
    let (mut src, socket) = source(dir.path(), "src");
    wait_tick(&mut src);

    let no_cert = connect_without_certificate(&fleet[1], port);
    assert!(no_cert.contains("CertificateRequired"), "{no_cert}");
    let attempts: [(&str, Vec<&str>, &str); 4] = [
        (
            "a certificate from another CA",
            vec!["--tls-dir", foreign.to_str().expect("utf-8"), "--tls-name", "dst"],
            "the peer does not trust this host's certificate (another CA)",
        ),
        (
            "a name not in --tls-allow",
            vec!["--tls-dir", fleet[2].to_str().expect("utf-8"), "--tls-name", "dst"],
            "the peer does not allow this host's certificate name (its --tls-allow)",
        ),
        (
            "a server of another CA",
            vec!["--tls-dir", other[0].to_str().expect("utf-8"), "--tls-name", "dst"],
            "the peer's certificate is not from this host's CA",
        ),
        ("a plaintext source", vec!["--insecure-tcp"], "it may want mutual TLS (--tls-dir on both ends)"),
    ];
    for (what, args, reason) in &attempts {
        let (ok, text) = migrate(&socket, &uri, args);
        assert!(!ok, "{what}: the migration went ahead: {text}");
        assert!(text.contains(reason), "{what}: {text}");
        let t = wait_tick(&mut src);
        assert!(wait_tick(&mut src) > t, "{what}: the source guest runs on");
        let info = ctl(&socket, &["info"]);
        assert!(info.contains("\"state\": \"running\""), "{what}: {info}");
    }
    assert!(dst.alive(), "the destination keeps waiting");
    assert!(!dst.seen().contains("TICK"), "no guest started on the destination");

    let (ok, text) = migrate(&socket, &uri, &["--tls-dir", &path(&fleet[1]), "--tls-name", "dst"]);
    assert!(ok, "{text}");
    let src = src.finish(DEADLINE);
    assert_eq!(src.code(), 0, "{}", src.stderr);
    dst.wait_line("TICK", DEADLINE).expect("the guest ticks on the destination");
    let dst = dst.finish(Duration::from_secs(1));
    let refusals: Vec<&str> = dst.stderr.lines().filter(|l| l.contains("refused a migration peer")).collect();
    for reason in [
        "the peer sent no certificate",
        "the peer's certificate is not from this host's CA",
        "the peer's certificate is valid for none of the names in --tls-allow",
        "the peer does not speak TLS",
    ] {
        assert!(refusals.iter().any(|l| l.contains(reason)), "no refusal saying '{reason}':\n{}", dst.stderr);
    }
    assert!(dst.stderr.contains("(its certificate is valid for 'src')"), "{}", dst.stderr);
}
