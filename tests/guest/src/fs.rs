//! virtio-fs (device ID 0x105A): a minimal FUSE client, the `fs-*` tokens.
//! One request at a time on request queue 1 (the hiprio queue 0 is left
//! unused): FUSE_INIT once, then `fs-open=<name>` looks a file up in the
//! share's root and opens it, and `fs-read` reads the open file from its
//! start (up to one page) with the handle `fs-open` got, which must still
//! be valid where the guest runs now.
//!
//! A request is one device-readable buffer (fuse_in_header, 40 bytes, then
//! the operation's body) and one device-writable buffer (fuse_out_header,
//! 16 bytes: len, error, unique; then the reply's body).

use crate::dma;
use crate::virtio::{Device, DeviceSpec, InitError, Slot};
use crate::virtq::{Virtq, DESC_NEXT, DESC_WRITE};

const FUSE_LOOKUP: u32 = 1;
const FUSE_OPEN: u32 = 14;
const FUSE_READ: u32 = 15;
const FUSE_INIT: u32 = 26;
const ROOT: u64 = 1;
const IN_HEADER: usize = 40;
const OUT_HEADER: usize = 16;
/// Longest name `fs-open` takes.
pub const MAX_NAME: usize = 200;
/// Most bytes `fs-read` asks for.
const READ_SIZE: u32 = dma::PAGE as u32;
const TIMEOUT_MS: u64 = 2000;
/// MSI-X vector 0x44.
const IRQ: usize = 4;
const REQUEST_QUEUE: u16 = 1;

pub const SPEC: DeviceSpec = DeviceSpec { name: "FS", device_id: 0x105A, optional_features: 0 };

pub struct Fs {
    dev: Device,
    q: Virtq,
    unique: u64,
    /// The file `fs-open` opened: (node id, file handle).
    open: Option<(u64, u64)>,
}

fn init() -> Result<Fs, InitError> {
    let mut dev = Device::probe(&SPEC)?;
    // MSI-X entry 1: entry 0 would be the hiprio queue's.
    let q = dev.queue(REQUEST_QUEUE, dma::QUEUE_FS, 1, IRQ)?;
    dev.driver_ok();
    let mut fs = Fs { dev, q, unique: 0, open: None };
    let mut body = [0u8; 64];
    body[0..4].copy_from_slice(&7u32.to_le_bytes()); // major
    body[4..8].copy_from_slice(&31u32.to_le_bytes()); // minor
    let reply = fs.request(FUSE_INIT, 0, &body, 64).ok_or("init-timeout")?;
    let r = fs.reply(reply);
    if r.error != 0 || r.len < 8 {
        crate::println!("FS ERROR op=INIT error={}", r.error);
        fs.dev.reset();
        return Err(InitError::Failed("init-refused"));
    }
    crate::println!("FS INIT major={} minor={}", r.u32_at(0), r.u32_at(4));
    Ok(fs)
}

/// A reply: its error (0 or a negative errno) and body length.
struct Reply {
    error: i32,
    len: usize,
}

impl Reply {
    fn bytes(&self) -> &'static [u8] {
        // SAFETY: the device has returned the out buffer (one request at a
        // time), and `len` is capped at its size.
        unsafe { &dma::bytes(dma::FS_OUT, OUT_HEADER + self.len)[OUT_HEADER..] }
    }

    fn u32_at(&self, at: usize) -> u32 {
        self.bytes().get(at..at + 4).map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64_at(&self, at: usize) -> u64 {
        self.bytes().get(at..at + 8).map_or(0, |b| {
            let mut w = [0u8; 8];
            w.copy_from_slice(b);
            u64::from_le_bytes(w)
        })
    }
}

