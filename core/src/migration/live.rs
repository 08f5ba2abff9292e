//! Live migration over TCP or a unix socket, with the device plan agreed
//! before the guest is paused, and pre-copy of dirty memory.
//!
//! ```text
//!  source                                   destination (ferry run --incoming)
//!  HELLO (manifest)            ---------->  plan each device against its plugins
//!                              <----------  PLAN
//!  refused? DECISION "abort"   ---------->  exits non-zero with the reasons
//!  dry run? DECISION "dry-run" ---------->  exits 0
//!  DECISION "go"               ---------->  builds the VM from the manifest
//!  dirty logging on
//!  round 0: PAGES (non-zero pages)   ---->  writes them into RAM
//!  round n: PAGES / ZERO-PAGES (dirty) --->
//!    ... until the rest fits in max-downtime (or the round limit)
//!  pause (vCPUs, devices)
//!  last PAGES / ZERO-PAGES     ---------->
//!  MACHINE, VCPU x N, DEVICE x M (at the plan's versions) ---> loads them (upgrades)
//!  END                         ---------->  resumes devices
//!                              <----------  RESUMED, then starts its vCPUs
//!  exits with the report
//! ```
//!
//! Any failure before RESUMED arrives (connection lost, destination gone,
//! a device refusing its downgrade at stop-and-copy, a timeout, a cancel)
//! resumes the source guest; the destination exits non-zero with the
//! reason. The destination sends RESUMED before it starts its vCPUs; if
//! that write fails it never runs the guest. (If the connection breaks
//! after RESUMED left the destination but before the source read it, both
//! would hold the guest: the one window left, as in any two-party commit.)
//!
//! Policy when the guest dirties memory faster than the link: after
//! [`MAX_ROUNDS`] rounds ferry stops and copies anyway if the expected
//! downtime is within twice the limit; otherwise it gives up, says so, and
//! the source guest keeps running.

use std::{
    io::{BufReader, BufWriter, Read, Write},
    time::{Duration, Instant},
};

pub use super::conn::{Cancel, Conn, Endpoint, MigrateError, TcpSecurity};
pub use super::status::Status;
use super::{
    manifest::Manifest,
    plan::Plan,
    stream::{self, Kind, StreamError},
};
use crate::{
    state::{self, MACHINE_STATE_VERSION, VCPU_STATE_VERSION},
    vmcore::VmCore,
};

/// Test knobs, read from the environment of the source ferry (tests use
/// them to make pre-copy long and to show what the device dirty bitmap is
/// for; they are not for production use):
/// `FERRY_MIGRATION_ROUND_DELAY_MS` (pause between rounds),
/// `FERRY_MIGRATION_MIN_ROUNDS` (rounds before a switch-over is allowed),
/// `FERRY_MIGRATION_IGNORE_DEVICE_DIRTY=1` (leave device writes out).
struct Knobs {
    round_delay: Duration,
    min_rounds: u32,
    ignore_device_dirty: bool,
}

impl Knobs {
    fn from_env() -> Self {
        let num = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        Knobs {
            round_delay: Duration::from_millis(num("FERRY_MIGRATION_ROUND_DELAY_MS")),
            min_rounds: num("FERRY_MIGRATION_MIN_ROUNDS") as u32,
            ignore_device_dirty: std::env::var("FERRY_MIGRATION_IGNORE_DEVICE_DIRTY").is_ok_and(|v| v == "1"),
        }
    }
}

/// Rounds of pre-copy before the convergence policy applies.
pub const MAX_ROUNDS: u32 = 30;
/// Default downtime limit.
pub const DEFAULT_MAX_DOWNTIME_MS: u64 = 300;
/// Pages per PAGES message.
const PAGES_PER_MESSAGE: usize = 1024;
/// How long the source waits for the destination's answers.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// What `ferry ctl migrate` asked for.
#[derive(Debug, Clone)]
pub struct Options {
    /// `tcp:HOST:PORT` or `unix:PATH`.
    pub uri: String,
    /// Downtime limit.
    pub max_downtime_ms: u64,
    /// Stop after the plan.
    pub dry_run: bool,
    /// TLS or plaintext, for a tcp: URI (None for unix:).
    pub security: Option<TcpSecurity>,
}

struct Link {
    reader: BufReader<Conn>,
    writer: BufWriter<Conn>,
    received: usize,
    sent: u64,
}

