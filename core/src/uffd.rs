//! userfaultfd, for post-copy migration's destination: guest RAM
//! registered in "missing" mode, so the first touch of a page that is not
//! in the memfd (by a vCPU through KVM, or by a device) stops the toucher
//! and queues a fault event here; the page is then filled in place
//! (`copy`, `zero`), which wakes whoever waits on it.
//!
//! The kernel's interface has no Rust binding in libc; the structures and
//! request numbers below are those of `<linux/userfaultfd.h>`. All unsafe
//! code for it sits in this module.

use std::{
    fs::File,
    io,
    os::fd::{AsRawFd, FromRawFd, RawFd},
};

const UFFD_API: u64 = 0xaa;
/// `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
const UFFDIO_API: u64 = 0xc018_aa3f;
/// `_IOWR(0xAA, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: u64 = 0xc020_aa00;
/// `_IOR(0xAA, 0x02, struct uffdio_range)`.
const UFFDIO_WAKE: u64 = 0x8010_aa02;
/// `_IOWR(0xAA, 0x03, struct uffdio_copy)`.
const UFFDIO_COPY: u64 = 0xc028_aa03;
/// `_IOWR(0xAA, 0x04, struct uffdio_zeropage)`.
const UFFDIO_ZEROPAGE: u64 = 0xc020_aa04;
/// `_IO(0xAA, 0x00)` on /dev/userfaultfd: a new userfaultfd.
const USERFAULTFD_IOC_NEW: u64 = 0xaa00;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// Bytes in one `struct uffd_msg`.
const MSG_LEN: usize = 32;
const PAGE: u64 = 4096;

/// The ioctl request type of userfaultfd (for seccomp's argument check).
pub const IOCTL_TYPE: u64 = 0xaa00;

#[repr(C)]
#[derive(Default)]
struct Api {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct Range {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Register {
    range: Range,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct Copy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct ZeroPage {
    range: Range,
    mode: u64,
    zeropage: i64,
}

/// One userfaultfd, non-blocking.
pub struct Userfault {
    fd: File,
}

/// `ioctl(fd, request, arg)`, as an io::Result.
///
/// # Safety
/// `arg` must point to the structure `request` names.
unsafe fn ioctl<T>(fd: RawFd, request: u64, arg: *mut T) -> io::Result<()> {
    // SAFETY: the caller passes the structure the request expects.
    if unsafe { libc::ioctl(fd, request as _, arg) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Userfault {
    /// A new userfaultfd that also sees faults the kernel takes on the
    /// process's behalf (KVM reading guest memory): the `userfaultfd`
    /// system call, or, where that is refused, `/dev/userfaultfd`.
    pub fn open() -> io::Result<Self> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: a plain system call; it returns a new descriptor or -1.
        let mut fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) } as RawFd;
        if fd < 0 {
            let dev = std::fs::OpenOptions::new().read(true).write(true).open("/dev/userfaultfd")?;
            // SAFETY: the device's one request; its argument is the flags.
            fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: a descriptor just created that nothing else owns.
        let fd = unsafe { File::from_raw_fd(fd) };
        let mut api = Api { api: UFFD_API, ..Api::default() };
        // SAFETY: UFFDIO_API takes a struct uffdio_api.
        unsafe { ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api)? };
        Ok(Userfault { fd })
    }

    /// Catch first touches of missing pages in `len` bytes at host
    /// address `addr` (a shared mapping of a memfd).
    pub fn register(&self, addr: u64, len: u64) -> io::Result<()> {
        let mut reg =
            Register { range: Range { start: addr, len }, mode: UFFDIO_REGISTER_MODE_MISSING, ioctls: 0 };
        // SAFETY: UFFDIO_REGISTER takes a struct uffdio_register; the range
        // is a mapping the caller owns.
        unsafe { ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) }
    }

    /// Wake whoever waits on `len` bytes at `addr`.
    pub fn wake(&self, addr: u64, len: u64) -> io::Result<()> {
        let mut range = Range { start: addr, len };
        // SAFETY: UFFDIO_WAKE takes a struct uffdio_range.
        unsafe { ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE, &mut range) }
    }

    /// Fill the missing pages at `dst` with `data` (whole pages) and wake
    /// their waiters. Pages already present are left as they are (the
    /// guest may have written them since) and their waiters woken.
    /// Returns the pages filled.
    pub fn copy(&self, dst: u64, data: &[u8]) -> io::Result<u64> {
        self.fill(dst, data.len() as u64, |at, done, len| {
            let mut c = Copy { dst: at, src: data.as_ptr() as u64 + done, len, mode: 0, copy: 0 };
            // SAFETY: UFFDIO_COPY takes a struct uffdio_copy; `src` points
            // into `data` for `len` bytes.
            let r = unsafe { ioctl(self.fd.as_raw_fd(), UFFDIO_COPY, &mut c) };
            (r, c.copy)
        })
    }

