//! Queue 0 receives, queue 1 transmits. Each buffer starts with the 12-byte
//! virtio-net header, which the tap reads and writes as is.

use std::io::{Read, Write};

use ferry_plugin_api::{
    sdk::{DescriptorBuilder, Properties},
    DeviceConfig, HostBox, PluginDescriptor, PropertyKind,
};
use ferry_virtio_pci::{NoDeviceState, Queues, VirtioDevice, VirtioPci};

use crate::tap::{Tap, VNET_HDR_LEN};

const RX: usize = 0;
const TX: usize = 1;
/// Header plus the largest frame a tap hands over without offloads.
const MAX_PACKET: usize = VNET_HDR_LEN + 65_550;
const F_MAC: u64 = 1 << 5;

pub fn describe() -> PluginDescriptor {
    DescriptorBuilder::new(
        "virtio-net",
        env!("CARGO_PKG_VERSION"),
        "virtio network device on a tap interface",
    )
    .binding("tap", None, "host tap interface name (a host binding)")
    .property(
        "mac",
        PropertyKind::STRING,
        Some(""),
        "guest MAC address (default: derived from the device id)",
    )
    .versioned::<NoDeviceState>()
    .build()
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// A locally administered unicast MAC derived from the device id.
fn derived_mac(id: &str) -> [u8; 6] {
    let h = id.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    let b = h.to_le_bytes();
    [0x52, 0x54, 0x00, b[0], b[1], b[2]]
}

pub fn create(config: &DeviceConfig, host: HostBox) -> Result<VirtioPci<Net>, String> {
    let props = Properties::new(config);
    let mac = match props.string("mac")? {
        "" => derived_mac(config.id.as_str()),
        s => parse_mac(s).ok_or_else(|| format!("mac '{s}' is not six hex bytes separated by ':'"))?,
    };
    let tap = Tap::open(props.string("tap")?)?;
    VirtioPci::new(Net::new(tap, mac), host)
}

/// A device on tap `name`, outside a transport: the fuzz target's
/// (tests/fuzz/fuzz_targets/virtqueue.rs, in a network namespace of its own).
#[cfg(feature = "fuzzing")]
pub fn fuzzing_net(name: &str) -> Result<Net, String> {
    Ok(Net::new(Tap::open(name)?, [0x02, 0, 0, 0, 0, 1]))
}

/// The device. Receive and transmit have a buffer each: a received packet
/// may wait in `rx_buf` (the guest's ring is full) while the guest
/// transmits, and must come out as it went in.
pub struct Net {
    tap: Tap,
    mac: [u8; 6],
    /// A received packet waiting for a guest buffer (its length in `rx_buf`).
    pending: Option<usize>,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
}

impl Net {
    fn new(tap: Tap, mac: [u8; 6]) -> Self {
        Net { tap, mac, pending: None, rx_buf: vec![0; MAX_PACKET], tx_buf: vec![0; MAX_PACKET] }
    }

    /// Move packets from the tap into the guest while it has buffers.
    fn receive(&mut self, queues: &mut Queues<'_>) -> Result<(), String> {
        let mem = queues.mem();
        loop {
            let len = match self.pending.take() {
                Some(len) => len,
                None => match self.tap.recv(&mut self.rx_buf)? {
                    Some(len) if len >= VNET_HDR_LEN => len,
                    Some(_) => continue,
                    None => return Ok(()),
                },
            };
            let Some(chain) = queues.pop(RX) else {
                self.pending = Some(len);
                return Ok(());
            };
            let head = chain.head_index();
            // num_buffers: every packet fits one buffer chain.
            self.rx_buf[10..12].copy_from_slice(&1u16.to_le_bytes());
            let written = match chain.writer(mem) {
                Ok(mut w) => {
                    let n = w.available_bytes().min(len);
                    w.write_all(&self.rx_buf[..n]).map_err(|e| format!("rx: {e}"))?;
                    n
                }
                Err(e) => {
                    queues.complete(RX, head, 0)?;
                    return Err(format!("rx: bad buffer chain: {e}"));
                }
            };
            queues.complete(RX, head, written as u32)?;
        }
    }

    fn transmit(&mut self, queues: &mut Queues<'_>) -> Result<(), String> {
        let mem = queues.mem();
        let mut error = None;
        while let Some(chain) = queues.pop(TX) {
            let head = chain.head_index();
            match chain.reader(mem) {
                Ok(mut r) => {
                    let n = r.available_bytes().min(MAX_PACKET);
                    if r.read_exact(&mut self.tx_buf[..n]).is_ok() && n > VNET_HDR_LEN {
                        if let Err(e) = self.tap.send(&self.tx_buf[..n]) {
                            error.get_or_insert(e);
                        }
                    }
                }
                Err(e) => {
                    error.get_or_insert(format!("tx: bad buffer chain: {e}"));
                }
            }
            queues.complete(TX, head, 0)?;
        }
        error.map_or(Ok(()), Err)
    }
}

impl VirtioDevice for Net {
    type State = NoDeviceState;

    fn state(&self) -> NoDeviceState {
        NoDeviceState
    }

    fn set_state(&mut self, _state: NoDeviceState) -> Result<(), String> {
        Ok(())
    }

    fn device_type(&self) -> u32 {
        1
    }

    fn pci_class(&self) -> u32 {
        0x02_0000 // network, ethernet
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![256, 256]
    }

    fn features(&self) -> u64 {
        F_MAC
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&self.mac);
        for (i, b) in data.iter_mut().enumerate() {
            *b = config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn process_queue(&mut self, queue: usize, queues: &mut Queues<'_>) -> Result<(), String> {
        match queue {
            RX => self.receive(queues),
            TX => self.transmit(queues),
            _ => Ok(()),
        }
    }

    fn backend_fds(&self) -> Vec<std::os::fd::RawFd> {
        vec![self.tap.fd()]
    }

    fn process_backend(&mut self, _index: usize, queues: &mut Queues<'_>) -> Result<(), String> {
        self.receive(queues)
    }

    fn reset(&mut self) {
        self.pending = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_and_derive() {
        assert_eq!(parse_mac("52:54:00:12:34:56"), Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        assert_eq!(parse_mac("52:54:00:12:34"), None);
        assert_eq!(parse_mac("52:54:00:12:34:56:78"), None);
        assert_eq!(parse_mac("zz:54:00:12:34:56"), None);
        let a = derived_mac("net0");
        assert_eq!(a[0] & 1, 0, "unicast");
        assert_ne!(a, derived_mac("net1"));
    }
}

#[cfg(test)]
mod queue_tests {
    use super::*;
    use ferry_virtio_pci::testing::{Desc, TestQueues, NEXT, WRITE};

    /// A transient tap (gone when the fd closes); needs CAP_NET_ADMIN.
    fn net(tag: &str) -> Option<Net> {
        let name = format!("fnt{tag}{}", std::process::id() % 100_000);
        match Tap::open(&name) {
            Ok(tap) => Some(Net::new(tap, [0x52, 0x54, 0, 1, 2, 3])),
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "SKIPPED virtio-net queue tests: no tap ({e})");
                None
            }
        }
    }

    #[test]
    fn a_received_packet_fills_one_buffer_with_num_buffers_set() {
        let Some(mut net) = net("r") else { return };
        let mut t = TestQueues::new(4 << 20, &[16, 16]);
        let frame: Vec<u8> = (0..(VNET_HDR_LEN + 60)).map(|i| i as u8).collect();
        net.rx_buf[..frame.len()].copy_from_slice(&frame);
        net.pending = Some(frame.len());
        t.post_chain(RX, 0, &[(0x10_0000, 2048, true)]);
        net.process_queue(RX, &mut t.queues()).unwrap();
        assert_eq!(t.used(RX), vec![(0, frame.len() as u32)]);
        let got = t.read(0x10_0000, frame.len());
        assert_eq!(&got[10..12], &1u16.to_le_bytes(), "num_buffers");
        assert_eq!(&got[12..], &frame[12..]);
        assert!(t.ram.dirty_pages().contains(&0x100));
    }

    #[test]
    fn a_packet_waiting_for_a_buffer_survives_a_transmit() {
        let Some(mut net) = net("w") else { return };
        let mut t = TestQueues::new(4 << 20, &[16, 16]);
        let frame: Vec<u8> = (0..(VNET_HDR_LEN + 60)).map(|i| (i * 7) as u8).collect();
        net.rx_buf[..frame.len()].copy_from_slice(&frame);
        net.pending = Some(frame.len()); // the guest's receive ring is full
        let own = vec![0xeeu8; VNET_HDR_LEN + 60];
        t.write(0x20_0000, &own);
        t.post_chain(TX, 0, &[(0x20_0000, own.len() as u32, false)]);
        let _ = net.process_queue(TX, &mut t.queues()); // the tap may refuse: not the point
        t.post_chain(RX, 0, &[(0x10_0000, 2048, true)]);
        net.process_queue(RX, &mut t.queues()).unwrap();
        assert_eq!(
            &t.read(0x10_0000, frame.len())[12..],
            &frame[12..],
            "the packet that waited, not the guest's own"
        );
    }

    #[test]
    fn malformed_chains_are_refused() {
        let Some(mut net) = net("m") else { return };
        let ram = 4u64 << 20;
        for (q, desc) in [
            (TX, Desc { addr: ram + 4096, len: 64, flags: 0, next: 0 }),
            (TX, Desc { addr: 0x10_0000, len: u32::MAX, flags: 0, next: 0 }),
            (TX, Desc { addr: 0x10_0000, len: 64, flags: NEXT, next: 99 }),
            (RX, Desc { addr: ram - 16, len: 2048, flags: WRITE, next: 0 }),
        ] {
            let mut t = TestQueues::new(ram as usize, &[16, 16]);
            net.pending = Some(VNET_HDR_LEN + 60);
            t.post(q, 0, &[desc], 0);
            let r = net.process_queue(q, &mut t.queues());
            assert_eq!(t.used(q).len(), 1, "queue {q} {desc:?}: the chain comes back");
            if desc.next != 99 {
                assert!(r.is_err(), "queue {q} {desc:?}: reported");
                assert_eq!(t.used(q)[0].1, 0);
            }
        }
    }
}
