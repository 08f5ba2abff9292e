//! The device process (`ferry device-process`, started by ferry, never by
//! hand): it receives its device's configuration and guest RAM, enters its
//! sandbox, loads the plugin library through the same checks ferry uses,
//! creates the device and answers ferry's calls on it until ferry closes
//! the control socket.
//!
//! ```text
//!  recv Init (+ RAM memfd, bitmap memfd)
//!  sandbox::before_plugin    rlimits, no_new_privs, mount/IPC/UTS namespaces, Landlock
//!  map RAM and bitmap shared; load the plugin; create the device (RemoteHost as its Host)
//!  sandbox::after_create     network namespace, seccomp allowlist
//!  send Ready, then serve Requests one at a time
//! ```

use std::{
    fs::File,
    os::fd::{AsRawFd, OwnedFd},
    path::Path,
    sync::{Arc, Mutex},
};

use abi_stable::{
    sabi_trait::TD_Opaque,
    std_types::{RArc, RResult, RSlice, RSliceMut, RStr, RVec},
};
use ferry_plugin_api::{
    DeviceConfig, DeviceParts, ErrorKind, GuestMemoryMap, Host, HostBox, LogLevel, MemoryRegion, MsiMessage,
    PluginError, Property, StateBlob, StopKind,
};

use super::{
    protocol::{decode, encode, Bar, HostCall, HostReply, Init, Ready, Reply, Request},
    sandbox,
    wire::Channel,
    IsolateError,
};

/// Where ferry puts the control socket in the child.
pub const CONTROL_FD: i32 = 3;
/// Where ferry puts the host socket in the child.
pub const HOST_FD: i32 = 4;
pub use crate::seccomp::SANDBOX_PREFIX;

/// Run the device process; returns its exit status.
pub fn main() -> i32 {
    // SAFETY: ferry's spawner put the two sockets at these numbers; nothing
    // else in this process owns them.
    let (control, host) = unsafe { (Channel::from_raw(CONTROL_FD), Channel::from_raw(HOST_FD)) };
    match serve(&control, host) {
        Ok(()) => 0,
        Err(why) => {
            // A plugin's refusal in its own words: ferry names the device.
            let why = match why {
                IsolateError::Create { error, .. } => error.message.to_string(),
                other => other.to_string(),
            };
            let _ = control.send(&encode(&Ready::Failed(why.clone())), &[], None);
            eprintln!("{why}");
            1
        }
    }
}

fn serve(control: &Channel, host: Channel) -> Result<(), IsolateError> {
    let wire = |what| move |source| IsolateError::Wire { what, source };
    let (bytes, fds) = control.recv(None).map_err(wire("no configuration from ferry"))?;
    let init: Init = decode(&bytes, "init")?;
    let [ram_fd, bitmap_fd]: [OwnedFd; 2] = fds
        .try_into()
        .map_err(|_| IsolateError::Start("ferry did not pass guest RAM and the dirty bitmap".into()))?;
    let plugin = Path::new(&init.plugin);
    sandbox::before_plugin(&init.sandbox, plugin).map_err(|e| IsolateError::Sandbox(e.to_string()))?;
    let memory = map_memory(&init, &File::from(ram_fd), &File::from(bitmap_fd))?;
    let lib = crate::plugins::load_one(plugin)?;
    let config = DeviceConfig {
        id: init.id.as_str().into(),
        properties: init
            .properties
            .iter()
            .map(|(n, v)| Property { name: n.as_str().into(), value: v.as_str().into() })
            .collect(),
    };
    // The host socket stays open for the life of the process even if the
    // device drops its Host handle: ferry reads its closing as the end.
    let host = Arc::new(Mutex::new(host));
    let _keep_host = host.clone();
    let status = StatusPost::start(host.clone())
        .map_err(|source| IsolateError::Io { what: "cannot start the status thread", source })?;
    let remote = RemoteHost { socket: host, memory, status };
    let host_box = HostBox::from_ptr(RArc::new(remote), TD_Opaque);
    let DeviceParts { mut device, pci } = lib.create(config, host_box).map_err(|error| {
        IsolateError::Create { id: init.id.clone(), plugin: lib.name().to_string(), error }
    })?;
    let mut pci = pci.into_option();
    sandbox::after_create().map_err(|e| IsolateError::Sandbox(e.to_string()))?;
    let regions = device.regions().iter().map(|r| (r.space.0, r.base, r.len)).collect();
    control
        .send(&encode(&Ready::Device { regions, pci: pci.is_some() }), &[], None)
        .map_err(wire("ferry went away"))?;

    loop {
        let Ok((bytes, _)) = control.recv(None) else {
            return Ok(()); // ferry closed the socket: done
        };
        let request: Request = decode(&bytes, "request")?;
        let reply = answer(&mut device, pci.as_mut(), request);
        if control.send(&encode(&reply), &[], None).is_err() {
            return Ok(());
        }
    }
}

