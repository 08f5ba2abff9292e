//! Guest pages on a live migration's connection, both ways: the source
//! encodes pages by dirty-bitmap number into PAGES messages (runs of
//! non-zero pages: the first page's address, then the pages) and
//! ZERO-PAGES messages (pairs of address and page count); the destination
//! checks each against its RAM and writes it.

use super::stream::{Kind, SectionHeader, SectionSink, StreamError};
use crate::memory::GuestRam;

/// Pages per PAGES message (the stream's limit for the kind).
const PAGES_PER_MESSAGE: usize = 1024;
/// Address/count pairs per ZERO-PAGES message.
const ZERO_RUNS_PER_MESSAGE: usize = 65536;
const PAGE: u64 = 4096;

/// Send pages `pages` (dirty-bitmap numbering) of `ram`: non-zero runs as
/// PAGES, zero pages as ZERO-PAGES. Returns the page bytes sent.
pub fn send(ram: &GuestRam, pages: &[u64], sink: &mut impl SectionSink) -> Result<u64, StreamError> {
    let mut sent = 0u64;
    let mut batch: Vec<u8> = Vec::new();
    let mut batch_pages = 0usize;
    let mut next_gpa = None;
    let mut zeros: Vec<(u64, u64)> = Vec::new();
    let mut flush = |sink: &mut _, batch: &mut Vec<u8>, batch_pages: &mut usize| {
        if *batch_pages > 0 {
            SectionSink::put(sink, Kind::Pages, "", 1, batch)?;
            sent += *batch_pages as u64 * PAGE;
        }
        batch.clear();
        *batch_pages = 0;
        Ok::<(), StreamError>(())
    };
    for &page in pages {
        let Some(gpa) = ram.gpa_of_page(page) else { continue };
        let Some(data) = ram.bytes(gpa, PAGE) else { continue };
        if is_zero(data) {
            match zeros.last_mut() {
                Some((start, n)) if *start + *n * PAGE == gpa => *n += 1,
                _ => zeros.push((gpa, 1)),
            }
            continue;
        }
        if next_gpa != Some(gpa) || batch_pages == PAGES_PER_MESSAGE {
            flush(sink, &mut batch, &mut batch_pages)?;
            batch.extend_from_slice(&gpa.to_le_bytes());
        }
        batch.extend_from_slice(data);
        batch_pages += 1;
        next_gpa = Some(gpa + PAGE);
    }
    flush(sink, &mut batch, &mut batch_pages)?;
    send_runs(Kind::ZeroPages, &zeros, sink)?;
    Ok(sent)
}

/// The guest-physical runs `(gpa, pages)` of RAM pages `pages`
/// (dirty-bitmap numbering, ascending).
pub fn runs(ram: &GuestRam, pages: &[u64]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for gpa in pages.iter().filter_map(|&p| ram.gpa_of_page(p)) {
        match runs.last_mut() {
            Some((start, n)) if *start + *n * PAGE == gpa => *n += 1,
            _ => runs.push((gpa, 1)),
        }
    }
    runs
}

/// Send `runs` (pairs of gpa and page count) as messages of `kind`
/// (ZERO-PAGES, STALE, REQUEST).
pub fn send_runs(kind: Kind, runs: &[(u64, u64)], sink: &mut impl SectionSink) -> Result<(), StreamError> {
    for chunk in runs.chunks(ZERO_RUNS_PER_MESSAGE.min(kind.max_payload() as usize / 16)) {
        let payload: Vec<u8> =
            chunk.iter().flat_map(|(g, n)| g.to_le_bytes().into_iter().chain(n.to_le_bytes())).collect();
        sink.put(kind, "", 1, &payload)?;
    }
    Ok(())
}

/// The address and the page bytes of a PAGES message, checked to be
/// whole pages inside guest RAM.
pub fn decode_pages<'a>(
    ram: &GuestRam,
    h: &SectionHeader,
    payload: &'a [u8],
) -> Result<(u64, &'a [u8]), StreamError> {
    if payload.len() < 8 || (payload.len() - 8) % PAGE as usize != 0 {
        return Err(h.bad("malformed pages"));
    }
    let gpa = payload[..8].try_into().map(u64::from_le_bytes).map_err(|_| h.bad("malformed pages"))?;
    let data = &payload[8..];
    if gpa % PAGE != 0 || ram.bytes(gpa, data.len() as u64).is_none() {
        return Err(h.bad(format!("pages at {gpa:#x} outside guest RAM")));
    }
    Ok((gpa, data))
}

/// The runs (gpa, pages) a ZERO-PAGES, STALE or REQUEST message carries,
/// each checked to be page aligned and inside guest RAM.
pub fn decode_runs(
    ram: &GuestRam,
    h: &SectionHeader,
    payload: &[u8],
) -> Result<Vec<(u64, u64)>, StreamError> {
    let u64_at = |b: &[u8]| b.try_into().map(u64::from_le_bytes).map_err(|_| h.bad("malformed"));
    if payload.len() % 16 != 0 {
        return Err(h.bad(format!("malformed {}", h.kind.name())));
    }
    let mut runs = Vec::with_capacity(payload.len() / 16);
    for pair in payload.chunks_exact(16) {
        let (gpa, n) = (u64_at(&pair[..8])?, u64_at(&pair[8..])?);
        let len = n.checked_mul(PAGE).ok_or_else(|| h.bad("run overflows"))?;
        if gpa % PAGE != 0 || ram.bytes(gpa, len).is_none() {
            return Err(h.bad(format!("{} at {gpa:#x} outside guest RAM", h.kind.name())));
        }
        runs.push((gpa, n));
    }
    Ok(runs)
}

