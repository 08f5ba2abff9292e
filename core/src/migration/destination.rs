//! Live migration, the destination's side: wait for a source (through the
//! TLS handshake for `tcp:` with `--tls-dir`), answer its manifest with the
//! plan, then receive memory and the VM's state until END. The protocol is
//! drawn in `source.rs`.

use std::{
    fs::File,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard,
    },
};

use super::{
    conn::{Conn, Endpoint, MigrateError, TcpSecurity},
    link::{io, st, Link, ANSWER_TIMEOUT},
    manifest::{Manifest, MANIFEST_VERSION},
    pages,
    plan::Plan,
    postcopy,
    stream::{self, Kind, SectionHeader},
    vmstate::{StateReader, VmState},
};
use crate::{
    images::{Arrivals, ImageError, ImageStore},
    memory::GuestRam,
    state,
    unix_socket::Peers,
    vmcore::VmCore,
};

/// What the destination received before it builds the VM.
pub struct Incoming {
    /// The source's manifest.
    pub manifest: Manifest,
    /// The guest RAM memfd, when the source handed it over (same host).
    pub memfd: Option<File>,
    /// The plan it agreed to.
    pub plan: Plan,
    /// The connection, for memory, state and RESUMED.
    pub link: IncomingLink,
}

/// How long a destination whose guest ended in post-copy waits for its
/// source to hang up.
const ENDING_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The destination's side of the connection.
pub struct IncomingLink {
    shared: Arc<Shared>,
    /// Post-copy: the runs (gpa, pages) the source still holds.
    stale: Vec<(u64, u64)>,
    /// Where this destination listened, to listen again in post-copy.
    listen: ListenOn,
    /// The buffer pages came through (megabytes), kept from the end of
    /// [`Self::receive_vm`] until the vCPUs run ([`Self::release_buffer`]):
    /// freeing 4 MiB gives it back to the kernel, 0.36 ms of unmapping
    /// measured here, which is not worth adding to the pause.
    spent: Vec<u8>,
}

/// The connection as the main thread and a post-copy puller share it.
pub(crate) struct Shared {
    link: Mutex<Link>,
    /// RESUMED went out: the guest is this side's from now on.
    pub(crate) confirmed: AtomicBool,
    /// The connection broke (the puller saw it): RESUMED must not go out.
    pub(crate) broken: AtomicBool,
    /// A post-copy puller runs: pages are still on the source.
    pub(crate) pulling: AtomicBool,
    /// The guest ended here: the puller stops when the source hangs up.
    pub(crate) ending: AtomicBool,
}

impl Shared {
    pub(crate) fn link(&self) -> MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Put a new connection in place of a broken one.
    pub(crate) fn replace(&self, link: Link) {
        *self.link() = link;
        self.broken.store(false, Ordering::SeqCst);
    }
}

/// What an incoming migration listened on, with its checks.
#[derive(Clone)]
pub(crate) struct ListenOn {
    pub(crate) uri: String,
    pub(crate) security: Option<TcpSecurity>,
    pub(crate) peers: Peers,
}

impl IncomingLink {
    /// Tell the source the guest is about to run here. Refused once the
    /// connection is known to be broken: the source keeps the guest then.
    ///
    /// Then this thread yields once. On one host (the memfd hand-over,
    /// tests, benchmarks) the source's thread that woke it with END may
    /// sit preempted on this CPU with only RESUMED left to read; without
    /// the yield it waited out the guest's start here (0.5-0.7 ms
    /// measured, mostly the seccomp filter's installation): post-copy
    /// downtime 1.1-1.4 ms, with it 0.76-0.83. Between two hosts a yield
    /// with nothing else to run returns at once.
    pub fn resumed(&mut self) -> std::io::Result<()> {
        {
            let mut link = self.shared.link();
            if self.shared.broken.load(Ordering::SeqCst) {
                return Err(std::io::Error::other("the connection to the source broke"));
            }
            link.send(Kind::Resumed, "", 1, &[])?;
            link.flush()?;
            self.shared.confirmed.store(true, Ordering::SeqCst);
        }
        std::thread::yield_now();
        Ok(())
    }

