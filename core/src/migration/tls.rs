//! Mutual TLS 1.3 for migration over TCP (rustls with the ring provider).
//!
//! A host's TLS directory holds QEMU's file names: `ca-cert.pem` (the
//! fleet's CA), `server-cert.pem`/`server-key.pem` (what this host shows
//! when it receives a VM) and `client-cert.pem`/`client-key.pem` (what it
//! shows when it sends one); `ferry tls init` writes them (`certs.rs`).
//! The destination accepts a source only if its client certificate chains
//! to the CA and, with `--tls-allow`, is valid for one of the allowed
//! names; the source accepts a destination only if its server certificate
//! chains to the CA and is valid for the name it dialled (or
//! `--tls-name`). Every refusal happens inside the TLS handshake, before a
//! byte of the migration protocol moves.
//!
//! A TLS session is one state machine for both directions, while the
//! migration link reads and writes through two handles (`Conn::try_clone`):
//! [`TlsStream`] shares the session behind a mutex. The protocol is
//! strictly request/answer on one thread, so the lock is never contended;
//! `shutdown` and read timeouts go to the TCP socket directly, never
//! through the lock, so a cancel wakes a blocked read.

use std::{
    io::{BufReader, Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use rustls::{
    client::danger::HandshakeSignatureValid,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
    ClientConfig, ClientConnection, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    ServerConnection, SignatureScheme, StreamOwned,
};

/// The fleet's CA certificate.
pub const CA_CERT: &str = "ca-cert.pem";
/// This host's certificate as a destination.
pub const SERVER_CERT: &str = "server-cert.pem";
/// Its key.
pub const SERVER_KEY: &str = "server-key.pem";
/// This host's certificate as a source.
pub const CLIENT_CERT: &str = "client-cert.pem";
/// Its key.
pub const CLIENT_KEY: &str = "client-key.pem";

/// How long a TLS handshake may take before the peer counts as silent.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS errors.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A credentials file is missing or unreadable.
    #[error("{}: {reason}", .path.display())]
    File {
        /// Which file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The credentials do not make a TLS configuration.
    #[error("TLS credentials in {}: {reason}", .dir.display())]
    Config {
        /// The TLS directory.
        dir: PathBuf,
        /// Why.
        reason: String,
    },
    /// Not a name a certificate can be checked against.
    #[error("'{0}' is not a DNS name or an IP address")]
    Name(String),
    /// The handshake failed (the peer's certificate, or the connection).
    #[error("TLS handshake with {peer}: {reason}")]
    Handshake {
        /// The peer's address.
        peer: String,
        /// Why.
        reason: String,
    },
    /// Writing credentials (`ferry tls init`).
    #[error("{0}")]
    Init(String),
}

/// TLS settings of one end of a migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// The TLS directory.
    pub dir: PathBuf,
    /// Destination: the client certificate names accepted (empty: any
    /// certificate from the CA).
    pub allow: Vec<String>,
    /// Source: the name the destination's certificate must carry (default:
    /// the host in the URI).
    pub name: Option<String>,
}

fn read_file(dir: &Path, name: &str) -> Result<Vec<u8>, TlsError> {
    let path = dir.join(name);
    std::fs::read(&path).map_err(|e| TlsError::File { path, reason: e.to_string() })
}

fn certs(dir: &Path, name: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_file(dir, name)?;
    let bad = |reason: String| TlsError::File { path: dir.join(name), reason };
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(bad("holds no certificate".into()));
    }
    Ok(certs)
}

fn key(dir: &Path, name: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read_file(dir, name)?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| TlsError::File { path: dir.join(name), reason: format!("not a PEM private key: {e}") })
}

fn roots(dir: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in certs(dir, CA_CERT)? {
        store.add(cert).map_err(|e| TlsError::File {
            path: dir.join(CA_CERT),
            reason: format!("not a CA certificate: {e}"),
        })?;
    }
    Ok(Arc::new(store))
}

