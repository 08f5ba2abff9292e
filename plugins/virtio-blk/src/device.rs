//! Block requests: a 16-byte header (type, reserved, sector), data buffers,
//! and a one-byte status the device writes last.
//!
//! ```text
//!  [ type u32 | reserved u32 | sector u64 ]  device-readable
//!  [ data ... ]                              readable (OUT) or writable (IN, GET_ID)
//!  [ status u8 ]                             device-writable: 0 OK, 1 IOERR, 2 UNSUPP
//! ```
//!
//! Data moves in bounded chunks, so no allocation is sized by the guest.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Write},
    os::unix::fs::FileExt,
};

use ferry_plugin_api::state::Versioned;
use ferry_plugin_api::{
    sdk::{DescriptorBuilder, Properties},
    DeviceConfig, ErrorKind, HostBox, LogLevel, PluginDescriptor, PropertyKind,
};
use ferry_virtio_pci::{DescriptorChain, GuestMemory, Queues, VirtioDevice, VirtioPci};

use crate::state::BlkState;

const SECTOR: u64 = 512;
const CHUNK: usize = 128 * 1024;
const ID_BYTES: usize = 20;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;
/// The guest may switch the cache between writeback and writethrough
/// (`writeback` at offset 32 of the device configuration). Offered only
/// when the machine type sets `config-wce = true` (release 0.2 and later).
const F_CONFIG_WCE: u64 = 1 << 11;
const CONFIG_WRITEBACK: u64 = 32;

/// This build's release, or the previous one (0.1.0, state v1, no
/// `config-wce`) with the `previous-release` feature; the state versions
/// are `BlkState`'s (`state.rs`).
#[cfg(feature = "previous-release")]
const RELEASE: &str = "0.1.0";
#[cfg(not(feature = "previous-release"))]
const RELEASE: &str = env!("CARGO_PKG_VERSION");

pub fn describe() -> PluginDescriptor {
    let b = DescriptorBuilder::new("virtio-blk", RELEASE, "virtio block device on a raw image file")
        .binding("path", None, "raw disk image (a host binding)")
        .property("readonly", PropertyKind::BOOL, Some("false"), "refuse guest writes")
        .property(
            "serial",
            PropertyKind::STRING,
            Some(""),
            "id string the guest reads (default: the device id)",
        )
        .versioned::<BlkState>();
    if BlkState::CURRENT >= 2 {
        b.property(
            "config-wce",
            PropertyKind::BOOL,
            Some("false"),
            "offer VIRTIO_BLK_F_CONFIG_WCE (cache mode switch)",
        )
        .build()
    } else {
        b.build()
    }
}