impl Link {
    fn new(conn: Conn) -> Result<Self, std::io::Error> {
        let reader = BufReader::new(conn.try_clone()?);
        Ok(Link { reader, writer: BufWriter::with_capacity(1 << 20, conn), received: 0, sent: 0 })
    }

    fn send(&mut self, kind: Kind, id: &str, version: u32, payload: &[u8]) -> std::io::Result<()> {
        self.sent += payload.len() as u64 + 24 + id.len() as u64;
        stream::send(&mut self.writer, kind, id, version, payload)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.writer.flush()
    }

    fn receive(&mut self) -> Result<(stream::SectionHeader, Vec<u8>), StreamError> {
        let r = stream::receive(&mut self.reader, self.received);
        self.received += 1;
        r
    }
}

fn io(phase: &'static str) -> impl Fn(std::io::Error) -> MigrateError {
    move |e| MigrateError::Stream { phase, source: StreamError::Io(e) }
}

fn st(phase: &'static str) -> impl Fn(StreamError) -> MigrateError {
    move |source| MigrateError::Stream { phase, source }
}

/// Send RAM pages (dirty-bitmap numbering): runs of non-zero pages as
/// PAGES messages, zero pages as ZERO-PAGES runs. Returns page bytes sent.
fn send_pages(core: &VmCore, link: &mut Link, pages: &[u64]) -> Result<u64, MigrateError> {
    let mut sent = 0u64;
    let mut batch: Vec<u8> = Vec::new();
    let mut batch_pages = 0usize;
    let mut next_gpa = None;
    let mut zeros: Vec<(u64, u64)> = Vec::new();
    let flush = |link: &mut Link, batch: &mut Vec<u8>, batch_pages: &mut usize, sent: &mut u64| {
        if *batch_pages > 0 {
            link.send(Kind::Pages, "", 1, batch)?;
            *sent += *batch_pages as u64 * 4096;
        }
        batch.clear();
        *batch_pages = 0;
        Ok::<(), std::io::Error>(())
    };
    for &page in pages {
        let Some(gpa) = core.ram.gpa_of_page(page) else { continue };
        let Some(data) = core.ram.bytes(gpa, 4096) else { continue };
        if data.iter().all(|b| *b == 0) {
            match zeros.last_mut() {
                Some((start, n)) if *start + *n * 4096 == gpa => *n += 1,
                _ => zeros.push((gpa, 1)),
            }
            continue;
        }
        if next_gpa != Some(gpa) || batch_pages == PAGES_PER_MESSAGE {
            flush(link, &mut batch, &mut batch_pages, &mut sent).map_err(io("sending memory"))?;
            batch.extend_from_slice(&gpa.to_le_bytes());
        }
        batch.extend_from_slice(data);
        batch_pages += 1;
        next_gpa = Some(gpa + 4096);
    }
    flush(link, &mut batch, &mut batch_pages, &mut sent).map_err(io("sending memory"))?;
    for chunk in zeros.chunks(65536) {
        let payload: Vec<u8> =
            chunk.iter().flat_map(|(g, n)| g.to_le_bytes().into_iter().chain(n.to_le_bytes())).collect();
        link.send(Kind::ZeroPages, "", 1, &payload).map_err(io("sending memory"))?;
    }
    Ok(sent)
}

/// Wait until the destination has applied everything sent so far, so a
/// round's time is end to end and no backlog is left for the downtime.
fn sync(link: &mut Link, phase: &'static str) -> Result<(), MigrateError> {
    link.send(Kind::Decision, "", 1, b"sync").map_err(io(phase))?;
    link.flush().map_err(io(phase))?;
    let (h, payload) = link.receive().map_err(st(phase))?;
    match (h.kind, payload.as_slice()) {
        (Kind::Decision, b"synced") => Ok(()),
        (Kind::Failed, reason) => {
            Err(MigrateError::Protocol(format!("destination failed: {}", String::from_utf8_lossy(reason))))
        }
        (kind, _) => Err(MigrateError::Protocol(format!("{phase}: expected SYNCED, got {}", kind.name()))),
    }
}

fn update(core: &VmCore, f: impl FnOnce(&mut Status)) {
    let mut guard = core.migration.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = guard.as_mut() {
        f(s);
    }
}

