//! A backend's identity: what it offers, read with the messages a frontend
//! may send before it owns the device (GET_FEATURES, GET/SET_PROTOCOL_FEATURES,
//! GET_QUEUE_NUM, GET_CONFIG), in the order backends expect. Nothing is set
//! up: no owner, no memory table, no ring. The probe has a deadline: the
//! vhost crate retries a read that times out, so a watchdog shuts the
//! socket down instead, and a backend that does not answer is named, never
//! waited on for ever. A reply the protocol does not allow is an error
//! naming the step.

use std::{os::unix::net::UnixStream, path::Path, time::Duration};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vhost::{
    vhost_user::{message::VhostUserConfigFlags, Frontend, VhostUserFrontend, VhostUserProtocolFeatures},
    VhostBackend,
};

use crate::features;

/// How long a backend may take to answer the whole probe.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// VHOST_USER_F_PROTOCOL_FEATURES: the backend takes GET_PROTOCOL_FEATURES.
pub(crate) const PROTOCOL_FEATURES_BIT: u64 = 1 << 30;

/// VHOST_F_LOG_ALL: the backend logs its writes to guest memory.
pub(crate) const LOG_ALL_BIT: u64 = 1 << 26;

/// Which virtio device a backend serves (the protocol does not say: the
/// operator does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// virtio-blk (qemu-storage-daemon's vhost-user-blk export).
    Blk,
    /// virtio-fs (virtiofsd).
    Fs,
}

impl Device {
    /// From its name on the command line.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "blk" => Some(Device::Blk),
            "fs" => Some(Device::Fs),
            _ => None,
        }
    }

    /// How much configuration space to read: the part every version of
    /// the device's configuration structure has (virtio-blk up to
    /// write_zeroes_may_unmap, virtio-fs its tag and queue count).
    fn config_size(self) -> u32 {
        match self {
            Device::Blk => 60,
            Device::Fs => 40,
        }
    }
}

/// What a backend offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendIdentity {
    /// The device the operator said it serves, if said.
    pub device: Option<Device>,
    /// Its virtio feature bits (GET_FEATURES).
    pub features: u64,
    /// Their names.
    pub feature_names: Vec<String>,
    /// Its protocol feature bits (0 if it does not offer bit 30).
    pub protocol_features: u64,
    /// Their names.
    pub protocol_names: Vec<String>,
    /// The most queues it serves (GET_QUEUE_NUM, with protocol feature MQ).
    pub queues: Option<u64>,
    /// Its configuration space (GET_CONFIG, with protocol feature CONFIG,
    /// for a device said).
    pub config: Option<Vec<u8>>,
}

impl BackendIdentity {
    /// Does it offer protocol feature `bit`?
    pub fn has_protocol(&self, feature: VhostUserProtocolFeatures) -> bool {
        self.protocol_features & feature.bits() == feature.bits()
    }

    /// What its configuration says, for people: a disk's capacity, a
    /// share's tag.
    pub fn summary(&self) -> Option<String> {
        let config = self.config.as_ref()?;
        match self.device? {
            Device::Blk => {
                let sectors = u64::from_le_bytes(config.get(0..8)?.try_into().ok()?);
                Some(format!("capacity {sectors} sectors ({} bytes)", sectors.saturating_mul(512)))
            }
            Device::Fs => {
                let tag = config.get(0..36)?;
                let end = tag.iter().position(|&b| b == 0).unwrap_or(tag.len());
                Some(format!("tag {:?}", String::from_utf8_lossy(&tag[..end])))
            }
        }
    }

    /// One line per fact, for people.
    pub fn lines(&self) -> Vec<String> {
        let mut out = vec![
            format!("features {:#x}: {}", self.features, self.feature_names.join(" ")),
            format!("protocol features {:#x}: {}", self.protocol_features, self.protocol_names.join(" ")),
        ];
        if let Some(q) = self.queues {
            out.push(format!("queues: up to {q}"));
        }
        if let Some(s) = self.summary() {
            out.push(format!("config: {s}"));
        }
        out
    }
}

/// Why a backend's identity could not be read.
#[derive(Debug, Error)]
pub enum ProbeError {
    /// Nothing to talk to.
    #[error("vhost-user backend {path}: cannot connect: {source}")]
    Connect {
        /// The socket.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The backend failed a step or answered what the protocol does not
    /// allow.
    #[error("vhost-user backend {path}: {step}: {message}")]
    Protocol {
        /// The socket.
        path: String,
        /// The message it was sent.
        step: &'static str,
        /// What went wrong (a timeout reads "no answer within 5 s").
        message: String,
    },
}

/// Read the identity of the backend listening on `path`, naming its bits
/// as a `device` backend's.
pub fn probe(path: &Path, device: Option<Device>) -> Result<BackendIdentity, ProbeError> {
    let shown = path.display().to_string();
    let connect = |source| ProbeError::Connect { path: shown.clone(), source };
    let stream = UnixStream::connect(path).map_err(connect)?;
    identify(stream, &shown, device, ANSWER_TIMEOUT)
}

/// [`probe`] on a connected stream, within `deadline` (the fuzz target
/// plays the backend on a socket pair).
pub fn identify(
    stream: UnixStream,
    shown: &str,
    device: Option<Device>,
    deadline: Duration,
) -> Result<BackendIdentity, ProbeError> {
    let io = |source| ProbeError::Connect { path: shown.to_string(), source };
    stream.set_write_timeout(Some(deadline)).map_err(io)?;
    let guard = stream.try_clone().map_err(io)?;
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        let late = finished.recv_timeout(deadline) == Err(std::sync::mpsc::RecvTimeoutError::Timeout);
        if late {
            // The pending read returns end-of-file.
            let _ = guard.shutdown(std::net::Shutdown::Both);
        }
        late
    });
    let result = ask(stream, shown, device);
    let _ = done.send(());
    match (result, watchdog.join().unwrap_or(false)) {
        (Err(ProbeError::Protocol { path, step, .. }), true) => Err(ProbeError::Protocol {
            path,
            step,
            message: format!("no answer within {} s", deadline.as_secs_f64()),
        }),
        (result, _) => result,
    }
}

