//! The control API: REST/JSON over a unix socket (`curl --unix-socket`
//! works), and the client `ferry ctl` uses. Both speak the same typed
//! requests ([`ApiRequest`], bodies [`SnapshotRequest`] and
//! [`MigrateRequest`]) through one route table ([`ROUTES`]). The server
//! thread parses requests and hands them to the VM's main loop, which
//! answers each.
//!
//! ```text
//!  GET /vm                          info (state, machine, cpus, memory, devices)
//!  PUT /vm/pause                    pause vCPUs, then devices
//!  PUT /vm/resume                   resume devices, then vCPUs
//!  PUT /vm/snapshot {"path": FILE}  write a snapshot (the guest pauses meanwhile)
//!  PUT /vm/shutdown                 end the VM; ferry exits 0
//!  PUT /vm/migrate {"uri": "tcp:HOST:PORT"|"unix:PATH", "max_downtime_ms": 300, "dry_run": false,
//!                   "max_bandwidth": BYTES_PER_S (optional),
//!                   "tls_dir": DIR, "tls_name": NAME, "insecure_tcp": false,
//!                   "postcopy": false, "resume": false}
//!                                   start a live migration (answers at once); tcp: needs
//!                                   tls_dir (mutual TLS) or insecure_tcp: true; "resume":
//!                                   reconnect a paused post-copy to uri
//!  GET /vm/migration                the migration's progress, plan and report
//!  PUT /vm/migrate-cancel           give up the migration; the guest keeps running here
//! ```
//! Answers are JSON; errors are `{"error": "..."}` with the status of the
//! error's kind ([`ApiError::status`]): 400 (a bad request: malformed
//! body, bad URI, a snapshot path that cannot be created), 404 (no such
//! endpoint), 405 (wrong method), 409 (the VM's state does not allow it
//! now: a migration is running, none is, the guest's state or the target
//! host refuses a snapshot), 500 (the operation failed in ferry or KVM)
//! or 503 (the VM has ended).

pub mod http;

use std::{
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
};

use crossbeam_channel::{Receiver, Sender};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

use crate::migration::{
    conn::{Endpoint, TcpSecurity},
    converge::DEFAULT_MAX_DOWNTIME_MS,
    plan::HostManifest,
    source::Options,
    tls::TlsSettings,
};
use crate::unix_socket::Peers;

/// Why a request failed; its kind chooses the HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ApiError {
    /// The request itself is wrong (400).
    #[error("{0}")]
    BadRequest(String),
    /// No such endpoint (404).
    #[error("no endpoint {0}")]
    NotFound(String),
    /// The endpoint exists, with another method (405).
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed {
        /// The method used.
        method: String,
        /// The path.
        path: String,
    },
    /// The VM's state does not allow it now (409).
    #[error("{0}")]
    Conflict(String),
    /// It failed in ferry or KVM (500).
    #[error("{0}")]
    Failed(String),
    /// The VM has ended (503).
    #[error("the VM has ended")]
    Ended,
}

impl ApiError {
    /// The HTTP status of this kind of error.
    pub fn status(&self) -> u16 {
        match self {
            ApiError::BadRequest(_) => 400,
            ApiError::NotFound(_) => 404,
            ApiError::MethodNotAllowed { .. } => 405,
            ApiError::Conflict(_) => 409,
            ApiError::Failed(_) => 500,
            ApiError::Ended => 503,
        }
    }
}

/// The body of `PUT /vm/snapshot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRequest {
    /// The file (absolute: the server resolves relative paths against its
    /// own directory).
    pub path: PathBuf,
    /// Write it for another host's plugins (a `ferry plugins --manifest`
    /// document): older state versions where the plan says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Box<HostManifest>>,
}

/// The body of `PUT /vm/migrate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateRequest {
    /// `tcp:HOST:PORT` or `unix:PATH`.
    pub uri: String,
    /// Downtime limit.
    #[serde(default = "default_max_downtime")]
    pub max_downtime_ms: u64,
    /// Plan only.
    #[serde(default)]
    pub dry_run: bool,
    /// Bytes per second memory may go at while the guest runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
    /// tcp: mutual TLS with this TLS directory (absolute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_dir: Option<PathBuf>,
    /// tcp: the name the destination's certificate must carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_name: Option<String>,
    /// tcp: plaintext, unauthenticated.
    #[serde(default)]
    pub insecure_tcp: bool,
    /// Post-copy where the guest outruns the link (instead of throttling).
    #[serde(default)]
    pub postcopy: bool,
    /// Reconnect a post-copy whose connection broke, to `uri`.
    #[serde(default)]
    pub resume: bool,
}

