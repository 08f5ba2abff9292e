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

use ferry_plugin_api::{
    sdk::{DescriptorBuilder, Properties},
    DeviceConfig, HostBox, PluginDescriptor, PropertyKind,
};
use ferry_virtio_pci::{DescriptorChain, GuestMemory, Queues, VirtioDevice, VirtioPci};

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

pub fn describe() -> PluginDescriptor {
    DescriptorBuilder::new("virtio-blk", env!("CARGO_PKG_VERSION"), "virtio block device on a raw image file")
        .property("path", PropertyKind::String, None, "raw disk image")
        .property("readonly", PropertyKind::Bool, Some("false"), "refuse guest writes")
        .property("serial", PropertyKind::String, Some(""), "id string the guest reads (default: the device id)")
        .build()
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
    VirtioPci::new(Block { file, sectors: len / SECTOR, readonly, id }, host)
}

pub struct Block {
    file: File,
    sectors: u64,
    readonly: bool,
    id: [u8; ID_BYTES],
}

impl Block {
    fn range_ok(&self, sector: u64, bytes: usize) -> bool {
        bytes as u64 % SECTOR == 0
            && sector.checked_add(bytes as u64 / SECTOR).is_some_and(|end| end <= self.sectors)
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
        let mut status_writer = writer.split_at(writable - 1).map_err(|e| format!("bad request chain: {e}"))?;

        let mut written = 0usize;
        let status = match kind {
            T_IN => {
                let bytes = writer.available_bytes();
                if !self.range_ok(sector, bytes) {
                    S_IOERR
                } else {
                    let mut buf = vec![0u8; CHUNK.min(bytes.max(1))];
                    let mut offset = sector * SECTOR;
                    let mut left = bytes;
                    let mut status = S_OK;
                    while left > 0 {
                        let n = left.min(buf.len());
                        if self.file.read_exact_at(&mut buf[..n], offset).is_err()
                            || writer.write_all(&buf[..n]).is_err()
                        {
                            status = S_IOERR;
                            break;
                        }
                        written += n;
                        left -= n;
                        offset += n as u64;
                    }
                    status
                }
            }
            T_OUT => {
                let bytes = reader.available_bytes();
                if self.readonly || !self.range_ok(sector, bytes) {
                    S_IOERR
                } else {
                    let mut buf = vec![0u8; CHUNK.min(bytes.max(1))];
                    let mut offset = sector * SECTOR;
                    let mut left = bytes;
                    let mut status = S_OK;
                    while left > 0 {
                        let n = left.min(buf.len());
                        if reader.read_exact(&mut buf[..n]).is_err()
                            || self.file.write_all_at(&buf[..n], offset).is_err()
                        {
                            status = S_IOERR;
                            break;
                        }
                        left -= n;
                        offset += n as u64;
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
        Ok((written + 1) as u32)
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        2
    }

    fn pci_class(&self) -> u32 {
        0x01_8000 // mass storage, other
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![256]
    }

    fn features(&self) -> u64 {
        F_FLUSH | if self.readonly { F_RO } else { 0 }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config: capacity (u64, in 512-byte sectors) first.
        let mut config = [0u8; 64];
        config[0..8].copy_from_slice(&self.sectors.to_le_bytes());
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
        match errors.len() {
            0 => Ok(()),
            n => Err(format!("{n} bad request(s): {}", errors[0])),
        }
    }
}