/// Migrate `core`'s VM to the destination. On success the caller ends the
/// source VM; on failure the guest is running again (it may have been
/// paused for stop-and-copy).
pub fn migrate(core: &VmCore, opts: &Options, cancel: &Cancel) -> Result<Status, MigrateError> {
    let start = Instant::now();
    let endpoint = Endpoint::parse(&opts.uri)?;
    let plaintext_tcp = opts.security == Some(TcpSecurity::Insecure);
    if plaintext_tcp {
        crate::log::warn(&format!(
            "migrating to {} over plaintext TCP (--insecure-tcp): the VM's memory and state travel \
             unencrypted to a peer nobody authenticated",
            opts.uri
        ));
    }
    let conn = endpoint.connect(&opts.uri, opts.security.as_ref())?;
    update(core, |s| s.transport = TcpSecurity::describe(opts.security.as_ref()).into());
    cancel.watch(&conn);
    conn.set_read_timeout(Some(ANSWER_TIMEOUT)).map_err(io("connecting"))?;
    let mut link = Link::new(conn).map_err(io("connecting"))?;

    // Handshake: nothing is paused.
    let manifest = core.manifest();
    let encoded = state::encode(&manifest).map_err(|e| MigrateError::State(e.to_string()))?;
    link.send(Kind::Hello, "", super::manifest::MANIFEST_VERSION, &encoded).map_err(io("handshake"))?;
    link.flush().map_err(io("handshake"))?;
    let (h, payload) = link.receive().map_err(|e| match e {
        // A TLS destination drops a plaintext hello without a word.
        StreamError::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof && plaintext_tcp => {
            MigrateError::Security(
                "the destination closed the connection at the handshake: it may want mutual TLS \
                 (--tls-dir on both ends)"
                    .into(),
            )
        }
        e => cancel.explain(st("handshake")(e)),
    })?;
    if h.kind == Kind::Failed {
        return Err(MigrateError::Protocol(format!("destination: {}", String::from_utf8_lossy(&payload))));
    }
    if h.kind != Kind::Plan {
        return Err(MigrateError::Protocol(format!("handshake: expected a plan, got {}", h.kind.name())));
    }
    let mut plan: Plan = state::decode(&payload).map_err(|e| MigrateError::Protocol(format!("plan: {e}")))?;
    trial_downgrades(core, &mut plan);
    update(core, |s| s.plan = plan.lines());
    if plan.refused() {
        let _ = link.send(Kind::Decision, "", 1, b"abort: refused");
        let _ = link.flush();
        return Err(MigrateError::Refused(plan.lines()));
    }
    if opts.dry_run {
        link.send(Kind::Decision, "", 1, b"dry-run").map_err(io("handshake"))?;
        link.flush().map_err(io("handshake"))?;
        let mut s = Status { phase: "dry-run".into(), plan: plan.lines(), done: true, ..Status::default() };
        s.total_ms = start.elapsed().as_secs_f64() * 1e3;
        return Ok(s);
    }
    // Same host over a unix socket: hand the RAM memfd over, copy nothing.
    if let (Endpoint::Unix(_), Some(memfd)) = (&endpoint, core.ram.memfd()) {
        link.send(Kind::Decision, "", 1, b"go-memfd").map_err(io("handshake"))?;
        link.flush().map_err(io("handshake"))?;
        let (h, payload) = link.receive().map_err(st("memfd hand-over"))?;
        if h.kind != Kind::Decision || payload != b"ready-memfd" {
            return Err(MigrateError::Protocol(format!(
                "memfd hand-over: the destination answered {}",
                h.kind.name()
            )));
        }
        send_memfd(&link, memfd)?;
        // The destination answers once its VM is built on the memfd: only
        // then does the guest pause here.
        sync(&mut link, "memfd hand-over").map_err(|e| cancel.explain(e))?;
        cancel.disarm()?;
        let result = switch_over(core, &plan, &mut link, start, Vec::new(), 0, None);
        if result.is_err() && core.control.is_paused() {
            let _ = core.resume();
        }
        return result;
    }
    link.send(Kind::Decision, "", 1, b"go").map_err(io("handshake"))?;

    // Pre-copy.
    update(core, |s| s.phase = "precopy".into());
    core.kvm.set_dirty_log(&core.ram, true).map_err(|e| MigrateError::State(e.to_string()))?;
    let result =
        precopy_and_switch(core, opts, &plan, &mut link, start, cancel).map_err(|e| cancel.explain(e));
    if result.is_err() {
        // Give the guest back: running, not logging.
        if core.control.is_paused() {
            let _ = core.resume();
        }
        let _ = core.kvm.set_dirty_log(&core.ram, false);
        let _ = link.send(Kind::Failed, "", 1, b"source aborted the migration");
        let _ = link.flush();
    }
    result
}

