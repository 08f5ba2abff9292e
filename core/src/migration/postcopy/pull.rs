//! Post-copy, the destination's side: the puller. One thread waits on
//! guest RAM's userfaultfd and on the connection: a touched stale page is
//! requested from the source, a touched page that was never sent is
//! zero-filled here, and every page that arrives is filled in where still
//! missing. After a broken link it listens again and, once the source
//! reconnects, tells it what is still missing.

use std::{
    sync::{atomic::Ordering, Arc},
    time::Instant,
};

use super::PageSet;
use crate::{
    memory::GuestRam,
    migration::{
        conn::MigrateError,
        destination::{ListenOn, Listener, Shared},
        link::{io, st, Link, ANSWER_TIMEOUT},
        pages,
        status::{Phase, Status},
        stream::Kind,
    },
    uffd::{poll_readable, Userfault},
    vmcore::VmCore,
};

const PAGE: u64 = 4096;
const PHASE: &str = "post-copy";

/// Guest RAM made ready for post-copy: the stale pages taken out, the
/// RAM registered with userfaultfd.
pub struct Armed {
    uffd: Userfault,
    stale: PageSet,
}

impl Armed {
    /// Pages still on the source.
    pub fn stale_pages(&self) -> u64 {
        self.stale.len()
    }
}

fn failed(what: String) -> MigrateError {
    MigrateError::Protocol(format!("post-copy: {what}"))
}

/// Punch the stale runs out of `ram`'s memfd, so that their first touch
/// faults once RAM is armed. The vCPUs must not run yet. Done as each
/// STALE message arrives: most of them come while the guest still runs
/// on the source, so little of this falls in the downtime.
pub fn take_out(ram: &GuestRam, runs: &[(u64, u64)]) -> Result<(), MigrateError> {
    if ram.memfd().is_none() {
        return Err(failed("guest RAM is not a memfd".into()));
    }
    for &(gpa, n) in runs {
        ram.zero_pages(gpa, n * PAGE).map_err(|e| failed(e.to_string()))?;
    }
    Ok(())
}

/// Register every RAM range with a new userfaultfd; `runs`, already
/// taken out ([`take_out`]), are the pages the source still holds. The
/// vCPUs must not run yet.
pub fn arm(ram: &GuestRam, runs: &[(u64, u64)]) -> Result<Armed, MigrateError> {
    if ram.memfd().is_none() {
        return Err(failed("guest RAM is not a memfd".into()));
    }
    let mut stale = PageSet::new(ram.size() / PAGE);
    for page in pages::run_pages(ram, runs) {
        stale.insert(page);
    }
    let uffd = Userfault::open().map_err(|e| failed(format!("userfaultfd: {e}")))?;
    for r in ram.ranges() {
        let host = ram.bytes(r.gpa, r.len).ok_or_else(|| failed(format!("range {:#x} unmapped", r.gpa)))?;
        uffd.register(host.as_ptr() as u64, r.len)
            .map_err(|e| failed(format!("registering RAM at {:#x}: {e}", r.gpa)))?;
    }
    Ok(Armed { uffd, stale })
}

/// Can this host take a post-copy? None if so, else why not (for the plan).
pub fn unavailable(isolated: bool) -> Option<String> {
    if isolated {
        return Some(
            "devices run isolated here, and a device process would not wait for a missing page".into(),
        );
    }
    Userfault::open().err().map(|e| format!("userfaultfd is not available here: {e}"))
}

/// Start the puller thread on `core`'s RAM.
pub(crate) fn start(
    core: Arc<VmCore>,
    armed: Armed,
    shared: Arc<Shared>,
    listen: ListenOn,
) -> std::io::Result<()> {
    let pages = core.ram.size() / PAGE;
    let puller = Puller {
        core,
        uffd: armed.uffd,
        stale: armed.stale,
        requested: PageSet::new(pages),
        shared,
        listen,
        requests: 0,
        zero_filled: 0,
        started: Instant::now(),
        done_heard: false,
    };
    puller.shared.pulling.store(true, Ordering::SeqCst);
    let started = std::thread::Builder::new().name("postcopy".into()).spawn(move || {
        let shared = puller.shared.clone();
        puller.run();
        shared.pulling.store(false, Ordering::SeqCst);
    });
    started.map(|_| ())
}

struct Puller {
    core: Arc<VmCore>,
    uffd: Userfault,
    /// Pages still on the source.
    stale: PageSet,
    /// Stale pages asked for on this connection.
    requested: PageSet,
    shared: Arc<Shared>,
    listen: ListenOn,
    requests: u64,
    zero_filled: u64,
    started: Instant,
    /// The source said it sent every page (and more were asked for since).
    done_heard: bool,
}

