//! Post-copy, the source's side: after END, serve the destination's
//! requests at once and push the rest in order, on one thread, until the
//! destination has every page; after a broken link, reconnect when the
//! operator says where (`ferry ctl migrate --resume`).

use std::time::Instant;

use super::PageSet;
use crate::{
    migration::{
        conn::{Endpoint, MigrateError, TcpSecurity},
        link::{io, st, Link, ANSWER_TIMEOUT},
        pages,
        stream::Kind,
    },
    vmcore::VmCore,
};

const PHASE: &str = "post-copy";
/// Pages per pushed batch: small, so a request waits at most one batch.
const BATCH: usize = 64;
/// Under a bandwidth cap, the time one batch takes at most, seconds.
const BATCH_TIME: f64 = 0.002;

/// What serving has done so far.
#[derive(Debug, Default)]
pub struct Served {
    /// When the destination's RESUMED arrived (the guest runs there from
    /// then on; a broken link no longer gives it back to the source).
    pub resumed: Option<Instant>,
    /// Pages sent after END, pushed or requested.
    pub pages: u64,
    /// Requests answered.
    pub requests: u64,
    /// The guest ended on the destination before every page went.
    pub guest_ended: bool,
}

/// Serve the destination over `link` until it holds every page of `left`
/// (pages taken out as they are sent) and has resumed the guest.
/// `progress(pages_left, served)` is called after each batch.
pub(crate) fn serve(
    core: &VmCore,
    link: &mut Link,
    left: &mut PageSet,
    served: &mut Served,
    mut progress: impl FnMut(u64, &Served),
) -> Result<(), MigrateError> {
    let (mut from, mut done_sent, mut complete) = (0u64, false, false);
    // Under a cap, a batch of about BATCH_TIME: a request waits at most that.
    let batch = link.rate().map_or(BATCH, |rate| ((rate * BATCH_TIME / 4096.0) as usize).clamp(1, BATCH));
    let mut payload = Vec::new();
    loop {
        // What the destination said first: a request waits at most one batch.
        // Nothing is read after its last word: it may close the connection
        // (its guest ended) right after, and that is no failure.
        while !(complete && served.resumed.is_some()) && link.readable(0).map_err(io(PHASE))? {
            let h = link.receive_into(&mut payload).map_err(st(PHASE))?;
            match h.kind {
                Kind::Request => {
                    let runs = pages::decode_runs(&core.ram, &h, &payload).map_err(st(PHASE))?;
                    let wanted: Vec<u64> = pages::run_pages(&core.ram, &runs).collect();
                    // A vCPU waits for these: past the cap's pacing.
                    link.unpaced(|link| {
                        pages::send(&core.ram, &wanted, link).map_err(st(PHASE))?;
                        link.flush().map_err(io(PHASE))
                    })?;
                    for page in &wanted {
                        left.remove(*page);
                    }
                    served.pages += wanted.len() as u64;
                    served.requests += 1;
                }
                Kind::Resumed => served.resumed = Some(Instant::now()),
                Kind::Decision if payload == b"postcopy-complete" => complete = true,
                Kind::Decision if payload == super::GUEST_ENDED && served.resumed.is_some() => {
                    served.guest_ended = true;
                    return Ok(());
                }
                Kind::Failed => {
                    return Err(MigrateError::Protocol(format!(
                        "destination failed: {}",
                        String::from_utf8_lossy(&payload)
                    )))
                }
                other => return Err(MigrateError::Protocol(format!("{PHASE}: unexpected {}", other.name()))),
            }
        }
        if complete && served.resumed.is_some() {
            return Ok(());
        }
        if served.resumed.is_none() {
            // Nothing is pushed while the destination loads the state and
            // resumes (its requests are answered): the pause stays short.
            link.readable(-1).map_err(io(PHASE))?;
        } else if !left.is_empty() {
            let batch = left.take(&mut from, batch);
            pages::send(&core.ram, &batch, link).map_err(st(PHASE))?;
            link.flush().map_err(io(PHASE))?;
            served.pages += batch.len() as u64;
            progress(left.len(), served);
        } else if !done_sent {
            link.decide(b"postcopy-done", PHASE)?;
            done_sent = true;
        } else {
            link.readable(-1).map_err(io(PHASE))?;
        }
    }
}

/// Where and how to reconnect (`ferry ctl migrate --resume`).
pub(crate) struct Reconnect<'a> {
    pub uri: &'a str,
    pub security: Option<&'a TcpSecurity>,
    pub max_bandwidth: Option<u64>,
}

/// Reconnect to a destination waiting in post-copy and learn what it
/// still lacks: `left` becomes that set.
pub(crate) fn reconnect(core: &VmCore, to: Reconnect, left: &mut PageSet) -> Result<Link, MigrateError> {
    let phase = "resuming post-copy";
    let conn = Endpoint::parse(to.uri)?.connect(to.uri, to.security)?;
    conn.set_read_timeout(Some(ANSWER_TIMEOUT)).map_err(io(phase))?;
    let mut link = Link::new(conn).map_err(io(phase))?;
    link.limit(to.max_bandwidth);
    link.decide(b"resume-postcopy", phase)?;
    let mut lacks = PageSet::new(left.capacity());
    loop {
        let (h, payload) = link.receive().map_err(st(phase))?;
        match h.kind {
            Kind::Stale => {
                let runs = pages::decode_runs(&core.ram, &h, &payload).map_err(st(phase))?;
                for page in pages::run_pages(&core.ram, &runs) {
                    lacks.insert(page);
                }
            }
            Kind::Decision if payload == b"resume-ready" => break,
            Kind::Failed => {
                return Err(MigrateError::Protocol(format!(
                    "the destination refused to resume: {}",
                    String::from_utf8_lossy(&payload)
                )))
            }
            other => return Err(MigrateError::Protocol(format!("{phase}: unexpected {}", other.name()))),
        }
    }
    // No read timeout from here: serving waits on the destination's needs.
    link.reader.get_ref().set_read_timeout(None).map_err(io(phase))?;
    *left = lacks;
    Ok(link)
}
