//! The connection a migration runs over: where to connect or listen
//! (`Endpoint`), how TCP is secured (`TcpSecurity`), the byte stream
//! (`Conn`), how a running migration is given up (`Cancel`), and the
//! errors of a migration (`MigrateError`). Below `link.rs` and the two
//! ends (`source.rs`, `destination.rs`), which run the protocol over it;
//! above `tls.rs`.

use std::{
    io::{Read, Write},
    net::TcpStream,
    os::unix::net::UnixStream,
    time::Duration,
};

use super::{
    stream::StreamError,
    tls::{TlsError, TlsSettings, TlsStream},
    vmstate::VmStateError,
};

/// Migration errors.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The URI is not tcp:HOST:PORT or unix:PATH.
    #[error("'{0}' is not tcp:HOST:PORT or unix:PATH")]
    Uri(String),
    /// TCP without `--tls-dir` or `--insecure-tcp`, or either on a unix
    /// socket.
    #[error("{0}")]
    Security(String),
    /// TLS credentials or the TLS handshake.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Cannot reach the destination.
    #[error("cannot connect to {uri}: {source}")]
    Connect {
        /// Where.
        uri: String,
        /// Why.
        source: std::io::Error,
    },
    /// The stream broke or carried something wrong.
    #[error("{phase}: {source}")]
    Stream {
        /// During which phase.
        phase: &'static str,
        /// What.
        source: StreamError,
    },
    /// The destination refused the plan.
    #[error("refused by the destination:\n{}", .0.join("\n"))]
    Refused(Vec<String>),
    /// The destination said something unexpected or failed.
    #[error("{0}")]
    Protocol(String),
    /// A message could not be encoded.
    #[error("encoding a message: {0}")]
    Encode(#[from] crate::state::StateError),
    /// KVM's dirty log.
    #[error(transparent)]
    Kvm(#[from] crate::kvm::KvmError),
    /// A device would not pause or resume.
    #[error(transparent)]
    Devices(#[from] crate::vmcore::DeviceCallError),
    /// The unix socket path is taken.
    #[error(transparent)]
    Socket(#[from] crate::unix_socket::ClaimError),
    /// This host's plugins cannot be opened.
    #[error(transparent)]
    Plugins(#[from] crate::plugins::PluginError),
    /// The VM's state could not be captured, or what came was wrong.
    #[error(transparent)]
    VmState(#[from] VmStateError),
    /// Post-copy failed after the destination resumed the guest: the
    /// source must not resume it (it runs there, short of these pages).
    #[error("{0}; the guest runs on the destination, the source stays paused with the pages it still holds")]
    GuestMoved(String),
    /// Pre-copy does not converge.
    #[error("did not converge after {rounds} rounds: the guest dirties {dirty:.1} MB/s, the link moves {link:.1} MB/s; the source keeps running")]
    NoConvergence {
        /// Rounds done.
        rounds: u32,
        /// MB/s dirtied.
        dirty: f64,
        /// MB/s sent.
        link: f64,
    },
}

/// How a running migration is given up (`ferry ctl migrate-cancel`, or
/// the guest resetting): a flag pre-copy checks between rounds, and, until
/// the switch-over begins, the connection, shut down so that a read
/// waiting on the destination (the handshake, a pass's acknowledgement)
/// returns at once. From the switch-over on, cancelling only sets the flag,
/// which nothing reads any more: the guest may already run on the
/// destination, and only the destination's answer decides where it runs.
#[derive(Default)]
pub struct Cancel {
    flag: std::sync::atomic::AtomicBool,
    conn: std::sync::Mutex<Option<Conn>>,
}

impl Cancel {
    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Conn>> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ready for a new migration.
    pub fn clear(&self) {
        *self.slot() = None;
        self.flag.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Give the migration up.
    pub fn cancel(&self) {
        let slot = self.slot();
        self.flag.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(conn) = slot.as_ref() {
            conn.shutdown();
        }
    }

    fn is_cancelled(&self) -> bool {
        self.flag.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Err("cancelled") once cancelled.
    pub(crate) fn check(&self) -> Result<(), MigrateError> {
        if self.is_cancelled() {
            return Err(MigrateError::Protocol("cancelled".into()));
        }
        Ok(())
    }

    /// A failure caused by a cancel (the connection shut down under a
    /// read) reads as the cancel it was.
    pub(crate) fn explain(&self, e: MigrateError) -> MigrateError {
        self.check().err().unwrap_or(e)
    }

    /// Let `cancel` shut this connection down (until `disarm`).
    pub(crate) fn watch(&self, conn: &Conn) {
        let mut slot = self.slot();
        *slot = conn.try_clone().ok();
        if self.is_cancelled() {
            conn.shutdown();
        }
    }

    /// The switch-over begins: from here `cancel` no longer touches the
    /// connection. Fails if it was cancelled before.
    pub(crate) fn disarm(&self) -> Result<(), MigrateError> {
        *self.slot() = None;
        self.check()
    }
}

pub(crate) const NEEDS_SECURITY: &str =
    "a tcp: migration needs --tls-dir DIR (mutual TLS) or, to move the VM \
                              unencrypted and unauthenticated, --insecure-tcp";

/// How a TCP migration is protected: mutual TLS, or, only when both ends
/// say so, nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TcpSecurity {
    /// Mutual TLS 1.3 with this host's TLS directory.
    Tls(TlsSettings),
    /// Plaintext and unauthenticated (`--insecure-tcp`).
    Insecure,
}

impl TcpSecurity {
    /// What the command line or API asked for, checked against the
    /// endpoint: TCP needs exactly one of the two, a unix socket neither.
    pub fn choose(
        endpoint: &Endpoint,
        tls: Option<TlsSettings>,
        insecure: bool,
    ) -> Result<Option<TcpSecurity>, MigrateError> {
        let refuse = |m: &str| Err(MigrateError::Security(m.to_string()));
        match (endpoint, tls, insecure) {
            (Endpoint::Tcp(_), Some(_), true) => refuse("--tls-dir and --insecure-tcp exclude each other"),
            (Endpoint::Tcp(_), Some(tls), false) => Ok(Some(TcpSecurity::Tls(tls))),
            (Endpoint::Tcp(_), None, true) => Ok(Some(TcpSecurity::Insecure)),
            (Endpoint::Tcp(_), None, false) => refuse(NEEDS_SECURITY),
            (Endpoint::Unix(_), None, false) => Ok(None),
            (Endpoint::Unix(_), _, _) => {
                refuse("--tls-dir and --insecure-tcp are for tcp: migrations (a unix socket is checked by its owner)")
            }
        }
    }

    /// For reports and logs.
    pub fn describe(security: Option<&TcpSecurity>) -> &'static str {
        match security {
            Some(TcpSecurity::Tls(_)) => "mutual TLS 1.3",
            Some(TcpSecurity::Insecure) => "PLAINTEXT TCP (--insecure-tcp: unencrypted, unauthenticated)",
            None => "unix socket",
        }
    }
}

/// A connected byte stream to the other side.
pub enum Conn {
    /// TCP, plaintext.
    Tcp(TcpStream),
    /// TCP with mutual TLS.
    Tls(TlsStream),
    /// Unix socket.
    Unix(UnixStream),
}

impl Conn {
    pub(crate) fn try_clone(&self) -> std::io::Result<Conn> {
        Ok(match self {
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
            Conn::Tls(s) => Conn::Tls(s.try_clone()?),
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
        })
    }

    pub(crate) fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_read_timeout(t),
            Conn::Tls(s) => s.tcp().set_read_timeout(t),
            Conn::Unix(s) => s.set_read_timeout(t),
        }
    }

    /// The socket's descriptor (to poll it).
    pub(crate) fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        match self {
            Conn::Tcp(s) => s.as_raw_fd(),
            Conn::Tls(s) => s.tcp().as_raw_fd(),
            Conn::Unix(s) => s.as_raw_fd(),
        }
    }

    /// Bytes a read returns without waiting that a poll on the socket
    /// does not see (TLS's decrypted records).
    pub(crate) fn has_buffered(&self) -> bool {
        matches!(self, Conn::Tls(s) if s.has_plaintext())
    }

    /// Close both directions (wakes a blocked reader).
    pub fn shutdown(&self) {
        let _ = match self {
            Conn::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Conn::Tls(s) => s.tcp().shutdown(std::net::Shutdown::Both),
            Conn::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Tls(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Tcp(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
            Conn::Unix(s) => s.flush(),
        }
    }
}

/// Where to connect or listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// host:port.
    Tcp(String),
    /// A socket path.
    Unix(std::path::PathBuf),
}

impl Endpoint {
    /// Parse `tcp:HOST:PORT` or `unix:PATH`.
    pub fn parse(uri: &str) -> Result<Self, MigrateError> {
        if let Some(rest) = uri.strip_prefix("tcp:") {
            if rest.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()) {
                return Ok(Endpoint::Tcp(rest.to_string()));
            }
        } else if let Some(path) = uri.strip_prefix("unix:") {
            if !path.is_empty() {
                return Ok(Endpoint::Unix(path.into()));
            }
        }
        Err(MigrateError::Uri(uri.to_string()))
    }

    /// Connect, with TLS when `security` says so (a TLS client is loaded
    /// first, so missing credentials fail before anything is dialled).
    pub fn connect(&self, uri: &str, security: Option<&TcpSecurity>) -> Result<Conn, MigrateError> {
        let err = |source| MigrateError::Connect { uri: uri.to_string(), source };
        match (self, security) {
            (Endpoint::Tcp(addr), Some(security)) => {
                let client = match security {
                    TcpSecurity::Tls(settings) => Some(super::tls::Client::load(settings)?),
                    TcpSecurity::Insecure => None,
                };
                let s = TcpStream::connect(addr).map_err(err)?;
                let _ = s.set_nodelay(true);
                match client {
                    Some(client) => Ok(Conn::Tls(client.connect(s, host_of(addr))?)),
                    None => Ok(Conn::Tcp(s)),
                }
            }
            (Endpoint::Tcp(_), None) => Err(MigrateError::Security(NEEDS_SECURITY.into())),
            (Endpoint::Unix(path), _) => UnixStream::connect(path).map(Conn::Unix).map_err(err),
        }
    }
}

/// The host part of `host:port` (`[v6]:port` keeps its brackets, which
/// the TLS name check strips).
fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!(Endpoint::parse("tcp:10.0.0.2:4444").unwrap(), Endpoint::Tcp("10.0.0.2:4444".into()));
        assert_eq!(Endpoint::parse("unix:/tmp/m.sock").unwrap(), Endpoint::Unix("/tmp/m.sock".into()));
        for bad in ["tcp:host", "tcp::1", "udp:1:2", "unix:", "tcp:h:99999"] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }
}