/// Try every planned downgrade now, while the guest runs: a device whose
/// guest state the older version cannot express turns its line into a
/// refusal, so the migration stops before anything is paused. (The real
/// downgrade at stop-and-copy checks again.)
fn trial_downgrades(core: &VmCore, plan: &mut Plan) {
    for line in &mut plan.devices {
        let super::plan::Verdict::Downgrade { from, to } = line.verdict else { continue };
        let Some(slot) = core.bus.devices().iter().find(|d| d.id == line.id) else { continue };
        let result = slot.device.lock().unwrap_or_else(|e| e.into_inner()).save_state(to).into_result();
        if let Err(reason) = result {
            line.verdict = super::plan::Verdict::Refused {
                reason: format!("the source cannot downgrade state v{from}->v{to} now: {reason}"),
            };
        }
    }
}

/// Send the MEMFD message with the guest RAM memfd attached (SCM_RIGHTS).
fn send_memfd(link: &Link, memfd: &std::fs::File) -> Result<(), MigrateError> {
    use std::os::fd::AsRawFd;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let Conn::Unix(sock) = link.writer.get_ref() else {
        return Err(MigrateError::Protocol("a memfd can only go over a unix socket".into()));
    };
    let header = stream::header_bytes(Kind::Memfd, "", 1, 0, crc32fast::hash(&[]));
    sock.send_with_fd(&header[..], memfd.as_raw_fd())
        .map_err(|e| io("memfd hand-over")(std::io::Error::from_raw_os_error(e.errno())))?;
    Ok(())
}

fn precopy_and_switch(
    core: &VmCore,
    opts: &Options,
    plan: &Plan,
    link: &mut Link,
    start: Instant,
    cancel: &Cancel,
) -> Result<Status, MigrateError> {
    // Round 0: every non-zero page (the destination's RAM starts zeroed).
    let _ = core.kvm.dirty_pages(&core.ram); // start a fresh log
    let _ = core.ram.dirty().take();
    let round0: Vec<u64> = core
        .ram
        .nonzero_runs()
        .iter()
        .flat_map(|&(gpa, len)| {
            let first = core.ram.page_of(gpa).unwrap_or(0);
            first..first + len / 4096
        })
        .collect();
    let t = Instant::now();
    let bytes = send_pages(core, link, &round0)?;
    sync(link, "first pass")?;
    let mut bandwidth = (bytes.max(4096) as f64) / t.elapsed().as_secs_f64().max(1e-6);
    update(core, |s| {
        s.bytes_sent = link.sent;
        s.bandwidth_bytes_per_s = bandwidth;
    });
    cancel.check()?;

    let max_downtime = opts.max_downtime_ms as f64 / 1e3;
    let knobs = Knobs::from_env();
    let max_rounds = MAX_ROUNDS.max(knobs.min_rounds + 1);
    let mut round = 1u32;
    let mut last_round = Instant::now();
    loop {
        std::thread::sleep(knobs.round_delay);
        let mut dirty = Vec::new();
        take_dirty(core, &knobs, &mut dirty)?;
        let dirty_bytes = dirty.len() as u64 * 4096;
        let dirty_rate = dirty_bytes as f64 / last_round.elapsed().as_secs_f64().max(1e-6);
        let expected = dirty_bytes as f64 / bandwidth;
        update(core, |s| {
            s.round = round;
            s.dirty_rate_bytes_per_s = dirty_rate;
            s.expected_downtime_ms = expected * 1e3;
        });
        if expected <= max_downtime && round > knobs.min_rounds {
            // Switch over: what is dirty now goes in the final pass.
            cancel.disarm()?;
            return switch_over(core, plan, link, start, dirty, round, Some(&knobs));
        }
        if round >= max_rounds {
            if expected <= 2.0 * max_downtime {
                cancel.disarm()?;
                return switch_over(core, plan, link, start, dirty, round, Some(&knobs));
            }
            return Err(MigrateError::NoConvergence {
                rounds: round,
                dirty: dirty_rate / 1e6,
                link: bandwidth / 1e6,
            });
        }
        last_round = Instant::now();
        let t = Instant::now();
        let bytes = send_pages(core, link, &dirty)?;
        sync(link, "pre-copy")?;
        if bytes > 0 {
            bandwidth = 0.5 * bandwidth + 0.5 * (bytes as f64 / t.elapsed().as_secs_f64().max(1e-6));
        }
        update(core, |s| {
            s.bytes_sent = link.sent;
            s.bandwidth_bytes_per_s = bandwidth;
        });
        cancel.check()?;
        round += 1;
    }
}

