//! One section at a time over a byte stream: live migration's messages.
//! The header is checked before the payload is read, as in a file.

use std::io::{Read, Write};

use super::{header_bytes, Kind, RawHeader, SectionHeader, StreamError, MAX_ID_LEN, SECTION_HEADER_LEN};

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

/// Receive one message from a byte stream: the header is checked (CRC,
/// kind, length limit) before the payload is read, then the payload's CRC.
/// `index` numbers messages in errors.
pub fn receive<R: Read>(input: &mut R, index: usize) -> Result<(SectionHeader, Vec<u8>), StreamError> {
    let mut payload = Vec::new();
    let h = receive_into(input, index, &mut payload)?;
    Ok((h, payload))
}

/// [`receive`] into `payload`, whose allocation is reused: a connection
/// that carries gigabytes of pages then allocates (and the kernel
/// zero-fills) no new buffer per message.
pub fn receive_into<R: Read>(
    input: &mut R,
    index: usize,
    payload: &mut Vec<u8>,
) -> Result<SectionHeader, StreamError> {
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
    payload.clear();
    payload.resize(payload_len as usize, 0);
    input.read_exact(payload)?;
    if crc32fast::hash(payload) != payload_crc {
        return Err(StreamError::PayloadCrc { index, kind: kind.name(), id });
    }
    Ok(SectionHeader { index, kind, id, version, payload_len, payload_crc, payload_at: 0 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

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
}
