//! Command-line tokens (whitespace-separated, executed in order).

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
    Ticks(u64),
    Exit(u64),
    Reset,
    Echo,
    Initrd,
    Unknown(&'a str),
}

/// Parses a decimal or `0x`-prefixed hexadecimal number.
fn number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
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
        ("echo", None, _) => Token::Echo,
        ("initrd", None, _) => Token::Initrd,
        ("seed", _, Some(n)) => Token::Seed(n),
        ("pattern", _, Some(n)) => Token::Pattern(n),
        ("hz", _, Some(n)) => Token::Hz(n),
        ("dirty", _, Some(n)) => Token::Dirty(n),
        ("ticks", _, Some(n)) => Token::Ticks(n),
        ("exit", _, Some(n)) => Token::Exit(n),
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
