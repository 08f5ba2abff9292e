//! Ferry's side of a device process: starting it, the device and PCI
//! function that stand in for the plugin's on the bus, the thread that
//! serves its host calls, and what happens when it dies or stops answering.
//!
//! Containment: whichever notices first (the vCPU thread whose access got
//! no answer, or the host thread that saw the socket close) concludes once
//! for the device: it reaps the process, reads its last words from its
//! stderr, and stops the VM with [`StopEvent::DeviceFailed`], naming the
//! device, its plugin and the cause. The main loop then keeps the API
//! answering until `ferry ctl shutdown` (`vm/run.rs`). Every later call on
//! the device fails at once with the same line.

use std::{
    collections::{HashMap, VecDeque},
    io::{BufRead, BufReader},
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::process::{CommandExt, ExitStatusExt},
    },
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use abi_stable::{
    sabi_trait::TD_Opaque,
    std_types::{RResult, RSlice, RSliceMut, RVec},
};
use ferry_plugin_api::{
    AddressSpace, Device, DeviceBox, DeviceConfig, DeviceParts, ErrorKind, HostBox, LogLevel, MsiMessage,
    PciBar, PciFunction, PciFunctionBox, PluginError, Region, StateBlob, StopKind,
};

use super::{
    process,
    protocol::{decode, encode, HostCall, HostReply, Init, Ready, Reply, Request, SandboxSpec},
    wire::{self, Channel, WireError},
    IsolateError, RamShare,
};
use crate::{
    plugins::PluginLibrary,
    vcpu::{StopEvent, VmControl},
};

/// How long pause, resume, state and reset may take (they may wait for a
/// request in flight, or move a large state).
const LIFECYCLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a device process may take to start and create its device.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Lines of a device process's stderr kept for its verdict.
const LAST_WORDS: usize = 4;

/// What [`spawn`] needs.
pub(super) struct Spawn<'a> {
    pub exe: &'a Path,
    pub lib: &'a PluginLibrary,
    pub config: DeviceConfig,
    pub host: HostBox,
    pub index: usize,
    pub share: &'a RamShare,
    pub control: Arc<VmControl>,
    pub timeout: Duration,
}

/// One device process, as both stand-ins and the host thread share it.
struct Link {
    id: String,
    plugin: String,
    index: usize,
    pid: u32,
    timeout: Duration,
    control: Arc<VmControl>,
    /// The control socket; the lock keeps one request in flight.
    socket: Mutex<Channel>,
    /// The process until it is reaped, then the verdict (None: retired).
    end: Mutex<End>,
    /// Why ferry killed it, if it did.
    killed_for: Mutex<Option<String>>,
    /// The first socket error, if the process outlived it.
    socket_error: Mutex<Option<String>>,
    /// The last lines it wrote to stderr, and whether stderr closed.
    last_words: LastWords,
}

/// A device process's last stderr lines and whether its stderr closed,
/// with a condition variable signalled when it does.
type LastWords = Arc<(Mutex<(VecDeque<String>, bool)>, std::sync::Condvar)>;

enum End {
    Running(Child),
    /// It failed; every later call gets this line.
    Failed(String),
    /// Ferry let it go (the VM ended or the device was recreated).
    Retired,
}

