//! The socket between ferry and a device process: a `SOCK_SEQPACKET` pair,
//! one message per send, file descriptors attached with `SCM_RIGHTS`.
//!
//! A message larger than one datagram (a big device state) goes as several:
//! each datagram starts with a byte saying whether more follow, and the
//! descriptors ride on the first. Callers keep one message in flight per
//! direction (they hold a lock around send and receive), so datagrams of
//! two messages never interleave.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    time::Instant,
};

/// Payload bytes per datagram (the socket's buffer holds several).
const CHUNK: usize = 60 * 1024;
/// Descriptors one message may carry.
const MAX_FDS: usize = crate::fdpass::MAX_FDS;
/// Largest message accepted (a device state, mostly).
pub const MAX_MESSAGE: usize = 256 << 20;
/// How long a wait polls before it sleeps. Register accesses come in
/// bursts (a driver's set-up, a console line), and where waking a sleeping
/// CPU is dear (a nested KVM: an IPI and a halt exit each way) an answer
/// caught while spinning costs a quarter of one that needs both sides
/// woken: 24 against 101 µs per isolated port read on the development
/// machine (`cargo bench --bench isolation`). A device process idle for
/// longer than this sleeps; a vCPU waiting for an answer was blocked
/// anyway.
const SPIN: std::time::Duration = std::time::Duration::from_micros(50);

/// Why a receive or send did not complete.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The other side closed its end (its process ended).
    #[error("the other side closed the connection")]
    Closed,
    /// Nothing came before the deadline.
    #[error("no answer in time")]
    Timeout,
    /// A datagram or a message that breaks the framing.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The socket failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// One end of the pair.
pub struct Channel {
    fd: OwnedFd,
}

/// A connected pair (close-on-exec; the spawner moves one end into the
/// child by `dup2`).
pub fn pair() -> io::Result<(Channel, Channel)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into `fds` on success.
    let r = unsafe {
        libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr())
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and owned by nobody else.
    Ok(unsafe { (Channel::from_raw(fds[0]), Channel::from_raw(fds[1])) })
}

impl Channel {
    /// Take ownership of descriptor `fd`, a `SOCK_SEQPACKET` socket.
    ///
    /// # Safety
    /// `fd` must be an open descriptor nothing else owns.
    pub unsafe fn from_raw(fd: RawFd) -> Self {
        // SAFETY: as the caller promises.
        Channel { fd: unsafe { OwnedFd::from_raw_fd(fd) } }
    }

    /// The descriptor (for the spawner's `dup2`).
    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Wait until the socket is readable (or writable), up to `deadline`:
    /// polling without sleeping for the first [`SPIN`], then sleeping.
    fn wait(&self, events: libc::c_short, deadline: Option<Instant>) -> Result<(), WireError> {
        let spin_until = Instant::now() + SPIN;
        loop {
            let now = Instant::now();
            let timeout = match deadline {
                Some(d) if d <= now => return Err(WireError::Timeout),
                _ if now < spin_until => 0,
                None => -1,
                Some(d) => i32::try_from((d - now).as_millis().max(1)).unwrap_or(i32::MAX),
            };
            let mut p = libc::pollfd { fd: self.raw(), events, revents: 0 };
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut p, 1, timeout) };
            if r > 0 {
                return Ok(());
            }
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e.into());
                }
            } else if timeout == 0 {
                std::hint::spin_loop();
            }
        }
    }

    /// Send `bytes` with `fds` attached, waiting for room up to `deadline`.
    pub fn send(&self, bytes: &[u8], fds: &[RawFd], deadline: Option<Instant>) -> Result<(), WireError> {
        if fds.len() > MAX_FDS {
            return Err(WireError::Malformed(format!("{} descriptors in one message", fds.len())));
        }
        let mut chunks = bytes.chunks(CHUNK).peekable();
        let mut first = true;
        loop {
            let chunk = chunks.next().unwrap_or(&[]);
            let more = chunks.peek().is_some();
            let flag = [u8::from(more)];
            self.wait(libc::POLLOUT, deadline)?;
            self.send_datagram(&flag, chunk, if first { fds } else { &[] })?;
            first = false;
            if !more {
                return Ok(());
            }
        }
    }

    fn send_datagram(&self, flag: &[u8; 1], chunk: &[u8], fds: &[RawFd]) -> Result<(), WireError> {
        match crate::fdpass::send(self.raw(), &[flag, chunk], fds) {
            Ok(_) => Ok(()),
            Err(e) => match e.raw_os_error() {
                Some(libc::EPIPE) | Some(libc::ECONNRESET) => Err(WireError::Closed),
                _ => Err(e.into()),
            },
        }
    }

    /// Receive one message and the descriptors that came with it, waiting
    /// up to `deadline` for each of its datagrams.
    pub fn recv(&self, deadline: Option<Instant>) -> Result<(Vec<u8>, Vec<OwnedFd>), WireError> {
        let mut message = Vec::new();
        let mut fds = Vec::new();
        loop {
            self.wait(libc::POLLIN, deadline)?;
            let more = self.recv_datagram(&mut message, &mut fds)?;
            if message.len() > MAX_MESSAGE {
                return Err(WireError::Malformed(format!("a message over {MAX_MESSAGE} bytes")));
            }
            if !more {
                return Ok((message, fds));
            }
        }
    }

    /// One datagram, appended to `message`; true if more follow.
    fn recv_datagram(&self, message: &mut Vec<u8>, fds: &mut Vec<OwnedFd>) -> Result<bool, WireError> {
        let mut flag = [0u8; 1];
        let start = message.len();
        message.resize(start + CHUNK, 0);
        let got = crate::fdpass::recv(self.raw(), &mut [&mut flag, &mut message[start..]], fds);
        let got = match got {
            Ok(got) => got,
            Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => return Err(WireError::Closed),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                return Err(WireError::Malformed(e.to_string()))
            }
            Err(e) => return Err(e.into()),
        };
        if got.len == 0 {
            message.truncate(start);
            return Err(WireError::Closed);
        }
        if got.truncated {
            return Err(WireError::Malformed("a datagram was truncated".into()));
        }
        message.truncate(start + got.len - 1);
        Ok(flag[0] != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_and_its_descriptors_arrive_whole() {
        let (a, b) = pair().expect("pair");
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let file = std::fs::File::open("/dev/null").expect("open");
        // Larger than the socket's buffer: the receiver reads meanwhile.
        let reader = std::thread::spawn(move || (b.recv(None).expect("recv"), b));
        a.send(&big, &[file.as_raw_fd()], None).expect("send");
        let ((got, fds), b) = reader.join().expect("reader");
        assert_eq!(got, big);
        assert_eq!(fds.len(), 1);
        a.send(b"", &[], None).expect("send empty");
        assert_eq!(b.recv(None).expect("recv empty").0, b"");
    }

    #[test]
    fn a_closed_peer_and_a_silent_one_are_told_apart() {
        let (a, b) = pair().expect("pair");
        let soon = Instant::now() + std::time::Duration::from_millis(20);
        assert!(matches!(b.recv(Some(soon)), Err(WireError::Timeout)));
        drop(a);
        assert!(matches!(b.recv(None), Err(WireError::Closed)));
        assert!(matches!(b.send(b"x", &[], None), Err(WireError::Closed)));
    }
}
