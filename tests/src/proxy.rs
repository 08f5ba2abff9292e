//! A TCP proxy between a migration's source and destination that injects
//! one fault into the stream. It reads and writes messages with ferry's
//! own stream module (`ferry::migration::stream`), so it checks every
//! message as the two ends do and frames a changed one the same way.

use std::{
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

pub use ferry::migration::stream::Kind;
use ferry::migration::stream::{receive, send, SectionHeader};

/// What a [`MigrationProxy`] does to the migration stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Cut both connections when the source sends a message of this kind
    /// (the `nth` one, counting from 1).
    CutAt {
        /// The kind.
        kind: Kind,
        /// Which one of that kind.
        nth: usize,
    },
    /// Cut when the destination sends this kind (e.g. RESUMED).
    CutReply {
        /// The kind.
        kind: Kind,
    },
    /// Replace the payload of the source's DEVICE message for this device
    /// id with bytes that are not a state (framed and checksummed right).
    SpoilDevice(&'static str),
    /// Cut both connections at the source's `nth` PAGES message after the
    /// destination's RESUMED passed (post-copy: the guest runs on the
    /// destination, part of its memory still on the source).
    CutInPostcopy {
        /// Which PAGES message after RESUMED.
        nth: usize,
    },
}

/// A proxy for one migration connection.
pub struct MigrationProxy {
    port: u16,
    /// Set once the fault was injected.
    pub fired: Arc<AtomicBool>,
}

/// Forward messages from `from` to `to` until `act` says to cut (true)
/// or the stream ends; `act` may change a payload.
fn forward(
    mut from: TcpStream,
    mut to: TcpStream,
    cut: &(TcpStream, TcpStream),
    mut act: impl FnMut(&SectionHeader, &mut Vec<u8>) -> bool,
) {
    let mut index = 0;
    while let Ok((h, mut payload)) = receive(&mut from, index) {
        index += 1;
        if act(&h, &mut payload) {
            let _ = cut.0.shutdown(Shutdown::Both);
            let _ = cut.1.shutdown(Shutdown::Both);
            return;
        }
        if send(&mut to, h.kind, &h.id, h.version, &payload).is_err() {
            return;
        }
    }
}

impl MigrationProxy {
    /// Listen on a free loopback port and forward one connection to `target`.
    pub fn start(target: SocketAddr, fault: Fault) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy listen");
        let port = listener.local_addr().expect("addr").port();
        let fired = Arc::new(AtomicBool::new(false));
        let fired_here = fired.clone();
        std::thread::spawn(move || {
            let Ok((src, _)) = listener.accept() else { return };
            let Ok(dst) = TcpStream::connect(target) else { return };
            let clone = |s: &TcpStream| s.try_clone().expect("clone a socket");
            let cut = Arc::new((clone(&src), clone(&dst)));
            // Destination -> source.
            let resumed = Arc::new(AtomicBool::new(false));
            let (back_from, back_to, back_cut, back_fired, back_resumed) =
                (clone(&dst), clone(&src), cut.clone(), fired_here.clone(), resumed.clone());
            std::thread::spawn(move || {
                forward(back_from, back_to, &back_cut, |h, _| {
                    if h.kind == Kind::Resumed {
                        back_resumed.store(true, Ordering::SeqCst);
                    }
                    let hit = fault == Fault::CutReply { kind: h.kind };
                    if hit {
                        back_fired.store(true, Ordering::SeqCst);
                    }
                    hit
                })
            });
            // Source -> destination.
            let mut seen = std::collections::HashMap::new();
            let mut after_resumed = 0usize;
            forward(src, dst, &cut, |h, payload| {
                let n = seen.entry(h.kind.name()).or_insert(0usize);
                *n += 1;
                if h.kind == Kind::Pages && resumed.load(Ordering::SeqCst) {
                    after_resumed += 1;
                }
                match fault {
                    Fault::CutInPostcopy { nth } if h.kind == Kind::Pages && after_resumed == nth => {
                        fired_here.store(true, Ordering::SeqCst);
                        true
                    }
                    Fault::CutAt { kind, nth } if h.kind == kind && *n == nth => {
                        fired_here.store(true, Ordering::SeqCst);
                        true
                    }
                    Fault::SpoilDevice(dev) if h.kind == Kind::Device && h.id == dev => {
                        *payload = vec![0xff, 0x00, 0x13];
                        fired_here.store(true, Ordering::SeqCst);
                        false
                    }
                    _ => false,
                }
            });
        });
        MigrationProxy { port, fired }
    }

    /// The port the source should migrate to.
    pub fn port(&self) -> u16 {
        self.port
    }
}