impl End {
    /// The error every call on a device that has ended gets.
    fn error(&self) -> Option<PluginError> {
        match self {
            End::Failed(line) => Some(PluginError::new(ErrorKind::IO, line.clone())),
            End::Retired => Some(PluginError::new(ErrorKind::IO, "the device process was let go")),
            End::Running(_) => None,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Start a device process for `s.config`, create the device in it, and
/// return stand-ins that forward every call to it.
pub(super) fn spawn(s: Spawn<'_>) -> Result<DeviceParts, IsolateError> {
    let io = |what| move |source| IsolateError::Io { what, source };
    let (ours, theirs) = wire::pair().map_err(io("cannot make the device socket"))?;
    let (host_ours, host_theirs) = wire::pair().map_err(io("cannot make the device socket"))?;
    let (control_fd, host_fd) = (theirs.raw(), host_theirs.raw());
    let mut cmd = Command::new(s.exe);
    cmd.args(["device-process", "--device", s.config.id.as_str()])
        .stdin(Stdio::inherit())
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped());
    // A panic backtrace would read the process's own files, which its
    // sandbox hides; the panic's message is what the verdict quotes.
    cmd.env_remove("RUST_BACKTRACE").env_remove("RUST_LIB_BACKTRACE");
    // SAFETY: the closure runs in the forked child before exec and calls
    // only async-signal-safe functions (fcntl, dup2, close_range, prctl).
    unsafe {
        cmd.pre_exec(move || {
            let fail = || Err(std::io::Error::last_os_error());
            // Out of the way of 3 and 4 first, then into place (dup2 clears
            // close-on-exec), then nothing else of ferry's stays open.
            let control = libc::fcntl(control_fd, libc::F_DUPFD, 10);
            let host = libc::fcntl(host_fd, libc::F_DUPFD, 10);
            if control < 0 || host < 0 {
                return fail();
            }
            if libc::dup2(control, process::CONTROL_FD) < 0 || libc::dup2(host, process::HOST_FD) < 0 {
                return fail();
            }
            if libc::syscall(libc::SYS_close_range, process::HOST_FD + 1, u32::MAX, 0) != 0 {
                return fail();
            }
            // It dies with ferry, whatever ends ferry.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return fail();
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| {
        IsolateError::Start(format!("cannot start a device process ({}): {e}", s.exe.display()))
    })?;
    drop((theirs, host_theirs));
    let pid = child.id();
    let last_words = Arc::new((Mutex::new((VecDeque::new(), false)), std::sync::Condvar::new()));
    if let Some(stderr) = child.stderr.take() {
        relay_stderr(stderr, s.config.id.to_string(), last_words.clone());
    }

    let init = Init {
        plugin: s.lib.path.display().to_string(),
        id: s.config.id.to_string(),
        properties: s.config.properties.iter().map(|p| (p.name.to_string(), p.value.to_string())).collect(),
        ram: s.share.ranges.clone(),
        dirty_pages: s.share.pages,
        sandbox: SandboxSpec { files: property_files(&s.config), ram_bytes: s.share.bytes },
    };
    let link = Arc::new(Link {
        id: s.config.id.to_string(),
        plugin: s.lib.name().to_string(),
        index: s.index,
        pid,
        timeout: s.timeout,
        control: s.control,
        socket: Mutex::new(ours),
        end: Mutex::new(End::Running(child)),
        killed_for: Mutex::new(None),
        socket_error: Mutex::new(None),
        last_words,
    });
    let ready = {
        let socket = lock(&link.socket);
        let deadline = Some(Instant::now() + START_TIMEOUT);
        let fds = [s.share.memfd.as_raw_fd(), s.share.bitmap.as_raw_fd()];
        socket.send(&encode(&init), &fds, deadline).and_then(|()| socket.recv(deadline))
    };
    let ready = match ready {
        Ok((bytes, _)) => decode::<Ready>(&bytes, "ready"),
        Err(WireError::Timeout) => Err(IsolateError::Start(format!(
            "its device process did not start within {} s",
            START_TIMEOUT.as_secs()
        ))),
        Err(e) => Err(IsolateError::Start(format!(
            "its device process ended while starting ({e}){}",
            link.words_suffix()
        ))),
    };
    let (regions, pci) = match ready {
        Ok(Ready::Device { regions, pci }) => (regions, pci),
        Ok(Ready::Failed(why)) => {
            link.retire();
            return Err(IsolateError::Start(why));
        }
        Err(why) => {
            link.retire();
            return Err(why);
        }
    };
    let thread_link = link.clone();
    std::thread::Builder::new()
        .name(format!("{}-host", link.id))
        .spawn(move || serve_host(&thread_link, &host_ours, &s.host))
        .map_err(io("cannot start the device's host thread"))?;
    crate::log::info(&format!("{}: device process {pid} ready (plugin {})", link.id, link.plugin));

    let regions =
        regions.into_iter().map(|(space, base, len)| Region { space: AddressSpace(space), base, len });
    let device = RemoteDevice { link: link.clone(), regions: regions.collect() };
    let pci = pci.then(|| PciFunctionBox::from_value(RemotePci { link }, TD_Opaque));
    Ok(DeviceParts { device: DeviceBox::from_value(device, TD_Opaque), pci: pci.into() })
}

/// String properties that name an existing file: the files the sandbox
/// lets the device open.
fn property_files(config: &DeviceConfig) -> Vec<String> {
    config
        .properties
        .iter()
        .map(|p| p.value.to_string())
        .filter(|v| !v.is_empty() && Path::new(v).is_file())
        .filter_map(|v| std::fs::canonicalize(&v).ok().map(|p| p.display().to_string()))
        .collect()
}

/// Copy a device process's stderr to ferry's, tagged with the device id,
/// keeping the last lines for its verdict.
fn relay_stderr(stderr: std::process::ChildStderr, id: String, words: LastWords) {
    let _ = std::thread::Builder::new().name(format!("{id}-stderr")).spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.trim().is_empty() {
                continue;
            }
            eprintln!("ferry: {id}: {line}");
            let mut w = lock(&words.0);
            w.0.push_back(line);
            if w.0.len() > LAST_WORDS {
                w.0.pop_front();
            }
        }
        lock(&words.0).1 = true;
        words.1.notify_all();
    });
}

impl Link {
    /// The failure line, if the device failed.
    fn failed(&self) -> Option<PluginError> {
        lock(&self.end).error()
    }

