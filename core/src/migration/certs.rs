//! `ferry tls init DIR --host NAME...`: credentials for a small fleet in
//! one command. It writes a CA (`DIR/ca-cert.pem`, and its key
//! `DIR/ca-key.pem`, which belongs on no host) and, for each host, the
//! directory `DIR/NAME/` that host passes as `--tls-dir`: the CA
//! certificate and a server and a client certificate for NAME (a DNS name
//! or an IP address: the name a source dials, and the name a
//! destination's `--tls-allow` lists). Keys are written owner-only.
//! Nothing existing is overwritten.

use std::{
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use super::tls::{TlsError, CA_CERT, CLIENT_CERT, CLIENT_KEY, SERVER_CERT, SERVER_KEY};

/// The CA's private key, beside the hosts' directories.
pub const CA_KEY: &str = "ca-key.pem";

fn init_err(what: &str) -> impl Fn(rcgen::Error) -> TlsError + '_ {
    move |e| TlsError::Init(format!("{what}: {e}"))
}

/// Write `contents` to a new file (never over an existing one), owner-only
/// if `secret`.
fn write_new(path: &Path, contents: &str, secret: bool) -> Result<(), TlsError> {
    let err = |e: std::io::Error| TlsError::Init(format!("{}: {e}", path.display()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(err)?;
    file.write_all(contents.as_bytes()).map_err(err)
}

fn make_dir(path: &Path) -> Result<(), TlsError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|e| TlsError::Init(format!("{}: {e}", path.display())))
}

/// A short id of a key: 16 hex digits of its public key (the random X
/// coordinate of a P-256 point, past its format byte).
fn key_id(key: &KeyPair) -> String {
    key.public_key_raw().iter().skip(1).take(8).map(|b| format!("{b:02x}")).collect()
}

/// A certificate for `host`, for one purpose, signed by the CA.
fn host_cert(
    host: &str,
    purpose: ExtendedKeyUsagePurpose,
    ca: &Issuer<'_, KeyPair>,
) -> Result<(String, String), TlsError> {
    let mut params =
        CertificateParams::new(vec![host.to_string()]).map_err(|_| TlsError::Name(host.to_string()))?;
    params.distinguished_name.push(DnType::CommonName, host);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![purpose];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().map_err(init_err("generating a key"))?;
    let cert = params.signed_by(&key, ca).map_err(init_err(host))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Write the CA and a TLS directory per host under `dir`; returns the
/// hosts' directories.
pub fn init(dir: &Path, hosts: &[String]) -> Result<Vec<PathBuf>, TlsError> {
    if hosts.is_empty() {
        return Err(TlsError::Init("name at least one host (--host NAME)".into()));
    }
    for (i, host) in hosts.iter().enumerate() {
        // The name becomes a directory and a certificate's subject.
        if host.contains('/') || rustls::pki_types::ServerName::try_from(host.as_str()).is_err() {
            return Err(TlsError::Name(host.clone()));
        }
        if hosts[..i].contains(host) {
            return Err(TlsError::Init(format!("host '{host}' is named twice")));
        }
        if dir.join(host).exists() {
            return Err(TlsError::Init(format!("{} exists already", dir.join(host).display())));
        }
    }
    if dir.join(CA_KEY).exists() || dir.join(CA_CERT).exists() {
        return Err(TlsError::Init(format!("{} holds a CA already; choose a new directory", dir.display())));
    }
    make_dir(dir)?;
    let ca_key = KeyPair::generate().map_err(init_err("generating the CA key"))?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(init_err("CA"))?;
    // Each fleet's CA gets a name of its own: certificate checks find an
    // issuer by name, so two fleets' CAs with one name would make a
    // foreign certificate fail as a bad signature instead of as another CA.
    params.distinguished_name.push(DnType::CommonName, format!("ferry migration CA {}", key_id(&ca_key)));
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = params.self_signed(&ca_key).map_err(init_err("CA"))?;
    write_new(&dir.join(CA_KEY), &ca_key.serialize_pem(), true)?;
    write_new(&dir.join(CA_CERT), &ca_cert.pem(), false)?;
    let ca = Issuer::new(params, ca_key);
    let mut made = Vec::new();
    for host in hosts {
        let host_dir = dir.join(host);
        make_dir(&host_dir)?;
        write_new(&host_dir.join(CA_CERT), &ca_cert.pem(), false)?;
        let (cert, key) = host_cert(host, ExtendedKeyUsagePurpose::ServerAuth, &ca)?;
        write_new(&host_dir.join(SERVER_CERT), &cert, false)?;
        write_new(&host_dir.join(SERVER_KEY), &key, true)?;
        let (cert, key) = host_cert(host, ExtendedKeyUsagePurpose::ClientAuth, &ca)?;
        write_new(&host_dir.join(CLIENT_CERT), &cert, false)?;
        write_new(&host_dir.join(CLIENT_KEY), &key, true)?;
        made.push(host_dir);
    }
    Ok(made)
}
