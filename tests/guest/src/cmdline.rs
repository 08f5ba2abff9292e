//! Command-line tokens (whitespace-separated, executed in order).

use crate::{blk, blk_bench, blk_dma_check, net, pio_bench, rng};

/// Used when the loader passes no command line or an empty one.
pub const DEFAULT_CMDLINE: &str = "ready ticks=5 exit=0";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Token<'a> {
    Ready,
    Seed(u64),
    Pattern(u64),
    Verify,
    Smp,
    Hz(u64),
    Dirty(u64),
    DirtyMib(u64),
    Ticks(u64),
    Exit(u64),
    Reset,
    /// `boot`: count this boot in CMOS RAM.
    Boot,
    /// `fresh`: report the devices as this boot found them.
    Fresh,
    /// `reboot-until=<n>`: reset while fewer than `n` boots were counted.
    RebootUntil(u64),
    /// `blk-boots=<sector>`: check earlier boots' disk writes, add this one's.
    BlkBoots(u64),
    Echo,
    Initrd,
    Pci,
    Calibrate,
    Blk(BlkOp),
    Rng(u64),
    NetSend(u64),
    NetRecv(u64),
    /// `dev-write=<reg>:<value>` on the test device.
    DevWrite(u8, u8),
    /// `dev-check=<reg>:<value>` on the test device.
    DevCheck(u8, u8),
    /// `cpuid=<leaf>`: print what CPUID answers for it.
    Cpuid(u32),
    /// `pio-bench=<port>:<n>`: time `n` reads of an I/O port.
    PioBench(u16, u64),
    /// `fs-open=<name>`: look a file up in the virtio-fs share and open it.
    FsOpen(&'a str),
    /// `fs-read`: read the file `fs-open` opened.
    FsRead,
    Unknown(&'a str),
}

/// A `blk-*` token (sector counts are 1..=64, `blk-bench` request counts
/// 1..=100000, `blk-dma-check` waits 0..=100000 ticks, checked when
/// parsing).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum BlkOp {
    Write { sector: u64, count: u64, seed: u64 },
    Read { sector: u64, count: u64 },
    Verify { sector: u64, count: u64, seed: u64 },
    Flush,
    Id,
    Bench { write: bool, count: u64, depth: u64 },
    DmaCheck { sector: u64, count: u64, seed: u64, before: u64, after: u64 },
}

impl BlkOp {
    /// Name used in `BLK TIMEOUT op=<name>`.
    pub fn name(self) -> &'static str {
        match self {
            BlkOp::Write { .. } => "write",
            BlkOp::Read { .. } => "read",
            BlkOp::Verify { .. } => "verify",
            BlkOp::Flush => "flush",
            BlkOp::Id => "id",
            BlkOp::Bench { .. } => "bench",
            BlkOp::DmaCheck { .. } => "dma-check",
        }
    }
}

/// Parses a decimal or `0x`-prefixed hexadecimal number.
/// `<reg>:<value>`, both bytes.
fn reg_value(s: &str) -> Option<(u8, u8)> {
    let [r, v] = numbers::<2>(s)?;
    Some((u8::try_from(r).ok()?, u8::try_from(v).ok()?))
}

/// `<port>:<n>`, a 16-bit port and a read count in 1..=MAX_READS.
fn port_count(s: &str) -> Option<(u16, u64)> {
    let [p, n] = numbers::<2>(s)?;
    Some((u16::try_from(p).ok()?, in_range(n, pio_bench::MAX_READS)?))
}

fn number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Parses exactly `N` colon-separated numbers.
fn numbers<const N: usize>(s: &str) -> Option<[u64; N]> {
    let mut out = [0; N];
    let mut parts = s.split(':');
    for slot in out.iter_mut() {
        *slot = number(parts.next()?)?;
    }
    parts.next().is_none().then_some(out)
}

/// `Some(n)` if `n` lies in `1..=max`.
fn in_range(n: u64, max: u64) -> Option<u64> {
    (1..=max).contains(&n).then_some(n)
}