    /// Free the buffer the pages came through: for when the guest runs.
    pub fn release_buffer(&mut self) {
        self.spent = Vec::new();
    }

    /// The guest ended here (it exited or stopped) while a post-copy was
    /// still pulling: tell the source, whose remaining pages no guest needs
    /// any more, so it ends instead of waiting to resume. Best effort: a
    /// broken connection leaves the source paused, as any break does.
    pub fn guest_ended(&self) {
        if !self.shared.pulling.load(Ordering::SeqCst) || self.shared.broken.load(Ordering::SeqCst) {
            return;
        }
        self.shared.ending.store(true, Ordering::SeqCst);
        let said = self.shared.link().decide(postcopy::GUEST_ENDED, "ending post-copy");
        if let Err(e) = said {
            crate::log::warn(&format!("post-copy: could not tell the source the guest ended: {e}"));
            return;
        }
        // Until the source hangs up (the puller reads on meanwhile): an
        // exit now could reset the connection before the source has read
        // the word.
        let waited = std::time::Instant::now();
        while self.shared.pulling.load(Ordering::SeqCst) && waited.elapsed() < ENDING_WAIT {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Tell the source this side failed.
    pub fn failed(&mut self, reason: &str) {
        self.shared.link().fail(reason);
    }

    /// Memory into `ram` and the VM's state into `reader`, until END,
    /// answering each SYNC once everything before it is applied. Returns
    /// the state, every section checked, nothing loaded yet. The runs a
    /// post-copy source still holds (STALE) are taken out of `ram` as they
    /// arrive (most come before the source pauses) and kept for
    /// [`Self::postcopy`].
    pub fn receive_vm(&mut self, ram: &GuestRam, mut reader: StateReader) -> Result<VmState, MigrateError> {
        let phase = "receiving the VM";
        let mut link = self.shared.link();
        // One buffer for every message: pages go through it by the gigabyte.
        let mut payload = Vec::new();
        loop {
            let h = link.receive_into(&mut payload).map_err(st(phase))?;
            match h.kind {
                k if pages::is_pages(k) => pages::receive(ram, &h, &payload).map_err(st(phase))?,
                // A copy as long as the section: the buffer, as long as
                // the largest PAGES message, is kept for the next one.
                k if StateReader::wants(k) => reader.take(&h, payload.clone())?,
                Kind::Stale => {
                    let runs = pages::decode_runs(ram, &h, &payload).map_err(st(phase))?;
                    postcopy::pull::take_out(ram, &runs)?;
                    self.stale.extend(runs);
                }
                Kind::End => {
                    let t = std::time::Instant::now();
                    let state = reader.finish()?;
                    if crate::log::debugging() {
                        crate::log::debug(&format!(
                            "END received; state sections decoded and checked in {:.2} ms",
                            t.elapsed().as_secs_f64() * 1e3
                        ));
                    }
                    self.spent = payload;
                    return Ok(state);
                }
                Kind::Decision if payload == b"sync" => link.decide(b"synced", "answering a sync")?,
                Kind::Failed => {
                    return Err(MigrateError::Protocol(format!(
                        "the source gave up: {}",
                        String::from_utf8_lossy(&payload)
                    )))
                }
                other => {
                    return Err(MigrateError::Protocol(format!(
                        "message {}: unexpected {}",
                        h.index,
                        other.name()
                    )))
                }
            }
        }
    }

    /// If the source switched to post-copy (it sent STALE runs, already
    /// taken out of guest RAM): register the RAM with userfaultfd and start
    /// the puller, before anything (a device's state load) may touch
    /// guest memory. Nothing to do after a pre-copy.
    pub fn postcopy(&mut self, core: &Arc<VmCore>) -> Result<(), MigrateError> {
        if self.stale.is_empty() {
            return Ok(());
        }
        let t = std::time::Instant::now();
        let armed = postcopy::pull::arm(&core.ram, &self.stale)?;
        crate::log::info(&format!(
            "post-copy: {} pages stay on the source until the guest touches them or they are pushed \
             (userfaultfd armed in {:.2} ms)",
            armed.stale_pages(),
            t.elapsed().as_secs_f64() * 1e3
        ));
        postcopy::pull::start(core.clone(), armed, self.shared.clone(), self.listen.clone())
            .map_err(io("starting the post-copy puller"))
    }
}

/// Where an incoming migration is awaited.
pub(crate) enum Listener {
    Tcp(std::net::TcpListener, Option<super::tls::Server>),
    Unix(std::os::unix::net::UnixListener, std::path::PathBuf, Peers),
}

impl Listener {
    /// Listen on `on.uri` with its checks.
    pub(crate) fn bind(on: &ListenOn) -> Result<Self, MigrateError> {
        let connect_err = |source| MigrateError::Connect { uri: on.uri.clone(), source };
        Ok(match (Endpoint::parse(&on.uri)?, &on.security) {
            (Endpoint::Tcp(addr), Some(security)) => {
                let tls = match security {
                    TcpSecurity::Tls(settings) => Some(super::tls::Server::load(settings)?),
                    TcpSecurity::Insecure => None,
                };
                Listener::Tcp(std::net::TcpListener::bind(&addr).map_err(connect_err)?, tls)
            }
            (Endpoint::Tcp(_), None) => {
                return Err(MigrateError::Security(super::conn::NEEDS_SECURITY.into()))
            }
            (Endpoint::Unix(path), _) => {
                let listener = crate::unix_socket::bind_owner_only(&path, "--incoming")?;
                Listener::Unix(listener, path, on.peers.clone())
            }
        })
    }

    /// The listening socket's descriptor, made non-blocking (to poll it
    /// beside other work).
    pub(crate) fn nonblocking_fd(&self) -> std::io::Result<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        match self {
            Listener::Tcp(l, _) => l.set_nonblocking(true).map(|()| l.as_raw_fd()),
            Listener::Unix(l, _, _) => l.set_nonblocking(true).map(|()| l.as_raw_fd()),
        }
    }

    /// The next connection, through the TLS handshake where there is one.
    /// Err(None) for a peer turned away (logged), to wait for the next.
    pub(crate) fn accept(&self) -> Result<Conn, Option<std::io::Error>> {
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
            Listener::Unix(l, _, peers) => {
                let stream = l.accept().map_err(Some)?.0;
                if let Err(e) = peers.check(&stream) {
                    crate::log::warn(&format!("refused a migration peer: {e}; still waiting"));
                    return Err(None);
                }
                Ok(Conn::Unix(stream))
            }
        }
    }
}

