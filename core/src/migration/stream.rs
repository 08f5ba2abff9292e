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

use std::io::{Read, Seek, SeekFrom, Write};

use thiserror::Error;

/// File magic.
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
}

impl Kind {
    fn code(self) -> u16 {
        match self {
            Kind::Manifest => 1,
            Kind::Machine => 2,
            Kind::Vcpu => 3,
            Kind::Device => 4,
            Kind::Memory => 5,
            Kind::End => 0xffff,
            Kind::Hello => 0x10,
            Kind::Plan => 0x11,
            Kind::Decision => 0x12,
            Kind::Pages => 0x13,
            Kind::ZeroPages => 0x14,
            Kind::Resumed => 0x15,
            Kind::Failed => 0x16,
            Kind::Memfd => 0x17,
        }
    }

    fn from_code(code: u16) -> Option<Self> {
        Some(match code {
            1 => Kind::Manifest,
            2 => Kind::Machine,
            3 => Kind::Vcpu,
            4 => Kind::Device,
            5 => Kind::Memory,
            0xffff => Kind::End,
            0x10 => Kind::Hello,
            0x11 => Kind::Plan,
            0x12 => Kind::Decision,
            0x13 => Kind::Pages,
            0x14 => Kind::ZeroPages,
            0x15 => Kind::Resumed,
            0x16 => Kind::Failed,
            0x17 => Kind::Memfd,
            _ => return None,
        })
    }

