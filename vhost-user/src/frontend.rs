//! A vhost-user device's connection to its backend: the setup a backend
//! expects (identity, SET_OWNER; then at the driver's DRIVER_OK the
//! features, the memory table, the dirty log and each ring), stopping the
//! rings (GET_VRING_BASE) and starting them again where they stopped.
//!
//! Every call has a deadline: a watchdog thread shuts the socket down when
//! a backend takes longer than [`ANSWER_TIMEOUT`] to answer, so a hung
//! backend becomes an error naming the message, never a hung vCPU.

use std::{
    os::{
        fd::{AsRawFd, RawFd},
        unix::net::UnixStream,
    },
    path::Path,
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use thiserror::Error;
use vhost::{
    vhost_user::{message::VhostUserHeaderFlag, Frontend, VhostUserFrontend, VhostUserProtocolFeatures},
    VhostBackend, VhostUserMemoryRegionInfo, VringConfigData,
};
use vmm_sys_util::eventfd::EventFd;

use crate::identity::{
    ask_on, BackendIdentity, Device, ProbeError, ANSWER_TIMEOUT, LOG_ALL_BIT, PROTOCOL_FEATURES_BIT,
};

/// VHOST_VRING_F_LOG: log writes to the used ring too.
const VRING_F_LOG: u32 = 1;

/// The protocol features a device acknowledges, of those offered.
fn device_protocol() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::DEVICE_STATE
}

/// How long a backend may take to write or read its state.
const STATE_TIMEOUT: Duration = Duration::from_secs(10);

/// A pipe: (read end, write end), close-on-exec.
fn pipe() -> std::io::Result<(std::fs::File, std::fs::File)> {
    use std::os::fd::FromRawFd;
    let mut fds = [-1; 2];
    // SAFETY: pipe2 writes two descriptors into the array on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and owned by nothing else.
    Ok(unsafe { (std::fs::File::from_raw_fd(fds[0]), std::fs::File::from_raw_fd(fds[1])) })
}

/// Wait until `fd` is ready for `events` or `deadline` passes.
fn wait_ready(fd: RawFd, events: libc::c_short, deadline: Instant) -> std::io::Result<()> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"));
        }
        let mut p = libc::pollfd { fd, events, revents: 0 };
        let ms = libc::c_int::try_from(left.as_millis()).unwrap_or(libc::c_int::MAX).max(1);
        // SAFETY: one valid pollfd for the duration of the call.
        match unsafe { libc::poll(&mut p, 1, ms) } {
            n if n > 0 => return Ok(()),
            0 => continue,
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// Why a backend could not be used.
#[derive(Debug, Error)]
pub enum FrontendError {
    /// Reading its identity failed.
    #[error(transparent)]
    Probe(#[from] ProbeError),
    /// A step of the setup, a stop or a start failed.
    #[error("vhost-user backend {path}: {step}: {message}")]
    Step {
        /// The socket.
        path: String,
        /// The message it was sent.
        step: &'static str,
        /// What went wrong.
        message: String,
    },
    /// The backend lacks what the device needs.
    #[error("vhost-user backend {path}: {message}")]
    Lacks {
        /// The socket.
        path: String,
        /// What it lacks.
        message: String,
    },
}

/// Guest RAM as the backend maps it.
#[derive(Debug, Clone)]
pub struct SharedRam {
    /// The RAM file (a memfd); the caller keeps it open.
    pub fd: RawFd,
    /// Ranges: guest-physical start, length, offset in the file, and the
    /// address where this process maps it (rings are given by it).
    pub ranges: Vec<RamRange>,
    /// The dirty log: a file of one bit per 4 KiB guest-physical page,
    /// and its length in bytes.
    pub log: Option<(RawFd, u64)>,
}

/// One range of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRange {
    /// Guest-physical start.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// Offset in the RAM file.
    pub offset: u64,
    /// Address in this process.
    pub host_addr: u64,
}

impl SharedRam {
    fn host_addr(&self, gpa: u64, len: u64) -> Option<u64> {
        self.ranges
            .iter()
            .find(|r| gpa >= r.gpa && gpa.checked_add(len).is_some_and(|end| end <= r.gpa + r.len))
            .map(|r| r.host_addr + (gpa - r.gpa))
    }
}

/// One ring to start.
pub struct RingSpec<'a> {
    /// Queue index.
    pub index: usize,
    /// Size the driver chose.
    pub size: u16,
    /// Guest-physical addresses of the descriptor table, available and
    /// used rings.
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// Where to start taking buffers.
    pub next_avail: u16,
    /// The driver's notifications.
    pub kick: &'a EventFd,
    /// The queue's interrupt (`None`: the ring gets an eventfd nobody
    /// reads).
    pub call: Option<&'a EventFd>,
}

