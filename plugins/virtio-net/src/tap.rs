//! A tap interface opened with a virtio-net header in front of every frame
//! (IFF_VNET_HDR, 12-byte header), so frames pass between the guest's
//! queues and the tap without conversion. No offloads are enabled.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Write},
    os::{
        fd::{AsRawFd, RawFd},
        unix::fs::OpenOptionsExt,
    },
};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// The virtio-net header length with VIRTIO_F_VERSION_1 (num_buffers included).
pub const VNET_HDR_LEN: usize = 12;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open tap interface.
pub struct Tap {
    file: File,
}

impl Tap {
    /// Attach to tap `name` (it must exist, or we must be allowed to create it).
    pub fn open(name: &str) -> Result<Self, String> {
        if name.is_empty() || name.len() >= 16 {
            return Err(format!("tap name '{name}' must be 1 to 15 bytes"));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| format!("cannot open /dev/net/tun: {e}"))?;
        let mut req = IfReq { name: [0; 16], flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, _pad: [0; 22] };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        let fd = file.as_raw_fd();
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq` (40 bytes),
        // which `req` is, for the fd we own.
        if unsafe { libc::ioctl(fd, TUNSETIFF, &mut req as *mut IfReq) } < 0 {
            return Err(format!("cannot attach to tap {name}: {}", std::io::Error::last_os_error()));
        }
        let hdr_len: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer.
        if unsafe { libc::ioctl(fd, TUNSETVNETHDRSZ, &hdr_len as *const libc::c_int) } < 0 {
            return Err(format!("tap {name}: cannot set header size: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: TUNSETOFFLOAD takes an unsigned long value, not a pointer.
        if unsafe { libc::ioctl(fd, TUNSETOFFLOAD, 0 as libc::c_ulong) } < 0 {
            return Err(format!("tap {name}: cannot disable offloads: {}", std::io::Error::last_os_error()));
        }
        Ok(Tap { file })
    }

    /// The fd to wait on.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Read one frame (header included); None when nothing is waiting.
    pub fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, String> {
        match self.file.read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(format!("tap read: {e}")),
        }
    }

    /// Send one frame (header included). A full tap queue drops the frame,
    /// as a busy link would.
    pub fn send(&mut self, frame: &[u8]) -> Result<(), String> {
        match self.file.write(frame) {
            Ok(_) => Ok(()),
            // A full queue or a link that is down drops the frame, as a
            // busy or unplugged cable would.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.raw_os_error() == Some(libc::EIO) => {
                Ok(())
            }
            Err(e) => Err(format!("tap write: {e}")),
        }
    }
}
