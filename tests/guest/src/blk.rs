//! virtio-blk (device ID 0x1042): the `blk-*` tokens, one request at a
//! time on queue 0.
//!
//! Request: header { le32 type, le32 reserved, le64 sector } (device
//! reads), optional data buffer, one status byte (device writes: 0 OK,
//! 1 IOERR, 2 UNSUPP). Types: 0 IN (read), 1 OUT (write), 4 FLUSH,
//! 8 GET_ID (20-byte ID string, NUL-padded). Sectors are 512 bytes.
//! VIRTIO_BLK_F_RO (feature bit 5) is accepted if offered; a read-only
//! device fails writes with IOERR. VIRTIO_BLK_F_CONFIG_WCE (bit 11) is
//! accepted if offered and the cache is left in the device's mode.

use crate::cmdline::BlkOp;
use crate::virtio::{Device, DeviceSpec, InitError, Slot};
use crate::virtq::{Virtq, DESC_NEXT, DESC_WRITE};
use crate::{dma, io, serial};

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const F_RO: u64 = 1 << 5;
const F_CONFIG_WCE: u64 = 1 << 11;
pub const SECTOR: usize = 512;
const WORDS_PER_SECTOR: usize = SECTOR / 8;
/// Most sectors per request (the size of the data buffer).
pub const MAX_SECTORS: u64 = (dma::BLK_DATA_LEN / SECTOR) as u64;
const ID_LEN: usize = 20;
/// Per-request limit (`BLK TIMEOUT` after it).
pub const TIMEOUT_MS: u64 = 2000;
/// MSI-X vector 0x40.
const IRQ: usize = 0;
pub const STATUS_OK: u8 = 0;
/// Device configuration: le64 capacity in 512-byte sectors at offset 0.
const CONFIG_CAPACITY: u64 = 0;

pub const SPEC: DeviceSpec = DeviceSpec { name: "BLK", device_id: 0x1042, optional_features: F_RO | F_CONFIG_WCE };

pub struct Blk {
    pub dev: Device,
    pub q: Virtq,
}

fn init() -> Result<Blk, InitError> {
    let mut dev = Device::probe(&SPEC)?;
    let q = dev.queue(0, dma::QUEUE_BLK, 0, IRQ)?;
    if q.size < 4 {
        dev.reset();
        return Err(InitError::Failed("queue-too-small"));
    }
    dev.driver_ok();
    Ok(Blk { dev, q })
}

/// A finished request: status byte and MSI-X interrupts taken meanwhile.
pub struct Done {
    pub status: u8,
    pub irqs: u64,
}

impl Blk {
    /// Capacity in sectors (0 without a device configuration structure).
    pub fn capacity(&self) -> u64 {
        self.dev
            .config
            .and_then(|c| c.sub(CONFIG_CAPACITY, 8))
            .map_or(0, |c| u64::from(c.read32(0)) | u64::from(c.read32(4)) << 32)
    }

    /// Writes the request header and presets the status byte to 0xFF.
    pub fn prepare(&mut self, kind: u32, sector: u64) {
        // SAFETY: header and status byte belong to the driver: requests
        // are issued one at a time, and each has been returned (or the
        // device reset) before the next call.
        unsafe {
            let header = dma::bytes(dma::BLK_HEADER, 16);
            header[..4].copy_from_slice(&kind.to_le_bytes());
            header[4..8].fill(0);
            header[8..].copy_from_slice(&sector.to_le_bytes());
            dma::bytes(dma::BLK_STATUS, 1)[0] = 0xFF;
        }
    }

    /// The status byte of the last request (meaningful once returned).
    pub fn status(&self) -> u8 {
        // SAFETY: the byte lies in the `.dma` block; a volatile one-byte
        // load sees some value even if the device were writing it.
        unsafe { (dma::addr(dma::BLK_STATUS) as *const u8).read_volatile() }
    }

