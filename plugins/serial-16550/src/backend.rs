//! Where the UART's bytes go and come from.

use std::{
    fs::{File, OpenOptions},
    io::{self, Read, Write},
    os::unix::{fs::FileTypeExt, net::UnixListener, net::UnixStream},
    path::Path,
    sync::{Arc, Mutex},
};

/// The output side, handed to vm-superio as its writer.
pub enum Output {
    Stdout,
    File(File),
    /// The currently connected socket client, if any.
    Socket(Arc<Mutex<Option<UnixStream>>>),
    Discard,
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Output::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(buf)?;
                out.flush()?;
            }
            Output::File(f) => f.write_all(buf)?,
            Output::Socket(client) => {
                let mut client = client.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(stream) = client.as_mut() {
                    if stream.write_all(buf).is_err() {
                        // The client went away: drop it, keep the guest running.
                        *client = None;
                    }
                }
            }
            Output::Discard => {}
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Output::Stdout => io::stdout().flush(),
            Output::File(f) => f.flush(),
            _ => Ok(()),
        }
    }
}

/// Open a file for guest output (appending, so nothing is lost).
pub fn open_file(path: &str) -> Result<Output, String> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map(Output::File)
        .map_err(|e| format!("cannot open output file {path}: {e}"))
}

/// Bind a listening unix socket at `path` (replacing a stale socket, never
/// a regular file).
pub fn bind_socket(path: &str) -> Result<UnixListener, String> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        } else {
            return Err(format!("{path} exists and is not a socket"));
        }
    }
    if let Some(dir) = Path::new(path).parent() {
        if !dir.as_os_str().is_empty() && !dir.is_dir() {
            return Err(format!("directory of {path} does not exist"));
        }
    }
    UnixListener::bind(path).map_err(|e| format!("cannot listen on {path}: {e}"))
}

/// A byte source for guest input.
pub type Input = Box<dyn Read + Send>;
