//! One queue; every chain's writable buffers are filled with random bytes.

use ferry_plugin_api::{sdk::DescriptorBuilder, DeviceConfig, HostBox, PluginDescriptor};
use ferry_virtio_pci::{Queues, VirtioDevice, VirtioPci};
use vm_memory_bytes::fill_writable;

/// Largest request served at once; bigger chains get this much.
const MAX_REQUEST: usize = 64 * 1024;

pub fn describe() -> PluginDescriptor {
    DescriptorBuilder::new("virtio-rng", env!("CARGO_PKG_VERSION"), "virtio entropy device (host getrandom)")
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
    fn device_type(&self) -> u32 {
        4
    }

    fn pci_class(&self) -> u32 {
        0xff_0000
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
        while let Some(chain) = queues.pop(queue) {
            let head = chain.head_index();
            let written = fill_writable(chain, queues.mem(), MAX_REQUEST, getrandom)?;
            queues.complete(queue, head, written)?;
        }
        Ok(())
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