    /// One request and its reply, within the bound for its kind.
    fn call(&self, request: &Request) -> Result<Reply, PluginError> {
        if let Some(e) = self.failed() {
            return Err(e);
        }
        let bound = match request {
            Request::Read { .. }
            | Request::Write { .. }
            | Request::ConfigRead { .. }
            | Request::ConfigWrite { .. }
            | Request::Bars => self.timeout,
            _ => LIFECYCLE_TIMEOUT,
        };
        let result = {
            let socket = lock(&self.socket);
            let deadline = Some(Instant::now() + bound);
            socket.send(&encode(request), &[], deadline).and_then(|()| socket.recv(deadline))
        };
        match result {
            Ok((bytes, _)) => match decode::<Reply>(&bytes, "reply") {
                Ok(Reply::Failed { kind, message }) if ErrorKind(kind) == ErrorKind::PANIC => {
                    // The plugin's state is poisoned: the device is gone.
                    self.kill_for(format!("it panicked during {}: {message}", request.describe()));
                    Err(self.conclude())
                }
                Ok(reply) => Ok(reply),
                Err(e) => {
                    self.kill_for(format!("it answered {} with {e}", request.describe()));
                    Err(self.conclude())
                }
            },
            Err(WireError::Timeout) => {
                self.kill_for(format!(
                    "it did not answer {} within {} ms; ferry killed its process",
                    request.describe(),
                    bound.as_millis()
                ));
                Err(self.conclude())
            }
            Err(e) => {
                lock(&self.socket_error).get_or_insert_with(|| format!("{} failed: {e}", request.describe()));
                Err(self.conclude())
            }
        }
    }

    /// Kill the process, recording why (the first reason stays).
    fn kill_for(&self, why: String) {
        lock(&self.killed_for).get_or_insert(why);
        if let End::Running(child) = &mut *lock(&self.end) {
            let _ = child.kill();
        }
    }

    /// " (its last words: ...)" from its stderr, or nothing.
    fn words_suffix(&self) -> String {
        let (m, cv) = &*self.last_words;
        let deadline = Instant::now() + Duration::from_millis(500);
        let mut w = lock(m);
        while !w.1 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            w = cv.wait_timeout(w, left).map(|(g, _)| g).unwrap_or_else(|e| e.into_inner().0);
        }
        // The sandbox's own line names what it refused; else the last line.
        let line = w.0.iter().rev().find(|l| l.starts_with(super::process::SANDBOX_PREFIX)).or(w.0.back());
        match line {
            Some(l) => format!(" (its last words: {})", l.trim()),
            None => String::new(),
        }
    }

    /// The device failed (its process ended, or ferry killed it): reap the
    /// process once, stop the VM naming the cause, and return the line.
    fn conclude(&self) -> PluginError {
        let mut end = lock(&self.end);
        let child = match &mut *end {
            End::Running(child) => child,
            ended => return ended.error().unwrap_or_else(|| PluginError::other("the device process ended")),
        };
        // Its sockets closed, or ferry gave up on it: make sure it is gone.
        let status = match child.try_wait() {
            Ok(Some(s)) => Some(s),
            _ => {
                std::thread::sleep(Duration::from_millis(50));
                match child.try_wait() {
                    Ok(Some(s)) => Some(s),
                    _ => {
                        // Still there: its socket broke under it, or it
                        // closed it. Either way it is of no use now.
                        let why =
                            lock(&self.socket_error).clone().unwrap_or_else(|| "its socket closed".into());
                        lock(&self.killed_for).get_or_insert(format!("{why}; ferry killed its process"));
                        let _ = child.kill();
                        child.wait().ok()
                    }
                }
            }
        };
        let killed_for = lock(&self.killed_for).clone();
        let cause = match (killed_for, status) {
            (Some(why), _) => why,
            (None, Some(s)) => match (s.signal(), s.code()) {
                (Some(sig), _) => format!(
                    "its process {} was killed by {}{}",
                    self.pid,
                    signal_name(sig),
                    self.words_suffix()
                ),
                (None, Some(code)) => {
                    format!("its process {} exited with status {code}{}", self.pid, self.words_suffix())
                }
                _ => format!("its process {} ended", self.pid),
            },
            (None, None) => format!("its process {} ended", self.pid),
        };
        let line = format!("device {} ({}) failed: {cause}", self.id, self.plugin);
        // Stop the VM before anyone can see `Failed`: a caller that finds
        // the device failed returns an error that would stop the VM too,
        // and the first stop is the one reported.
        self.control.stop(StopEvent::DeviceFailed { index: self.index, message: line.clone() });
        *end = End::Failed(line.clone());
        drop(end);
        PluginError::new(ErrorKind::IO, line)
    }