fn default_max_downtime() -> u64 {
    DEFAULT_MAX_DOWNTIME_MS
}

impl MigrateRequest {
    /// The migration's options: the URI parsed, and TLS or plaintext as
    /// the endpoint requires (tcp: exactly one of them, unix: neither).
    pub fn options(&self) -> Result<Options, ApiError> {
        let bad = |e: crate::migration::conn::MigrateError| ApiError::BadRequest(e.to_string());
        let endpoint = Endpoint::parse(&self.uri).map_err(bad)?;
        let tls = self.tls_dir.clone().map(|dir| TlsSettings {
            dir,
            allow: Vec::new(),
            name: self.tls_name.clone(),
        });
        let security = TcpSecurity::choose(&endpoint, tls, self.insecure_tcp).map_err(bad)?;
        if self.max_bandwidth.is_some_and(|b| b < 1 << 20) {
            return Err(ApiError::BadRequest("max_bandwidth: at least 1 MiB per second".into()));
        }
        Ok(Options {
            uri: self.uri.clone(),
            max_downtime_ms: self.max_downtime_ms,
            dry_run: self.dry_run,
            max_bandwidth: self.max_bandwidth,
            security,
            postcopy: self.postcopy,
        })
    }
}

/// What a request asks the VM, as `ferry ctl` sends it and the main loop
/// receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest {
    /// Describe the VM.
    Info,
    /// Pause.
    Pause,
    /// Resume.
    Resume,
    /// Write a snapshot.
    Snapshot(SnapshotRequest),
    /// End the VM.
    Shutdown,
    /// Start a live migration (its options already checked).
    Migrate(MigrateRequest),
    /// Progress of the migration.
    MigrationStatus,
    /// Give up the migration.
    MigrateCancel,
}

/// The endpoints, each once: method, path, and the request it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Info,
    Pause,
    Resume,
    Snapshot,
    Shutdown,
    Migrate,
    Migration,
    MigrateCancel,
}

/// The route table: every method and path the API answers.
const ROUTES: [(&str, &str, Route); 8] = [
    ("GET", "/vm", Route::Info),
    ("PUT", "/vm/pause", Route::Pause),
    ("PUT", "/vm/resume", Route::Resume),
    ("PUT", "/vm/snapshot", Route::Snapshot),
    ("PUT", "/vm/shutdown", Route::Shutdown),
    ("PUT", "/vm/migrate", Route::Migrate),
    ("GET", "/vm/migration", Route::Migration),
    ("PUT", "/vm/migrate-cancel", Route::MigrateCancel),
];

impl ApiRequest {
    fn route(&self) -> Route {
        match self {
            ApiRequest::Info => Route::Info,
            ApiRequest::Pause => Route::Pause,
            ApiRequest::Resume => Route::Resume,
            ApiRequest::Snapshot(_) => Route::Snapshot,
            ApiRequest::Shutdown => Route::Shutdown,
            ApiRequest::Migrate(_) => Route::Migrate,
            ApiRequest::MigrationStatus => Route::Migration,
            ApiRequest::MigrateCancel => Route::MigrateCancel,
        }
    }

    /// Method, path and JSON body, from the route table.
    pub fn http(&self) -> (&'static str, &'static str, Option<Value>) {
        let route = self.route();
        let (method, path) =
            ROUTES.iter().find(|(_, _, r)| *r == route).map(|(m, p, _)| (*m, *p)).unwrap_or(("GET", "/vm"));
        let body = match self {
            ApiRequest::Snapshot(s) => serde_json::to_value(s).ok(),
            ApiRequest::Migrate(m) => serde_json::to_value(m).ok(),
            _ => None,
        };
        (method, path, body)
    }
}