pub fn create(config: &DeviceConfig, host: HostBox) -> Result<VirtioPci<Block>, String> {
    let props = Properties::new(config);
    let path = props.string("path")?;
    let readonly = props.boolean("readonly")?;
    let serial = match props.string("serial")? {
        "" => config.id.as_str(),
        s => s,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(!readonly)
        .open(path)
        .map_err(|e| format!("cannot open disk image {path}: {e}"))?;
    let len = file.metadata().map_err(|e| format!("{path}: {e}"))?.len();
    let mut id = [0u8; ID_BYTES];
    let n = serial.len().min(ID_BYTES);
    id[..n].copy_from_slice(&serial.as_bytes()[..n]);
    let offer_wce = BlkState::CURRENT >= 2 && props.boolean("config-wce")?;
    VirtioPci::new(
        Block {
            file,
            sectors: len / SECTOR,
            readonly,
            id,
            offer_wce,
            wce_negotiated: false,
            writeback: 1,
            buf: Vec::new(),
            status: Status { path: path.to_string(), host: Some(host.clone()), ..Status::default() },
        },
        host,
    )
}

/// A device over `file` with no host to publish to, outside a transport:
/// the fuzz target's (tests/fuzz/fuzz_targets/virtqueue.rs).
#[cfg(feature = "fuzzing")]
pub fn fuzzing_block(file: File, readonly: bool) -> Result<Block, String> {
    let sectors = file.metadata().map_err(|e| e.to_string())?.len() / SECTOR;
    Ok(Block {
        file,
        sectors,
        readonly,
        id: [0; ID_BYTES],
        offer_wce: true,
        wce_negotiated: true,
        writeback: 1,
        buf: Vec::new(),
        status: Status::default(),
    })
}

/// Request counts, published as the device's status line (`ferry ctl
/// info`) through `Host::set_status`. On a core without it (plugin-api
/// 1.0) the first failed request is logged instead.
#[derive(Default)]
struct Status {
    path: String,
    host: Option<HostBox>,
    reads: u64,
    writes: u64,
    flushes: u64,
    errors: u64,
    published: (u64, u64, u64, u64),
    unsupported: bool,
    logged_error: bool,
}

impl Status {
    fn count(&mut self, kind: u32, status: u8) {
        match (kind, status) {
            (_, S_IOERR) => self.errors += 1,
            (T_IN, _) => self.reads += 1,
            (T_OUT, _) => self.writes += 1,
            (T_FLUSH, _) => self.flushes += 1,
            _ => {}
        }
    }

    /// Publish the counts if they changed.
    fn publish(&mut self) {
        let now = (self.reads, self.writes, self.flushes, self.errors);
        let Some(host) = &self.host else { return };
        if now == self.published {
            return;
        }
        self.published = now;
        if !self.unsupported {
            let line = format!(
                "{}: {} reads, {} writes, {} flushes, {} failed",
                self.path, self.reads, self.writes, self.flushes, self.errors
            );
            match host.set_status(line.as_str().into()).into_result() {
                Ok(()) => return,
                Err(e) if e.kind == ErrorKind::UNSUPPORTED => self.unsupported = true,
                Err(_) => return,
            }
        }
        if self.errors > 0 && !self.logged_error {
            self.logged_error = true;
            host.log(LogLevel::WARN, format!("{}: a request failed (I/O error)", self.path).as_str().into());
        }
    }
}

pub struct Block {
    file: File,
    sectors: u64,
    readonly: bool,
    id: [u8; ID_BYTES],
    offer_wce: bool,
    wce_negotiated: bool,
    /// 1 writeback (flush on request), 0 writethrough (every write synced).
    writeback: u8,
    /// Bounce buffer for data moves, grown to `CHUNK` at most and kept.
    buf: Vec<u8>,
    status: Status,
}

impl Block {
    fn range_ok(&self, sector: u64, bytes: usize) -> bool {
        bytes as u64 % SECTOR == 0
            && sector.checked_add(bytes as u64 / SECTOR).is_some_and(|end| end <= self.sectors)
    }

    /// Moves `bytes` from `sector` on, at most `CHUNK` at a time through
    /// the device's reusable buffer: `step(file, chunk, file_offset)` does
    /// one chunk and says whether it worked. S_IOERR at the first failure.
    fn chunked(
        &mut self,
        sector: u64,
        bytes: usize,
        mut step: impl FnMut(&File, &mut [u8], u64) -> bool,
    ) -> u8 {
        let chunk_len = CHUNK.min(bytes.max(1));
        if self.buf.len() < chunk_len {
            self.buf.resize(chunk_len, 0);
        }
        let mut offset = sector * SECTOR;
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk_len);
            if !step(&self.file, &mut self.buf[..n], offset) {
                return S_IOERR;
            }
            left -= n;
            offset += n as u64;
        }
        S_OK
    }

    /// Serve one chain; returns the bytes written into guest memory.
    fn request(&mut self, chain: DescriptorChain<&GuestMemory>, mem: &GuestMemory) -> Result<u32, String> {
        let mut reader = chain.clone().reader(mem).map_err(|e| format!("bad request chain: {e}"))?;
        let mut writer = chain.writer(mem).map_err(|e| format!("bad request chain: {e}"))?;
        let mut header = [0u8; 16];
        reader.read_exact(&mut header).map_err(|_| "request header shorter than 16 bytes".to_string())?;
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes(header[8..16].try_into().map_err(|_| "header")?);
        let writable = writer.available_bytes();
        if writable == 0 {
            return Err("request has no status byte".to_string());
        }
        // After the split `writer` covers the data, the returned half the status byte.
        let mut status_writer =
            writer.split_at(writable - 1).map_err(|e| format!("bad request chain: {e}"))?;

        let mut written = 0usize;
        let status = match kind {
            T_IN => {
                let bytes = writer.available_bytes();
                if !self.range_ok(sector, bytes) {
                    S_IOERR
                } else {
                    self.chunked(sector, bytes, |file, chunk, offset| {
                        let ok = file.read_exact_at(chunk, offset).is_ok() && writer.write_all(chunk).is_ok();
                        written += if ok { chunk.len() } else { 0 };
                        ok
                    })
                }
            }
            T_OUT => {
                let bytes = reader.available_bytes();
                if self.readonly || !self.range_ok(sector, bytes) {
                    S_IOERR
                } else {
                    let mut status = self.chunked(sector, bytes, |file, chunk, offset| {
                        reader.read_exact(chunk).is_ok() && file.write_all_at(chunk, offset).is_ok()
                    });
                    if status == S_OK && self.writeback == 0 && self.file.sync_data().is_err() {
                        status = S_IOERR;
                    }
                    status
                }
            }
            T_FLUSH => {
                if self.readonly || self.file.sync_data().is_ok() {
                    S_OK
                } else {
                    S_IOERR
                }
            }
            T_GET_ID => {
                let n = writer.available_bytes().min(ID_BYTES);
                match writer.write_all(&self.id[..n]) {
                    Ok(()) => {
                        written += n;
                        S_OK
                    }
                    Err(_) => S_IOERR,
                }
            }
            _ => S_UNSUPP,
        };
        status_writer.write_all(&[status]).map_err(|e| format!("writing status: {e}"))?;
        self.status.count(kind, status);
        Ok((written + 1) as u32)
    }
}