/// Adds the pages dirtied since the last call, by the guest (KVM's log)
/// and by devices (the device dirty bitmap), to `dirty`: sorted, each once.
fn take_dirty(core: &VmCore, knobs: &Knobs, dirty: &mut Vec<u64>) -> Result<(), MigrateError> {
    dirty.extend(core.kvm.dirty_pages(&core.ram).map_err(|e| MigrateError::State(e.to_string()))?);
    let device_dirty = core.ram.dirty().take();
    if !knobs.ignore_device_dirty {
        dirty.extend(device_dirty);
    }
    dirty.sort_unstable();
    dirty.dedup();
    Ok(())
}

/// Pauses the source and sends the rest: with `memory` (pre-copy's
/// knobs), the pages still dirty; without (the memfd hand-over), none.
fn switch_over(
    core: &VmCore,
    plan: &Plan,
    link: &mut Link,
    start: Instant,
    mut dirty: Vec<u64>,
    rounds: u32,
    memory: Option<&Knobs>,
) -> Result<Status, MigrateError> {
    update(core, |s| s.phase = "stop-and-copy".into());
    let paused_at = Instant::now();
    core.pause().map_err(MigrateError::State)?;
    let t_paused = paused_at.elapsed();
    if let Some(knobs) = memory {
        take_dirty(core, knobs, &mut dirty)?;
        send_pages(core, link, &dirty)?;
    }

    let machine = state::save_machine(&core.kvm.vm).map_err(|e| MigrateError::State(e.to_string()))?;
    let enc = |v: Result<Vec<u8>, state::StateError>| v.map_err(|e| MigrateError::State(e.to_string()));
    link.send(Kind::Machine, "", MACHINE_STATE_VERSION, &enc(state::encode(&machine))?)
        .map_err(io("stop-and-copy"))?;
    for (i, s) in core.control.take_vcpu_states().iter().enumerate() {
        let s = s.as_ref().map_err(|e| MigrateError::State(format!("vCPU {i}: {e}")))?;
        link.send(Kind::Vcpu, &format!("cpu{i}"), VCPU_STATE_VERSION, &enc(state::encode(s))?)
            .map_err(io("stop-and-copy"))?;
    }
    for d in core.bus.devices() {
        let version = plan
            .write_version(&d.id)
            .ok_or_else(|| MigrateError::State(format!("device {}: not in the plan", d.id)))?;
        let blob =
            d.device.lock().unwrap_or_else(|e| e.into_inner()).save_state(version).into_result().map_err(
                |e| MigrateError::State(format!("device {} ({}): state v{version}: {e}", d.id, d.plugin)),
            )?;
        link.send(Kind::Device, &d.id, blob.version, blob.bytes.as_slice()).map_err(io("stop-and-copy"))?;
    }
    link.send(Kind::End, "", 1, &[]).map_err(io("stop-and-copy"))?;
    link.flush().map_err(io("stop-and-copy"))?;
    let t_sent = paused_at.elapsed();

    let (h, payload) = link.receive().map_err(st("waiting for the destination to resume"))?;
    match h.kind {
        Kind::Resumed => {}
        Kind::Failed => {
            return Err(MigrateError::Protocol(format!(
                "destination failed: {}",
                String::from_utf8_lossy(&payload)
            )))
        }
        other => return Err(MigrateError::Protocol(format!("expected RESUMED, got {}", other.name()))),
    }
    let downtime = paused_at.elapsed().as_secs_f64() * 1e3;
    crate::log::info(&format!(
        "stop-and-copy: paused in {:.2} ms, state sent at {:.2} ms, resumed on the destination at {downtime:.2} ms",
        t_paused.as_secs_f64() * 1e3,
        t_sent.as_secs_f64() * 1e3
    ));
    let mut status = core.migration.lock().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_default();
    status.phase = "completed".into();
    status.round = rounds;
    status.bytes_sent = link.sent;
    status.downtime_ms = downtime;
    status.total_ms = start.elapsed().as_secs_f64() * 1e3;
    status.done = true;
    Ok(status)
}

