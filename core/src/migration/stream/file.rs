//! A whole stream in a seekable file: [`Writer`] for snapshots, with the
//! memory runs placed page aligned so a restore can map them, and
//! [`Reader`], which checks every length against what is left of the file
//! before it allocates or reads.

use std::io::{Read, Seek, SeekFrom, Write};

use super::{
    header_bytes, Kind, RawHeader, SectionHeader, SectionSink, StreamError, FILE_HEADER_LEN, FORMAT_VERSION,
    MAGIC, MAX_ID_LEN, RUN_ENTRY_LEN, SECTION_HEADER_LEN,
};

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

    /// Skip past a memory section whose `runs` were just read: to the end
    /// of the last run's data, page aligned (or of the run table).
    pub fn skip_memory(&mut self, header: &SectionHeader, runs: &[Run]) -> Result<(), StreamError> {
        let table_end = header.payload_at + header.payload_len;
        let data_end = runs.last().map_or(table_end, |l| l.data_at + l.pages * 4096);
        self.skip_to((data_end.div_ceil(4096) * 4096).max(table_end))
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

impl<W: Write + Seek> SectionSink for Writer<W> {
    fn put(&mut self, kind: Kind, id: &str, version: u32, payload: &[u8]) -> Result<(), StreamError> {
        self.section(kind, id, version, payload)
    }
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