impl Puller {
    fn run(mut self) {
        loop {
            let Err(e) = self.serve() else {
                crate::log::info(&format!(
                    "post-copy complete in {:.1} ms: {} request(s) from the guest's touches, {} never-sent page(s) zero-filled",
                    self.started.elapsed().as_secs_f64() * 1e3,
                    self.requests,
                    self.zero_filled
                ));
                self.status(Phase::Completed, None);
                return;
            };
            if self.shared.ending.load(Ordering::SeqCst) {
                crate::log::info(&format!("post-copy ended with the guest ({e}): the source hung up"));
                return;
            }
            if !self.shared.confirmed.load(Ordering::SeqCst) {
                // The guest never ran here: the source takes it back.
                crate::log::warn(&format!("post-copy: {e} before the guest resumed here"));
                return;
            }
            crate::log::warn(&format!(
                "post-copy paused: {e}; {} page(s) are still on the source and a vCPU or device that \
                 touches one waits; listening on {} for the source to resume (ferry ctl migrate --resume)",
                self.stale.len(),
                self.listen.uri
            ));
            self.status(Phase::PostcopyPaused, Some(e.to_string()));
            if let Err(e) = self.wait_for_source() {
                crate::log::log(
                    ferry_plugin_api::LogLevel::ERROR,
                    &format!(
                        "post-copy cannot resume: {e}; the pages still on the source are lost to the guest"
                    ),
                );
                return;
            }
            self.status(Phase::Postcopy, None);
            crate::log::info("post-copy resumed on a new connection");
        }
    }

    fn status(&self, phase: Phase, error: Option<String>) {
        let mut slot = self.core.migration.lock().unwrap_or_else(|e| e.into_inner());
        let s = slot.get_or_insert_with(Status::default);
        s.phase = phase;
        s.error = error;
        s.done = phase == Phase::Completed;
    }

    /// Until the source says every page went: faults and messages as they
    /// come. An error is the connection's (marked broken).
    fn serve(&mut self) -> Result<(), MigrateError> {
        let sock = self.shared.link().reader.get_ref().raw_fd();
        let mut payload = Vec::new();
        loop {
            let buffered = {
                let link = self.shared.link();
                !link.reader.buffer().is_empty() || link.reader.get_ref().has_buffered()
            };
            let ready = match buffered {
                true => vec![false, true],
                false => poll_readable(&[std::os::fd::AsRawFd::as_raw_fd(&self.uffd), sock], -1)
                    .map_err(io(PHASE))?,
            };
            if ready[0] {
                self.on_faults(true)?;
            }
            if ready[1] && self.on_message(&mut payload)? {
                return Ok(());
            }
        }
    }

    /// The guest-physical address of host address `addr` in guest RAM.
    fn gpa_of(&self, addr: u64) -> Option<u64> {
        let ram = &self.core.ram;
        ram.ranges().iter().find_map(|r| {
            let host = ram.bytes(r.gpa, r.len)?.as_ptr() as u64;
            (addr >= host && addr < host + r.len).then(|| r.gpa + addr - host)
        })
    }

    /// The host address of guest page `gpa`.
    fn host_of(&self, gpa: u64, len: u64) -> Option<u64> {
        self.core.ram.bytes(gpa, len).map(|b| b.as_ptr() as u64)
    }

    /// Read the faults queued: request stale pages (when `connected`),
    /// zero-fill the rest.
    fn on_faults(&mut self, connected: bool) -> Result<(), MigrateError> {
        let mut addrs = Vec::new();
        self.uffd.faults(&mut addrs).map_err(io("reading userfaultfd"))?;
        let mut want = Vec::new();
        for addr in addrs {
            let Some(gpa) = self.gpa_of(addr) else { continue };
            let Some(page) = self.core.ram.page_of(gpa) else { continue };
            if self.stale.contains(page) {
                if self.requested.insert(page) {
                    want.push(page);
                }
            } else {
                // Never sent: zero on the source too. (A page filled since
                // the fault was queued is present: left alone, woken.)
                self.zero_filled += self.uffd.zero(addr, PAGE).map_err(io("zero-filling a page"))?;
            }
        }
        if connected && !want.is_empty() {
            want.sort_unstable();
            self.request(&want)?;
        }
        Ok(())
    }

    fn request(&mut self, pages_wanted: &[u64]) -> Result<(), MigrateError> {
        let runs = pages::runs(&self.core.ram, pages_wanted);
        let mut link = self.shared.link();
        let sent = pages::send_runs(Kind::Request, &runs, &mut *link)
            .map_err(st(PHASE))
            .and_then(|()| link.flush().map_err(io(PHASE)));
        if sent.is_err() {
            self.shared.broken.store(true, Ordering::SeqCst);
        }
        self.requests += 1;
        sent
    }