    /// Largest payload accepted for this kind.
    pub fn max_payload(self) -> u64 {
        match self {
            Kind::Manifest | Kind::Hello | Kind::Plan => 16 << 20,
            Kind::Machine | Kind::Vcpu => 1 << 20,
            Kind::Device => 64 << 20,
            Kind::Memory | Kind::ZeroPages => 64 << 20,
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
            Kind::End => "end",
            Kind::Hello => "hello",
            Kind::Plan => "plan",
            Kind::Decision => "decision",
            Kind::Pages => "pages",
            Kind::ZeroPages => "zero-pages",
            Kind::Resumed => "resumed",
            Kind::Failed => "failed",
            Kind::Memfd => "memfd",
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

/// Writes a stream.
pub struct Writer<W: Write + Seek> {
    out: W,
}

impl<W: Write + Seek> Writer<W> {
    /// Start a stream with its file header.
    pub fn new(mut out: W) -> Result<Self, StreamError> {
        let mut h = MAGIC.to_vec();
        h.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        let crc = crc32fast::hash(&h);
        h.extend_from_slice(&crc.to_le_bytes());
        out.write_all(&h)?;
        Ok(Writer { out })
    }

    /// Write one section.
    pub fn section(&mut self, kind: Kind, id: &str, version: u32, payload: &[u8]) -> Result<(), StreamError> {
        assert!(id.len() <= MAX_ID_LEN, "section ids are short");
        self.out.write_all(&header_bytes(
            kind,
            id,
            version,
            payload.len() as u64,
            crc32fast::hash(payload),
        ))?;
        self.out.write_all(payload)?;
        Ok(())
    }

    /// Write the memory section: `runs` of (gpa, page bytes); the data is
    /// placed page aligned after the run table.
    pub fn memory(&mut self, runs: &[(u64, &[u8])]) -> Result<(), StreamError> {
        let table_len = 8 + RUN_ENTRY_LEN * runs.len() as u64;
        let header_len = SECTION_HEADER_LEN + "ram".len() as u64;
        let start = self.out.stream_position()?;
        let mut data_at = (start + header_len + table_len).div_ceil(4096) * 4096;
        let mut table = Vec::with_capacity(table_len as usize);
        table.extend_from_slice(&(runs.len() as u64).to_le_bytes());
        for (gpa, data) in runs {
            table.extend_from_slice(&gpa.to_le_bytes());
            table.extend_from_slice(&(data.len() as u64 / 4096).to_le_bytes());
            table.extend_from_slice(&data_at.to_le_bytes());
            table.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
            table.extend_from_slice(&0u32.to_le_bytes());
            data_at += data.len() as u64;
        }
        self.section(Kind::Memory, "ram", 1, &table)?;
        let here = self.out.stream_position()?;
        let aligned = here.div_ceil(4096) * 4096;
        self.out.write_all(&vec![0u8; (aligned - here) as usize])?;
        for (_, data) in runs {
            self.out.write_all(data)?;
        }
        Ok(())
    }

    /// Write the end marker and hand back the output.
    pub fn finish(mut self) -> Result<W, StreamError> {
        self.section(Kind::End, "", 1, &[])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// One memory run as the table says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Guest-physical address.
    pub gpa: u64,
    /// 4 KiB pages.
    pub pages: u64,
    /// Offset of the data in the stream.
    pub data_at: u64,
    /// CRC32 of the data.
    pub crc: u32,
}

/// Reads a stream from a seekable input of known length.
pub struct Reader<R: Read + Seek> {
    input: R,
    len: u64,
    at: u64,
    index: usize,
}

impl<R: Read + Seek> Reader<R> {
    /// Check the file header.
    pub fn new(mut input: R) -> Result<Self, StreamError> {
        let len = input.seek(SeekFrom::End(0))?;
        input.seek(SeekFrom::Start(0))?;
        let mut r = Reader { input, len, at: 0, index: 0 };
        let h = r.read_exact_checked(FILE_HEADER_LEN, "the file header")?;
        if h[0..8] != MAGIC {
            return Err(StreamError::Magic);
        }
        let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        if crc32fast::hash(&h[..12]) != u32::from_le_bytes([h[12], h[13], h[14], h[15]]) {
            return Err(StreamError::HeaderCrc);
        }
        if version > FORMAT_VERSION {
            return Err(StreamError::FutureFormat(version));
        }
        Ok(r)
    }

    /// Input length.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Empty input.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn read_exact_checked(&mut self, n: u64, what: &str) -> Result<Vec<u8>, StreamError> {
        if self.at.checked_add(n).is_none_or(|end| end > self.len) {
            return Err(StreamError::Truncated {
                what: what.to_string(),
                need: n,
                at: self.at,
                have: self.len,
            });
        }
        let mut buf = vec![0u8; n as usize];
        self.input.read_exact(&mut buf)?;
        self.at += n;
        Ok(buf)
    }

    /// The next section header (the payload is not read yet).
    pub fn next_header(&mut self) -> Result<SectionHeader, StreamError> {
        let at = self.at;
        let index = self.index;
        let h = self.read_exact_checked(SECTION_HEADER_LEN, &format!("section {index} header"))?;
        let raw = RawHeader::parse(&h);
        if raw.id_len > MAX_ID_LEN {
            return Err(StreamError::SectionHeaderCrc { index, at });
        }
        let id_bytes = self.read_exact_checked(raw.id_len as u64, &format!("section {index} id"))?;
        let (kind, id) = raw.check(&h, &id_bytes, index, at)?;
        let RawHeader { version, payload_len, payload_crc, .. } = raw;
        if self.at + payload_len > self.len {
            return Err(StreamError::Truncated {
                what: format!("section {index} ({} {id}) payload", kind.name()),
                need: payload_len,
                at: self.at,
                have: self.len,
            });
        }
        self.index += 1;
        Ok(SectionHeader { index, kind, id, version, payload_len, payload_crc, payload_at: self.at })
    }

    /// The payload of `header` (just read), CRC checked.
    pub fn payload(&mut self, header: &SectionHeader) -> Result<Vec<u8>, StreamError> {
        let what = format!("section {} ({} {}) payload", header.index, header.kind.name(), header.id);
        let data = self.read_exact_checked(header.payload_len, &what)?;
        if crc32fast::hash(&data) != header.payload_crc {
            return Err(StreamError::PayloadCrc {
                index: header.index,
                kind: header.kind.name(),
                id: header.id.clone(),
            });
        }
        Ok(data)
    }

    /// Skip the payload of `header`.
    pub fn skip(&mut self, header: &SectionHeader) -> Result<(), StreamError> {
        self.at = header.payload_at + header.payload_len;
        self.input.seek(SeekFrom::Start(self.at))?;
        Ok(())
    }

    /// Decode a memory run table (the payload of a MEMORY section), checking
    /// every run against `ram` ((gpa, len) ranges) and the input length.
    pub fn runs(
        &self,
        header: &SectionHeader,
        table: &[u8],
        ram: &[(u64, u64)],
    ) -> Result<Vec<Run>, StreamError> {
        if table.len() < 8 {
            return Err(header.bad("run table shorter than its count"));
        }
        let count = u64::from_le_bytes(table[0..8].try_into().expect("8 bytes"));
        if count.checked_mul(RUN_ENTRY_LEN).and_then(|n| n.checked_add(8)) != Some(table.len() as u64) {
            return Err(
                header.bad(format!("run count {count} does not match a table of {} bytes", table.len()))
            );
        }
        let mut runs = Vec::with_capacity(count as usize);
        let mut data_end = header.payload_at + header.payload_len;
        for i in 0..count as usize {
            let e = &table[8 + i * RUN_ENTRY_LEN as usize..8 + (i + 1) * RUN_ENTRY_LEN as usize];
            let word = |k: usize| u64::from_le_bytes(e[k * 8..k * 8 + 8].try_into().expect("8 bytes"));
            let run = Run {
                gpa: word(0),
                pages: word(1),
                data_at: word(2),
                crc: u32::from_le_bytes([e[24], e[25], e[26], e[27]]),
            };
            let bytes = run
                .pages
                .checked_mul(4096)
                .ok_or_else(|| header.bad(format!("run {i}: page count overflows")))?;
            let inside = ram.iter().any(|&(start, len)| {
                run.gpa >= start && run.gpa.checked_add(bytes).is_some_and(|end| end <= start + len)
            });
            if !inside || run.gpa % 4096 != 0 || run.pages == 0 {
                return Err(header.bad(format!(
                    "run {i} at {:#x} ({} pages) is not inside guest RAM",
                    run.gpa, run.pages
                )));
            }
            if run.data_at % 4096 != 0 || run.data_at < data_end {
                return Err(header.bad(format!("run {i}: data offset {:#x} is misplaced", run.data_at)));
            }
            data_end = run.data_at + bytes;
            if data_end > self.len {
                return Err(StreamError::Truncated {
                    what: format!("memory run {i} ({} pages at {:#x})", run.pages, run.gpa),
                    need: bytes,
                    at: run.data_at,
                    have: self.len,
                });
            }
            runs.push(run);
        }
        Ok(runs)
    }

    /// Move past the memory data (to the next section).
    pub fn skip_to(&mut self, at: u64) -> Result<(), StreamError> {
        self.at = at;
        self.input.seek(SeekFrom::Start(at))?;
        Ok(())
    }

    /// Read the data of a run and check its CRC.
    pub fn verify_run(&mut self, header: &SectionHeader, i: usize, run: &Run) -> Result<(), StreamError> {
        self.input.seek(SeekFrom::Start(run.data_at))?;
        let mut crc = crc32fast::Hasher::new();
        let mut left = run.pages * 4096;
        let mut buf = vec![0u8; 1 << 20];
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            self.input.read_exact(&mut buf[..n])?;
            crc.update(&buf[..n]);
            left -= n as u64;
        }
        self.input.seek(SeekFrom::Start(self.at))?;
        if crc.finalize() != run.crc {
            return Err(header.bad(format!("memory run {i} at {:#x}: data CRC mismatch", run.gpa)));
        }
        Ok(())
    }
}

/// Send one message (a section) on a byte stream.
pub fn send<W: Write>(
    out: &mut W,
    kind: Kind,
    id: &str,
    version: u32,
    payload: &[u8],
) -> std::io::Result<()> {
    out.write_all(&header_bytes(kind, id, version, payload.len() as u64, crc32fast::hash(payload)))?;
    out.write_all(payload)
}

/// The fixed 24 bytes of a section header, decoded but not yet trusted.
struct RawHeader {
    code: u16,
    id_len: usize,
    version: u32,
    payload_len: u64,
    payload_crc: u32,
    header_crc: u32,
}

impl RawHeader {
    /// `h` holds exactly `SECTION_HEADER_LEN` bytes.
    fn parse(h: &[u8]) -> Self {
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
    fn check(&self, h: &[u8], id_bytes: &[u8], index: usize, at: u64) -> Result<(Kind, String), StreamError> {
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

/// Receive one message from a byte stream: the header is checked (CRC,
/// kind, length limit) before the payload is read, then the payload's CRC.
/// `index` numbers messages in errors.
pub fn receive<R: Read>(input: &mut R, index: usize) -> Result<(SectionHeader, Vec<u8>), StreamError> {
    let mut h = [0u8; SECTION_HEADER_LEN as usize];
    input.read_exact(&mut h)?;
    let raw = RawHeader::parse(&h);
    if raw.id_len > MAX_ID_LEN {
        return Err(StreamError::SectionHeaderCrc { index, at: 0 });
    }
    let mut id_bytes = vec![0u8; raw.id_len];
    input.read_exact(&mut id_bytes)?;
    let (kind, id) = raw.check(&h, &id_bytes, index, 0)?;
    let RawHeader { version, payload_len, payload_crc, .. } = raw;
    let mut payload = vec![0u8; payload_len as usize];
    input.read_exact(&mut payload)?;
    if crc32fast::hash(&payload) != payload_crc {
        return Err(StreamError::PayloadCrc { index, kind: kind.name(), id });
    }
    Ok((SectionHeader { index, kind, id, version, payload_len, payload_crc, payload_at: 0 }, payload))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn sample() -> Vec<u8> {
        let mut w = Writer::new(Cursor::new(Vec::new())).unwrap();
        w.section(Kind::Manifest, "", 1, b"manifest bytes").unwrap();
        w.section(Kind::Device, "com1", 3, b"uart").unwrap();
        let page = vec![7u8; 4096];
        w.memory(&[(0x1000, &page), (0x10_0000, &page)]).unwrap();
        w.finish().unwrap().into_inner()
    }

    #[test]
    fn a_stream_reads_back_section_by_section() {
        let bytes = sample();
        let mut r = Reader::new(Cursor::new(bytes)).unwrap();
        let h = r.next_header().unwrap();
        assert_eq!((h.kind, h.id.as_str(), h.version), (Kind::Manifest, "", 1));
        assert_eq!(r.payload(&h).unwrap(), b"manifest bytes");
        let h = r.next_header().unwrap();
        assert_eq!((h.kind, h.id.as_str(), h.version), (Kind::Device, "com1", 3));
        r.skip(&h).unwrap();
        let h = r.next_header().unwrap();
        assert_eq!(h.kind, Kind::Memory);
        let table = r.payload(&h).unwrap();
        let runs = r.runs(&h, &table, &[(0, 64 << 20)]).unwrap();
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0].data_at % 4096, 0);
        for (i, run) in runs.iter().enumerate() {
            r.verify_run(&h, i, run).unwrap();
        }
        r.skip_to(runs[1].data_at + 4096).unwrap();
        assert_eq!(r.next_header().unwrap().kind, Kind::End);
    }

    #[test]
    fn every_kind_of_damage_is_named() {
        let good = sample();
        let err = |bytes: Vec<u8>| -> String {
            let mut r = match Reader::new(Cursor::new(bytes)) {
                Ok(r) => r,
                Err(e) => return e.to_string(),
            };
            loop {
                let h = match r.next_header() {
                    Ok(h) => h,
                    Err(e) => return e.to_string(),
                };
                if h.kind == Kind::End {
                    return "no error".into();
                }
                if let Err(e) = r.payload(&h) {
                    return e.to_string();
                }
                if h.kind == Kind::Memory {
                    return "reached memory".into();
                }
            }
        };
        let mut magic = good.clone();
        magic[0] = b'X';
        assert_eq!(err(magic), "not a ferry snapshot (wrong magic)");
        let mut future = good.clone();
        future[8..12].copy_from_slice(&9u32.to_le_bytes());
        let crc = crc32fast::hash(&future[..12]);
        future[12..16].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(err(future), "stream format version 9 is newer than this ferry reads (1)");
        let truncated = good[..60].to_vec();
        assert!(err(truncated).starts_with("truncated"), "truncated");
        let mut flipped = good.clone();
        let at = good.windows(4).position(|w| w == b"uart").unwrap();
        flipped[at] ^= 1;
        assert_eq!(err(flipped), "section 1 (device com1): payload CRC mismatch");
        let mut header = good.clone();
        header[16 + 4] ^= 1; // the manifest's version field
        assert_eq!(err(header), "section 0 at offset 16: header CRC mismatch");
        // A length longer than the file, with a valid header CRC.
        let mut long = good[..16].to_vec();
        long.extend_from_slice(&header_bytes(Kind::Device, "com1", 1, 1 << 20, 0));
        assert!(
            err(long).starts_with("truncated: section 0 (device com1) payload needs 1048576 bytes"),
            "long"
        );
        let mut huge = good[..16].to_vec();
        huge.extend_from_slice(&header_bytes(Kind::Vcpu, "cpu0", 1, u64::MAX, 0));
        assert!(err(huge).contains("exceeds the limit"), "huge");
    }

    #[test]
    fn messages_cross_a_byte_stream_and_damage_is_caught() {
        let mut wire = Vec::new();
        send(&mut wire, Kind::Hello, "", 1, b"manifest").unwrap();
        send(&mut wire, Kind::Pages, "", 1, &[1u8; 8 + 4096]).unwrap();
        let mut r = Cursor::new(wire.clone());
        let (h, p) = receive(&mut r, 0).unwrap();
        assert_eq!((h.kind, p.as_slice()), (Kind::Hello, &b"manifest"[..]));
        assert_eq!(receive(&mut r, 1).unwrap().1.len(), 8 + 4096);
        assert!(receive(&mut r, 2).is_err(), "end of stream");
        let mut bad = wire.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let mut r = Cursor::new(bad);
        receive(&mut r, 0).unwrap();
        assert!(receive(&mut r, 1).unwrap_err().to_string().contains("payload CRC mismatch"));
        let mut huge = Vec::new();
        huge.extend_from_slice(&header_bytes(Kind::Pages, "", 1, u64::MAX / 2, 0));
        assert!(receive(&mut Cursor::new(huge), 0).unwrap_err().to_string().contains("exceeds the limit"));
    }

    #[test]
    fn runs_outside_ram_or_past_the_end_are_refused() {
        let bytes = sample();
        let mut r = Reader::new(Cursor::new(bytes)).unwrap();
        let h = r.next_header().unwrap();
        r.skip(&h).unwrap();
        let h = r.next_header().unwrap();
        r.skip(&h).unwrap();
        let h = r.next_header().unwrap();
        let table = r.payload(&h).unwrap();
        let e = r.runs(&h, &table, &[(0, 0x2000)]).unwrap_err().to_string();
        assert!(e.contains("not inside guest RAM"), "{e}");
        let mut bad = table.clone();
        bad[0] = 200; // count no longer matches
        assert!(r.runs(&h, &bad, &[(0, 64 << 20)]).unwrap_err().to_string().contains("does not match"));
    }
}
