//! virtio-net (device ID 0x1041): the `net-send` and `net-recv` tokens.
//!
//! Queue 0 receives, queue 1 transmits. With VIRTIO_F_VERSION_1 every
//! buffer starts with the 12-byte struct virtio_net_hdr (flags, gso_type,
//! hdr_len, gso_size, csum_start, csum_offset, num_buffers), all zero on
//! transmit. No offloads and no mergeable buffers are negotiated, so each
//! receive buffer holds one whole frame (12 + 1514 bytes at most).
//! VIRTIO_NET_F_MAC (feature bit 5): device config bytes 0-5 hold the MAC.

use core::fmt;

use crate::virtio::{Device, DeviceSpec, InitError, Slot};
use crate::virtq::{Deadline, Virtq, DESC_WRITE};
use crate::{dma, serial};

const F_MAC: u64 = 1 << 5;
const HDR_LEN: usize = 12;
/// Ethernet frame sent by `net-send` (no FCS): 60 bytes, the minimum.
const FRAME_LEN: usize = 60;
const ETH_HEADER: usize = 14;
pub const ETHERTYPE_FERRY: u16 = 0x88B5;
const PAYLOAD_PREFIX: &[u8] = b"FERRY-FRAME ";
/// Payload bytes shown per received frame.
const PAYLOAD_SHOWN: usize = 32;
/// Source address when the device offers no MAC (locally administered).
const FALLBACK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// Frames `net-send`/`net-recv` accept per token.
pub const MAX_FRAMES: u64 = 1024;
const TIMEOUT_MS: u64 = 2000;
const RECV_TIMEOUT_MS: u64 = 5000;
/// MSI-X vectors 0x41 (receive) and 0x42 (transmit).
const RX_IRQ: usize = 1;
const TX_IRQ: usize = 2;

pub const SPEC: DeviceSpec = DeviceSpec { name: "NET", device_id: 0x1041, optional_features: F_MAC };

pub struct Net {
    dev: Device,
    rx: Virtq,
    tx: Virtq,
    mac: [u8; 6],
    /// Receive buffers in use (descriptor i = buffer i, always posted
    /// except while `net-recv` looks at it).
    rx_bufs: u16,
}

fn rx_buf(i: u16) -> usize {
    dma::NET_RX_BUF + usize::from(i) * dma::NET_RX_SLOT
}

fn tx_buf(i: u16) -> usize {
    dma::NET_TX_BUF + usize::from(i) * dma::NET_TX_SLOT
}

fn init() -> Result<Net, InitError> {
    let mut dev = Device::probe(&SPEC)?;
    let mut rx = dev.queue(0, dma::QUEUE_NET_RX, 0, RX_IRQ)?;
    let tx = dev.queue(1, dma::QUEUE_NET_TX, 1, TX_IRQ)?;
    let mut mac = FALLBACK_MAC;
    if let Some(cfg) = dev.config.and_then(|c| c.sub(0, 6)) {
        if dev.features & F_MAC != 0 {
            for (i, b) in mac.iter_mut().enumerate() {
                *b = cfg.read8(i as u64);
            }
        }
    }
    dev.driver_ok();
    let rx_bufs = (dma::NET_RX_SLOTS as u16).min(rx.size);
    for i in 0..rx_bufs {
        rx.set_desc(i, dma::addr(rx_buf(i)), dma::NET_RX_SLOT as u32, DESC_WRITE);
        rx.push(i);
    }
    rx.kick();
    Ok(Net { dev, rx, tx, mac, rx_bufs })
}