impl VirtioDevice for Block {
    type State = BlkState;

    fn device_type(&self) -> u32 {
        2
    }

    fn pci_class(&self) -> u32 {
        0x01_0000 // mass storage (as QEMU's virtio-blk-pci)
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![256]
    }

    fn features(&self) -> u64 {
        F_FLUSH | if self.readonly { F_RO } else { 0 } | if self.offer_wce { F_CONFIG_WCE } else { 0 }
    }

    fn activate(&mut self, features: u64) -> Result<(), String> {
        self.wce_negotiated = features & F_CONFIG_WCE != 0;
        Ok(())
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if offset == CONFIG_WRITEBACK && self.offer_wce {
            if let Some(&v) = data.first() {
                self.writeback = u8::from(v != 0);
            }
        }
    }

    /// The driver reset the device (or the guest rebooted): what it
    /// negotiated is forgotten; the counts stay (they are the host's).
    fn reset(&mut self) {
        self.wce_negotiated = false;
        self.writeback = 1;
    }

    fn state(&self) -> BlkState {
        BlkState { wce_negotiated: self.wce_negotiated, writeback: self.writeback }
    }

    fn set_state(&mut self, s: BlkState) -> Result<(), String> {
        if s.wce_negotiated && !self.offer_wce {
            return Err(
                "the guest negotiated VIRTIO_BLK_F_CONFIG_WCE, which this machine type does not offer".into(),
            );
        }
        self.wce_negotiated = s.wce_negotiated;
        self.writeback = s.writeback;
        Ok(())
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config: capacity (u64, in 512-byte sectors) first.
        let mut config = [0u8; 64];
        config[0..8].copy_from_slice(&self.sectors.to_le_bytes());
        config[CONFIG_WRITEBACK as usize] = self.writeback;
        for (i, b) in data.iter_mut().enumerate() {
            *b = config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn process_queue(&mut self, queue: usize, queues: &mut Queues<'_>) -> Result<(), String> {
        let mem = queues.mem();
        let mut errors = Vec::new();
        while let Some(chain) = queues.pop(queue) {
            let head = chain.head_index();
            let len = match self.request(chain, mem) {
                Ok(n) => n,
                Err(e) => {
                    errors.push(e);
                    0
                }
            };
            queues.complete(queue, head, len)?;
        }
        self.status.publish();
        match errors.len() {
            0 => Ok(()),
            n => Err(format!("{n} bad request(s): {}", errors[0])),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_virtio_pci::testing::{Desc, TestQueues, NEXT, WRITE};

    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x10_1000;
    const STATUS: u64 = 0x10_3000;

    struct Disk {
        path: std::path::PathBuf,
    }

    impl Drop for Disk {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn disk(tag: &str, sectors: u64, readonly: bool) -> (Block, Disk) {
        let path = std::env::temp_dir().join(format!("ferry-blk-{tag}-{}.img", std::process::id()));
        std::fs::write(&path, vec![0u8; (sectors * SECTOR) as usize]).unwrap();
        let file = OpenOptions::new().read(true).write(!readonly).open(&path).unwrap();
        let id = *b"test-disk\0\0\0\0\0\0\0\0\0\0\0";
        (
            Block {
                file,
                sectors,
                readonly,
                id,
                offer_wce: true,
                wce_negotiated: false,
                writeback: 1,
                buf: Vec::new(),
                status: Status::default(),
            },
            Disk { path },
        )
    }

    fn header(kind: u32, sector: u64) -> Vec<u8> {
        let mut h = kind.to_le_bytes().to_vec();
        h.extend_from_slice(&[0; 4]);
        h.extend_from_slice(&sector.to_le_bytes());
        h
    }

    fn request(t: &mut TestQueues, kind: u32, sector: u64, data_len: u32, data_writable: bool) {
        t.write(HDR, &header(kind, sector));
        t.write(STATUS, &[0xee]);
        t.post_chain(0, 0, &[(HDR, 16, false), (DATA, data_len, data_writable), (STATUS, 1, true)]);
    }

    #[test]
    fn guest_writes_reach_the_file_and_read_back() {
        let (mut blk, d) = disk("rw", 64, false);
        let mut t = TestQueues::new(4 << 20, &[16]);
        let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 3) as u8).collect();
        t.write(DATA, &pattern);
        request(&mut t, T_OUT, 5, 1024, false);
        blk.process_queue(0, &mut t.queues()).unwrap();
        assert_eq!(t.read(STATUS, 1), [S_OK]);
        let file = std::fs::read(&d.path).unwrap();
        assert_eq!(&file[5 * 512..7 * 512], &pattern[..]);

        t.write(DATA, &[0u8; 1024]);
        t.ram.clear_dirty();
        request(&mut t, T_IN, 5, 1024, true);
        blk.process_queue(0, &mut t.queues()).unwrap();
        assert_eq!(t.read(STATUS, 1), [S_OK]);
        assert_eq!(t.read(DATA, 1024), pattern);
        assert_eq!(t.used(0), vec![(0, 1), (0, 1025)]);
        let dirty = t.ram.dirty_pages();
        assert!(dirty.contains(&((DATA / 4096) as usize)), "data page marked: {dirty:?}");
        assert!(dirty.contains(&((STATUS / 4096) as usize)), "status page marked: {dirty:?}");
    }

    #[test]
    fn a_readonly_disk_fails_writes_with_ioerr() {
        let (mut blk, d) = disk("ro", 8, true);
        let mut t = TestQueues::new(4 << 20, &[16]);
        t.write(DATA, &[0xabu8; 512]);
        request(&mut t, T_OUT, 0, 512, false);
        blk.process_queue(0, &mut t.queues()).unwrap();
        assert_eq!(t.read(STATUS, 1), [S_IOERR]);
        assert!(std::fs::read(&d.path).unwrap().iter().all(|b| *b == 0));
        assert_eq!(blk.features() & F_RO, F_RO);
    }

    #[test]
    fn requests_past_the_end_and_unknown_types_get_an_error_status() {
        let (mut blk, _d) = disk("end", 8, false);
        let mut t = TestQueues::new(4 << 20, &[16]);
        request(&mut t, T_IN, 7, 1024, true);
        blk.process_queue(0, &mut t.queues()).unwrap();
        assert_eq!(t.read(STATUS, 1), [S_IOERR]);
        request(&mut t, 77, 0, 512, true);
        blk.process_queue(0, &mut t.queues()).unwrap();
        assert_eq!(t.read(STATUS, 1), [S_UNSUPP]);
        request(&mut t, T_GET_ID, 0, 20, true);
        blk.process_queue(0, &mut t.queues()).unwrap();
        assert_eq!(&t.read(DATA, 9), b"test-disk");
    }

    /// Every malformed chain is an error for that request only: the chain is
    /// returned with length 0, nothing outside RAM is touched, no panic.
    #[test]
    fn malformed_chains_are_refused() {
        let (mut blk, d) = disk("bad", 64, false);
        let ram = 4u64 << 20;
        let cases: Vec<(&str, Vec<Desc>)> = vec![
            (
                "header outside RAM",
                vec![
                    Desc { addr: ram + 0x1000, len: 16, flags: NEXT, next: 1 },
                    Desc { addr: STATUS, len: 1, flags: WRITE, next: 0 },
                ],
            ),
            (
                "data straddling the end of RAM",
                vec![
                    Desc { addr: HDR, len: 16, flags: NEXT, next: 1 },
                    Desc { addr: ram - 8, len: 512, flags: NEXT, next: 2 },
                    Desc { addr: STATUS, len: 1, flags: WRITE, next: 0 },
                ],
            ),
            (
                "a loop",
                vec![
                    Desc { addr: HDR, len: 16, flags: NEXT, next: 1 },
                    Desc { addr: DATA, len: 512, flags: NEXT, next: 0 },
                ],
            ),
            (
                "next past the queue size",
                vec![
                    Desc { addr: HDR, len: 16, flags: NEXT, next: 1 },
                    Desc { addr: DATA, len: 512, flags: NEXT, next: 400 },
                ],
            ),
            (
                "an oversize length",
                vec![
                    Desc { addr: HDR, len: 16, flags: NEXT, next: 1 },
                    Desc { addr: DATA, len: 0xffff_f000, flags: WRITE | NEXT, next: 2 },
                    Desc { addr: STATUS, len: 1, flags: WRITE, next: 0 },
                ],
            ),
        ];
        for (i, (what, descs)) in cases.into_iter().enumerate() {
            let mut t = TestQueues::new(ram as usize, &[16]);
            t.write(HDR, &header(T_OUT, 0));
            t.write(STATUS, &[0xee]);
            t.post(0, 0, &descs, 0);
            let r = blk.process_queue(0, &mut t.queues());
            assert!(r.is_err(), "case {i} ({what}) must be reported");
            assert_eq!(t.used(0), vec![(0, 0)], "case {i} ({what}): returned with length 0");
        }
        assert!(std::fs::read(&d.path).unwrap().iter().all(|b| *b == 0), "nothing reached the file");
    }
}

#[cfg(test)]
mod state_tests {
    use super::*;

    #[test]
    fn a_negotiated_cache_switch_refuses_the_v1_downgrade() {
        let path = std::env::temp_dir().join(format!("ferry-blk-wce-{}.img", std::process::id()));
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let file = OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let mut blk = Block {
            file,
            sectors: 8,
            readonly: false,
            id: [0; ID_BYTES],
            offer_wce: true,
            wce_negotiated: false,
            writeback: 1,
            buf: Vec::new(),
            status: Status::default(),
        };
        assert_eq!(blk.state().save_version(1).unwrap(), Vec::<u8>::new(), "unused: v1 is fine");
        blk.activate(F_CONFIG_WCE | ferry_virtio_pci::VIRTIO_F_VERSION_1).unwrap();
        blk.write_config(CONFIG_WRITEBACK, &[0]);
        assert_eq!(
            blk.state().save_version(1).unwrap_err(),
            "guest negotiated VIRTIO_BLK_F_CONFIG_WCE; v1 cannot express it"
        );
        let v2 = blk.state().save_version(2).unwrap();
        let mut other = Block { writeback: 1, wce_negotiated: false, ..blk };
        other.set_state(BlkState::load_version(2, &v2).unwrap()).unwrap();
        assert_eq!((other.wce_negotiated, other.writeback), (true, 0));
        other.set_state(BlkState::load_version(1, &[]).unwrap()).unwrap();
        assert_eq!(
            (other.wce_negotiated, other.writeback),
            (false, 1),
            "v1 upgrades to writeback, not negotiated"
        );
        let _ = std::fs::remove_file(&path);
    }
}
