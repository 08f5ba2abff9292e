//! HTTP/1.1 on the API socket, as much as the API uses: one request per
//! connection (`Connection: close`), a body by `Content-Length` only, JSON
//! both ways. Every length is bounded before anything is allocated (a
//! head of 16 KiB, a body of 1 MiB), and a request that breaks the rules
//! is answered 400 with the reason. The parser is fuzzed
//! (`tests/fuzz`, target `api`).

use std::io::{BufRead, Read, Write};

use thiserror::Error;

/// Longest request head (request line and headers).
pub const MAX_HEAD: usize = 16 << 10;
/// Longest request body.
pub const MAX_BODY: usize = 1 << 20;

/// A request as it came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// GET, PUT, ...
    pub method: String,
    /// The path, query string removed.
    pub path: String,
    /// The body (UTF-8).
    pub body: String,
}

/// Why a request or response could not be read.
#[derive(Debug, Error)]
pub enum HttpError {
    /// The connection failed or ended early.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Not HTTP as the API speaks it.
    #[error("{0}")]
    Malformed(String),
}

fn malformed(m: impl Into<String>) -> HttpError {
    HttpError::Malformed(m.into())
}

/// The head's request line and the body length its headers give.
fn parse_head(head: &str) -> Result<(String, String, usize), HttpError> {
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed(format!("bad request line '{request_line}'")));
    };
    if !version.starts_with("HTTP/1.") || method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase())
    {
        return Err(malformed(format!("bad request line '{request_line}'")));
    }
    let path = target.split('?').next().unwrap_or_default().to_string();
    let mut length = 0usize;
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').ok_or_else(|| malformed(format!("bad header '{line}'")))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = value.parse().map_err(|_| malformed(format!("bad Content-Length '{value}'")))?;
            if length > MAX_BODY {
                return Err(malformed(format!("a body of {length} bytes is over the limit of {MAX_BODY}")));
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(malformed("chunked bodies are not taken: send Content-Length"));
        }
    }
    Ok((method.to_string(), path, length))
}

/// Read the head: bytes up to the blank line, within `MAX_HEAD`.
fn read_head(r: &mut impl BufRead) -> Result<String, HttpError> {
    let mut head = Vec::new();
    loop {
        let before = head.len();
        let n = r.by_ref().take((MAX_HEAD + 1 - head.len()) as u64).read_until(b'\n', &mut head)?;
        if n == 0 {
            return Err(malformed("the connection ended inside the request head"));
        }
        if head.len() > MAX_HEAD {
            return Err(malformed(format!("a request head over {MAX_HEAD} bytes")));
        }
        if &head[before..] == b"\r\n" || &head[before..] == b"\n" {
            head.truncate(before);
            break;
        }
    }
    let text = String::from_utf8(head).map_err(|_| malformed("the request head is not UTF-8"))?;
    Ok(text.replace("\r\n", "\n").replace('\n', "\r\n"))
}

/// Read one request.
pub fn read_request(r: &mut impl BufRead) -> Result<Request, HttpError> {
    let head = read_head(r)?;
    let (method, path, length) = parse_head(&head)?;
    let mut body = vec![0u8; length];
    r.read_exact(&mut body)?;
    let body = String::from_utf8(body).map_err(|_| malformed("the body is not UTF-8"))?;
    Ok(Request { method, path, body })
}

/// Parse a whole request from bytes (the fuzz target's entry).
pub fn parse_request(bytes: &[u8]) -> Result<Request, HttpError> {
    read_request(&mut std::io::BufReader::new(bytes))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// Write a JSON response and close.
pub fn write_response(w: &mut impl Write, status: u16, body: &serde_json::Value) -> std::io::Result<()> {
    let body = body.to_string() + "\n";
    write!(
        w,
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        reason(status),
        body.len()
    )?;
    w.flush()
}

/// Write a request.
pub fn write_request(w: &mut impl Write, method: &str, path: &str, body: &str) -> std::io::Result<()> {
    write!(
        w,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    w.flush()
}

/// Read a response: its status and JSON body.
pub fn read_response(r: &mut impl BufRead) -> Result<(u16, serde_json::Value), HttpError> {
    let head = read_head(r)?;
    let status_line = head.split("\r\n").next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| malformed(format!("no status in '{status_line}'")))?;
    let mut body = String::new();
    r.by_ref().take(MAX_BODY as u64).read_to_string(&mut body)?;
    let value =
        serde_json::from_str(body.trim()).map_err(|e| malformed(format!("not JSON ({e}): {body}")))?;
    Ok((status, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_reads_back_and_bad_ones_are_named() {
        let mut wire = Vec::new();
        write_request(&mut wire, "PUT", "/vm/migrate", r#"{"uri":"unix:/x"}"#).unwrap();
        let r = parse_request(&wire).unwrap();
        assert_eq!(
            (r.method.as_str(), r.path.as_str(), r.body.as_str()),
            ("PUT", "/vm/migrate", r#"{"uri":"unix:/x"}"#)
        );
        let curl = b"GET /vm?x=1 HTTP/1.1\r\nHost: localhost\r\nUser-Agent: curl\r\nAccept: */*\r\n\r\n";
        assert_eq!(parse_request(curl).unwrap().path, "/vm");
        for (bad, why) in [
            (&b"GET /vm\r\n\r\n"[..], "bad request line"),
            (b"GET /vm HTTP/1.1\r\nContent-Length: x\r\n\r\n", "bad Content-Length"),
            (b"PUT /vm HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", "over the limit"),
            (b"PUT /vm HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", "chunked"),
            (b"GET /vm HTTP/1.1\r\nHost", "ended inside the request head"),
        ] {
            let err = parse_request(bad).unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
        }
        let huge = vec![b'a'; MAX_HEAD + 10];
        assert!(parse_request(&huge).unwrap_err().to_string().contains("over 16384 bytes"));
        let short = b"PUT /vm HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc";
        assert!(parse_request(short).is_err(), "a body shorter than said");
    }

    #[test]
    fn a_response_reads_back() {
        let mut wire = Vec::new();
        write_response(&mut wire, 409, &serde_json::json!({"error": "busy"})).unwrap();
        let (status, v) = read_response(&mut std::io::BufReader::new(&wire[..])).unwrap();
        assert_eq!((status, v["error"].as_str()), (409, Some("busy")));
    }
}