/// What the destination received before it starts the guest.
pub struct Incoming {
    /// The source's manifest.
    pub manifest: Manifest,
    /// The guest RAM memfd, when the source handed it over (same host).
    pub memfd: Option<std::fs::File>,
    /// The plan it agreed to.
    pub plan: Plan,
    /// The connection, to send RESUMED on.
    pub link: IncomingLink,
}

/// The destination's side of the connection.
pub struct IncomingLink(Link);

impl IncomingLink {
    /// Tell the source the guest is about to run here.
    pub fn resumed(&mut self) -> std::io::Result<()> {
        self.0.send(Kind::Resumed, "", 1, &[])?;
        self.0.flush()
    }

    /// Answer a SYNC: everything before it has been applied.
    pub fn synced(&mut self) -> std::io::Result<()> {
        self.0.send(Kind::Decision, "", 1, b"synced")?;
        self.0.flush()
    }

    /// Tell the source this side failed.
    pub fn failed(&mut self, reason: &str) {
        let _ = self.0.send(Kind::Failed, "", 1, reason.as_bytes());
        let _ = self.0.flush();
    }

    /// The next message.
    pub fn receive(&mut self) -> Result<(stream::SectionHeader, Vec<u8>), StreamError> {
        self.0.receive()
    }
}

/// Where an incoming migration is awaited.
enum Listener {
    Tcp(std::net::TcpListener, Option<super::tls::Server>),
    Unix(std::os::unix::net::UnixListener, std::path::PathBuf),
}

impl Listener {
    /// The next connection, through the TLS handshake where there is one.
    /// Err(None) for a peer turned away (logged), to wait for the next.
    fn accept(&self) -> Result<Conn, Option<std::io::Error>> {
        match self {
            Listener::Tcp(l, tls) => {
                let (s, peer) = l.accept().map_err(Some)?;
                let _ = s.set_nodelay(true);
                let Some(tls) = tls else {
                    crate::log::warn(&format!(
                        "accepted a migration connection from {peer} over plaintext TCP (--insecure-tcp): \
                         nobody authenticated it"
                    ));
                    return Ok(Conn::Tcp(s));
                };
                // A probe that connects and closes (a port check) is no
                // peer to refuse: wait for the next without a warning.
                let _ = s.set_read_timeout(Some(ANSWER_TIMEOUT));
                if !matches!(s.peek(&mut [0u8]), Ok(1)) {
                    crate::log::debug("a connection ended before sending anything; still waiting");
                    return Err(None);
                }
                match tls.accept(s) {
                    Ok(stream) => {
                        crate::log::info(&format!(
                            "migration peer {peer} authenticated by mutual TLS 1.3{}",
                            tls.allowed_line(&stream)
                        ));
                        Ok(Conn::Tls(stream))
                    }
                    Err(e) => {
                        crate::log::warn(&format!("refused a migration peer: {e}; still waiting"));
                        Err(None)
                    }
                }
            }
            Listener::Unix(l, _) => Ok(Conn::Unix(l.accept().map_err(Some)?.0)),
        }
    }
}