/// Map guest RAM and the bitmap as ferry laid them out; the device sees
/// them at this process's addresses.
fn map_memory(init: &Init, ram: &File, bitmap: &File) -> Result<GuestMemoryMap, IsolateError> {
    let map = |file: &File, len: u64, offset: u64, what: &'static str| -> Result<u64, IsolateError> {
        let len = usize::try_from(len).map_err(|e| IsolateError::Start(format!("{what}: {e}")))?;
        // SAFETY: a new shared mapping of a memfd ferry sized; checked
        // below, and kept for the life of the process (never unmapped).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(IsolateError::Io { what, source: std::io::Error::last_os_error() });
        }
        Ok(p as u64)
    };
    let mut regions = RVec::new();
    for &(gpa, len, offset) in &init.ram {
        let host_addr = map(ram, len, offset, "cannot map guest RAM")?;
        regions.push(MemoryRegion { gpa, len, host_addr, first_page: offset / crate::memory::PAGE_SIZE });
    }
    let words = init.dirty_pages.div_ceil(64).max(1);
    let dirty_bitmap = map(bitmap, words * 8, 0, "cannot map the dirty bitmap")?;
    Ok(GuestMemoryMap { regions, dirty_bitmap, dirty_pages: init.dirty_pages })
}

fn failed(e: PluginError) -> Reply {
    Reply::Failed { kind: e.kind.0, message: e.message.into_string() }
}

fn done(r: RResult<(), PluginError>) -> Reply {
    match r {
        RResult::ROk(()) => Reply::Done,
        RResult::RErr(e) => failed(e),
    }
}

/// Carry out one of ferry's calls on the device.
fn answer(
    device: &mut ferry_plugin_api::DeviceBox,
    pci: Option<&mut ferry_plugin_api::PciFunctionBox>,
    request: Request,
) -> Reply {
    match request {
        Request::Read { region, offset, len } => {
            let mut data = vec![0u8; len.min(4096) as usize];
            match device.read(region, offset, RSliceMut::from_mut_slice(&mut data)) {
                RResult::ROk(()) => Reply::Bytes(data),
                RResult::RErr(e) => failed(e),
            }
        }
        Request::Write { region, offset, data } => {
            done(device.write(region, offset, RSlice::from_slice(&data)))
        }
        Request::Pause => done(device.pause()),
        Request::Resume => done(device.resume()),
        Request::SaveState { version } => match device.save_state(version) {
            RResult::ROk(s) => Reply::State { version: s.version, bytes: s.bytes.into_vec() },
            RResult::RErr(e) => failed(e),
        },
        Request::LoadState { version, bytes } => {
            done(device.load_state(StateBlob { version, bytes: bytes.into() }))
        }
        Request::Reset => done(device.reset()),
        Request::ConfigRead { offset, len } => {
            let mut data = vec![0xffu8; len.min(4) as usize];
            if let Some(f) = pci {
                f.config_read(offset, RSliceMut::from_mut_slice(&mut data));
            }
            Reply::Bytes(data)
        }
        Request::ConfigWrite { offset, data } => match pci {
            Some(f) => done(f.config_write(offset, RSlice::from_slice(&data))),
            None => failed(PluginError::other("the device has no PCI function")),
        },
        Request::Bars => {
            Reply::Bars(pci.map(|f| f.bars().iter().map(Bar::from).collect()).unwrap_or_default())
        }
    }
}

/// The device's host services, in the device process: each call goes to
/// ferry over the host socket (one at a time); guest memory is local.
#[derive(Clone)]
struct RemoteHost {
    socket: Arc<Mutex<Channel>>,
    memory: GuestMemoryMap,
    status: Arc<StatusPost>,
}