/// Decode method, path and body into a request, through the route table.
pub fn route(method: &str, path: &str, body: &str) -> Result<ApiRequest, ApiError> {
    let trimmed = path.trim_end_matches('/');
    let mut routes = ROUTES.iter().filter(|(_, p, _)| *p == trimmed).peekable();
    if routes.peek().is_none() {
        return Err(ApiError::NotFound(path.to_string()));
    }
    let Some(&(_, _, route)) = routes.find(|(m, _, _)| *m == method) else {
        return Err(ApiError::MethodNotAllowed { method: method.to_string(), path: path.to_string() });
    };
    let json = || -> Result<Value, ApiError> {
        serde_json::from_str(body).map_err(|e| ApiError::BadRequest(format!("body is not JSON: {e}")))
    };
    Ok(match route {
        Route::Info => ApiRequest::Info,
        Route::Pause => ApiRequest::Pause,
        Route::Resume => ApiRequest::Resume,
        Route::Shutdown => ApiRequest::Shutdown,
        Route::Migration => ApiRequest::MigrationStatus,
        Route::MigrateCancel => ApiRequest::MigrateCancel,
        Route::Snapshot => {
            let v = json()?;
            if v.get("path").and_then(Value::as_str).is_none() {
                return Err(ApiError::BadRequest("body needs {\"path\": FILE}".into()));
            }
            let req: SnapshotRequest = serde_json::from_value(v)
                .map_err(|e| ApiError::BadRequest(format!("target is not a host manifest: {e}")))?;
            ApiRequest::Snapshot(req)
        }
        Route::Migrate => {
            let v = json()?;
            if v.get("uri").and_then(Value::as_str).is_none() {
                return Err(ApiError::BadRequest("body needs {\"uri\": ...}".into()));
            }
            let req: MigrateRequest = serde_json::from_value(v)
                .map_err(|e| ApiError::BadRequest(format!("bad migrate body: {e}")))?;
            req.options()?;
            ApiRequest::Migrate(req)
        }
    })
}

/// A request and where its answer goes.
pub type Call = (ApiRequest, Sender<Result<Value, ApiError>>);

/// Why the API cannot be served.
#[derive(Debug, Error)]
pub enum ServeError {
    /// The socket path is taken, or cannot be bound.
    #[error(transparent)]
    Claim(#[from] crate::unix_socket::ClaimError),
    /// The server thread did not start.
    #[error("cannot start the API thread: {0}")]
    Thread(std::io::Error),
}

/// The server side: requests to answer, and a signal after each answer
/// has been written (so ferry does not exit under a response). Dropping it
/// removes the socket.
pub struct Served {
    /// Requests.
    pub calls: Receiver<Call>,
    /// One message per response written.
    pub answered: Receiver<()>,
    path: PathBuf,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// How long a client may take to send its request.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Serve the API on `path`, created owner-only (0600); requests arrive on
/// the returned channel and wait there until the VM's main loop runs. A
/// socket another process answers on is refused, a stale one replaced
/// (`unix_socket::claim`). A peer `peers` does not allow is logged and
/// closed without an answer.
pub fn serve(path: &Path, peers: Peers) -> Result<Served, ServeError> {
    let listener = crate::unix_socket::bind_owner_only(path, "--api-socket")?;
    let (tx, rx) = crossbeam_channel::unbounded::<Call>();
    let (answered_tx, answered) = crossbeam_channel::unbounded::<()>();
    let shown = path.display().to_string();
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                if let Err(e) = peers.check(&stream) {
                    crate::log::warn(&format!("--api-socket {shown}: refused a connection: {e}"));
                    continue;
                }
                let _ = stream.set_read_timeout(Some(REQUEST_TIMEOUT));
                let answer = match http::read_request(&mut std::io::BufReader::new(&stream)) {
                    Err(http::HttpError::Io(_)) => continue, // gone, or silent too long
                    Err(e) => Err(ApiError::BadRequest(e.to_string())),
                    Ok(req) => route(&req.method, &req.path, &req.body).and_then(|req| {
                        let (reply_tx, reply_rx) = crossbeam_channel::bounded(1);
                        tx.send((req, reply_tx)).map_err(|_| ApiError::Ended)?;
                        reply_rx.recv().map_err(|_| ApiError::Ended)?
                    }),
                };
                let (status, value) = match answer {
                    Ok(v) => (200, v),
                    Err(e) => (e.status(), serde_json::json!({ "error": e.to_string() })),
                };
                let _ = http::write_response(&mut stream, status, &value);
                let _ = answered_tx.send(());
            }
        })
        .map_err(ServeError::Thread)?;
    Ok(Served { calls: rx, answered, path: path.to_path_buf() })
}

