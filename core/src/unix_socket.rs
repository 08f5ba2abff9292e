//! Claiming a unix socket path for a listener: a socket something still
//! answers on belongs to another process (another ferry's API, a waiting
//! incoming migration) and is never taken over; a socket nothing answers
//! on is stale (its process died) and is removed; anything else at the
//! path is left alone and refused.

use std::{
    io::ErrorKind,
    os::unix::fs::FileTypeExt,
    os::unix::net::{UnixListener, UnixStream},
    path::Path,
};

/// Why a socket path cannot be claimed; each names the option and path.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// The path cannot be looked at.
    #[error("{what} {path}: {source}")]
    Stat {
        /// The option (`--api-socket`).
        what: String,
        /// The path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Something other than a socket is there.
    #[error("{what} {path} exists and is not a socket")]
    NotASocket {
        /// The option.
        what: String,
        /// The path.
        path: String,
    },
    /// Another process answers on it.
    #[error("{what} {path}: another process is listening on it (a running ferry?); not taking it over")]
    InUse {
        /// The option.
        what: String,
        /// The path.
        path: String,
    },
    /// A stale socket that cannot be removed.
    #[error("{what} {path}: cannot remove the stale socket: {source}")]
    Stale {
        /// The option.
        what: String,
        /// The path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Binding the new socket failed.
    #[error("{what} {path}: cannot listen: {source}")]
    Bind {
        /// The option.
        what: String,
        /// The path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Whether it is in use cannot be told.
    #[error("{what} {path}: cannot tell whether it is in use: {source}")]
    Unknown {
        /// The option.
        what: String,
        /// The path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Make `path` free for a new listener, or say why it is not. `what` names
/// the option in messages (`--api-socket`).
pub fn claim(path: &Path, what: &str) -> Result<(), ClaimError> {
    let (what, path_shown) = (what.to_string(), path.display().to_string());
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(ClaimError::Stat { what, path: path_shown, source }),
    };
    if !meta.file_type().is_socket() {
        return Err(ClaimError::NotASocket { what, path: path_shown });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ClaimError::InUse { what, path: path_shown }),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path).map_err(|source| ClaimError::Stale { what, path: path_shown, source })
        }
        Err(source) => Err(ClaimError::Unknown { what, path: path_shown, source }),
    }
}

/// Who may talk to ferry's sockets (the control API, a `unix:` migration):
/// root, ferry's own user, and the uids `--api-allow-uid` names. Checked
/// on every connection with `SO_PEERCRED`; the sockets are created
/// owner-only besides (mode 0600).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peers {
    /// Further uids allowed.
    pub allowed: Vec<u32>,
}

/// A peer the socket turned away.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// Its credentials could not be read.
    #[error("cannot read the peer's credentials: {0}")]
    Credentials(std::io::Error),
    /// Its uid is not allowed.
    #[error("uid {uid} (pid {pid}) is not root, ferry's own uid or one --api-allow-uid names")]
    NotAllowed {
        /// Its uid.
        uid: u32,
        /// Its pid.
        pid: i32,
    },
}

impl Peers {
    /// Check the process at the other end of `stream`.
    pub fn check(&self, stream: &UnixStream) -> Result<(), PeerError> {
        let (uid, pid) = peer_credentials(stream).map_err(PeerError::Credentials)?;
        // SAFETY: geteuid has no preconditions.
        let own = unsafe { libc::geteuid() };
        if uid == 0 || uid == own || self.allowed.contains(&uid) {
            return Ok(());
        }
        Err(PeerError::NotAllowed { uid, pid })
    }
}

/// The uid and pid of the process at the other end (`SO_PEERCRED`).
fn peer_credentials(stream: &UnixStream) -> std::io::Result<(u32, i32)> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a ucred
    // of that size, for a socket this process owns.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((cred.uid, cred.pid))
}

/// Claim `path` and listen on it, the socket file owner-only (0600) from
/// the moment it exists: created under a umask that keeps group and
/// others out.
pub fn bind_owner_only(path: &Path, what: &str) -> Result<UnixListener, ClaimError> {
    claim(path, what)?;
    static UMASK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = UMASK.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: umask has no preconditions; the previous mask is put back
    // right after the bind (the lock keeps two binds from interleaving).
    let previous = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(previous) };
    bound.map_err(|source| ClaimError::Bind {
        what: what.to_string(),
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_socket_is_refused_and_a_stale_one_replaced() {
        let dir = std::env::temp_dir().join(format!("ferry-claim-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let live = dir.join("live.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&live).unwrap();
        let err = claim(&live, "--api-socket").unwrap_err().to_string();
        assert!(
            err.ends_with("another process is listening on it (a running ferry?); not taking it over"),
            "{err}"
        );
        assert!(live.exists());

        let stale = dir.join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        assert!(stale.exists(), "a dropped listener leaves its file");
        claim(&stale, "--api-socket").unwrap();
        assert!(!stale.exists());

        let file = dir.join("file");
        std::fs::write(&file, b"x").unwrap();
        assert_eq!(
            claim(&file, "--api-socket").unwrap_err().to_string(),
            format!("--api-socket {} exists and is not a socket", file.display())
        );
        claim(&dir.join("absent"), "--api-socket").unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
