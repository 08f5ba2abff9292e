//! The one stream format for snapshots (and, later, migration).
//!
//! ```text
//!  file header, 16 bytes
//!  +--------------------+----------------+----------------+
//!  | magic "FERRY\0VM"  | format version | CRC32 of the   |
//!  | (8 bytes)          | u32 LE (1)     | first 12 bytes |
//!  +--------------------+----------------+----------------+
//!
//!  section, repeated
//!  +--------+--------+---------+-------------+-------------+------------+----------+---------+
//!  | kind   | id_len | version | payload_len | payload CRC | header CRC | id bytes | payload |
//!  | u16    | u16    | u32     | u64         | u32         | u32        | (id_len) |         |
//!  +--------+--------+---------+-------------+-------------+------------+----------+---------+
//!    header CRC covers the 20 bytes before it and the id bytes: a header
//!    decodes, and is checked, before any of its payload is read.
//!
//!  sections in order: MANIFEST, MACHINE, VCPU x N ("cpu0".."cpuN-1"),
//!  DEVICE x M (id = device id, version = its state version), MEMORY, END
//!
//!  MEMORY payload: run count u64, then per run
//!    gpa u64 | pages u64 | data offset u64 (from the start of the file,
//!    4 KiB aligned) | CRC32 of the run's data u32 | reserved u32
//!  Zero pages are not stored. In a snapshot file the page data follows the
//!  MEMORY section, page aligned, so a restore maps it instead of reading it.
//! ```
//!
//! Every length is checked against a per-kind limit and against what is
//! left of the input before anything is allocated or read.
//!
//! `file.rs` reads and writes a whole stream in a file (snapshots);
//! `message.rs` sends and receives one section at a time over a byte
//! stream (live migration's messages). Both check headers the same way
//! (`RawHeader`, here).

mod file;
mod message;

use thiserror::Error;

pub use file::{Reader, Run, Writer};
pub use message::{receive, receive_into, send};

pub const MAGIC: [u8; 8] = *b"FERRY\0VM";
/// The format version this ferry writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes in the file header.
pub const FILE_HEADER_LEN: u64 = 16;
/// Bytes in a section header before the id.
pub const SECTION_HEADER_LEN: u64 = 24;
/// Longest section id.
pub const MAX_ID_LEN: usize = 64;
/// Size of one memory run entry.
pub const RUN_ENTRY_LEN: u64 = 32;
/// Largest PAGES message: its address and 1024 pages.
pub const MAX_PAGES_PAYLOAD: u64 = 8 + 1024 * 4096;

/// Section kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// What the stream holds (CBOR).
    Manifest,
    /// irqchip, PIT, clock (CBOR).
    Machine,
    /// One vCPU (CBOR).
    Vcpu,
    /// One device's state (the plugin's bytes).
    Device,
    /// Guest memory run table.
    Memory,
    /// A piece of a boot image (id: its SHA-256; the pieces of one image
    /// follow each other in order).
    Image,
    /// The end.
    End,
    /// Live migration: the source's manifest, opening a migration.
    Hello,
    /// Live migration: the destination's plan, device by device.
    Plan,
    /// Live migration: the source goes ahead (payload: "go") or stops
    /// ("dry-run", "abort: reason").
    Decision,
    /// Live migration: guest pages (gpa u64, then whole pages).
    Pages,
    /// Live migration: zero pages (pairs of gpa u64, pages u64).
    ZeroPages,
    /// Live migration: the destination has resumed the guest.
    Resumed,
    /// Live migration: the destination failed (payload: the reason).
    Failed,
    /// Live migration on one host: the guest RAM memfd follows as
    /// SCM_RIGHTS ancillary data.
    Memfd,
    /// Post-copy: the pages still on the source (pairs of gpa u64,
    /// pages u64); the destination fetches them on first touch.
    Stale,
    /// Post-copy: pages the destination's guest touched and waits for
    /// (pairs of gpa u64, pages u64).
    Request,
}