/// The pages (dirty-bitmap numbering) of `runs` as [`decode_runs`] gives
/// them (each inside one RAM range).
pub fn run_pages<'a>(ram: &'a GuestRam, runs: &'a [(u64, u64)]) -> impl Iterator<Item = u64> + 'a {
    runs.iter().filter_map(|&(gpa, n)| ram.page_of(gpa).map(|first| first..first + n)).flatten()
}

/// Is every byte of `page` zero? Reads a cache line (eight words) at a
/// time, so a zero page is checked at memory speed and a non-zero one
/// stops at its first non-zero line.
fn is_zero(page: &[u8]) -> bool {
    let mut lines = page.chunks_exact(64);
    let whole = lines.all(|line| {
        line.chunks_exact(8).fold(0u64, |acc, w| acc | u64::from_ne_bytes(w.try_into().unwrap_or([1; 8])))
            == 0
    });
    whole && lines.remainder().iter().all(|b| *b == 0)
}

/// Is `kind` a page message?
pub fn is_pages(kind: Kind) -> bool {
    matches!(kind, Kind::Pages | Kind::ZeroPages)
}

/// Write a PAGES or ZERO-PAGES message into `ram` (the guest is not
/// running), after checking that it is well formed and lies inside guest
/// RAM. Pages go in through the memfd and zero runs become holes
/// (`GuestRam::write_pages`, `zero_pages`).
pub fn receive(ram: &GuestRam, h: &SectionHeader, payload: &[u8]) -> Result<(), StreamError> {
    match h.kind {
        Kind::Pages => {
            let (gpa, data) = decode_pages(ram, h, payload)?;
            ram.write_pages(gpa, data).map_err(|e| h.bad(e.to_string()))
        }
        Kind::ZeroPages => {
            for (gpa, n) in decode_runs(ram, h, payload)? {
                ram.zero_pages(gpa, n * PAGE).map_err(|e| h.bad(e.to_string()))?;
            }
            Ok(())
        }
        other => Err(h.bad(format!("a {} message is not pages", other.name()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    /// Collects messages as a connection would carry them.
    #[derive(Default)]
    struct Wire(Vec<(Kind, Vec<u8>)>);

    impl SectionSink for Wire {
        fn put(&mut self, kind: Kind, _id: &str, _version: u32, payload: &[u8]) -> Result<(), StreamError> {
            self.0.push((kind, payload.to_vec()));
            Ok(())
        }
    }

    fn header(kind: Kind, payload: &[u8]) -> SectionHeader {
        SectionHeader {
            index: 7,
            kind,
            id: String::new(),
            version: 1,
            payload_len: payload.len() as u64,
            payload_crc: 0,
            payload_at: 0,
        }
    }

    #[test]
    fn pages_cross_and_land_where_they_were() {
        let src = GuestRam::new(16 << 20).unwrap();
        let dst = GuestRam::new(16 << 20).unwrap();
        src.mem().write_slice(&[0xaa; 4096], GuestAddress(0x3000)).unwrap();
        src.mem().write_slice(&[0xbb; 4096], GuestAddress(0x4000)).unwrap();
        dst.mem().write_slice(&[0xcc; 4096], GuestAddress(0x5000)).unwrap();
        let mut wire = Wire::default();
        let sent = send(&src, &[3, 4, 5], &mut wire).unwrap();
        assert_eq!(sent, 2 * 4096, "page 5 is zero: sent as a run, not as bytes");
        let kinds: Vec<Kind> = wire.0.iter().map(|m| m.0).collect();
        assert_eq!(kinds, [Kind::Pages, Kind::ZeroPages]);
        for (kind, payload) in &wire.0 {
            receive(&dst, &header(*kind, payload), payload).unwrap();
        }
        for gpa in [0x3000, 0x4000, 0x5000] {
            assert_eq!(dst.bytes(gpa, 4096), src.bytes(gpa, 4096), "page at {gpa:#x}");
        }
    }

    #[test]
    fn a_page_is_zero_only_if_every_byte_is() {
        let mut page = [0u8; 4096];
        assert!(is_zero(&page));
        for at in [0, 7, 63, 64, 2049, 4095] {
            page[at] = 1;
            assert!(!is_zero(&page), "byte {at} set");
            page[at] = 0;
        }
        assert!(!is_zero(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]), "a tail shorter than a line counts too");
    }

    #[test]
    fn pages_outside_ram_or_malformed_are_refused() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let mut outside = (16u64 << 20).to_le_bytes().to_vec();
        outside.extend_from_slice(&[1u8; 4096]);
        let err = receive(&ram, &header(Kind::Pages, &outside), &outside).unwrap_err().to_string();
        assert_eq!(err, "section 7 (pages ): pages at 0x1000000 outside guest RAM");
        let short = [0u8; 12];
        let err = receive(&ram, &header(Kind::Pages, &short), &short).unwrap_err().to_string();
        assert!(err.ends_with("malformed pages"), "{err}");
        let mut huge = 0u64.to_le_bytes().to_vec();
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        let err = receive(&ram, &header(Kind::ZeroPages, &huge), &huge).unwrap_err().to_string();
        assert!(err.ends_with("run overflows"), "{err}");
    }
}