    /// Fill the missing pages of `len` bytes at `dst` with zeros and wake
    /// their waiters; present pages are left alone. Returns the pages
    /// filled.
    pub fn zero(&self, dst: u64, len: u64) -> io::Result<u64> {
        self.fill(dst, len, |at, _, len| {
            let mut z = ZeroPage { range: Range { start: at, len }, mode: 0, zeropage: 0 };
            // SAFETY: UFFDIO_ZEROPAGE takes a struct uffdio_zeropage.
            let r = unsafe { ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE, &mut z) };
            (r, z.zeropage)
        })
    }

    /// Run `op(at, done, len)` over `len` bytes at `dst` until all is
    /// filled: a partial fill goes on after what was done; a present page
    /// (EEXIST) is woken and stepped over.
    fn fill(
        &self,
        dst: u64,
        len: u64,
        mut op: impl FnMut(u64, u64, u64) -> (io::Result<()>, i64),
    ) -> io::Result<u64> {
        let (mut done, mut filled) = (0u64, 0u64);
        while done < len {
            let (r, count) = op(dst + done, done, len - done);
            match r {
                Ok(()) => return Ok(filled + (len - done) / PAGE),
                Err(e) => match e.raw_os_error() {
                    Some(libc::EAGAIN) if count > 0 => {
                        done += count as u64;
                        filled += count as u64 / PAGE;
                    }
                    Some(libc::EAGAIN) => {}
                    Some(libc::EEXIST) => {
                        self.wake(dst + done, PAGE)?;
                        done += PAGE;
                    }
                    _ => return Err(e),
                },
            }
        }
        Ok(filled)
    }

    /// The page-aligned host addresses of the faults queued now (none if
    /// nothing waits), appended to `out`.
    pub fn faults(&self, out: &mut Vec<u64>) -> io::Result<()> {
        let mut buf = [0u8; MSG_LEN * 64];
        loop {
            // SAFETY: reading into our own buffer of that length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EAGAIN) => Ok(()),
                    _ => Err(e),
                };
            }
            for msg in buf[..n as usize].chunks_exact(MSG_LEN) {
                if msg[0] == UFFD_EVENT_PAGEFAULT {
                    let addr = u64::from_ne_bytes(msg[16..24].try_into().unwrap_or([0; 8]));
                    out.push(addr & !(PAGE - 1));
                }
            }
            if (n as usize) < buf.len() {
                return Ok(());
            }
        }
    }
}

impl AsRawFd for Userfault {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Wait until one of `fds` is readable, or `timeout_ms` passes (-1:
/// forever). Returns, per descriptor, whether it is readable (or closed).
pub fn poll_readable(fds: &[RawFd], timeout_ms: i32) -> io::Result<Vec<bool>> {
    let mut polls: Vec<libc::pollfd> =
        fds.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }).collect();
    loop {
        // SAFETY: `polls` is an array of that many pollfd structures.
        let n = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, timeout_ms) };
        if n >= 0 {
            return Ok(polls.iter().map(|p| p.revents != 0).collect());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;

    /// A thread touching a missing page waits until the page is filled,
    /// and sees what was put there; a page filled twice keeps the first.
    #[test]
    fn a_touch_of_a_missing_page_waits_for_its_fill() {
        let Ok(uffd) = Userfault::open() else {
            eprintln!("SKIPPED: no userfaultfd here (not root, or the kernel refuses it)");
            return;
        };
        let ram = GuestRam::new(16 << 20).expect("ram");
        let host = ram.bytes(0x10_0000, PAGE).expect("page").as_ptr() as u64;
        uffd.register(host, PAGE).expect("register");
        let reader = std::thread::spawn(move || {
            // SAFETY: a page of the mapping `ram` keeps alive until joined.
            unsafe { std::ptr::read_volatile((host + 8) as *const u8) }
        });
        let mut faults = Vec::new();
        for _ in 0..500 {
            uffd.faults(&mut faults).expect("read faults");
            if !faults.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        assert_eq!(faults, [host], "the reader's touch is queued");
        assert!(!reader.is_finished(), "and the reader waits");
        assert_eq!(uffd.copy(host, &[0x5a; PAGE as usize]).expect("copy"), 1);
        assert_eq!(reader.join().expect("reader"), 0x5a, "it reads the page filled in");
        assert_eq!(uffd.copy(host, &[0x11; PAGE as usize]).expect("copy again"), 0, "present: left alone");
        assert_eq!(uffd.zero(host, PAGE).expect("zero"), 0);
        assert_eq!(ram.bytes(0x10_0000, 1), Some(&[0x5a][..]));
    }
}