    /// One message from the source; true once every page is here.
    fn on_message(&mut self, payload: &mut Vec<u8>) -> Result<bool, MigrateError> {
        let mut link = self.shared.link();
        let h = match link.receive_into(payload) {
            Ok(h) => h,
            Err(e) => {
                self.shared.broken.store(true, Ordering::SeqCst);
                return Err(st(PHASE)(e));
            }
        };
        let ram = &self.core.ram;
        match h.kind {
            Kind::Pages => {
                let (gpa, data) = pages::decode_pages(ram, &h, payload).map_err(st(PHASE))?;
                for (k, page_data) in data.chunks_exact(PAGE as usize).enumerate() {
                    let at = gpa + k as u64 * PAGE;
                    let Some(page) = ram.page_of(at) else { continue };
                    if self.stale.remove(page) {
                        self.requested.remove(page);
                        let host = self.host_of(at, PAGE).ok_or_else(|| st(PHASE)(h.bad("unmapped")))?;
                        self.uffd.copy(host, page_data).map_err(io("filling a page"))?;
                    }
                }
            }
            Kind::ZeroPages => {
                for (gpa, n) in pages::decode_runs(ram, &h, payload).map_err(st(PHASE))? {
                    for k in 0..n {
                        let at = gpa + k * PAGE;
                        let Some(page) = ram.page_of(at) else { continue };
                        if self.stale.remove(page) {
                            self.requested.remove(page);
                            let host = self.host_of(at, PAGE).ok_or_else(|| st(PHASE)(h.bad("unmapped")))?;
                            self.uffd.zero(host, PAGE).map_err(io("filling a page"))?;
                        }
                    }
                }
            }
            Kind::Decision if payload.as_slice() == b"postcopy-done" => {
                self.done_heard = true;
                if !self.stale.is_empty() {
                    // Every page was to come before this; ask again for the rest.
                    let rest = self.stale.pages();
                    drop(link);
                    crate::log::warn(&format!(
                        "post-copy: the source says done, {} page(s) missing: asking",
                        rest.len()
                    ));
                    self.request(&rest)?;
                    return Ok(false);
                }
            }
            Kind::Failed => {
                return Err(MigrateError::Protocol(format!(
                    "the source failed: {}",
                    String::from_utf8_lossy(payload)
                )))
            }
            other => return Err(MigrateError::Protocol(format!("{PHASE}: unexpected {}", other.name()))),
        }
        // The pages asked for after the source's "done" have all come: the
        // source sends no second "done", so this is the end.
        if self.done_heard && self.stale.is_empty() {
            link.decide(b"postcopy-complete", PHASE)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Listen again and wait for the source to reconnect, zero-filling
    /// never-sent pages meanwhile; then send what is still missing, ask
    /// again for what the guest waits on, and put the new connection in
    /// place.
    fn wait_for_source(&mut self) -> Result<(), MigrateError> {
        let listener = Listener::bind(&self.listen)?;
        let fd = listener.nonblocking_fd().map_err(io("listening again"))?;
        loop {
            let ready = poll_readable(&[std::os::fd::AsRawFd::as_raw_fd(&self.uffd), fd], -1)
                .map_err(io("listening again"))?;
            if ready[0] {
                self.on_faults(false)?;
            }
            if !ready[1] {
                continue;
            }
            let conn = match listener.accept() {
                Ok(conn) => conn,
                Err(Some(e)) if e.kind() != std::io::ErrorKind::WouldBlock => {
                    return Err(MigrateError::Connect { uri: self.listen.uri.clone(), source: e })
                }
                Err(_) => continue,
            };
            match self.resume_on(conn) {
                Ok(link) => {
                    self.shared.replace(link);
                    // Ask again for what the guest waits on: its requests
                    // may have been lost with the old connection.
                    let waiting = self.requested.pages();
                    if !waiting.is_empty() {
                        self.request(&waiting)?;
                    }
                    return Ok(());
                }
                Err(e) => {
                    crate::log::warn(&format!("post-copy: a connection did not resume: {e}; still waiting"))
                }
            }
        }
    }

    /// The resume handshake on a new connection: the source asks to
    /// resume; this side answers with the runs it still lacks.
    fn resume_on(&self, conn: crate::migration::conn::Conn) -> Result<Link, MigrateError> {
        let phase = "resuming post-copy";
        conn.set_read_timeout(Some(ANSWER_TIMEOUT)).map_err(io(phase))?;
        let mut link = Link::new(conn).map_err(io(phase))?;
        let (h, payload) = link.receive().map_err(st(phase))?;
        if h.kind != Kind::Decision || payload != b"resume-postcopy" {
            let reason = "this destination is in post-copy and waits for its source to resume it \
                          (ferry ctl migrate --resume)";
            link.fail(reason);
            return Err(MigrateError::Protocol(format!("got {} instead: {reason}", h.kind.name())));
        }
        let runs = pages::runs(&self.core.ram, &self.stale.pages());
        pages::send_runs(Kind::Stale, &runs, &mut link).map_err(st(phase))?;
        link.decide(b"resume-ready", phase)?;
        link.reader.get_ref().set_read_timeout(None).map_err(io(phase))?;
        Ok(link)
    }
}
