//! Live migration, the source's side: the plan agreed before the guest is
//! paused, pre-copy of dirty memory, and the switch-over.
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
//! When to switch over, and when to throttle: `converge.rs`.
//!
//! `--max-bandwidth` caps what pre-copy sends per second; the
//! stop-and-copy goes at full speed.

use std::time::{Duration, Instant};

use super::{
    conn::{Cancel, Conn, Endpoint, MigrateError, TcpSecurity},
    converge::{Step, SwitchOver, THROTTLE_FIRST},
    link::{io, st, Link, ANSWER_TIMEOUT},
    pages,
    plan::{Plan, Verdict},
    postcopy::{
        serve::{self, Served},
        PageSet,
    },
    status::{Phase, Status},
    stream::{self, Kind, StreamError},
    vmstate::VmState,
};
use crate::{images::ReadChunksError, state, vmcore::VmCore};

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

/// What `ferry ctl migrate` asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// `tcp:HOST:PORT` or `unix:PATH`.
    pub uri: String,
    /// Downtime limit.
    pub max_downtime_ms: u64,
    /// Stop after the plan.
    pub dry_run: bool,
    /// Bytes per second pre-copy may send (None: no limit).
    pub max_bandwidth: Option<u64>,
    /// TLS or plaintext, for a tcp: URI (None for unix:).
    pub security: Option<TcpSecurity>,
    /// Switch to post-copy when the guest outruns the link (instead of
    /// throttling it).
    pub postcopy: bool,
}

