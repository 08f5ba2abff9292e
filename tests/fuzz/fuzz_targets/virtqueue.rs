//! Virtio descriptor chains as a guest writes them, into ferry's virtio
//! devices: the input is one queue's descriptor table, its available ring
//! and the buffers it points at, laid in a fake guest RAM; the device then
//! takes every chain the ring offers (virtio-blk's requests on a memfd
//! disk, virtio-rng's entropy, virtio-net's transmit queue on a tap in a
//! network namespace of this process's own) and completes it. Every input
//! must end with the chains completed or a named error, never a panic, a
//! hang, or a write outside the RAM the guest has.
//!
//! Input: byte 0 picks the device, byte 1 the queue; 256 bytes of
//! descriptor table (16 descriptors); 36 bytes of available ring (flags,
//! idx, 16 heads); the rest (up to 64 KiB) is written at guest address
//! 0x10_0000, where seeds point their buffers.
#![no_main]

use std::{os::fd::FromRawFd, sync::Mutex};

use ferry_virtio_pci::{testing::TestQueues, VirtioDevice};
use libfuzzer_sys::fuzz_target;

const QUEUE_SIZE: u16 = 16;
const TABLE: usize = 16 * QUEUE_SIZE as usize;
const AVAIL: usize = 4 + 2 * QUEUE_SIZE as usize;
const BUFFERS: u64 = 0x10_0000;
const RAM: usize = 2 << 20;

struct Devices {
    blk: virtio_blk::fuzzing::Block,
    rng: virtio_rng::Rng,
    /// None where a tap cannot be made (no /dev/net/tun, no privilege).
    net: Option<virtio_net::fuzzing::Net>,
}

fn devices() -> Devices {
    // SAFETY: memfd_create with a NUL-terminated name; the descriptor is
    // new and ours, handed to File once.
    let disk = unsafe {
        let fd = libc::memfd_create(c"ferry-fuzz-disk".as_ptr(), libc::MFD_CLOEXEC);
        assert!(fd >= 0, "memfd_create");
        std::fs::File::from_raw_fd(fd)
    };
    disk.set_len(64 * 1024).expect("disk size");
    let blk = virtio_blk::fuzzing::block(disk, false).expect("virtio-blk");
    // A network namespace of our own: the tap and whatever the guest
    // transmits stay inside it.
    // SAFETY: unshare changes this process's namespace only.
    let net = if unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0 {
        virtio_net::fuzzing::net("ferry-fz0").map_err(|e| eprintln!("fuzz: virtio-net left out: {e}")).ok()
    } else {
        eprintln!("fuzz: virtio-net left out: no network namespace of our own");
        None
    };
    Devices { blk, rng: virtio_rng::Rng, net }
}

static DEVICES: Mutex<Option<Devices>> = Mutex::new(None);

/// Lay the input out in queue `q` of fresh RAM and let `device` take it.
fn run<D: VirtioDevice>(device: &mut D, queue: usize, data: &[u8]) {
    let sizes = vec![QUEUE_SIZE; device.queue_max_sizes().len()];
    let queue = queue % sizes.len();
    let mut t = TestQueues::new(RAM, &sizes);
    let table = 0x10000 * (queue as u64 + 1);
    let (descs, rest) = data.split_at(TABLE.min(data.len()));
    let (avail, buffers) = rest.split_at(AVAIL.min(rest.len()));
    t.write(table, descs);
    t.write(table + 0x4000, avail);
    t.write(BUFFERS, &buffers[..buffers.len().min(64 * 1024)]);
    // Twice: the second finds the ring as the first left it.
    for _ in 0..2 {
        let _ = device.process_queue(queue, &mut t.queues());
    }
    let used = t.used(queue);
    assert!(used.len() <= usize::from(QUEUE_SIZE), "more completions than the ring offered");
}

fuzz_target!(|data: &[u8]| {
    let [which, queue, rest @ ..] = data else { return };
    let mut guard = DEVICES.lock().unwrap_or_else(|e| e.into_inner());
    let d = guard.get_or_insert_with(devices);
    match which % 3 {
        0 => run(&mut d.blk, usize::from(*queue), rest),
        1 => run(&mut d.rng, usize::from(*queue), rest),
        _ => {
            if let Some(net) = d.net.as_mut() {
                run(net, usize::from(*queue), rest)
            }
        }
    }
});
