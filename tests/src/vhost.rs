//! vhost-user backends for tests, started by the test and killed when
//! dropped: a qemu-storage-daemon exporting an image as vhost-user-blk
//! (Debian's qemu-system-common), a virtiofsd sharing a directory (built
//! from crates.io into ~/.cargo/bin; `.ci/run` installs both), and a proxy
//! that makes a backend look older than it is.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{skip, wait_for_path};

/// The refusal in a migration that `ok` says failed, from its report
/// `text`: the plan's `REFUSED` line (printed for the log), checked to have
/// come before the guest paused (the report has no downtime).
pub fn plan_refusal(ok: bool, text: &str) -> String {
    assert!(!ok, "the migration went through:\n{text}");
    let refusal =
        text.lines().find(|l| l.contains("REFUSED")).unwrap_or_else(|| panic!("no refusal:\n{text}"));
    eprintln!("{refusal}");
    assert!(!text.contains("downtime"), "refused before the guest paused: {text}");
    refusal.to_string()
}

/// A qemu-storage-daemon exporting `image` on `socket`.
pub struct StorageDaemon {
    child: Child,
    socket: PathBuf,
}

impl StorageDaemon {
    /// Start one, waiting until its socket exists; None (said loudly) when
    /// qemu-storage-daemon is not installed. File locking is off, so two
    /// daemons (a migration's two hosts sharing storage) may export one
    /// image.
    pub fn start(image: &Path, socket: &Path) -> Option<Self> {
        let blockdev = format!("driver=file,node-name=disk,filename={},locking=off", image.display());
        let export = format!(
            "type=vhost-user-blk,id=e0,node-name=disk,addr.type=unix,addr.path={},writable=on,num-queues=1",
            socket.display()
        );
        let child = Command::new("qemu-storage-daemon")
            .args(["--blockdev", &blockdev, "--export", &export])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        match child {
            Ok(child) => {
                let d = StorageDaemon { child, socket: socket.to_path_buf() };
                assert!(wait_for_path(socket, Duration::from_secs(30)), "qemu-storage-daemon made no socket");
                Some(d)
            }
            Err(e) => {
                skip(
                    "vhost-user tests",
                    &format!("cannot start qemu-storage-daemon ({e}): install qemu-system-common"),
                );
                None
            }
        }
    }