/// ring, with AES-128-GCM first: the cheapest of TLS 1.3's suites per
/// byte where the CPU has AES instructions (migration moves gigabytes).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as suite;
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![
        suite::TLS13_AES_128_GCM_SHA256,
        suite::TLS13_AES_256_GCM_SHA384,
        suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(provider)
}

fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    let bare = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')).unwrap_or(name);
    ServerName::try_from(bare.to_string()).map_err(|_| TlsError::Name(name.to_string()))
}

/// The client certificate check: the CA chain (rustls's WebPKI verifier),
/// then, if names are listed, that the certificate is valid for one of
/// them. A certificate that fails the second check is refused in the
/// handshake with the `access_denied` alert.
#[derive(Debug)]
struct AllowedClients {
    chain: Arc<dyn ClientCertVerifier>,
    allow: Vec<ServerName<'static>>,
}

impl ClientCertVerifier for AllowedClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.chain.verify_client_cert(end_entity, intermediates, now)?;
        if self.allow.is_empty() {
            return Ok(verified);
        }
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        if self.allow.iter().any(|name| rustls::client::verify_server_name(&parsed, name).is_ok()) {
            Ok(verified)
        } else {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// The destination's side: accepts sources.
pub struct Server {
    config: Arc<ServerConfig>,
    allow: Vec<String>,
}

impl Server {
    /// Load `settings.dir`'s CA and server credentials.
    pub fn load(settings: &TlsSettings) -> Result<Self, TlsError> {
        let dir = &settings.dir;
        let config_err = |reason: String| TlsError::Config { dir: dir.clone(), reason };
        let allow = settings.allow.iter().map(|n| server_name(n)).collect::<Result<Vec<_>, _>>()?;
        let chain = rustls::server::WebPkiClientVerifier::builder_with_provider(roots(dir)?, provider())
            .build()
            .map_err(|e| config_err(e.to_string()))?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| config_err(e.to_string()))?
            .with_client_cert_verifier(Arc::new(AllowedClients { chain, allow }))
            .with_single_cert(certs(dir, SERVER_CERT)?, key(dir, SERVER_KEY)?)
            .map_err(|e| config_err(format!("{SERVER_CERT} and {SERVER_KEY}: {e}")))?;
        // One session per migration, never resumed: no tickets (a source
        // that never reads them would close on unread bytes, a reset).
        config.send_tls13_tickets = 0;
        Ok(Server { config: Arc::new(config), allow: settings.allow.clone() })
    }

    /// For the log: which `--tls-allow` names let `stream`'s peer in
    /// (empty without `--tls-allow`).
    pub fn allowed_line(&self, stream: &TlsStream) -> String {
        if self.allow.is_empty() {
            return " (any certificate of the CA is accepted here)".into();
        }
        format!(" (its certificate is valid for '{}')", stream.peer_valid_for(&self.allow).join("', '"))
    }

    /// Run the handshake on an accepted connection.
    pub fn accept(&self, tcp: TcpStream) -> Result<TlsStream, TlsError> {
        let conn = ServerConnection::new(self.config.clone())
            .map_err(|e| TlsError::Handshake { peer: peer_of(&tcp), reason: e.to_string() })?;
        TlsStream::handshake(Session::Server(StreamOwned::new(conn, Socket::new(tcp))))
    }
}

/// The source's side: connects to destinations.
pub struct Client {
    config: Arc<ClientConfig>,
    name: Option<String>,
}

