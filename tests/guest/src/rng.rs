//! virtio-rng (device ID 0x1044): the `rng=<n>` token. Queue 0 takes
//! device-writable buffers; the used length says how many random bytes
//! the device wrote.

use crate::dma;
use crate::virtio::{Device, DeviceSpec, InitError, Slot};
use crate::virtq::{Virtq, DESC_WRITE};

/// Largest request (the size of the buffer).
pub const MAX_BYTES: u64 = dma::RNG_BUF_LEN as u64;
const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";
const TIMEOUT_MS: u64 = 2000;
/// MSI-X vector 0x43.
const IRQ: usize = 3;

pub const SPEC: DeviceSpec = DeviceSpec { name: "RNG", device_id: 0x1044, optional_features: 0 };

pub struct Rng {
    dev: Device,
    q: Virtq,
}

fn init() -> Result<Rng, InitError> {
    let mut dev = Device::probe(&SPEC)?;
    let q = dev.queue(0, dma::QUEUE_RNG, 0, IRQ)?;
    dev.driver_ok();
    Ok(Rng { dev, q })
}

/// `rng=<n>`: one request for `n` bytes; prints
/// `RNG len=<received> hex=<bytes> irqs=<k>`.
pub fn run(slot: &mut Slot<Rng>, n: u64) {
    let Some(rng) = slot.get(SPEC.name, init) else {
        return;
    };
    let q = &mut rng.q;
    let len = (n as usize).min(dma::RNG_BUF_LEN);
    q.set_desc(0, dma::addr(dma::RNG_BUF), len as u32, DESC_WRITE);
    let before = q.irqs();
    q.push(0);
    q.kick();
    if !q.wait_idle(TIMEOUT_MS, before) {
        crate::println!("RNG TIMEOUT len={}", len);
        rng.dev.reset();
        *slot = Slot::Untried;
        return;
    }
    let written = q.pop().map_or(0, |(_, written)| written as usize).min(len);
    // SAFETY: the device has returned the buffer.
    let data = unsafe { dma::bytes(dma::RNG_BUF, written) };
    let mut hex = [0u8; 2 * dma::RNG_BUF_LEN];
    for (pair, &b) in hex.chunks_exact_mut(2).zip(data.iter()) {
        pair[0] = HEX_DIGITS[usize::from(b >> 4)];
        pair[1] = HEX_DIGITS[usize::from(b & 0xF)];
    }
    crate::println!(
        "RNG len={} hex={} irqs={}",
        written,
        core::str::from_utf8(&hex[..2 * written]).unwrap_or(""),
        q.irqs() - before
    );
}