/// Shuts the socket down when a call overruns its deadline.
struct Watchdog {
    state: Arc<(Mutex<WatchState>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct WatchState {
    deadline: Option<Instant>,
    fired: bool,
    done: bool,
}

impl Watchdog {
    fn start(socket: UnixStream) -> Result<Self, std::io::Error> {
        let state: Arc<(Mutex<WatchState>, Condvar)> = Arc::default();
        let shared = state.clone();
        let thread = std::thread::Builder::new().name("vhost-user-watchdog".into()).spawn(move || {
            let (lock, cv) = &*shared;
            let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
            while !st.done {
                match st.deadline {
                    None => st = cv.wait(st).unwrap_or_else(|e| e.into_inner()),
                    Some(d) => {
                        let now = Instant::now();
                        if now >= d {
                            // The pending read returns end-of-file.
                            let _ = socket.shutdown(std::net::Shutdown::Both);
                            st.fired = true;
                            st.deadline = None;
                        } else {
                            st = cv.wait_timeout(st, d - now).unwrap_or_else(|e| e.into_inner()).0;
                        }
                    }
                }
            }
        })?;
        Ok(Watchdog { state, thread: Some(thread) })
    }

    fn arm(&self, within: Duration) {
        let (lock, cv) = &*self.state;
        lock.lock().unwrap_or_else(|e| e.into_inner()).deadline = Some(Instant::now() + within);
        cv.notify_all();
    }

    /// Disarm; true if it fired since the last arm.
    fn disarm(&self) -> bool {
        let (lock, _) = &*self.state;
        let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
        st.deadline = None;
        std::mem::take(&mut st.fired)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let (lock, cv) = &*self.state;
        lock.lock().unwrap_or_else(|e| e.into_inner()).done = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn set_nonblocking(f: &std::fs::File) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor `f` owns, with flags it read first.
    unsafe {
        let flags = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A device's connection to its backend.
pub struct Connection {
    path: String,
    /// How long a call may wait for its answer.
    deadline: Duration,
    frontend: Frontend,
    identity: BackendIdentity,
    acked_protocol: VhostUserProtocolFeatures,
    /// A second handle on the socket, to watch for the backend hanging up.
    watch: UnixStream,
    watchdog: Watchdog,
    /// Features and memory table sent since SET_OWNER.
    configured: Option<u64>,
    /// Rings started and not stopped.
    started: Vec<usize>,
    /// Call eventfds for rings without a vector.
    spare_calls: Vec<EventFd>,
    queues: usize,
}

impl Connection {
    /// Connect to the backend at `path`, read its identity as a `device`
    /// backend, and take it (SET_OWNER).
    pub fn open(path: &Path, device: Device, queues: usize) -> Result<Self, FrontendError> {
        let shown = path.display().to_string();
        let stream = UnixStream::connect(path)
            .map_err(|source| ProbeError::Connect { path: shown.clone(), source })?;
        Self::on_stream(stream, &shown, device, queues, ANSWER_TIMEOUT)
    }

    /// [`Connection::open`] on a connected stream, every call within
    /// `deadline` (the fuzz target plays the backend on a socket pair).
    pub fn on_stream(
        stream: UnixStream,
        shown: &str,
        device: Device,
        queues: usize,
        deadline: Duration,
    ) -> Result<Self, FrontendError> {
        let connect = |source| ProbeError::Connect { path: shown.to_string(), source };
        let watch = stream.try_clone().map_err(connect)?;
        let watchdog = Watchdog::start(stream.try_clone().map_err(connect)?).map_err(connect)?;
        let mut frontend = Frontend::from_stream(stream, queues.max(1) as u64);
        watchdog.arm(deadline);
        let identity = ask_on(&mut frontend, shown, Some(device), device_protocol());
        let late = watchdog.disarm();
        let identity = identity.map_err(|e| match (e, late) {
            (ProbeError::Protocol { path, step, .. }, true) => ProbeError::Protocol {
                path,
                step,
                message: format!("no answer within {} s", deadline.as_secs_f64()),
            },
            (e, _) => e,
        })?;
        let acked_protocol =
            VhostUserProtocolFeatures::from_bits_truncate(identity.protocol_features) & device_protocol();
        let mut c = Connection {
            path: shown.to_string(),
            deadline,
            frontend,
            identity,
            acked_protocol,
            watch,
            watchdog,
            configured: None,
            started: Vec::new(),
            spare_calls: Vec::new(),
            queues,
        };
        if c.identity.features & PROTOCOL_FEATURES_BIT == 0 {
            return Err(c.lacks("it does not offer VHOST_USER_F_PROTOCOL_FEATURES (bit 30)"));
        }
        if c.acked_protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            c.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        c.call("SET_OWNER", |f| f.set_owner())?;
        Ok(c)
    }

    /// What the backend said about itself.
    pub fn identity(&self) -> &BackendIdentity {
        &self.identity
    }

    /// The socket, for watching (readable at end-of-file: the backend hung
    /// up).
    pub fn socket_fd(&self) -> RawFd {
        self.watch.as_raw_fd()
    }

    /// Has the backend hung up? (Never blocks.)
    pub fn hung_up(&self) -> bool {
        let mut byte = [0u8; 1];
        // SAFETY: a non-blocking peek into a local one-byte buffer on a
        // socket this connection owns.
        let n = unsafe {
            libc::recv(
                self.watch.as_raw_fd(),
                byte.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        n == 0 || (n < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EAGAIN))
    }

    /// The socket path, for messages.
    pub fn path(&self) -> &str {
        &self.path
    }

    fn lacks(&self, message: &str) -> FrontendError {
        FrontendError::Lacks { path: self.path.clone(), message: message.into() }
    }

    fn call<T>(
        &mut self,
        step: &'static str,
        f: impl FnOnce(&mut Frontend) -> vhost::Result<T>,
    ) -> Result<T, FrontendError> {
        self.watchdog.arm(self.deadline);
        let result = f(&mut self.frontend);
        let late = self.watchdog.disarm();
        result.map_err(|e| FrontendError::Step {
            path: self.path.clone(),
            step,
            message: match late {
                true => format!("no answer within {} s", self.deadline.as_secs_f64()),
                false => e.to_string(),
            },
        })
    }

    /// Start `rings` with the driver's `features`: the first time (and
    /// whenever the features change) the features, memory table and dirty
    /// log go first.
    pub fn start(
        &mut self,
        features: u64,
        ram: &SharedRam,
        rings: &[RingSpec<'_>],
    ) -> Result<(), FrontendError> {
        let log = ram.log.is_some()
            && self.identity.features & LOG_ALL_BIT != 0
            && self.acked_protocol.contains(VhostUserProtocolFeatures::LOG_SHMFD);
        let mut acked = features | PROTOCOL_FEATURES_BIT;
        if log {
            acked |= LOG_ALL_BIT;
        }
        if self.configured != Some(acked) {
            self.call("SET_FEATURES", |f| f.set_features(acked))?;
            let regions: Vec<VhostUserMemoryRegionInfo> = ram
                .ranges
                .iter()
                .map(|r| VhostUserMemoryRegionInfo {
                    guest_phys_addr: r.gpa,
                    memory_size: r.len,
                    userspace_addr: r.host_addr,
                    mmap_offset: r.offset,
                    mmap_handle: ram.fd,
                })
                .collect();
            self.call("SET_MEM_TABLE", |f| f.set_mem_table(&regions))?;
            if let (true, Some((fd, size))) = (log, ram.log) {
                self.set_log_base(fd, size)?;
            }
            self.configured = Some(acked);
        }
        for ring in rings {
            let q = ring.index;
            if q >= self.queues {
                return Err(self.lacks(&format!("queue {q}: the device has {} queue(s)", self.queues)));
            }
            let addr = |gpa: u64, len: u64, what: &str| {
                ram.host_addr(gpa, len).ok_or_else(|| FrontendError::Step {
                    path: self.path.clone(),
                    step: "SET_VRING_ADDR",
                    message: format!("queue {q}: the {what} at {gpa:#x} is outside guest RAM"),
                })
            };
            let size = u64::from(ring.size);
            let config = VringConfigData {
                queue_max_size: ring.size,
                queue_size: ring.size,
                flags: if log { VRING_F_LOG } else { 0 },
                desc_table_addr: addr(ring.desc, 16 * size, "descriptor table")?,
                used_ring_addr: addr(ring.used, 6 + 8 * size, "used ring")?,
                avail_ring_addr: addr(ring.avail, 6 + 2 * size, "available ring")?,
                log_addr: log.then_some(ring.used),
            };
            self.call("SET_VRING_NUM", |f| f.set_vring_num(q, ring.size))?;
            self.call("SET_VRING_ADDR", |f| f.set_vring_addr(q, &config))?;
            self.call("SET_VRING_BASE", |f| f.set_vring_base(q, ring.next_avail))?;
            let spare = match ring.call {
                Some(_) => None,
                None => Some(EventFd::new(libc::EFD_NONBLOCK).map_err(|e| FrontendError::Step {
                    path: self.path.clone(),
                    step: "SET_VRING_CALL",
                    message: format!("cannot create an eventfd: {e}"),
                })?),
            };
            if let Some(call) = ring.call.or(spare.as_ref()) {
                self.call("SET_VRING_CALL", |f| f.set_vring_call(q, call))?;
            }
            self.spare_calls.extend(spare);
            self.call("SET_VRING_KICK", |f| f.set_vring_kick(q, ring.kick))?;
            self.call("SET_VRING_ENABLE", |f| f.set_vring_enable(q, true))?;
            self.started.push(q);
        }
        Ok(())
    }

    /// SET_LOG_BASE with the log's file (protocol feature LOG_SHMFD),
    /// written here rather than by the vhost crate: backends answer it with
    /// a u64 (libvhost-user, so qemu-storage-daemon; QEMU reads any body),
    /// and the crate waits for the 16 bytes of its request's body, for
    /// ever.
    fn set_log_base(&mut self, fd: RawFd, size: u64) -> Result<(), FrontendError> {
        use std::io::Read;
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        const SET_LOG_BASE: u32 = 6;
        const VERSION_1: u32 = 0x1;
        const REPLY: u32 = 0x4;
        let step =
            |message: String| FrontendError::Step { path: self.path.clone(), step: "SET_LOG_BASE", message };
        let mut msg = Vec::with_capacity(28);
        msg.extend_from_slice(&SET_LOG_BASE.to_le_bytes());
        msg.extend_from_slice(&VERSION_1.to_le_bytes());
        msg.extend_from_slice(&16u32.to_le_bytes());
        msg.extend_from_slice(&size.to_le_bytes()); // mmap_size
        msg.extend_from_slice(&0u64.to_le_bytes()); // mmap_offset
        self.watchdog.arm(self.deadline);
        let result = (|| -> Result<(), String> {
            let sent =
                self.watch.send_with_fd(msg.as_slice(), fd).map_err(|e| format!("cannot send: {e}"))?;
            if sent != msg.len() {
                return Err(format!("sent {sent} of {} bytes", msg.len()));
            }
            let mut header = [0u8; 12];
            (&self.watch).read_exact(&mut header).map_err(|e| format!("no reply: {e}"))?;
            let word =
                |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
            let (request, flags, len) = (word(0), word(4), word(8));
            if request != SET_LOG_BASE || flags & REPLY == 0 || len > 64 {
                return Err(format!("answered request {request} (flags {flags:#x}, {len} bytes)"));
            }
            let mut body = vec![0u8; len as usize];
            (&self.watch).read_exact(&mut body).map_err(|e| format!("short reply: {e}"))?;
            Ok(())
        })();
        let late = self.watchdog.disarm();
        result.map_err(|e| {
            step(if late { format!("no answer within {} s", self.deadline.as_secs_f64()) } else { e })
        })
    }

    /// Stop every started ring: the next index each would take.
    pub fn stop(&mut self) -> Result<Vec<(usize, u16)>, FrontendError> {
        let mut out = Vec::new();
        for q in std::mem::take(&mut self.started) {
            let base = self.call("GET_VRING_BASE", |f| f.get_vring_base(q))?;
            let base = u16::try_from(base).map_err(|_| FrontendError::Step {
                path: self.path.clone(),
                step: "GET_VRING_BASE",
                message: format!("queue {q}: index {base} does not fit a ring index"),
            })?;
            out.push((q, base));
        }
        self.spare_calls.clear();
        Ok(out)
    }

    /// Does the backend keep state of its own that a migration moves
    /// (protocol feature DEVICE_STATE, acknowledged)?
    pub fn has_state(&self) -> bool {
        self.acked_protocol.contains(VhostUserProtocolFeatures::DEVICE_STATE)
    }

    /// The backend's own state, read while every ring is stopped
    /// (SET_DEVICE_STATE_FD save, then CHECK_DEVICE_STATE).
    pub fn save_state(&mut self) -> Result<Vec<u8>, FrontendError> {
        use std::io::Read;
        use vhost::vhost_user::message::{VhostTransferStateDirection, VhostTransferStatePhase};
        let path = self.path.clone();
        let step =
            |step: &'static str, message: String| FrontendError::Step { path: path.clone(), step, message };
        let (read, write) =
            pipe().map_err(|e| step("SET_DEVICE_STATE_FD", format!("cannot make a pipe: {e}")))?;
        let theirs = self.call("SET_DEVICE_STATE_FD", |f| {
            f.set_device_state_fd(
                VhostTransferStateDirection::SAVE,
                VhostTransferStatePhase::STOPPED,
                write.into(),
            )
        })?;
        let mut from = theirs.unwrap_or(read);
        set_nonblocking(&from).map_err(|e| step("SET_DEVICE_STATE_FD", e.to_string()))?;
        let deadline = Instant::now() + STATE_TIMEOUT;
        let mut bytes = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => bytes.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    wait_ready(from.as_raw_fd(), libc::POLLIN, deadline).map_err(|e| {
                        step("SET_DEVICE_STATE_FD", format!("the backend's state did not arrive: {e}"))
                    })?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(step("SET_DEVICE_STATE_FD", format!("reading the backend's state: {e}")))
                }
            }
        }
        drop(from);
        self.call("CHECK_DEVICE_STATE", |f| f.check_device_state())?;
        Ok(bytes)
    }

    /// Give the backend its state back, before any ring starts
    /// (SET_DEVICE_STATE_FD load, then CHECK_DEVICE_STATE).
    pub fn load_state(&mut self, bytes: &[u8]) -> Result<(), FrontendError> {
        use std::io::Write;
        use vhost::vhost_user::message::{VhostTransferStateDirection, VhostTransferStatePhase};
        let path = self.path.clone();
        let step =
            |step: &'static str, message: String| FrontendError::Step { path: path.clone(), step, message };
        if !self.has_state() {
            return Err(self.lacks("it has no DEVICE_STATE, and the guest's backend state must be loaded"));
        }
        let (read, write) =
            pipe().map_err(|e| step("SET_DEVICE_STATE_FD", format!("cannot make a pipe: {e}")))?;
        let theirs = self.call("SET_DEVICE_STATE_FD", |f| {
            f.set_device_state_fd(
                VhostTransferStateDirection::LOAD,
                VhostTransferStatePhase::STOPPED,
                read.into(),
            )
        })?;
        let mut to = theirs.unwrap_or(write);
        set_nonblocking(&to).map_err(|e| step("SET_DEVICE_STATE_FD", e.to_string()))?;
        let deadline = Instant::now() + STATE_TIMEOUT;
        let mut left = bytes;
        while !left.is_empty() {
            match to.write(left) {
                Ok(n) => left = &left[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    wait_ready(to.as_raw_fd(), libc::POLLOUT, deadline).map_err(|e| {
                        step("SET_DEVICE_STATE_FD", format!("the backend did not take its state: {e}"))
                    })?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(step("SET_DEVICE_STATE_FD", format!("writing the backend's state: {e}")))
                }
            }
        }
        drop(to);
        self.call("CHECK_DEVICE_STATE", |f| f.check_device_state())
    }

    /// The driver reset the device: the next start sends the features and
    /// the memory table again.
    pub fn reset(&mut self) {
        self.configured = None;
    }
}
