//! A migration's connection as both ends use it: buffered messages in the
//! stream format (`stream::send`/`receive`), counted, with the helpers
//! that turn a broken message into a [`MigrateError`] naming the phase.
//! Below the source (`source.rs`) and the destination (`destination.rs`).

use std::{
    io::{BufReader, BufWriter, Write},
    time::{Duration, Instant},
};

use super::{
    conn::{Conn, MigrateError},
    stream::{self, Kind, SectionHeader, SectionSink, StreamError},
};

/// How long one end waits for the other's answer during the handshake
/// and between pre-copy passes.
pub(crate) const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// One end of the connection.
pub(crate) struct Link {
    pub(crate) reader: BufReader<Conn>,
    pub(crate) writer: BufWriter<Conn>,
    received: usize,
    /// Bytes sent so far (headers included).
    pub(crate) sent: u64,
    /// A bandwidth limit on what is sent, if set.
    limit: Option<Limit>,
}

/// A bandwidth limit: sending waits while it is ahead of `rate`.
struct Limit {
    /// Bytes per second.
    rate: f64,
    since: Instant,
    sent: u64,
}

impl Link {
    pub(crate) fn new(conn: Conn) -> Result<Self, std::io::Error> {
        let reader = BufReader::new(conn.try_clone()?);
        Ok(Link {
            reader,
            writer: BufWriter::with_capacity(1 << 20, conn),
            received: 0,
            sent: 0,
            limit: None,
        })
    }

    /// Send at most `bytes_per_s` from now on (None: as fast as the
    /// connection goes).
    pub(crate) fn limit(&mut self, bytes_per_s: Option<u64>) {
        self.limit = bytes_per_s.map(|rate| Limit { rate: rate as f64, since: Instant::now(), sent: 0 });
    }

    /// The bandwidth limit, bytes per second, if one is set.
    pub(crate) fn rate(&self) -> Option<f64> {
        self.limit.as_ref().map(|l| l.rate)
    }

    /// Run `f` without waiting on the limit (what a guest waits for, now),
    /// its bytes still counted against it: later sends wait for them.
    pub(crate) fn unpaced<T>(&mut self, f: impl FnOnce(&mut Link) -> T) -> T {
        let limit = self.limit.take();
        let before = self.sent;
        let out = f(self);
        self.limit = limit.map(|mut l| {
            l.sent += self.sent - before;
            l
        });
        out
    }

    pub(crate) fn send(&mut self, kind: Kind, id: &str, version: u32, payload: &[u8]) -> std::io::Result<()> {
        let len = payload.len() as u64 + stream::SECTION_HEADER_LEN + id.len() as u64;
        self.sent += len;
        stream::send(&mut self.writer, kind, id, version, payload)?;
        if let Some(limit) = &mut self.limit {
            limit.sent += len;
            let due = Duration::from_secs_f64(limit.sent as f64 / limit.rate);
            if let Some(ahead) = due.checked_sub(limit.since.elapsed()) {
                std::thread::sleep(ahead);
            }
        }
        Ok(())
    }

    /// Send a DECISION message (its payload a word: "go", "sync", ...) and
    /// flush.
    pub(crate) fn decide(&mut self, word: &[u8], phase: &'static str) -> Result<(), MigrateError> {
        self.send(Kind::Decision, "", 1, word).map_err(io(phase))?;
        self.flush().map_err(io(phase))
    }

    pub(crate) fn flush(&mut self) -> std::io::Result<()> {
        self.writer.flush()
    }

    pub(crate) fn receive(&mut self) -> Result<(SectionHeader, Vec<u8>), StreamError> {
        let mut payload = Vec::new();
        let h = self.receive_into(&mut payload)?;
        Ok((h, payload))
    }

    /// Receive the next message into `payload`, reusing its allocation.
    pub(crate) fn receive_into(&mut self, payload: &mut Vec<u8>) -> Result<SectionHeader, StreamError> {
        let r = stream::receive_into(&mut self.reader, self.received, payload);
        self.received += 1;
        r
    }

    /// Is a message (or the end) waiting to be read? Waits up to
    /// `timeout_ms` (-1: until there is) for the socket.
    pub(crate) fn readable(&mut self, timeout_ms: i32) -> std::io::Result<bool> {
        let conn = self.reader.get_ref();
        if !self.reader.buffer().is_empty() || conn.has_buffered() {
            return Ok(true);
        }
        Ok(crate::uffd::poll_readable(&[conn.raw_fd()], timeout_ms)?[0])
    }

    /// Tell the other end this one failed (best effort: it may be gone).
    pub(crate) fn fail(&mut self, reason: &str) {
        let _ = self.send(Kind::Failed, "", 1, reason.as_bytes());
        let _ = self.flush();
    }
}

impl SectionSink for Link {
    fn put(&mut self, kind: Kind, id: &str, version: u32, payload: &[u8]) -> Result<(), StreamError> {
        Ok(self.send(kind, id, version, payload)?)
    }
}

/// An I/O error during `phase`.
pub(crate) fn io(phase: &'static str) -> impl Fn(std::io::Error) -> MigrateError {
    move |e| MigrateError::Stream { phase, source: StreamError::Io(e) }
}

/// A stream error during `phase`.
pub(crate) fn st(phase: &'static str) -> impl Fn(StreamError) -> MigrateError {
    move |source| MigrateError::Stream { phase, source }
}
