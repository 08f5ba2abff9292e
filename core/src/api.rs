//! The control API: REST/JSON over a unix socket (`curl --unix-socket`
//! works), and the client `ferry ctl` uses. The server thread parses
//! requests and hands them to the VM's main loop, which answers each.
//!
//! ```text
//!  GET /vm                          info (state, machine, cpus, memory, devices)
//!  PUT /vm/pause                    pause vCPUs, then devices
//!  PUT /vm/resume                   resume devices, then vCPUs
//!  PUT /vm/snapshot {"path": FILE}  write a snapshot (the guest pauses meanwhile)
//!  PUT /vm/shutdown                 end the VM; ferry exits 0
//!  PUT /vm/migrate {"uri": "tcp:HOST:PORT"|"unix:PATH", "max_downtime_ms": 300, "dry_run": false,
//!                   "tls_dir": DIR, "tls_name": NAME, "insecure_tcp": false}
//!                                   start a live migration (answers at once); tcp: needs
//!                                   tls_dir (mutual TLS) or insecure_tcp: true
//!  GET /vm/migration                the migration's progress, plan and report
//!  PUT /vm/migrate-cancel           give up the migration; the guest keeps running here
//! ```
//! Answers are JSON; errors are `{"error": "..."}` with status 400 (a bad
//! request: malformed body, bad URI, a snapshot path that cannot be
//! created), 404 (no such endpoint), 405 (wrong method), 409 (the VM's
//! state does not allow it now: a migration is running, none is, the
//! guest's state or the target host refuses a snapshot), 500 (the
//! operation failed in ferry or KVM) or 503 (the VM has ended).

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
};

use crossbeam_channel::{Receiver, Sender};
use serde_json::Value;

/// What the VM's main loop is asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest {
    /// Describe the VM.
    Info,
    /// Pause.
    Pause,
    /// Resume.
    Resume,
    /// Snapshot to a file, optionally written for another host's plugins
    /// (a `ferry plugins --manifest` document): older state versions where
    /// the plan says so.
    Snapshot(PathBuf, Option<Box<crate::migration::plan::HostManifest>>),
    /// End the VM.
    Shutdown,
    /// Start a live migration.
    Migrate {
        /// Where to.
        uri: String,
        /// Downtime limit.
        max_downtime_ms: u64,
        /// Plan only.
        dry_run: bool,
        /// TLS or plaintext (tcp: only).
        security: Option<crate::migration::conn::TcpSecurity>,
    },
    /// Progress of the migration.
    MigrationStatus,
    /// Give up the migration.
    MigrateCancel,
}

/// Why a request failed, with the HTTP status that says so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// 400, 409, 500, ...
    pub status: u16,
    /// The error, one line.
    pub message: String,
}

impl Failure {
    /// 400: the request itself is wrong.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Failure { status: 400, message: message.into() }
    }

    /// 409: the VM's state does not allow it now.
    pub fn conflict(message: impl Into<String>) -> Self {
        Failure { status: 409, message: message.into() }
    }

    /// 500: it failed in ferry or KVM.
    pub fn failed(message: impl Into<String>) -> Self {
        Failure { status: 500, message: message.into() }
    }
}

/// A request and where its answer goes.
pub type Call = (ApiRequest, Sender<Result<Value, Failure>>);