impl Client {
    /// Load `settings.dir`'s CA and client credentials.
    pub fn load(settings: &TlsSettings) -> Result<Self, TlsError> {
        let dir = &settings.dir;
        let config_err = |reason: String| TlsError::Config { dir: dir.clone(), reason };
        if let Some(name) = &settings.name {
            server_name(name)?;
        }
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| config_err(e.to_string()))?
            .with_root_certificates(roots(dir)?)
            .with_client_auth_cert(certs(dir, CLIENT_CERT)?, key(dir, CLIENT_KEY)?)
            .map_err(|e| config_err(format!("{CLIENT_CERT} and {CLIENT_KEY}: {e}")))?;
        Ok(Client { config: Arc::new(config), name: settings.name.clone() })
    }

    /// Run the handshake on a connection to `host` (the URI's host: the
    /// name checked unless `--tls-name` gave another).
    pub fn connect(&self, tcp: TcpStream, host: &str) -> Result<TlsStream, TlsError> {
        let name = server_name(self.name.as_deref().unwrap_or(host))?;
        let conn = ClientConnection::new(self.config.clone(), name)
            .map_err(|e| TlsError::Handshake { peer: peer_of(&tcp), reason: e.to_string() })?;
        TlsStream::handshake(Session::Client(StreamOwned::new(conn, Socket::new(tcp))))
    }
}

fn peer_of(tcp: &TcpStream) -> String {
    tcp.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "a peer".into())
}

/// How much of the TCP stream a read takes in at once.
const READ_AHEAD: usize = 256 << 10;

/// The TCP socket as a TLS session uses it: reads go through a buffer of
/// [`READ_AHEAD`] bytes, writes straight to the socket. rustls reads at
/// most 4 KiB per call (its record reassembly's step), so without the
/// buffer a destination made a `recv` per 4 KiB of guest memory: 16,384
/// calls for 64 MiB.
struct Socket {
    tcp: BufReader<TcpStream>,
}

impl Socket {
    fn new(tcp: TcpStream) -> Self {
        Socket { tcp: BufReader::with_capacity(READ_AHEAD, tcp) }
    }

    /// Are there bytes read from the socket that the session has not
    /// taken yet?
    fn buffered(&self) -> bool {
        !self.tcp.buffer().is_empty()
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.tcp.read(buf)
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tcp.get_mut().write(buf)
    }

    // rustls hands over its queued records as one vector: one `writev`.
    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        self.tcp.get_mut().write_vectored(bufs)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.tcp.get_mut().flush()
    }
}

enum Session {
    Client(StreamOwned<ClientConnection, Socket>),
    Server(StreamOwned<ServerConnection, Socket>),
}

impl Session {
    fn tcp(&self) -> &TcpStream {
        match self {
            Session::Client(s) => s.sock.tcp.get_ref(),
            Session::Server(s) => s.sock.tcp.get_ref(),
        }
    }

    /// Drive the handshake to its end.
    fn complete(&mut self) -> std::io::Result<()> {
        match self {
            Session::Client(s) => {
                while s.conn.is_handshaking() {
                    s.conn.complete_io(&mut s.sock)?;
                }
            }
            Session::Server(s) => {
                while s.conn.is_handshaking() {
                    s.conn.complete_io(&mut s.sock)?;
                }
            }
        }
        Ok(())
    }
}

/// What a TLS failure means for the user, in words (rustls says
/// "received fatal alert: UnknownCA" or "invalid peer certificate:
/// UnknownIssuer").
fn explain(e: std::io::Error) -> std::io::Error {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<E>()) else {
        return e;
    };
    let text = match tls {
        E::AlertReceived(alert) => {
            let why = match alert {
                A::UnknownCA => "the peer does not trust this host's certificate (another CA)",
                A::CertificateRequired => "the peer requires a client certificate",
                A::AccessDenied => "the peer does not allow this host's certificate name (its --tls-allow)",
                A::BadCertificate | A::CertificateUnknown => "the peer refused this host's certificate",
                A::CertificateExpired => "the peer says this host's certificate has expired",
                A::DecryptError => "the peer could not verify this host's certificate against its CA",
                _ => "",
            };
            if why.is_empty() {
                format!("the peer ended the TLS session (alert {alert:?})")
            } else {
                format!("the peer refused the TLS session: {why} (alert {alert:?})")
            }
        }
        E::NoCertificatesPresented => "the peer sent no certificate".into(),
        E::InvalidCertificate(C::UnknownIssuer) => "the peer's certificate is not from this host's CA".into(),
        E::InvalidCertificate(C::BadSignature) => {
            "the peer's certificate does not verify against this host's CA (another CA of the same name?)"
                .into()
        }
        E::InvalidCertificate(C::ApplicationVerificationFailure) => {
            "the peer's certificate is valid for none of the names in --tls-allow".into()
        }
        E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            "the peer's certificate is not valid for the name dialled (or --tls-name)".into()
        }
        E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            "the peer's certificate has expired".into()
        }
        E::InvalidMessage(_) | E::InappropriateMessage { .. } => {
            "the peer does not speak TLS (a plaintext --insecure-tcp peer?)".into()
        }
        other => other.to_string(),
    };
    std::io::Error::new(e.kind(), text)
}