fn blk_op(key: &str, value: &str) -> Option<BlkOp> {
    let count = |c| in_range(c, blk::MAX_SECTORS);
    match key {
        "blk-write" => {
            let [sector, count_, seed] = numbers(value)?;
            let count = count(count_)?;
            Some(BlkOp::Write { sector, count, seed })
        }
        "blk-read" => {
            let [sector, count_] = numbers(value)?;
            let count = count(count_)?;
            Some(BlkOp::Read { sector, count })
        }
        "blk-verify" => {
            let [sector, count_, seed] = numbers(value)?;
            let count = count(count_)?;
            Some(BlkOp::Verify { sector, count, seed })
        }
        "blk-dma-check" => {
            let [sector, count_, seed, before, after] = numbers(value)?;
            let count = count(count_)?;
            let wait = |t: u64| (t <= blk_dma_check::MAX_WAIT_TICKS).then_some(t);
            Some(BlkOp::DmaCheck { sector, count, seed, before: wait(before)?, after: wait(after)? })
        }
        "blk-bench" => {
            let (kind, count) = value.split_once(':')?;
            let write = match kind {
                "r" => false,
                "w" => true,
                _ => return None,
            };
            let (count, depth) = match count.split_once(':') {
                Some((count, depth)) => (count, in_range(number(depth)?, blk_bench::MAX_DEPTH)?),
                None => (count, 1),
            };
            let count = in_range(number(count)?, blk_bench::MAX_REQUESTS)?;
            Some(BlkOp::Bench { write, count, depth })
        }
        _ => None,
    }
}

/// Classifies one token. Malformed values count as unknown tokens.
pub fn parse_token(tok: &str) -> Token<'_> {
    let (key, value) = match tok.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None => (tok, None),
    };
    let num = value.and_then(number);
    match (key, value, num) {
        ("ready", None, _) => Token::Ready,
        ("verify", None, _) => Token::Verify,
        ("smp", None, _) => Token::Smp,
        ("reset", None, _) => Token::Reset,
        ("boot", None, _) => Token::Boot,
        ("fresh", None, _) => Token::Fresh,
        ("reboot-until", _, Some(n)) => Token::RebootUntil(n),
        ("blk-boots", _, Some(n)) => Token::BlkBoots(n),
        ("echo", None, _) => Token::Echo,
        ("initrd", None, _) => Token::Initrd,
        ("pci", None, _) => Token::Pci,
        ("calibrate", None, _) => Token::Calibrate,
        ("blk-flush", None, _) => Token::Blk(BlkOp::Flush),
        ("blk-id", None, _) => Token::Blk(BlkOp::Id),
        ("fs-read", None, _) => Token::FsRead,
        ("fs-open", Some(name), _) if !name.is_empty() && name.len() <= crate::fs::MAX_NAME => Token::FsOpen(name),
        ("seed", _, Some(n)) => Token::Seed(n),
        ("pattern", _, Some(n)) => Token::Pattern(n),
        ("hz", _, Some(n)) => Token::Hz(n),
        ("dirty", _, Some(n)) => Token::Dirty(n),
        ("dirty-mib", _, Some(n)) => Token::DirtyMib(n),
        ("ticks", _, Some(n)) => Token::Ticks(n),
        ("exit", _, Some(n)) => Token::Exit(n),
        ("cpuid", _, Some(n)) => u32::try_from(n).map_or(Token::Unknown(tok), Token::Cpuid),
        ("rng", _, Some(n)) => in_range(n, rng::MAX_BYTES).map_or(Token::Unknown(tok), Token::Rng),
        ("net-send", _, Some(n)) => in_range(n, net::MAX_FRAMES).map_or(Token::Unknown(tok), Token::NetSend),
        ("net-recv", _, Some(n)) => in_range(n, net::MAX_FRAMES).map_or(Token::Unknown(tok), Token::NetRecv),
        ("dev-write", Some(v), _) => reg_value(v).map_or(Token::Unknown(tok), |(r, x)| Token::DevWrite(r, x)),
        ("dev-check", Some(v), _) => reg_value(v).map_or(Token::Unknown(tok), |(r, x)| Token::DevCheck(r, x)),
        ("pio-bench", Some(v), _) => port_count(v).map_or(Token::Unknown(tok), |(p, n)| Token::PioBench(p, n)),
        (_, Some(v), _) => blk_op(key, v).map_or(Token::Unknown(tok), Token::Blk),
        _ => Token::Unknown(tok),
    }
}

/// Returns the command line to run: the loader's, or the default when it
/// is missing or blank. Invalid UTF-8 is cut at the first bad byte.
pub fn effective(raw: &[u8]) -> &str {
    let text = match core::str::from_utf8(raw) {
        Ok(s) => s,
        // The prefix up to the first invalid byte is valid UTF-8.
        Err(e) => core::str::from_utf8(&raw[..e.valid_up_to()]).unwrap_or(""),
    };
    if text.trim_ascii().is_empty() {
        DEFAULT_CMDLINE
    } else {
        text
    }
}