impl Kind {
    fn code(self) -> u16 {
        match self {
            Kind::Manifest => 1,
            Kind::Machine => 2,
            Kind::Vcpu => 3,
            Kind::Device => 4,
            Kind::Memory => 5,
            Kind::Image => 6,
            Kind::End => 0xffff,
            Kind::Hello => 0x10,
            Kind::Plan => 0x11,
            Kind::Decision => 0x12,
            Kind::Pages => 0x13,
            Kind::ZeroPages => 0x14,
            Kind::Resumed => 0x15,
            Kind::Failed => 0x16,
            Kind::Memfd => 0x17,
            Kind::Stale => 0x18,
            Kind::Request => 0x19,
        }
    }

    fn from_code(code: u16) -> Option<Self> {
        Some(match code {
            1 => Kind::Manifest,
            2 => Kind::Machine,
            3 => Kind::Vcpu,
            4 => Kind::Device,
            5 => Kind::Memory,
            6 => Kind::Image,
            0xffff => Kind::End,
            0x10 => Kind::Hello,
            0x11 => Kind::Plan,
            0x12 => Kind::Decision,
            0x13 => Kind::Pages,
            0x14 => Kind::ZeroPages,
            0x15 => Kind::Resumed,
            0x16 => Kind::Failed,
            0x17 => Kind::Memfd,
            0x18 => Kind::Stale,
            0x19 => Kind::Request,
            _ => return None,
        })
    }

    /// Largest payload accepted for this kind.
    pub fn max_payload(self) -> u64 {
        match self {
            Kind::Manifest | Kind::Hello | Kind::Plan => 16 << 20,
            Kind::Machine | Kind::Vcpu => 1 << 20,
            Kind::Device => 64 << 20,
            Kind::Memory | Kind::ZeroPages | Kind::Stale => 64 << 20,
            Kind::Request => 1 << 20,
            Kind::Image => crate::images::CHUNK as u64,
            Kind::Pages => MAX_PAGES_PAYLOAD,
            Kind::End | Kind::Memfd => 0,
            Kind::Decision | Kind::Resumed | Kind::Failed => 64 << 10,
        }
    }

    /// Its name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Manifest => "manifest",
            Kind::Machine => "machine",
            Kind::Vcpu => "vcpu",
            Kind::Device => "device",
            Kind::Memory => "memory",
            Kind::Image => "image",
            Kind::End => "end",
            Kind::Hello => "hello",
            Kind::Plan => "plan",
            Kind::Decision => "decision",
            Kind::Pages => "pages",
            Kind::ZeroPages => "zero-pages",
            Kind::Resumed => "resumed",
            Kind::Failed => "failed",
            Kind::Memfd => "memfd",
            Kind::Stale => "stale",
            Kind::Request => "request",
        }
    }
}

