//! Claiming a unix socket path for a listener: a socket something still
//! answers on belongs to another process (another ferry's API, a waiting
//! incoming migration) and is never taken over; a socket nothing answers
//! on is stale (its process died) and is removed; anything else at the
//! path is left alone and refused.

use std::{io::ErrorKind, os::unix::fs::FileTypeExt, os::unix::net::UnixStream, path::Path};

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