    /// Let the process go: close its control socket (it exits on EOF) and
    /// reap it, killing it if it lingers.
    fn retire(&self) {
        let mut end = lock(&self.end);
        if let End::Running(child) = &mut *end {
            // SAFETY: shutdown on our own socket; the descriptor stays open
            // (owned by the Channel) and reads as closed to both sides.
            unsafe { libc::shutdown(lock(&self.socket).raw(), libc::SHUT_RDWR) };
            let deadline = Instant::now() + Duration::from_secs(2);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }
        if matches!(*end, End::Running(_)) {
            *end = End::Retired;
        }
    }

    fn retired(&self) -> bool {
        matches!(*lock(&self.end), End::Retired)
    }
}

/// Serve the device's host calls until its host socket closes; then, unless
/// ferry let it go, the device has failed.
fn serve_host(link: &Link, socket: &Channel, host: &HostBox) {
    // The device's eventfds by their number in its process.
    let mut fds: HashMap<i32, OwnedFd> = HashMap::new();
    loop {
        let (bytes, got) = match socket.recv(None) {
            Ok(m) => m,
            Err(WireError::Closed) => break,
            Err(e) => {
                lock(&link.socket_error).get_or_insert_with(|| format!("its host socket failed: {e}"));
                break;
            }
        };
        let call = match decode::<HostCall>(&bytes, "host call") {
            Ok(c) => c,
            Err(e) => {
                link.kill_for(format!("it sent {e}"));
                break;
            }
        };
        let answered = call.answered();
        let mut got = got.into_iter();
        let result: Result<(), PluginError> = match call {
            HostCall::SetIrqLevel { gsi, level } => host.set_irq_level(gsi, level).into_result(),
            HostCall::StopVm { kind, status } => {
                host.stop_vm(StopKind(kind), status);
                Ok(())
            }
            HostCall::Log { level, message } => {
                host.log(LogLevel(level), message.as_str().into());
                Ok(())
            }
            HostCall::SetStatus(line) => host.set_status(line.as_str().into()).into_result(),
            HostCall::MsiRoute { fd, address, data } => adopt(&mut fds, fd, got.next())
                .and_then(|local| host.msi_route(local, MsiMessage { address, data }).into_result()),
            HostCall::MsiUnroute { fd } => match fds.get(&fd) {
                Some(local) => host.msi_unroute(local.as_raw_fd()).into_result(),
                None => Err(PluginError::other(format!("eventfd {fd} was never routed"))),
            },
            HostCall::Ioeventfd { fd, address } => {
                adopt(&mut fds, fd, got.next()).and_then(|local| host.ioeventfd(local, address).into_result())
            }
            HostCall::RemoveIoeventfd { fd, address } => match fds.get(&fd) {
                Some(local) => host.remove_ioeventfd(local.as_raw_fd(), address).into_result(),
                None => Err(PluginError::other(format!("eventfd {fd} was never registered"))),
            },
        };
        if answered {
            let reply = match result {
                Ok(()) => HostReply::Done,
                Err(e) => HostReply::Failed { kind: e.kind.0, message: e.message.to_string() },
            };
            if socket.send(&encode(&reply), &[], None).is_err() {
                break;
            }
        }
    }
    if !link.retired() {
        link.conclude();
    }
}

/// The eventfd the device calls `fd`: the one that came with this call
/// (kept for later calls naming it), or the one kept earlier.
fn adopt(fds: &mut HashMap<i32, OwnedFd>, fd: i32, came: Option<OwnedFd>) -> Result<i32, PluginError> {
    if let Some(kept) = fds.get(&fd) {
        return Ok(kept.as_raw_fd());
    }
    let came = came.ok_or_else(|| PluginError::other(format!("eventfd {fd} did not come with the call")))?;
    let raw = came.as_raw_fd();
    fds.insert(fd, came);
    Ok(raw)
}

fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGSYS => "SIGSYS",
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGTRAP => "SIGTRAP",
        _ => return format!("signal {sig}"),
    };
    name.to_string()
}

fn rerr<T>(e: PluginError) -> RResult<T, PluginError> {
    RResult::RErr(e)
}

/// The plugin's own error, as its device process passed it on.
fn plugin_error<T>(kind: u32, message: String) -> RResult<T, PluginError> {
    rerr(PluginError::new(ErrorKind(kind), message))
}

fn unexpected<T>(what: &str, reply: Reply) -> RResult<T, PluginError> {
    rerr(PluginError::other(format!("the device process answered {what} with {reply:?}")))
}

/// What stands in for the plugin's device on the bus.
struct RemoteDevice {
    link: Arc<Link>,
    regions: Vec<Region>,
}

impl Drop for RemoteDevice {
    fn drop(&mut self) {
        self.link.retire();
    }
}

impl RemoteDevice {
    fn done(&self, request: Request) -> RResult<(), PluginError> {
        match self.link.call(&request) {
            Ok(Reply::Done) => RResult::ROk(()),
            Ok(Reply::Failed { kind, message }) => plugin_error(kind, message),
            Ok(other) => unexpected(&request.describe(), other),
            Err(e) => rerr(e),
        }
    }
}

impl Device for RemoteDevice {
    fn regions(&self) -> RVec<Region> {
        self.regions.iter().copied().collect()
    }

    fn read(&mut self, region: u32, offset: u64, mut data: RSliceMut<'_, u8>) -> RResult<(), PluginError> {
        let request = Request::Read { region, offset, len: data.len() as u32 };
        match self.link.call(&request) {
            Ok(Reply::Bytes(b)) if b.len() == data.len() => {
                data.copy_from_slice(&b);
                RResult::ROk(())
            }
            Ok(Reply::Failed { kind, message }) => plugin_error(kind, message),
            Ok(other) => unexpected(&request.describe(), other),
            Err(e) => rerr(e),
        }
    }

    fn write(&mut self, region: u32, offset: u64, data: RSlice<'_, u8>) -> RResult<(), PluginError> {
        self.done(Request::Write { region, offset, data: data.to_vec() })
    }

    fn pause(&mut self) -> RResult<(), PluginError> {
        self.done(Request::Pause)
    }

    fn resume(&mut self) -> RResult<(), PluginError> {
        self.done(Request::Resume)
    }

    fn save_state(&mut self, version: u32) -> RResult<StateBlob, PluginError> {
        match self.link.call(&Request::SaveState { version }) {
            Ok(Reply::State { version, bytes }) => RResult::ROk(StateBlob { version, bytes: bytes.into() }),
            Ok(Reply::Failed { kind, message }) => plugin_error(kind, message),
            Ok(other) => unexpected("save_state", other),
            Err(e) => rerr(e),
        }
    }

    fn load_state(&mut self, state: StateBlob) -> RResult<(), PluginError> {
        self.done(Request::LoadState { version: state.version, bytes: state.bytes.into_vec() })
    }

    fn reset(&mut self) -> RResult<(), PluginError> {
        self.done(Request::Reset)
    }
}

/// What stands in for the plugin's PCI function.
struct RemotePci {
    link: Arc<Link>,
}

impl PciFunction for RemotePci {
    fn config_read(&mut self, offset: u32, mut data: RSliceMut<'_, u8>) {
        match self.link.call(&Request::ConfigRead { offset, len: data.len() as u32 }) {
            Ok(Reply::Bytes(b)) if b.len() == data.len() => data.copy_from_slice(&b),
            _ => data.fill(0xff),
        }
    }

    fn config_write(&mut self, offset: u32, data: RSlice<'_, u8>) -> RResult<(), PluginError> {
        match self.link.call(&Request::ConfigWrite { offset, data: data.to_vec() }) {
            Ok(Reply::Done) => RResult::ROk(()),
            Ok(Reply::Failed { kind, message }) => plugin_error(kind, message),
            Ok(other) => unexpected("a PCI configuration write", other),
            Err(e) => rerr(e),
        }
    }

    fn bars(&self) -> RVec<PciBar> {
        match self.link.call(&Request::Bars) {
            Ok(Reply::Bars(bars)) => bars.into_iter().map(PciBar::from).collect(),
            _ => RVec::new(),
        }
    }
}