/// Accept one migration on `uri` and run the handshake: returns the
/// manifest and the plan once the source said "go" (None for a dry run).
/// A TCP peer that fails the TLS handshake is turned away and the next one
/// awaited.
pub fn accept(
    uri: &str,
    security: Option<&TcpSecurity>,
    plan_for: impl FnOnce(&Manifest) -> Plan,
) -> Result<Option<Incoming>, MigrateError> {
    let connect_err = |source| MigrateError::Connect { uri: uri.into(), source };
    let listener = match (Endpoint::parse(uri)?, security) {
        (Endpoint::Tcp(addr), Some(security)) => {
            let tls = match security {
                TcpSecurity::Tls(settings) => Some(super::tls::Server::load(settings)?),
                TcpSecurity::Insecure => None,
            };
            Listener::Tcp(std::net::TcpListener::bind(&addr).map_err(connect_err)?, tls)
        }
        (Endpoint::Tcp(_), None) => return Err(MigrateError::Security(super::conn::NEEDS_SECURITY.into())),
        (Endpoint::Unix(path), _) => {
            crate::unix_socket::claim(&path, "--incoming").map_err(MigrateError::Protocol)?;
            Listener::Unix(std::os::unix::net::UnixListener::bind(&path).map_err(connect_err)?, path)
        }
    };
    crate::log::info(&format!("waiting for a migration on {uri} ({})", TcpSecurity::describe(security)));
    let mut link = loop {
        let conn = match listener.accept() {
            Ok(conn) => conn,
            Err(None) => continue,
            Err(Some(e)) => return Err(connect_err(e)),
        };
        conn.set_read_timeout(Some(ANSWER_TIMEOUT)).map_err(io("handshake"))?;
        let mut link = Link::new(conn).map_err(io("handshake"))?;
        match std::io::BufRead::fill_buf(&mut link.reader) {
            Ok(bytes) if !bytes.is_empty() => break link,
            // Closed (or silent) without a byte: something checking whether
            // the socket is live, or a port scan. Keep waiting.
            _ => crate::log::debug("a connection ended before sending anything; still waiting"),
        }
    };
    if let Listener::Unix(_, path) = &listener {
        let _ = std::fs::remove_file(path);
    }
    let (h, payload) = link.receive().map_err(st("handshake"))?;
    if h.kind != Kind::Hello {
        return Err(MigrateError::Protocol(format!("expected HELLO, got {}", h.kind.name())));
    }
    if h.version > super::manifest::MANIFEST_VERSION {
        let reason = format!("manifest v{} is newer than this ferry reads", h.version);
        let _ = link.send(Kind::Failed, "", 1, reason.as_bytes());
        let _ = link.flush();
        return Err(MigrateError::Protocol(reason));
    }
    let manifest: Manifest =
        state::decode(&payload).map_err(|e| MigrateError::Protocol(format!("manifest: {e}")))?;
    let plan = plan_for(&manifest);
    let encoded = state::encode(&plan).map_err(|e| MigrateError::State(e.to_string()))?;
    link.send(Kind::Plan, "", 1, &encoded).map_err(io("handshake"))?;
    link.flush().map_err(io("handshake"))?;
    if plan.refused() {
        return Err(MigrateError::Refused(plan.lines()));
    }
    let (h, payload) = link.receive().map_err(st("handshake"))?;
    let mut memfd = None;
    match (h.kind, payload.as_slice()) {
        (Kind::Decision, b"go") => {}
        (Kind::Decision, b"go-memfd") => {
            // The source waits for this before it sends the memfd, so
            // nothing is buffered on our side: receive it on the socket.
            link.send(Kind::Decision, "", 1, b"ready-memfd").map_err(io("memfd hand-over"))?;
            link.flush().map_err(io("memfd hand-over"))?;
            memfd = Some(receive_memfd(&link)?);
        }
        (Kind::Decision, b"dry-run") => return Ok(None),
        (Kind::Decision, other) => {
            return Err(MigrateError::Protocol(format!("source: {}", String::from_utf8_lossy(other))))
        }
        (kind, _) => {
            return Err(MigrateError::Protocol(format!(
                "expected the source's decision, got {}",
                kind.name()
            )))
        }
    }
    // The source may take long over pre-copy rounds: no read timeout from here
    // (a dead source closes the connection).
    link.reader.get_ref().set_read_timeout(None).map_err(io("pre-copy"))?;
    Ok(Some(Incoming { manifest, plan, memfd, link: IncomingLink(link) }))
}

/// Receive the MEMFD message and its descriptor (SCM_RIGHTS).
fn receive_memfd(link: &Link) -> Result<std::fs::File, MigrateError> {
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let Conn::Unix(sock) = link.reader.get_ref() else {
        return Err(MigrateError::Protocol("a memfd can only come over a unix socket".into()));
    };
    let mut header = vec![0u8; stream::SECTION_HEADER_LEN as usize];
    let (n, file) = sock
        .recv_with_fd(&mut header)
        .map_err(|e| io("memfd hand-over")(std::io::Error::from_raw_os_error(e.errno())))?;
    let mut have = n;
    while have < header.len() {
        let k = (&*sock).read(&mut header[have..]).map_err(io("memfd hand-over"))?;
        if k == 0 {
            return Err(MigrateError::Protocol("the source closed during the memfd hand-over".into()));
        }
        have += k;
    }
    let (h, _) = stream::receive(&mut std::io::Cursor::new(header), 0).map_err(st("memfd hand-over"))?;
    if h.kind != Kind::Memfd {
        return Err(MigrateError::Protocol(format!("expected MEMFD, got {}", h.kind.name())));
    }
    file.ok_or_else(|| MigrateError::Protocol("the MEMFD message carried no descriptor".into()))
}