/// Decode method, path and body into a request.
pub fn route(method: &str, path: &str, body: &str) -> Result<ApiRequest, (u16, String)> {
    match (method, path.trim_end_matches('/')) {
        ("GET", "/vm") => Ok(ApiRequest::Info),
        ("PUT", "/vm/pause") => Ok(ApiRequest::Pause),
        ("PUT", "/vm/resume") => Ok(ApiRequest::Resume),
        ("PUT", "/vm/shutdown") => Ok(ApiRequest::Shutdown),
        ("GET", "/vm/migration") => Ok(ApiRequest::MigrationStatus),
        ("PUT", "/vm/migrate-cancel") => Ok(ApiRequest::MigrateCancel),
        ("PUT", "/vm/migrate") => {
            let v: Value = serde_json::from_str(body).map_err(|e| (400, format!("body is not JSON: {e}")))?;
            let uri =
                v.get("uri").and_then(Value::as_str).ok_or((400, "body needs {\"uri\": ...}".to_string()))?;
            use crate::migration::{conn::Endpoint, conn::TcpSecurity, tls::TlsSettings};
            let endpoint = Endpoint::parse(uri).map_err(|e| (400, e.to_string()))?;
            let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
            let tls = text("tls_dir").map(|dir| TlsSettings {
                dir: dir.into(),
                allow: Vec::new(),
                name: text("tls_name"),
            });
            let insecure = v.get("insecure_tcp").and_then(Value::as_bool).unwrap_or(false);
            let security = TcpSecurity::choose(&endpoint, tls, insecure).map_err(|e| (400, e.to_string()))?;
            Ok(ApiRequest::Migrate {
                uri: uri.to_string(),
                max_downtime_ms: v.get("max_downtime_ms").and_then(Value::as_u64).unwrap_or(300),
                dry_run: v.get("dry_run").and_then(Value::as_bool).unwrap_or(false),
                security,
            })
        }
        ("PUT", "/vm/snapshot") => {
            let v: Value = serde_json::from_str(body).map_err(|e| (400, format!("body is not JSON: {e}")))?;
            let path = v
                .get("path")
                .and_then(Value::as_str)
                .ok_or((400, "body needs {\"path\": FILE}".to_string()))?;
            let target = match v.get("target") {
                None | Some(Value::Null) => None,
                Some(t) => Some(Box::new(
                    serde_json::from_value(t.clone())
                        .map_err(|e| (400, format!("target is not a host manifest: {e}")))?,
                )),
            };
            Ok(ApiRequest::Snapshot(PathBuf::from(path), target))
        }
        (
            _,
            "/vm" | "/vm/pause" | "/vm/resume" | "/vm/shutdown" | "/vm/snapshot" | "/vm/migrate"
            | "/vm/migration" | "/vm/migrate-cancel",
        ) => Err((405, format!("{method} is not allowed on {path}"))),
        _ => Err((404, format!("no endpoint {path}"))),
    }
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

/// Serve the API on `path`; requests arrive on the returned channel and
/// wait there until the VM's main loop runs. A socket another process
/// answers on is refused, a stale one replaced (`unix_socket::claim`).
pub fn serve(path: &Path) -> Result<Served, String> {
    crate::unix_socket::claim(path, "--api-socket")?;
    let server = tiny_http::Server::http_unix(path)
        .map_err(|e| format!("cannot serve the API on {}: {e}", path.display()))?;
    let (tx, rx) = crossbeam_channel::unbounded::<Call>();
    let (answered_tx, answered) = crossbeam_channel::unbounded::<()>();
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            for mut request in server.incoming_requests() {
                let mut body = String::new();
                let read = request.as_reader().take(1 << 20).read_to_string(&mut body);
                let method = request.method().as_str().to_string();
                let (status, value) = match read
                    .map_err(|e| (400, e.to_string()))
                    .and_then(|_| route(&method, request.url(), &body))
                {
                    Err((status, message)) => (status, serde_json::json!({ "error": message })),
                    Ok(req) => {
                        let (reply_tx, reply_rx) = crossbeam_channel::bounded(1);
                        if tx.send((req, reply_tx)).is_err() {
                            (503, serde_json::json!({ "error": "the VM has ended" }))
                        } else {
                            match reply_rx.recv() {
                                Ok(Ok(v)) => (200, v),
                                Ok(Err(f)) => (f.status, serde_json::json!({ "error": f.message })),
                                Err(_) => (503, serde_json::json!({ "error": "the VM has ended" })),
                            }
                        }
                    }
                };
                let header = tiny_http::Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..])
                    .expect("static header");
                let response = tiny_http::Response::from_string(value.to_string() + "\n")
                    .with_status_code(status)
                    .with_header(header);
                let _ = request.respond(response);
                let _ = answered_tx.send(());
            }
        })
        .map_err(|e| format!("cannot start the API thread: {e}"))?;
    Ok(Served { calls: rx, answered, path: path.to_path_buf() })
}

/// One request to the API at `socket`; returns the status and the body.
pub fn call(socket: &Path, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value), String> {
    let mut stream = UnixStream::connect(socket)
        .map_err(|e| format!("cannot connect to the API socket {}: {e}", socket.display()))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).map_err(|e| format!("API request: {e}"))?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(|e| format!("API response: {e}"))?;
    let (head, payload) = response.split_once("\r\n\r\n").ok_or("API response without a body")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("API response has no status: {head}"))?;
    // tiny_http may use chunked encoding; take the JSON object inside.
    let json = match (payload.find('{'), payload.rfind('}')) {
        (Some(a), Some(b)) if b >= a => &payload[a..=b],
        _ => "null",
    };
    let value = serde_json::from_str(json).map_err(|e| format!("API answer is not JSON ({e}): {payload}"))?;
    Ok((status, value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::conn::TcpSecurity;

    #[test]
    fn routes_decode() {
        assert_eq!(route("GET", "/vm", ""), Ok(ApiRequest::Info));
        assert_eq!(route("PUT", "/vm/pause/", ""), Ok(ApiRequest::Pause));
        assert_eq!(
            route("PUT", "/vm/snapshot", r#"{"path":"/tmp/s"}"#),
            Ok(ApiRequest::Snapshot("/tmp/s".into(), None))
        );
        assert_eq!(route("PUT", "/vm/snapshot", "{}").unwrap_err().0, 400);
        assert_eq!(route("GET", "/vm/pause", "").unwrap_err().0, 405);
        assert_eq!(route("GET", "/nope", "").unwrap_err().0, 404);
        let bad_uri = route("PUT", "/vm/migrate", r#"{"uri":"udp:1:2"}"#).unwrap_err();
        assert_eq!(bad_uri, (400, "'udp:1:2' is not tcp:HOST:PORT or unix:PATH".to_string()));
        let bare_tcp = route("PUT", "/vm/migrate", r#"{"uri":"tcp:h:1"}"#).unwrap_err();
        assert!(bare_tcp.0 == 400 && bare_tcp.1.contains("--insecure-tcp"), "{bare_tcp:?}");
        let tls_on_unix = route("PUT", "/vm/migrate", r#"{"uri":"unix:/s","tls_dir":"/t"}"#).unwrap_err();
        assert!(tls_on_unix.1.contains("are for tcp:"), "{tls_on_unix:?}");
        let Ok(ApiRequest::Migrate { security: Some(TcpSecurity::Tls(tls)), .. }) =
            route("PUT", "/vm/migrate", r#"{"uri":"tcp:h:1","tls_dir":"/t","tls_name":"b"}"#)
        else {
            panic!("tls_dir is not read");
        };
        assert_eq!((tls.dir, tls.name), ("/t".into(), Some("b".into())));
    }
}