/// Stream errors; each says where.
#[derive(Debug, Error)]
pub enum StreamError {
    /// Not a ferry stream.
    #[error("not a ferry snapshot (wrong magic)")]
    Magic,
    /// Written by a newer ferry.
    #[error("stream format version {0} is newer than this ferry reads ({FORMAT_VERSION})")]
    FutureFormat(u32),
    /// The file header is damaged.
    #[error("file header CRC mismatch")]
    HeaderCrc,
    /// The input ended early.
    #[error("truncated: {what} needs {need} bytes at offset {at}, the input has {have}")]
    Truncated {
        /// What was being read.
        what: String,
        /// Bytes needed.
        need: u64,
        /// Where.
        at: u64,
        /// Input length.
        have: u64,
    },
    /// A section header fails its CRC.
    #[error("section {index} at offset {at}: header CRC mismatch")]
    SectionHeaderCrc {
        /// Section number (0-based).
        index: usize,
        /// Offset.
        at: u64,
    },
    /// Unknown section kind.
    #[error("section {index} at offset {at}: unknown kind {code}")]
    UnknownKind {
        /// Section number.
        index: usize,
        /// Offset.
        at: u64,
        /// The kind code.
        code: u16,
    },
    /// A length beyond its limit.
    #[error("section {index} ({kind} {id}): {what} of {len} bytes exceeds the limit of {limit}")]
    TooLong {
        /// Section number.
        index: usize,
        /// Kind name.
        kind: &'static str,
        /// Id.
        id: String,
        /// Which length.
        what: &'static str,
        /// The length.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// A payload fails its CRC.
    #[error("section {index} ({kind} {id}): payload CRC mismatch")]
    PayloadCrc {
        /// Section number.
        index: usize,
        /// Kind name.
        kind: &'static str,
        /// Id.
        id: String,
    },
    /// Something else is wrong in a section.
    #[error("section {index} ({kind} {id}): {message}")]
    Bad {
        /// Section number.
        index: usize,
        /// Kind name.
        kind: &'static str,
        /// Id.
        id: String,
        /// What.
        message: String,
    },
    /// I/O.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A decoded section header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SectionHeader {
    /// Section number in the stream.
    pub index: usize,
    /// Kind.
    pub kind: Kind,
    /// Id (device id, "cpu3", ...).
    pub id: String,
    /// Version of the payload's encoding.
    pub version: u32,
    /// Payload length.
    pub payload_len: u64,
    /// CRC32 of the payload.
    pub payload_crc: u32,
    /// Offset of the payload in the stream.
    pub payload_at: u64,
}

impl SectionHeader {
    /// An error about this section.
    pub fn bad(&self, message: impl Into<String>) -> StreamError {
        StreamError::Bad {
            index: self.index,
            kind: self.kind.name(),
            id: self.id.clone(),
            message: message.into(),
        }
    }
}

/// The bytes of a section header (with its id) for a payload.
pub fn header_bytes(kind: Kind, id: &str, version: u32, payload_len: u64, payload_crc: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(SECTION_HEADER_LEN as usize + id.len());
    h.extend_from_slice(&kind.code().to_le_bytes());
    h.extend_from_slice(&(id.len() as u16).to_le_bytes());
    h.extend_from_slice(&version.to_le_bytes());
    h.extend_from_slice(&payload_len.to_le_bytes());
    h.extend_from_slice(&payload_crc.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&h);
    crc.update(id.as_bytes());
    h.extend_from_slice(&crc.finalize().to_le_bytes());
    h.extend_from_slice(id.as_bytes());
    h
}

/// The fixed 24 bytes of a section header, decoded but not yet trusted.
pub(super) struct RawHeader {
    pub(super) code: u16,
    pub(super) id_len: usize,
    pub(super) version: u32,
    pub(super) payload_len: u64,
    pub(super) payload_crc: u32,
    pub(super) header_crc: u32,
}

impl RawHeader {
    /// `h` holds exactly `SECTION_HEADER_LEN` bytes.
    pub(super) fn parse(h: &[u8]) -> Self {
        let u32_at = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        RawHeader {
            code: u16::from_le_bytes([h[0], h[1]]),
            id_len: usize::from(u16::from_le_bytes([h[2], h[3]])),
            version: u32_at(4),
            payload_len: u64::from(u32_at(8)) | u64::from(u32_at(12)) << 32,
            payload_crc: u32_at(16),
            header_crc: u32_at(20),
        }
    }

    /// Checks the header CRC (over `h`'s first 20 bytes and the id), the
    /// kind and the payload limit; returns the kind and the id.
    pub(super) fn check(
        &self,
        h: &[u8],
        id_bytes: &[u8],
        index: usize,
        at: u64,
    ) -> Result<(Kind, String), StreamError> {
        let mut crc = crc32fast::Hasher::new();
        crc.update(&h[..20]);
        crc.update(id_bytes);
        if crc.finalize() != self.header_crc {
            return Err(StreamError::SectionHeaderCrc { index, at });
        }
        let kind =
            Kind::from_code(self.code).ok_or(StreamError::UnknownKind { index, at, code: self.code })?;
        let id = String::from_utf8_lossy(id_bytes).to_string();
        if self.payload_len > kind.max_payload() {
            return Err(StreamError::TooLong {
                index,
                kind: kind.name(),
                id,
                what: "payload",
                len: self.payload_len,
                limit: kind.max_payload(),
            });
        }
        Ok((kind, id))
    }
}

/// Where sections go: a snapshot file ([`Writer`]) or a migration's
/// connection. The VM's state is written once, through this, for both.
pub trait SectionSink {
    /// Write one section.
    fn put(&mut self, kind: Kind, id: &str, version: u32, payload: &[u8]) -> Result<(), StreamError>;
}