/// The messages of a probe, in order.
fn ask(stream: UnixStream, shown: &str, device: Option<Device>) -> Result<BackendIdentity, ProbeError> {
    let mut frontend = Frontend::from_stream(stream, 64);
    ask_on(&mut frontend, shown, device, VhostUserProtocolFeatures::all())
}

/// The messages of a probe on `frontend`, acknowledging the protocol
/// features the backend offers among `ack` (a probe acknowledges what is
/// offered; a device only what it uses).
pub(crate) fn ask_on(
    frontend: &mut Frontend,
    shown: &str,
    device: Option<Device>,
    ack: VhostUserProtocolFeatures,
) -> Result<BackendIdentity, ProbeError> {
    let fail = |step: &'static str| {
        move |e: vhost::Error| ProbeError::Protocol { path: shown.to_string(), step, message: e.to_string() }
    };
    let features = frontend.get_features().map_err(fail("GET_FEATURES"))?;
    let mut offered = VhostUserProtocolFeatures::empty();
    let mut protocol = VhostUserProtocolFeatures::empty();
    if features & PROTOCOL_FEATURES_BIT != 0 {
        offered = frontend.get_protocol_features().map_err(fail("GET_PROTOCOL_FEATURES"))?;
        protocol = offered & ack;
        frontend.set_protocol_features(protocol).map_err(fail("SET_PROTOCOL_FEATURES"))?;
    }
    let queues = match protocol.contains(VhostUserProtocolFeatures::MQ) {
        true => Some(frontend.get_queue_num().map_err(fail("GET_QUEUE_NUM"))?),
        false => None,
    };
    let config = match (device, protocol.contains(VhostUserProtocolFeatures::CONFIG)) {
        (Some(d), true) => {
            let size = d.config_size();
            let buf = vec![0u8; size as usize];
            let (_, bytes) = frontend
                .get_config(0, size, VhostUserConfigFlags::empty(), &buf)
                .map_err(fail("GET_CONFIG"))?;
            Some(bytes)
        }
        _ => None,
    };
    Ok(BackendIdentity {
        device,
        features,
        feature_names: features::virtio_names(features, device),
        protocol_features: offered.bits(),
        protocol_names: features::protocol_names(offered.bits()),
        queues,
        config,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    const SHORT: Duration = Duration::from_millis(300);

    /// A fake backend on the other end of a socket pair: answers each
    /// request with `reply(request code, its header flags)`.
    fn fake(reply: impl Fn(u32) -> Vec<u8> + Send + 'static) -> UnixStream {
        let (ours, theirs) = UnixStream::pair().expect("socket pair");
        std::thread::spawn(move || {
            let mut theirs = theirs;
            loop {
                let mut hdr = [0u8; 12];
                if theirs.read_exact(&mut hdr).is_err() {
                    return;
                }
                let code = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
                let size = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize;
                let mut body = vec![0u8; size];
                if theirs.read_exact(&mut body).is_err() {
                    return;
                }
                let answer = reply(code);
                if answer.is_empty() {
                    // Silent, the socket held open.
                    std::thread::sleep(Duration::from_secs(2));
                    return;
                }
                if theirs.write_all(&answer).is_err() {
                    return;
                }
            }
        });
        ours
    }

    /// A reply header for request `code` with a body of `body`.
    fn reply(code: u32, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&code.to_le_bytes());
        out.extend_from_slice(&(0x1u32 | 0x4).to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn a_backend_without_protocol_features_gives_its_features_only() {
        let s = fake(|code| reply(code, &((1u64 << 32) | (1 << 9)).to_le_bytes()));
        let id = identify(s, "fake", Some(Device::Blk), SHORT).unwrap();
        assert_eq!(id.feature_names, ["FLUSH", "VERSION_1"]);
        assert_eq!((id.protocol_features, id.queues, id.config.is_none()), (0, None, true));
    }

    #[test]
    fn silence_garbage_and_wrong_replies_are_errors_naming_the_step() {
        let silent = fake(|_| Vec::new());
        let e = identify(silent, "fake", None, SHORT).unwrap_err().to_string();
        assert_eq!(e, "vhost-user backend fake: GET_FEATURES: no answer within 0.3 s");

        // A backend that hangs up.
        let (ours, theirs) = UnixStream::pair().expect("socket pair");
        drop(theirs);
        let e = identify(ours, "fake", None, SHORT).unwrap_err().to_string();
        assert!(e.starts_with("vhost-user backend fake: GET_FEATURES: "), "{e}");

        let garbage = fake(|_| vec![0xff; 40]);
        let e = identify(garbage, "fake", None, SHORT).unwrap_err().to_string();
        assert!(e.contains("GET_FEATURES"), "{e}");

        // The reply to another request than the one sent.
        let crossed = fake(|code| reply(code + 1, &0u64.to_le_bytes()));
        assert!(identify(crossed, "fake", None, SHORT).is_err());

        // A body too short for the u64 it should hold.
        let short = fake(|code| reply(code, &[1, 2, 3]));
        assert!(identify(short, "fake", None, SHORT).is_err());
    }
}