/// How often at most a device's status line goes to ferry.
const STATUS_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// The device's latest status line, on its way to ferry. A device may
/// publish one per request (virtio-blk does) and only the latest matters
/// (`ferry ctl info` shows it), so a thread of its own sends the latest at
/// most every [`STATUS_EVERY`] instead of one message per line: in-process
/// a line is a store, and isolated it must not cost a wake-up of ferry's
/// host thread per disk request.
struct StatusPost {
    latest: Mutex<Option<String>>,
    changed: std::sync::Condvar,
}

impl StatusPost {
    fn start(socket: Arc<Mutex<Channel>>) -> std::io::Result<Arc<StatusPost>> {
        let post = Arc::new(StatusPost { latest: Mutex::new(None), changed: std::sync::Condvar::new() });
        let mine = post.clone();
        std::thread::Builder::new().name("status".into()).spawn(move || loop {
            let line = {
                let mut latest = mine.latest.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    match latest.take() {
                        Some(line) => break line,
                        None => latest = mine.changed.wait(latest).unwrap_or_else(|e| e.into_inner()),
                    }
                }
            };
            let sent = socket.lock().unwrap_or_else(|e| e.into_inner()).send(
                &encode(&HostCall::SetStatus(line)),
                &[],
                None,
            );
            if sent.is_err() {
                return; // ferry went away
            }
            std::thread::sleep(STATUS_EVERY);
        })?;
        Ok(post)
    }

    fn set(&self, line: String) {
        let waiting = self.latest.lock().unwrap_or_else(|e| e.into_inner()).replace(line).is_none();
        // A line still there has not been taken yet: the thread takes the
        // newer one without waiting, so only a first line needs a wake-up
        // (a system call), not every line.
        if waiting {
            self.changed.notify_one();
        }
    }
}

impl RemoteHost {
    fn call(&self, call: &HostCall, fd: Option<i32>) -> RResult<(), PluginError> {
        let fds: Vec<i32> = fd.into_iter().collect();
        let socket = self.socket.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = socket.send(&encode(call), &fds, None) {
            return RResult::RErr(PluginError::new(ErrorKind::IO, format!("ferry went away: {e}")));
        }
        if !call.answered() {
            return RResult::ROk(());
        }
        match socket
            .recv(None)
            .map_err(|source| IsolateError::Wire { what: "host reply", source })
            .and_then(|(b, _)| decode::<HostReply>(&b, "host reply"))
        {
            Ok(HostReply::Done) => RResult::ROk(()),
            Ok(HostReply::Failed { kind, message }) => {
                RResult::RErr(PluginError::new(ErrorKind(kind), message))
            }
            Err(e) => RResult::RErr(PluginError::new(ErrorKind::IO, format!("ferry went away: {e}"))),
        }
    }
}

impl Host for RemoteHost {
    fn set_irq_level(&self, gsi: u32, level: bool) -> RResult<(), PluginError> {
        self.call(&HostCall::SetIrqLevel { gsi, level }, None)
    }

    fn stop_vm(&self, kind: StopKind, status: i32) {
        let _ = self.call(&HostCall::StopVm { kind: kind.0, status }, None);
    }

    fn log(&self, level: LogLevel, message: RStr<'_>) {
        let _ = self.call(&HostCall::Log { level: level.0, message: message.to_string() }, None);
    }

    fn guest_memory(&self) -> GuestMemoryMap {
        self.memory.clone()
    }

    fn msi_route(&self, fd: i32, message: MsiMessage) -> RResult<(), PluginError> {
        self.call(&HostCall::MsiRoute { fd, address: message.address, data: message.data }, Some(fd))
    }

    fn msi_unroute(&self, fd: i32) -> RResult<(), PluginError> {
        self.call(&HostCall::MsiUnroute { fd }, None)
    }

    fn ioeventfd(&self, fd: i32, address: u64) -> RResult<(), PluginError> {
        self.call(&HostCall::Ioeventfd { fd, address }, Some(fd))
    }

    fn remove_ioeventfd(&self, fd: i32, address: u64) -> RResult<(), PluginError> {
        self.call(&HostCall::RemoveIoeventfd { fd, address }, None)
    }

    fn set_status(&self, status: RStr<'_>) -> RResult<(), PluginError> {
        self.status.set(status.to_string());
        RResult::ROk(())
    }

    fn memory_fds(&self) -> RResult<ferry_plugin_api::MemoryFds, PluginError> {
        RResult::RErr(PluginError::unsupported(
            "a device in a device process (--isolate) cannot share guest RAM with another program yet; run it in ferry's process",
        ))
    }
}