    /// Its socket.
    pub fn socket(&self) -> String {
        self.socket.display().to_string()
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kill it now (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A virtiofsd sharing a directory on a socket.
pub struct Virtiofsd {
    child: Child,
    socket: PathBuf,
}

/// virtiofsd, where `.ci/run` puts it or on the PATH.
fn virtiofsd_bin() -> PathBuf {
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    let installed = home.join(".cargo/bin/virtiofsd");
    if installed.exists() {
        installed
    } else {
        PathBuf::from("virtiofsd")
    }
}

impl Virtiofsd {
    /// Share `dir` on `socket` with tag `share`; None (said loudly) when
    /// virtiofsd is not installed. It serves one frontend and exits when
    /// that one leaves.
    pub fn start(dir: &Path, socket: &Path) -> Option<Self> {
        let child = Command::new(virtiofsd_bin())
            .arg(format!("--socket-path={}", socket.display()))
            .arg("--shared-dir")
            .arg(dir)
            .args(["--tag", "share"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        match child {
            Ok(child) => {
                let d = Virtiofsd { child, socket: socket.to_path_buf() };
                assert!(wait_for_path(socket, Duration::from_secs(30)), "virtiofsd made no socket");
                Some(d)
            }
            Err(e) => {
                skip(
                    "vhost-user-fs tests",
                    &format!("cannot start virtiofsd ({e}): `cargo install virtiofsd` (needs libseccomp-dev, libcap-ng-dev)"),
                );
                None
            }
        }
    }

    /// Its socket.
    pub fn socket(&self) -> String {
        self.socket.display().to_string()
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A vhost-user backend that offers less than the one behind it: it
/// passes every message (and the file descriptors with it) between a
/// frontend and `upstream`, and clears `hidden` from the feature bits
/// GET_FEATURES answers and `hidden_protocol` from those
/// GET_PROTOCOL_FEATURES answers, as an older backend would offer them.
/// One thread per connection; it stops listening when dropped.
pub struct FeatureMask {
    socket: PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FeatureMask {
    /// Listen on `socket`, forwarding to `upstream` with `hidden` cleared.
    pub fn start(upstream: &Path, socket: &Path, hidden: u64) -> Self {
        Self::start_with(upstream, socket, hidden, 0)
    }

    /// As [`FeatureMask::start`], hiding protocol features too.
    pub fn start_with(upstream: &Path, socket: &Path, hidden: u64, hidden_protocol: u64) -> Self {
        use std::os::unix::net::{UnixListener, UnixStream};
        let listener = UnixListener::bind(socket).expect("listen for the masking backend");
        listener.set_nonblocking(true).expect("non-blocking listener");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (upstream, flag) = (upstream.to_path_buf(), stop.clone());
        std::thread::spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                match listener.accept() {
                    Ok((front, _)) => {
                        let _ = front.set_nonblocking(false);
                        let Ok(back) = UnixStream::connect(&upstream) else { return };
                        std::thread::spawn(move || mask_connection(front, back, hidden, hidden_protocol));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        FeatureMask { socket: socket.to_path_buf(), stop }
    }

    /// Its socket.
    pub fn socket(&self) -> String {
        self.socket.display().to_string()
    }
}

impl Drop for FeatureMask {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// One vhost-user message: the 12-byte header, the body, the descriptors.
fn read_message(from: &std::os::unix::net::UnixStream) -> Option<(Vec<u8>, Vec<std::os::fd::RawFd>)> {
    use std::io::Read;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let mut header = [0u8; 12];
    let mut fds = [-1; 8];
    let mut iov = [libc::iovec { iov_base: header.as_mut_ptr().cast(), iov_len: header.len() }];
    // SAFETY: the iovec points at `header`, borrowed mutably here and
    // alive for the call; arbitrary bytes are fine in it.
    let (n, nfds) = unsafe { from.recv_with_fds(&mut iov, &mut fds) }.ok()?;
    if n == 0 {
        return None;
    }
    let mut got = n;
    while got < 12 {
        let m = (&*from).read(&mut header[got..]).ok()?;
        if m == 0 {
            return None;
        }
        got += m;
    }
    let len = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
    let mut message = header.to_vec();
    message.resize(12 + len.min(1 << 16), 0);
    (&*from).read_exact(&mut message[12..]).ok()?;
    Some((message, fds[..nfds].to_vec()))
}

fn mask_connection(
    front: std::os::unix::net::UnixStream,
    back: std::os::unix::net::UnixStream,
    hidden: u64,
    hidden_protocol: u64,
) {
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    const GET_FEATURES: u32 = 1;
    const GET_PROTOCOL_FEATURES: u32 = 15;
    const REPLY: u32 = 0x4;
    let (front2, back2) = match (front.try_clone(), back.try_clone()) {
        (Ok(f), Ok(b)) => (f, b),
        _ => return,
    };
    // Backend to frontend: replies, GET_FEATURES's masked.
    std::thread::spawn(move || {
        while let Some((mut m, fds)) = read_message(&back2) {
            let request = u32::from_le_bytes([m[0], m[1], m[2], m[3]]);
            let flags = u32::from_le_bytes([m[4], m[5], m[6], m[7]]);
            let mask = match request {
                GET_FEATURES => hidden,
                GET_PROTOCOL_FEATURES => hidden_protocol,
                _ => 0,
            };
            if mask != 0 && flags & REPLY != 0 && m.len() == 20 {
                let v = u64::from_le_bytes(m[12..20].try_into().unwrap_or([0; 8])) & !mask;
                m[12..20].copy_from_slice(&v.to_le_bytes());
            }
            if front2.send_with_fds(&[&m[..]], &fds).is_err() {
                break;
            }
            fds.iter().for_each(|&fd| unsafe_close(fd));
        }
        let _ = front2.shutdown(std::net::Shutdown::Both);
    });
    // Frontend to backend: everything as it comes.
    while let Some((m, fds)) = read_message(&front) {
        if back.send_with_fds(&[&m[..]], &fds).is_err() {
            break;
        }
        fds.iter().for_each(|&fd| unsafe_close(fd));
    }
    let _ = back.shutdown(std::net::Shutdown::Both);
}

/// Close a descriptor this process received and passed on.
fn unsafe_close(fd: std::os::fd::RawFd) {
    // SAFETY: `fd` came with a message this process received; it owns it
    // and has passed it on, so nothing else uses it.
    unsafe { libc::close(fd) };
}