/// Wait until the destination has applied everything sent so far, so a
/// round's time is end to end and no backlog is left for the downtime.
fn sync(link: &mut Link, phase: &'static str) -> Result<(), MigrateError> {
    link.decide(b"sync", phase)?;
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
/// paused for stop-and-copy), unless it had moved by post-copy
/// ([`MigrateError::GuestMoved`]). A post-copy whose link breaks waits on
/// `resume` for where to reconnect.
pub fn migrate(
    core: &VmCore,
    opts: &Options,
    cancel: &Cancel,
    resume: &crossbeam_channel::Receiver<Options>,
) -> Result<Status, MigrateError> {
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
    let encoded = state::encode(&manifest)?;
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
        let _ = link.decide(b"abort: refused", "handshake");
        return Err(MigrateError::Refused(plan.lines()));
    }
    if let (true, Some(why)) = (opts.postcopy, &plan.postcopy) {
        let _ = link.decide(b"abort: no post-copy", "handshake");
        return Err(MigrateError::Refused(vec![format!(
            "post-copy was asked for, but the destination cannot: {why}"
        )]));
    }
    if opts.dry_run {
        link.decide(b"dry-run", "handshake")?;
        let mut s = Status { phase: Phase::DryRun, plan: plan.lines(), done: true, ..Status::default() };
        s.total_ms = start.elapsed().as_secs_f64() * 1e3;
        return Ok(s);
    }
    let image_bytes = send_images(core, &plan, &mut link)?;
    update(core, |s| s.boot_image_bytes = image_bytes);
    // Same host over a unix socket: hand the RAM memfd over, copy nothing.
    if let (Endpoint::Unix(_), Some(memfd)) = (&endpoint, core.ram.memfd()) {
        link.decide(b"go-memfd", "handshake")?;
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
    update(core, |s| s.phase = Phase::Precopy);
    core.kvm.set_dirty_log(&core.ram, true)?;
    let result = precopy_and_switch(core, opts, &plan, &mut link, start, cancel, resume)
        .map_err(|e| cancel.explain(e));
    if result.as_ref().is_err_and(|e| !matches!(e, MigrateError::GuestMoved(_))) {
        // Give the guest back: running, not logging.
        if core.control.is_paused() {
            let _ = core.resume();
        }
        let _ = core.kvm.set_dirty_log(&core.ram, false);
        link.fail("source aborted the migration");
    }
    result
}

/// Send the boot images the destination asked for (those its store lacks)
/// as IMAGE messages, before the decision; the bytes sent. If this host's
/// store lost them since the boot, none is sent and the log says the guest
/// cannot reboot there.
fn send_images(core: &VmCore, plan: &Plan, link: &mut Link) -> Result<u64, MigrateError> {
    if plan.images.is_empty() {
        return Ok(0);
    }
    let Some(image) = core.image.get() else {
        return Err(MigrateError::Protocol(
            "the destination asked for boot images this guest has none of".into(),
        ));
    };
    if let Some(odd) = plan.images.iter().find(|w| !image.record.images().any(|i| i == *w)) {
        return Err(MigrateError::Protocol(format!(
            "the destination asked for boot image {}, which is not this guest's",
            odd.short()
        )));
    }
    if let Some(lost) = image.store.missing(&image.record).first() {
        crate::log::warn(&format!(
            "boot image {} is no longer in the image store {}: the guest cannot reboot on the destination",
            lost.short(),
            image.store.dir().display()
        ));
        return Ok(0);
    }
    let before = link.sent;
    for want in &plan.images {
        image.store.read_chunks(want, |piece| link.send(Kind::Image, &want.sha256, 1, piece)).map_err(
            |e| match e {
                ReadChunksError::Store(e) => MigrateError::Protocol(e.to_string()),
                ReadChunksError::Sink(e) => io("sending the boot image")(e),
            },
        )?;
    }
    let bytes = link.sent - before;
    crate::log::info(&format!("boot image: {bytes} bytes sent (the destination's store lacked it)"));
    Ok(bytes)
}

/// Try every planned downgrade now, while the guest runs: a device whose
/// guest state the older version cannot express turns its line into a
/// refusal, so the migration stops before anything is paused. (The real
/// downgrade at stop-and-copy checks again.)
fn trial_downgrades(core: &VmCore, plan: &mut Plan) {
    for line in &mut plan.devices {
        let Verdict::Downgrade { from, to } = line.verdict else { continue };
        let Some(slot) = core.bus.devices().iter().find(|d| d.id == line.id) else { continue };
        let result = slot.device.lock().unwrap_or_else(|e| e.into_inner()).save_state(to).into_result();
        if let Err(reason) = result {
            line.verdict = Verdict::Refused {
                reason: format!("the source cannot downgrade state v{from}->v{to} now: {reason}"),
            };
        }
    }
}

/// Send the MEMFD message with the guest RAM memfd attached (SCM_RIGHTS).
fn send_memfd(link: &Link, memfd: &std::fs::File) -> Result<(), MigrateError> {
    use std::os::fd::AsRawFd;
    let Conn::Unix(sock) = link.writer.get_ref() else {
        return Err(MigrateError::Protocol("a memfd can only go over a unix socket".into()));
    };
    let header = stream::header_bytes(Kind::Memfd, "", 1, 0, crc32fast::hash(&[]));
    crate::fdpass::send_all(sock.as_raw_fd(), &header, &[memfd.as_raw_fd()]).map_err(io("memfd hand-over"))
}

fn precopy_and_switch(
    core: &VmCore,
    opts: &Options,
    plan: &Plan,
    link: &mut Link,
    start: Instant,
    cancel: &Cancel,
    resume: &crossbeam_channel::Receiver<Options>,
) -> Result<Status, MigrateError> {
    link.limit(opts.max_bandwidth);
    let mut throttler = Throttler::new(core);
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
    let bytes = pages::send(&core.ram, &round0, link).map_err(st("sending memory"))?;
    sync(link, "first pass")?;
    let first_pass = t.elapsed().as_secs_f64();
    let mut bandwidth = (bytes.max(4096) as f64) / first_pass.max(1e-6);
    update(core, |s| {
        s.bytes_sent = link.sent;
        s.bandwidth_bytes_per_s = bandwidth;
        s.first_pass_bytes = bytes;
        s.first_pass_ms = first_pass * 1e3;
    });
    cancel.check()?;

    let knobs = Knobs::from_env();
    let postcopy_asked = opts.postcopy && plan.postcopy.is_none();
    let mut policy = SwitchOver::new(opts.max_downtime_ms as f64 / 1e3, knobs.min_rounds, postcopy_asked);
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
        let mut step = policy.after_round(round, dirty_bytes, expected);
        // Post-copy where pre-copy would throttle (if asked for) or give up
        // (if the destination can take it).
        if let (Step::Throttle(_), true) | (Step::GiveUp, _) = (step, opts.postcopy) {
            if plan.postcopy.is_none() {
                step = Step::Postcopy;
            }
        }
        match step {
            Step::Postcopy => {
                crate::log::warn(&format!(
                    "pre-copy round {round}: {:.1} MiB dirty, {:.0} ms to send: switching to post-copy \
                     (the guest runs on the destination, which pulls the rest)",
                    dirty_bytes as f64 / 1048576.0,
                    expected * 1e3
                ));
                cancel.disarm()?;
                throttler.stop();
                // The pause goes at full speed; pushing the rest keeps the cap.
                link.limit(None);
                // Which pages stay here goes while the guest still runs: the
                // destination takes them out of its RAM as they arrive, and
                // the pause only adds the few dirtied since.
                let t = Instant::now();
                pages::send_runs(Kind::Stale, &pages::runs(&core.ram, &dirty), link)
                    .map_err(st("post-copy"))?;
                sync(link, "post-copy")?;
                crate::log::debug(&format!(
                    "post-copy: {} stale page(s) taken out on the destination in {:.2} ms, before the pause",
                    dirty.len(),
                    t.elapsed().as_secs_f64() * 1e3
                ));
                let moved =
                    postcopy(core, plan, link, start, dirty, round, &knobs, resume, opts.max_bandwidth);
                return moved;
            }
            Step::SwitchOver => {
                // What is dirty now goes in the final pass.
                cancel.disarm()?;
                link.limit(None);
                let result = switch_over(core, plan, link, start, dirty, round, Some(&knobs));
                throttler.stop();
                return result;
            }
            Step::Throttle(percent) => {
                let line = format!(
                    "pre-copy round {round}: {:.1} MiB dirty, {:.0} ms to send: throttling the vCPUs to sleep {percent}% of the time",
                    dirty_bytes as f64 / 1048576.0,
                    expected * 1e3
                );
                // The first says so whatever the log level; the rest are detail.
                if percent == THROTTLE_FIRST {
                    crate::log::warn(&format!(
                        "the guest dirties memory faster than the link carries it; {line}"
                    ));
                } else {
                    crate::log::info(&line);
                }
                throttler.set(percent);
                update(core, |s| s.throttle_pct = percent);
            }
            Step::GiveUp => {
                return Err(MigrateError::NoConvergence {
                    rounds: round,
                    dirty: dirty_rate / 1e6,
                    link: bandwidth / 1e6,
                })
            }
            Step::Another => {}
        }
        last_round = Instant::now();
        let t = Instant::now();
        let bytes = pages::send(&core.ram, &dirty, link).map_err(st("sending memory"))?;
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

/// Throttles the source's vCPUs while pre-copy runs: a thread that
/// begins a throttle period every slice plus the vCPUs' share of sleep.
/// Stopped (and the vCPUs let run freely) when dropped.
struct Throttler<'a> {
    core: &'a VmCore,
    /// The thread, and the sender whose drop ends it at once.
    running: Option<(crossbeam_channel::Sender<()>, std::thread::JoinHandle<()>)>,
}

impl<'a> Throttler<'a> {
    fn new(core: &'a VmCore) -> Self {
        Throttler { core, running: None }
    }

    /// Throttle the vCPUs to sleep `percent` of the time.
    fn set(&mut self, percent: u8) {
        self.core.control.set_throttle(percent);
        if self.running.is_some() {
            return;
        }
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let control = self.core.control.clone();
        let spawned = std::thread::Builder::new().name("throttle".into()).spawn(move || loop {
            let period = crate::vcpu::THROTTLE_SLICE + crate::vcpu::throttle_sleep(control.throttle());
            match stop_rx.recv_timeout(period) {
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => control.throttle_tick(),
                _ => return,
            }
        });
        match spawned {
            Ok(handle) => self.running = Some((stop_tx, handle)),
            // Without the thread no period begins: the throttle stays off.
            Err(e) => crate::log::warn(&format!("cannot throttle the vCPUs: {e}")),
        }
    }

    /// End the throttle: the vCPUs run freely again.
    fn stop(&mut self) {
        self.core.control.set_throttle(0);
        if let Some((stop_tx, handle)) = self.running.take() {
            drop(stop_tx);
            let _ = handle.join();
        }
    }
}

impl Drop for Throttler<'_> {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Adds the pages dirtied since the last call, by the guest (KVM's log)
/// and by devices (the device dirty bitmap), to `dirty`: sorted, each once.
fn take_dirty(core: &VmCore, knobs: &Knobs, dirty: &mut Vec<u64>) -> Result<(), MigrateError> {
    dirty.extend(core.kvm.dirty_pages(&core.ram)?);
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
    update(core, |s| s.phase = Phase::StopAndCopy);
    let paused_at = Instant::now();
    core.pause()?;
    let t_paused = paused_at.elapsed();
    if let Some(knobs) = memory {
        take_dirty(core, knobs, &mut dirty)?;
        pages::send(&core.ram, &dirty, link).map_err(st("sending memory"))?;
    }
    VmState::capture(core, Some(plan))?.write(link)?;
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
    let mut status = completed(core, link, start, rounds, downtime);
    status.mode = match (memory, status.throttle_pct) {
        (None, _) => "memfd",
        (Some(_), 0) => "pre-copy",
        (Some(_), _) => "throttled",
    }
    .into();
    Ok(status)
}