impl Fs {
    /// Sends `opcode` on `nodeid` with `body`, room for `out` reply bytes;
    /// the used length, or None on timeout.
    fn request(&mut self, opcode: u32, nodeid: u64, body: &[u8], out: usize) -> Option<usize> {
        self.unique += 1;
        let len = IN_HEADER + body.len();
        assert!(len <= dma::FS_IN_LEN && OUT_HEADER + out <= dma::FS_OUT_LEN);
        // SAFETY: both buffers belong to the driver: requests go one at a
        // time and the last one was returned (or the device reset).
        unsafe {
            let h = dma::bytes(dma::FS_IN, len);
            h[0..4].copy_from_slice(&(len as u32).to_le_bytes());
            h[4..8].copy_from_slice(&opcode.to_le_bytes());
            h[8..16].copy_from_slice(&self.unique.to_le_bytes());
            h[16..24].copy_from_slice(&nodeid.to_le_bytes());
            h[24..40].fill(0); // uid, gid, pid, extlen, padding
            h[IN_HEADER..].copy_from_slice(body);
            dma::bytes(dma::FS_OUT, OUT_HEADER + out).fill(0);
        }
        let q = &mut self.q;
        q.set_desc(0, dma::addr(dma::FS_IN), len as u32, DESC_NEXT);
        q.set_desc(1, dma::addr(dma::FS_OUT), (OUT_HEADER + out) as u32, DESC_WRITE);
        let before = q.irqs();
        q.push(0);
        q.kick();
        if !q.wait_idle(TIMEOUT_MS, before) {
            return None;
        }
        q.pop().map(|(_, used)| used as usize)
    }

    /// The reply to the last request (`used` bytes written).
    fn reply(&self, used: usize) -> Reply {
        // SAFETY: as in `Reply::bytes`: the device returned the buffer.
        let h = unsafe { dma::bytes(dma::FS_OUT, OUT_HEADER) };
        let error = i32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        let said = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let len = said.min(used).min(dma::FS_OUT_LEN).saturating_sub(OUT_HEADER);
        Reply { error, len }
    }

    /// One operation; its reply, or a line saying why not.
    fn call(&mut self, name: &str, opcode: u32, nodeid: u64, body: &[u8], out: usize) -> Option<Reply> {
        let Some(used) = self.request(opcode, nodeid, body, out) else {
            crate::println!("FS TIMEOUT op={}", name);
            return None;
        };
        let r = self.reply(used);
        if r.error != 0 {
            crate::println!("FS ERROR op={} error={}", name, r.error);
            return None;
        }
        Some(r)
    }
}

fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193))
}

/// `fs-open=<name>`: LOOKUP in the root, then OPEN read-only; prints
/// `FS OPEN name=<name> nodeid=<n> fh=<h>`.
pub fn open(slot: &mut Slot<Fs>, name: &str) {
    let Some(fs) = slot.get(SPEC.name, init) else { return };
    let mut body = [0u8; MAX_NAME + 1];
    let n = name.len().min(MAX_NAME);
    body[..n].copy_from_slice(&name.as_bytes()[..n]);
    let Some(entry) = fs.call("LOOKUP", FUSE_LOOKUP, ROOT, &body[..n + 1], 128) else { return };
    let nodeid = entry.u64_at(0);
    let Some(opened) = fs.call("OPEN", FUSE_OPEN, nodeid, &[0u8; 8], 16) else { return };
    let fh = opened.u64_at(0);
    fs.open = Some((nodeid, fh));
    crate::println!("FS OPEN name={} nodeid={} fh={}", name, nodeid, fh);
}

/// `fs-read`: READ the open file from offset 0; prints
/// `FS READ bytes=<n> fnv=<hash> text=<its first line>`.
pub fn read(slot: &mut Slot<Fs>) {
    let Some(fs) = slot.get(SPEC.name, init) else { return };
    let Some((nodeid, fh)) = fs.open else {
        crate::println!("FS ERROR op=READ error=no-open-file");
        return;
    };
    let mut body = [0u8; 40];
    body[0..8].copy_from_slice(&fh.to_le_bytes());
    body[16..20].copy_from_slice(&READ_SIZE.to_le_bytes());
    let Some(data) = fs.call("READ", FUSE_READ, nodeid, &body, READ_SIZE as usize) else { return };
    let bytes = data.bytes();
    let line = bytes.split(|&b| b == b'\n').next().unwrap_or(&[]);
    let text = core::str::from_utf8(&line[..line.len().min(60)]).unwrap_or("?");
    crate::println!("FS READ bytes={} fnv={:08x} text={}", bytes.len(), fnv1a(bytes), text);
}
