//! File descriptors over unix sockets (`SCM_RIGHTS`), the one place ferry
//! passes them: device processes' sockets (`isolate/wire.rs`) and the
//! same-host migration's memfd hand-over (`migration/`). Received
//! descriptors are close-on-exec (`MSG_CMSG_CLOEXEC`) and owned at once,
//! so none leaks whatever the message says; a message whose descriptors
//! did not fit is an error, never a silent loss.

use std::{
    io,
    os::fd::{FromRawFd, OwnedFd, RawFd},
};

/// Most descriptors one message carries.
pub const MAX_FDS: usize = 4;

/// What one receive got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Bytes (0: the peer closed).
    pub len: usize,
    /// A datagram larger than the buffers (its rest is lost).
    pub truncated: bool,
}

/// Control-buffer size for `MAX_FDS` descriptors.
fn control_space() -> usize {
    // SAFETY: CMSG_SPACE only computes a size.
    unsafe { libc::CMSG_SPACE((MAX_FDS * size_of::<RawFd>()) as u32) as usize }
}

/// One `sendmsg` of `parts` (gathered) with `fds` attached; returns the
/// bytes sent (on a stream socket possibly fewer than given).
pub fn send(sock: RawFd, parts: &[&[u8]], fds: &[RawFd]) -> io::Result<usize> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} descriptors in one message", fds.len()),
        ));
    }
    let mut iov: Vec<libc::iovec> = parts
        .iter()
        .map(|p| libc::iovec { iov_base: p.as_ptr() as *mut libc::c_void, iov_len: p.len() })
        .collect();
    let mut control = vec![0u8; control_space()];
    // SAFETY: msghdr is plain data; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = iov.len();
    if !fds.is_empty() {
        let bytes = std::mem::size_of_val(fds);
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        // SAFETY: a size computation.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(bytes as u32) } as usize;
        // SAFETY: the control buffer holds one header with MAX_FDS
        // descriptors and `fds.len() <= MAX_FDS`, so the first header and
        // its data lie inside it.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(bytes as u32) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c) as *mut RawFd, fds.len());
        }
    }
    loop {
        // SAFETY: `msg` points at live buffers (iov, control); MSG_NOSIGNAL
        // turns a closed peer into EPIPE instead of SIGPIPE.
        let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// One `recvmsg` into `parts` (scattered); the descriptors that came are
/// appended to `fds`, close-on-exec, before anything else is looked at.
/// Descriptors cut off for want of room are an error.
pub fn recv(sock: RawFd, parts: &mut [&mut [u8]], fds: &mut Vec<OwnedFd>) -> io::Result<Received> {
    let mut iov: Vec<libc::iovec> = parts
        .iter_mut()
        .map(|p| libc::iovec { iov_base: p.as_mut_ptr() as *mut libc::c_void, iov_len: p.len() })
        .collect();
    let space = control_space();
    let mut control = vec![0u8; space];
    // SAFETY: plain data; pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = iov.len();
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space;
    let n = loop {
        // SAFETY: `msg` describes live buffers of the sizes given; received
        // descriptors are close-on-exec.
        let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    // SAFETY: walking the control buffer the kernel filled, with the
    // kernel's own length fields (CMSG_NXTHDR stops at msg_controllen);
    // each descriptor it carries is new to this process and owned here.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c) as *const RawFd;
                let count = ((*c).cmsg_len - libc::CMSG_LEN(0) as usize) / size_of::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "descriptors were cut off (more than expected)",
        ));
    }
    Ok(Received { len: n, truncated: msg.msg_flags & libc::MSG_TRUNC != 0 })
}

/// On a stream socket: all of `bytes`, `fds` attached to the first part.
pub fn send_all(sock: RawFd, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let mut sent = send(sock, &[bytes], fds)?;
    while sent < bytes.len() {
        sent += send(sock, &[&bytes[sent..]], &[])?;
    }
    Ok(())
}

/// On a stream socket: exactly `buf.len()` bytes and the descriptors
/// that came with them.
pub fn recv_exact(sock: RawFd, buf: &mut [u8]) -> io::Result<Vec<OwnedFd>> {
    let mut fds = Vec::new();
    let mut have = 0;
    while have < buf.len() {
        let got = recv(sock, &mut [&mut buf[have..]], &mut fds)?;
        if got.len == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the peer closed mid-message"));
        }
        have += got.len;
    }
    Ok(fds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::{fd::AsRawFd, unix::net::UnixStream};

    #[test]
    fn bytes_and_a_descriptor_cross_a_stream_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = tempfile_fd();
        send_all(a.as_raw_fd(), b"header bytes", &[file.as_raw_fd()]).unwrap();
        let mut buf = [0u8; 12];
        let fds = recv_exact(b.as_raw_fd(), &mut buf).unwrap();
        assert_eq!(&buf, b"header bytes");
        assert_eq!(fds.len(), 1);
        // SAFETY: F_GETFD on a descriptor this test owns.
        let flags = unsafe { libc::fcntl(fds[0].as_raw_fd(), libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC, "received close-on-exec");
    }

    #[test]
    fn too_many_descriptors_are_refused_on_both_ends() {
        let (a, _b) = UnixStream::pair().unwrap();
        let fd = a.as_raw_fd();
        assert!(send(fd, &[b"x"], &[fd; MAX_FDS + 1]).is_err());
    }

    #[test]
    fn a_closed_peer_reads_as_end_of_file() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        let err = recv_exact(b.as_raw_fd(), &mut [0u8; 4]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    fn tempfile_fd() -> OwnedFd {
        // SAFETY: memfd_create with a valid name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"fdpass-test".as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: a new descriptor this test owns.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }
}