/// The status a finished move reports: the progress so far, completed.
fn completed(core: &VmCore, link: &Link, start: Instant, rounds: u32, downtime_ms: f64) -> Status {
    let mut status = core.migration.lock().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_default();
    status.phase = Phase::Completed;
    status.round = rounds;
    status.bytes_sent = link.sent;
    status.downtime_ms = downtime_ms;
    status.total_ms = start.elapsed().as_secs_f64() * 1e3;
    status.done = true;
    status
}

/// Post-copy: pause, send which pages were dirtied since `stale` (the
/// pages the destination already took out) and the state, then serve the
/// destination until it holds every page (`postcopy/`). A broken link
/// after the destination resumed the guest waits on `resume` for where to
/// reconnect; before, it fails like any switch-over (the guest resumes
/// here).
#[allow(clippy::too_many_arguments)]
fn postcopy(
    core: &VmCore,
    plan: &Plan,
    link: &mut Link,
    start: Instant,
    stale: Vec<u64>,
    rounds: u32,
    knobs: &Knobs,
    resume: &crossbeam_channel::Receiver<Options>,
    cap: Option<u64>,
) -> Result<Status, MigrateError> {
    update(core, |s| s.phase = Phase::StopAndCopy);
    let paused_at = Instant::now();
    core.pause()?;
    let t_paused = paused_at.elapsed();
    let mut late = Vec::new();
    take_dirty(core, knobs, &mut late)?;
    late.retain(|page| stale.binary_search(page).is_err());
    pages::send_runs(Kind::Stale, &pages::runs(&core.ram, &late), link).map_err(st("post-copy"))?;
    link.flush().map_err(io("post-copy"))?;
    let t_stale = paused_at.elapsed();
    VmState::capture(core, Some(plan))?.write(link)?;
    link.send(Kind::End, "", 1, &[]).map_err(io("post-copy"))?;
    link.flush().map_err(io("post-copy"))?;
    link.limit(cap);
    crate::log::debug(&format!(
        "post-copy: paused in {:.2} ms, {} more stale page(s) sent at {:.2} ms, state sent at {:.2} ms",
        t_paused.as_secs_f64() * 1e3,
        late.len(),
        t_stale.as_secs_f64() * 1e3,
        paused_at.elapsed().as_secs_f64() * 1e3
    ));
    // No read timeout from here: serving waits on the destination's needs.
    link.reader.get_ref().set_read_timeout(None).map_err(io("post-copy"))?;
    let mut left = PageSet::new(core.ram.size() / 4096);
    for &page in stale.iter().chain(&late) {
        left.insert(page);
    }
    update(core, |s| {
        s.phase = Phase::Postcopy;
        s.postcopy_pages_left = left.len();
    });
    let mut served = Served::default();
    let progress = |pages_left: u64, served: &Served| {
        update(core, |s| {
            s.postcopy_pages_left = pages_left;
            s.postcopy_pages = served.pages;
            s.postcopy_requests = served.requests;
        })
    };
    while let Err(e) = serve::serve(core, link, &mut left, &mut served, progress) {
        if served.resumed.is_none() {
            return Err(e);
        }
        crate::log::warn(&format!(
            "post-copy paused: {e}; the guest runs on the destination and {} page(s) are still here; \
             `ferry ctl migrate --resume URI` reconnects",
            left.len()
        ));
        update(core, |s| {
            s.phase = Phase::PostcopyPaused;
            s.error = Some(e.to_string());
            s.postcopy_pages_left = left.len();
        });
        *link = loop {
            let Ok(again) = resume.recv() else {
                return Err(MigrateError::GuestMoved(format!("post-copy was never resumed after: {e}")));
            };
            let to = serve::Reconnect {
                uri: &again.uri,
                security: again.security.as_ref(),
                max_bandwidth: again.max_bandwidth,
            };
            match serve::reconnect(core, to, &mut left) {
                Ok(link) => break link,
                Err(e) => {
                    crate::log::warn(&format!("post-copy: cannot resume on {}: {e}", again.uri));
                    update(core, |s| s.error = Some(format!("resume on {}: {e}", again.uri)));
                }
            }
        };
        crate::log::info(&format!("post-copy resumed: {} page(s) still to send", left.len()));
        update(core, |s| {
            s.phase = Phase::Postcopy;
            s.error = None;
        });
    }
    let resumed = served.resumed.unwrap_or(paused_at);
    let downtime = (resumed - paused_at).as_secs_f64() * 1e3;
    let mut status = completed(core, link, start, rounds, downtime);
    status.mode = "post-copy".into();
    status.postcopy_pages_left = 0;
    status.postcopy_pages = served.pages;
    status.postcopy_requests = served.requests;
    status.postcopy_ms = resumed.elapsed().as_secs_f64() * 1e3;
    crate::log::info(&format!(
        "post-copy: downtime {downtime:.2} ms, then {} page(s) in {:.1} ms ({} requested by the guest's touches)",
        served.pages, status.postcopy_ms, served.requests
    ));
    if served.guest_ended {
        crate::log::warn(&format!(
            "post-copy: the guest ended on the destination with {} page(s) still here, which no guest needs now",
            left.len()
        ));
    }
    Ok(status)
}