/// An established TLS session over TCP, shareable by a reader and a
/// writer.
pub struct TlsStream {
    session: Arc<Mutex<Session>>,
    tcp: TcpStream,
}

impl TlsStream {
    fn handshake(mut session: Session) -> Result<Self, TlsError> {
        let tcp = session.tcp();
        let peer = peer_of(tcp);
        let err =
            |e: std::io::Error| TlsError::Handshake { peer: peer.clone(), reason: explain(e).to_string() };
        let tcp = tcp.try_clone().map_err(err)?;
        let before = tcp.read_timeout().ok().flatten();
        tcp.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(err)?;
        session.complete().map_err(err)?;
        tcp.set_read_timeout(before).map_err(err)?;
        Ok(TlsStream { session: Arc::new(Mutex::new(session)), tcp })
    }

    fn session(&self) -> std::sync::MutexGuard<'_, Session> {
        self.session.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Those of `names` the peer's certificate is valid for (for the log:
    /// which `--tls-allow` entry let it in).
    pub fn peer_valid_for(&self, names: &[String]) -> Vec<String> {
        let session = self.session();
        let certs = match &*session {
            Session::Client(s) => s.conn.peer_certificates(),
            Session::Server(s) => s.conn.peer_certificates(),
        };
        let Some(parsed) =
            certs.and_then(|c| c.first()).and_then(|c| rustls::server::ParsedCertificate::try_from(c).ok())
        else {
            return Vec::new();
        };
        names
            .iter()
            .filter(|n| {
                server_name(n).is_ok_and(|sn| rustls::client::verify_server_name(&parsed, &sn).is_ok())
            })
            .cloned()
            .collect()
    }

    /// A second handle on the same session.
    pub fn try_clone(&self) -> std::io::Result<TlsStream> {
        Ok(TlsStream { session: self.session.clone(), tcp: self.tcp.try_clone()? })
    }

    /// Has TLS decrypted (or received, ready to decrypt) bytes that a read
    /// would return without waiting on the socket? (A poll on the socket
    /// does not see them.) An error counts as yes: the read reports it,
    /// and so do bytes read ahead from the socket ([`Socket`]): the peer
    /// sends whole records, so a part of one has the rest on its way.
    pub fn has_plaintext(&self) -> bool {
        let state = match &mut *self.session() {
            Session::Client(s) if s.sock.buffered() => return true,
            Session::Server(s) if s.sock.buffered() => return true,
            Session::Client(s) => s.conn.process_new_packets(),
            Session::Server(s) => s.conn.process_new_packets(),
        };
        state.map_or(true, |io| io.plaintext_bytes_to_read() > 0 || io.peer_has_closed())
    }

    /// The TCP socket underneath (timeouts, shutdown).
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match &mut *self.session() {
            Session::Client(s) => s.read(buf),
            Session::Server(s) => s.read(buf),
        }
        .map_err(explain)
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &mut *self.session() {
            Session::Client(s) => s.write(buf),
            Session::Server(s) => s.write(buf),
        }
        .map_err(explain)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match &mut *self.session() {
            Session::Client(s) => s.flush(),
            Session::Server(s) => s.flush(),
        }
        .map_err(explain)
    }
}