struct Mac([u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

/// Writes header + frame `index` (broadcast, ethertype 0x88B5, payload
/// `FERRY-FRAME <index>` zero-padded) into `buf`.
fn build_frame(buf: &mut [u8], mac: &[u8; 6], index: u64) {
    buf.fill(0);
    let frame = &mut buf[HDR_LEN..];
    frame[..6].fill(0xFF);
    frame[6..12].copy_from_slice(mac);
    frame[12..14].copy_from_slice(&ETHERTYPE_FERRY.to_be_bytes());
    let text = &mut frame[ETH_HEADER..];
    text[..PAYLOAD_PREFIX.len()].copy_from_slice(PAYLOAD_PREFIX);
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    let mut v = index;
    loop {
        start -= 1;
        digits[start] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    let at = PAYLOAD_PREFIX.len();
    text[at..at + digits.len() - start].copy_from_slice(&digits[start..]);
}

/// `net-send=<n>`: frames 1..=n in batches of up to 16 (one notification
/// per batch); prints `NET SENT <n> mac=<mac> irqs=<k>`.
pub fn send(slot: &mut Slot<Net>, n: u64) {
    let Some(net) = slot.get(SPEC.name, init) else {
        return;
    };
    let before = net.tx.irqs();
    let slots = (dma::NET_TX_SLOTS as u16).min(net.tx.size);
    let mut sent = 0;
    while sent < n {
        let batch = (n - sent).min(u64::from(slots)) as u16;
        for k in 0..batch {
            // SAFETY: every earlier batch has been returned, so all slots
            // belong to the driver; each slice is dropped before the next.
            let buf = unsafe { dma::bytes(tx_buf(k), HDR_LEN + FRAME_LEN) };
            build_frame(buf, &net.mac, sent + u64::from(k) + 1);
            let len = (HDR_LEN + FRAME_LEN) as u32;
            net.tx.set_desc(k, dma::addr(tx_buf(k)), len, 0);
            net.tx.push(k);
        }
        let irqs = net.tx.irqs();
        net.tx.kick();
        if !net.tx.wait_idle(TIMEOUT_MS, irqs) {
            crate::println!("NET TIMEOUT op=send sent={}", sent);
            net.dev.reset();
            *slot = Slot::Untried;
            return;
        }
        while net.tx.pop().is_some() {}
        sent += u64::from(batch);
    }
    crate::println!("NET SENT {} mac={} irqs={}", n, Mac(net.mac), net.tx.irqs() - before);
}

/// `net-recv=<n>`: prints every received frame until `n` frames with
/// ethertype 0x88B5 arrived (or 5 s passed), re-posting each buffer.
pub fn recv(slot: &mut Slot<Net>, n: u64) {
    let Some(net) = slot.get(SPEC.name, init) else {
        return;
    };
    let before = net.rx.irqs();
    crate::println!("NET RECV READY buffers={}", net.rx_bufs);
    let mut got = 0;
    let mut deadline = Deadline::start(RECV_TIMEOUT_MS);
    loop {
        let mut reposted = false;
        while got < n {
            let Some((id, written)) = net.rx.pop() else {
                break;
            };
            if id >= net.rx_bufs {
                continue;
            }
            if show_frame(id, written as usize) == ETHERTYPE_FERRY {
                got += 1;
            }
            net.rx.push(id);
            reposted = true;
        }
        if reposted {
            net.rx.kick();
        }
        if got >= n {
            break;
        }
        if !deadline.sleep() {
            crate::println!("NET RECV TIMEOUT got={} irqs={}", got, net.rx.irqs() - before);
            return;
        }
    }
    drop(deadline);
    crate::println!("NET RECV DONE got={} irqs={}", got, net.rx.irqs() - before);
}

/// Prints `NET RECV len=<l> ethertype=<t> payload=<text>` for the frame
/// in receive buffer `id` (`written` bytes including the virtio header);
/// returns the ethertype (0 for a runt frame).
fn show_frame(id: u16, written: usize) -> u16 {
    // SAFETY: the device returned buffer `id`; it is re-posted only after
    // this slice is gone.
    let buf = unsafe { dma::bytes(rx_buf(id), dma::NET_RX_SLOT) };
    let end = written.clamp(HDR_LEN, dma::NET_RX_SLOT);
    let frame = &buf[HDR_LEN..end];
    let ethertype = match frame.get(12..ETH_HEADER) {
        Some(t) => u16::from_be_bytes([t[0], t[1]]),
        None => 0,
    };
    let payload = frame.get(ETH_HEADER..).unwrap_or(&[]);
    let mut text = [0u8; PAYLOAD_SHOWN];
    crate::println!(
        "NET RECV len={} ethertype={:04x} payload={}",
        frame.len(),
        ethertype,
        serial::printable(payload, &mut text)
    );
    ethertype
}