/// Why a call to the API failed before an answer came.
#[derive(Debug, Error)]
pub enum CallError {
    /// No one answers on the socket.
    #[error("cannot connect to the API socket {socket}: {source}")]
    Connect {
        /// The socket.
        socket: String,
        /// Why.
        source: std::io::Error,
    },
    /// The exchange broke or the answer was not the API's.
    #[error("API answer: {0}")]
    Answer(#[from] http::HttpError),
}

/// Send `req` to the API at `socket`; the status and the JSON answer.
pub fn send(socket: &Path, req: &ApiRequest) -> Result<(u16, Value), CallError> {
    let (method, path, body) = req.http();
    call(socket, method, path, body.as_ref())
}

/// One request to the API at `socket`; returns the status and the body.
pub fn call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, Value), CallError> {
    let mut stream = UnixStream::connect(socket)
        .map_err(|source| CallError::Connect { socket: socket.display().to_string(), source })?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    http::write_request(&mut stream, method, path, &body).map_err(http::HttpError::Io)?;
    Ok(http::read_response(&mut std::io::BufReader::new(&stream))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_decode() {
        assert_eq!(route("GET", "/vm", ""), Ok(ApiRequest::Info));
        assert_eq!(route("PUT", "/vm/pause/", ""), Ok(ApiRequest::Pause));
        assert_eq!(
            route("PUT", "/vm/snapshot", r#"{"path":"/tmp/s"}"#),
            Ok(ApiRequest::Snapshot(SnapshotRequest { path: "/tmp/s".into(), target: None }))
        );
        assert_eq!(route("PUT", "/vm/snapshot", "{}").unwrap_err().status(), 400);
        assert_eq!(route("GET", "/vm/pause", "").unwrap_err().status(), 405);
        assert_eq!(route("GET", "/nope", "").unwrap_err().status(), 404);
        let bad_uri = route("PUT", "/vm/migrate", r#"{"uri":"udp:1:2"}"#).unwrap_err();
        assert_eq!(bad_uri, ApiError::BadRequest("'udp:1:2' is not tcp:HOST:PORT or unix:PATH".to_string()));
        let bare_tcp = route("PUT", "/vm/migrate", r#"{"uri":"tcp:h:1"}"#).unwrap_err();
        assert!(bare_tcp.status() == 400 && bare_tcp.to_string().contains("--insecure-tcp"), "{bare_tcp:?}");
        let tls_on_unix = route("PUT", "/vm/migrate", r#"{"uri":"unix:/s","tls_dir":"/t"}"#).unwrap_err();
        assert!(tls_on_unix.to_string().contains("are for tcp:"), "{tls_on_unix:?}");
        let Ok(ApiRequest::Migrate(m)) =
            route("PUT", "/vm/migrate", r#"{"uri":"tcp:h:1","tls_dir":"/t","tls_name":"b"}"#)
        else {
            panic!("tls_dir is not read");
        };
        let Ok(Options { security: Some(TcpSecurity::Tls(tls)), max_downtime_ms, .. }) = m.options() else {
            panic!("not TLS: {m:?}");
        };
        assert_eq!((tls.dir, tls.name), ("/t".into(), Some("b".into())));
        assert_eq!(max_downtime_ms, DEFAULT_MAX_DOWNTIME_MS, "the default, said once");
    }

    #[test]
    fn what_the_client_sends_the_server_reads_back() {
        let requests = [
            ApiRequest::Info,
            ApiRequest::Pause,
            ApiRequest::Resume,
            ApiRequest::Shutdown,
            ApiRequest::MigrationStatus,
            ApiRequest::MigrateCancel,
            ApiRequest::Snapshot(SnapshotRequest { path: "/tmp/x.snap".into(), target: None }),
            ApiRequest::Migrate(MigrateRequest {
                uri: "unix:/tmp/m.sock".into(),
                max_downtime_ms: 50,
                dry_run: true,
                max_bandwidth: Some(64 << 20),
                tls_dir: None,
                tls_name: None,
                insecure_tcp: false,
                postcopy: true,
                resume: false,
            }),
        ];
        for req in requests {
            let (method, path, body) = req.http();
            let text = body.map(|b| b.to_string()).unwrap_or_default();
            assert_eq!(route(method, path, &text), Ok(req.clone()), "{method} {path}");
        }
    }
}
