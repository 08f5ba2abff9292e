//! One queue; every chain's writable buffers are filled with random bytes.

use ferry_plugin_api::{sdk::DescriptorBuilder, DeviceConfig, HostBox, PluginDescriptor};
use ferry_virtio_pci::{NoDeviceState, Queues, VirtioDevice, VirtioPci};
use vm_memory_bytes::fill_writable;

/// Largest request served at once; bigger chains get this much.
const MAX_REQUEST: usize = 64 * 1024;

pub fn describe() -> PluginDescriptor {
    DescriptorBuilder::new("virtio-rng", env!("CARGO_PKG_VERSION"), "virtio entropy device (host getrandom)")
        .versioned::<NoDeviceState>()
        .build()
}

pub fn create(_config: &DeviceConfig, host: HostBox) -> Result<VirtioPci<Rng>, String> {
    VirtioPci::new(Rng, host)
}

pub struct Rng;

fn getrandom(buf: &mut [u8]) -> Result<(), String> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(format!("getrandom: {e}"));
            }
        } else {
            done += n as usize;
        }
    }
    Ok(())
}

impl VirtioDevice for Rng {
    type State = NoDeviceState;

    fn state(&self) -> NoDeviceState {
        NoDeviceState
    }

    fn set_state(&mut self, _state: NoDeviceState) -> Result<(), String> {
        Ok(())
    }

    fn device_type(&self) -> u32 {
        4
    }

    fn pci_class(&self) -> u32 {
        0x00_ff00 // unclassified (as QEMU's virtio-rng-pci)
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![256]
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn process_queue(&mut self, queue: usize, queues: &mut Queues<'_>) -> Result<(), String> {
        let mut error = None;
        while let Some(chain) = queues.pop(queue) {
            let head = chain.head_index();
            // A bad chain goes back empty; the queue carries on.
            let written = fill_writable(chain, queues.mem(), MAX_REQUEST, getrandom).unwrap_or_else(|e| {
                error.get_or_insert(e);
                0
            });
            queues.complete(queue, head, written)?;
        }
        error.map_or(Ok(()), Err)
    }
}

/// Helpers over descriptor chains.
mod vm_memory_bytes {
    use ferry_virtio_pci::{DescriptorChain, GuestMemory};

    /// Fill the chain's writable buffers (up to `max` bytes) from `source`.
    /// Returns the bytes written. A chain that points outside guest RAM is
    /// an error; nothing is written outside RAM.
    pub fn fill_writable(
        chain: DescriptorChain<&GuestMemory>,
        mem: &GuestMemory,
        max: usize,
        source: impl Fn(&mut [u8]) -> Result<(), String>,
    ) -> Result<u32, String> {
        let mut writer = chain.writer(mem).map_err(|e| format!("bad descriptor chain: {e}"))?;
        let len = writer.available_bytes().min(max);
        let mut buf = vec![0u8; len];
        source(&mut buf)?;
        let n = std::io::Write::write(&mut writer, &buf).map_err(|e| format!("writing guest memory: {e}"))?;
        Ok(n as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_virtio_pci::testing::{Desc, TestQueues, NEXT, WRITE};

    #[test]
    fn requests_get_random_bytes_and_mark_them_dirty() {
        let mut t = TestQueues::new(4 << 20, &[16]);
        t.post_chain(0, 0, &[(0x10_0000, 64, true)]);
        t.post_chain(0, 1, &[(0x10_1000, 64, true)]);
        Rng.process_queue(0, &mut t.queues()).unwrap();
        assert_eq!(t.used(0), vec![(0, 64), (1, 64)]);
        let (a, b) = (t.read(0x10_0000, 64), t.read(0x10_1000, 64));
        assert_ne!(a, b, "two requests, two different answers");
        assert!(a.iter().any(|x| *x != a[0]), "not a constant buffer");
        assert_eq!(t.ram.dirty_pages().iter().filter(|p| **p == 0x100 || **p == 0x101).count(), 2);
    }

    #[test]
    fn malformed_chains_are_refused_without_touching_memory_outside_ram() {
        let ram = 4u64 << 20;
        let cases: Vec<(&str, Vec<Desc>)> = vec![
            ("outside RAM", vec![Desc { addr: ram, len: 64, flags: WRITE, next: 0 }]),
            ("oversize", vec![Desc { addr: 0x10_0000, len: u32::MAX, flags: WRITE, next: 0 }]),
            (
                "a loop",
                vec![
                    Desc { addr: 0x10_0000, len: 8, flags: WRITE | NEXT, next: 1 },
                    Desc { addr: 0x10_1000, len: 8, flags: WRITE | NEXT, next: 0 },
                ],
            ),
            (
                "next past the queue size",
                vec![Desc { addr: 0x10_0000, len: 8, flags: WRITE | NEXT, next: 99 }],
            ),
        ];
        for (what, descs) in cases {
            let mut t = TestQueues::new(ram as usize, &[16]);
            t.post(0, 0, &descs, 0);
            // A loop or a dangling next ends the chain early (virtio-queue
            // stops after queue-size descriptors): the request is served
            // with what was valid, bounded by the queue size.
            let result = Rng.process_queue(0, &mut t.queues());
            let used = t.used(0);
            assert_eq!(used.len(), 1, "{what}: the chain is returned once");
            assert!(used[0].1 <= 16 * 8, "{what}: no more than the valid buffers: {used:?}");
            if what == "outside RAM" || what == "oversize" {
                assert!(result.is_err(), "{what}: reported");
                assert_eq!(used[0].1, 0, "{what}: nothing written");
            }
        }
    }
}