/// Accept one migration on `uri` and run the handshake: returns the
/// manifest and the plan once the source said "go" (None for a dry run).
/// A TCP peer that fails the TLS handshake, or a unix-socket peer
/// `peers` does not allow, is turned away and the next one awaited.
pub fn accept(
    uri: &str,
    security: Option<&TcpSecurity>,
    peers: &Peers,
    images: &ImageStore,
    plan_for: impl FnOnce(&Manifest) -> Result<Plan, MigrateError>,
) -> Result<Option<Incoming>, MigrateError> {
    let connect_err = |source| MigrateError::Connect { uri: uri.into(), source };
    let listen = ListenOn { uri: uri.to_string(), security: security.cloned(), peers: peers.clone() };
    let listener = Listener::bind(&listen)?;
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
    if let Listener::Unix(_, path, _) = &listener {
        let _ = std::fs::remove_file(path);
    }
    let (h, payload) = link.receive().map_err(st("handshake"))?;
    if h.kind != Kind::Hello {
        return Err(MigrateError::Protocol(format!("expected HELLO, got {}", h.kind.name())));
    }
    if h.version > MANIFEST_VERSION {
        let reason = format!("manifest v{} is newer than this ferry reads", h.version);
        link.fail(&reason);
        return Err(MigrateError::Protocol(reason));
    }
    let manifest: Manifest =
        state::decode(&payload).map_err(|e| MigrateError::Protocol(format!("manifest: {e}")))?;
    let plan = match plan_for(&manifest) {
        Ok(plan) => plan,
        Err(e) => {
            link.fail(&e.to_string());
            return Err(e);
        }
    };
    let encoded = state::encode(&plan)?;
    link.send(Kind::Plan, "", 1, &encoded).map_err(io("handshake"))?;
    link.flush().map_err(io("handshake"))?;
    if plan.refused() {
        return Err(MigrateError::Refused(plan.lines()));
    }
    let (h, payload) = receive_images(&mut link, images, &plan)?;
    let mut memfd = None;
    match (h.kind, payload.as_slice()) {
        (Kind::Decision, b"go") => {}
        (Kind::Decision, b"go-memfd") => {
            // The source waits for this before it sends the memfd, so
            // nothing is buffered on our side: receive it on the socket.
            link.decide(b"ready-memfd", "memfd hand-over")?;
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
    let shared = Arc::new(Shared {
        link: Mutex::new(link),
        confirmed: AtomicBool::new(false),
        broken: AtomicBool::new(false),
        pulling: AtomicBool::new(false),
        ending: AtomicBool::new(false),
    });
    Ok(Some(Incoming {
        manifest,
        plan,
        memfd,
        link: IncomingLink { shared, stale: Vec::new(), listen, spent: Vec::new() },
    }))
}

/// The boot images the plan asked for, as IMAGE messages ahead of the
/// source's decision, into this host's store; then the decision. A source
/// that predates images sends none, and the guest cannot reboot here.
fn receive_images(
    link: &mut Link,
    images: &ImageStore,
    plan: &Plan,
) -> Result<(SectionHeader, Vec<u8>), MigrateError> {
    let refuse = |link: &mut Link, e: ImageError| {
        link.fail(&e.to_string());
        MigrateError::Protocol(e.to_string())
    };
    let mut arrivals = match Arrivals::new(images, plan.images.clone()) {
        Ok(a) => a,
        Err(e) => return Err(refuse(link, e)),
    };
    loop {
        let (h, payload) = link.receive().map_err(st("handshake"))?;
        if h.kind != Kind::Image {
            let bytes = match arrivals.finish() {
                Ok(bytes) => bytes,
                Err(e) => return Err(refuse(link, e)),
            };
            if bytes > 0 {
                crate::log::info(&format!(
                    "boot image: {bytes} bytes received into {}",
                    images.dir().display()
                ));
            }
            return Ok((h, payload));
        }
        if let Err(e) = arrivals.take(&h.id, &payload) {
            return Err(refuse(link, e));
        }
    }
}

/// Receive the MEMFD message and its descriptor (SCM_RIGHTS).
fn receive_memfd(link: &Link) -> Result<File, MigrateError> {
    use std::os::fd::AsRawFd;
    let Conn::Unix(sock) = link.reader.get_ref() else {
        return Err(MigrateError::Protocol("a memfd can only come over a unix socket".into()));
    };
    let mut header = vec![0u8; stream::SECTION_HEADER_LEN as usize];
    let mut fds = crate::fdpass::recv_exact(sock.as_raw_fd(), &mut header).map_err(io("memfd hand-over"))?;
    let (h, _) = stream::receive(&mut std::io::Cursor::new(header), 0).map_err(st("memfd hand-over"))?;
    if h.kind != Kind::Memfd {
        return Err(MigrateError::Protocol(format!("expected MEMFD, got {}", h.kind.name())));
    }
    if fds.len() != 1 {
        return Err(MigrateError::Protocol(format!(
            "the MEMFD message carried {} descriptors, not 1",
            fds.len()
        )));
    }
    Ok(File::from(fds.remove(0)))
}