    /// Runs one request over the first `data_len` bytes of the data buffer
    /// (written by the device if `device_writes`, zeroed before then).
    /// `None` on timeout.
    fn request(&mut self, kind: u32, sector: u64, data_len: usize, device_writes: bool) -> Option<Done> {
        if device_writes {
            // Zeroed, so a short or failed transfer reads as zeros.
            // SAFETY: the data buffer belongs to the driver: no request is
            // outstanding (they are issued one at a time).
            unsafe { dma::bytes(dma::BLK_DATA, data_len) }.fill(0);
        }
        self.submit(kind, sector, dma::BLK_DATA, data_len, device_writes)
    }

    /// Runs one request over `data_len` bytes at `.dma` offset `data`
    /// (written by the device if `device_writes`) and waits for it. The
    /// CPU does not touch the data bytes. `None` on timeout.
    pub fn submit(
        &mut self,
        kind: u32,
        sector: u64,
        data: usize,
        data_len: usize,
        device_writes: bool,
    ) -> Option<Done> {
        self.prepare(kind, sector);
        let q = &mut self.q;
        q.set_desc(0, dma::addr(dma::BLK_HEADER), 16, DESC_NEXT);
        let mut last = 1;
        if data_len > 0 {
            let flags = DESC_NEXT | if device_writes { DESC_WRITE } else { 0 };
            q.set_desc(1, dma::addr(data), data_len as u32, flags);
            last = 2;
        }
        q.set_desc(last, dma::addr(dma::BLK_STATUS), 1, DESC_WRITE);
        let before = q.irqs();
        q.push(0);
        q.kick();
        if !q.wait_idle(TIMEOUT_MS, before) {
            return None;
        }
        q.pop();
        Some(Done { status: self.status(), irqs: self.q.irqs() - before })
    }
}

/// Runs one `blk-*` token. On a timeout the device is reset and set up
/// again by the next token.
pub fn run(slot: &mut Slot<Blk>, op: BlkOp) {
    let Some(blk) = slot.get(SPEC.name, init) else {
        return;
    };
    if execute(blk, op).is_none() {
        crate::println!("BLK TIMEOUT op={}", op.name());
        blk.dev.reset();
        *slot = Slot::Untried;
    }
}

fn execute(blk: &mut Blk, op: BlkOp) -> Option<()> {
    match op {
        BlkOp::Write { sector, count, seed } => {
            fill_pattern(sector, count, seed);
            let d = blk.request(T_OUT, sector, bytes(count), false)?;
            crate::println!(
                "BLK WRITE sector={} count={} status={} irqs={}",
                sector,
                count,
                d.status,
                d.irqs
            );
        }
        BlkOp::Read { sector, count } => {
            let d = blk.request(T_IN, sector, bytes(count), true)?;
            // SAFETY: the device has returned the buffer.
            let data = unsafe { dma::bytes(dma::BLK_DATA, bytes(count)) };
            crate::println!(
                "BLK READ sector={} count={} status={} fnv={:08x} irqs={}",
                sector,
                count,
                d.status,
                fnv1a(data),
                d.irqs
            );
        }
        BlkOp::Verify { sector, count, seed } => {
            let d = blk.request(T_IN, sector, bytes(count), true)?;
            if d.status != STATUS_OK {
                crate::println!("BLK VERIFY BAD sector={} count={} status={}", sector, count, d.status);
                fail();
            }
            // SAFETY: the device has returned the buffer.
            let words = unsafe { dma::words(dma::BLK_DATA, bytes(count) / 8) };
            match compare_pattern(words, sector, seed) {
                Ok(()) => crate::println!("BLK VERIFY OK sector={} count={}", sector, count),
                Err(m) => {
                    crate::println!(
                        "BLK VERIFY BAD sector={} offset={} want=0x{:x} got=0x{:x}",
                        m.sector,
                        m.offset,
                        m.want,
                        m.got
                    );
                    fail();
                }
            }
        }
        BlkOp::Flush => {
            let d = blk.request(T_FLUSH, 0, 0, false)?;
            crate::println!("BLK FLUSH status={}", d.status);
        }
        BlkOp::Id => {
            let d = blk.request(T_GET_ID, 0, ID_LEN, true)?;
            // SAFETY: the device has returned the buffer.
            let id = unsafe { dma::bytes(dma::BLK_DATA, ID_LEN) };
            let mut text = [0u8; ID_LEN];
            crate::println!("BLK ID {} status={}", serial::printable(id, &mut text), d.status);
        }
        BlkOp::Bench { write, count, depth: 1 } => crate::blk_bench::run(blk, write, count)?,
        BlkOp::Bench { write, count, depth } => crate::blk_bench::run_depth(blk, write, count, depth)?,
        BlkOp::DmaCheck { sector, count, seed, before, after } => {
            crate::blk_dma_check::run(blk, sector, count, seed, before, after)?
        }
    }
    Some(())
}

/// `PATTERN BAD`-style failure: exit status 2.
pub fn fail() -> ! {
    io::debug_exit(2);
    io::halt_forever()
}

pub fn bytes(count: u64) -> usize {
    count as usize * SECTOR
}

/// The qword at byte `offset` of sector `sector` written by `blk-write`.
fn pattern_word(sector: u64, offset: u64, seed: u64) -> u64 {
    (sector << 32) ^ offset ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn fill_pattern(sector: u64, count: u64, seed: u64) {
    // SAFETY: no request is outstanding, the buffer is the driver's.
    let words = unsafe { dma::words(dma::BLK_DATA, bytes(count) / 8) };
    for (s, chunk) in words.chunks_exact_mut(WORDS_PER_SECTOR).enumerate() {
        let base = pattern_word(sector.wrapping_add(s as u64), 0, seed);
        for (i, w) in chunk.iter_mut().enumerate() {
            *w = base ^ (i as u64 * 8);
        }
    }
}

/// The first qword that differs from the `blk-write` pattern.
pub struct Mismatch {
    /// Absolute sector number.
    pub sector: u64,
    /// Byte offset within that sector.
    pub offset: u64,
    /// Byte offset within the compared buffer.
    pub buf_offset: u64,
    pub want: u64,
    pub got: u64,
}

/// Compares `words` (whole sectors from `sector`) with the pattern.
pub fn compare_pattern(words: &[u64], sector: u64, seed: u64) -> Result<(), Mismatch> {
    for (s, chunk) in words.chunks_exact(WORDS_PER_SECTOR).enumerate() {
        let abs = sector.wrapping_add(s as u64);
        let base = pattern_word(abs, 0, seed);
        for (i, &got) in chunk.iter().enumerate() {
            let want = base ^ (i as u64 * 8);
            if got != want {
                return Err(Mismatch {
                    sector: abs,
                    offset: i as u64 * 8,
                    buf_offset: (s * SECTOR + i * 8) as u64,
                    want,
                    got,
                });
            }
        }
    }
    Ok(())
}

/// FNV-1a, 32-bit. Reads a qword at a time: fewer instructions per byte,
/// which matters under instruction emulation.
fn fnv1a(data: &[u8]) -> u32 {
    const PRIME: u32 = 0x0100_0193;
    let mut h: u32 = 0x811c_9dc5;
    let mut qwords = data.chunks_exact(8);
    for q in &mut qwords {
        let w = u64::from_le_bytes([q[0], q[1], q[2], q[3], q[4], q[5], q[6], q[7]]);
        let step = |h: u32, shift: u32| (h ^ ((w >> shift) as u32 & 0xFF)).wrapping_mul(PRIME);
        // Unrolled by hand: opt-level "s" keeps an inner loop otherwise.
        h = step(step(step(step(h, 0), 8), 16), 24);
        h = step(step(step(step(h, 32), 40), 48), 56);
    }
    for &b in qwords.remainder() {
        h = (h ^ u32::from(b)).wrapping_mul(PRIME);
    }
    h
}
