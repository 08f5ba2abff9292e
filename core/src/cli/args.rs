//! Value parsers for the command line, and the plugin directory.

use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use ferry::memory::parse_size;

/// `--cpus`: what the MP table can describe.
pub(crate) fn cpus_parser() -> clap::builder::RangedI64ValueParser<u8> {
    clap::value_parser!(u8).range(1..=i64::from(ferry::boot::mptable::MAX_CPUS))
}

/// `--memory`: a size such as 256M or 2G.
pub(crate) fn memory_size(s: &str) -> Result<u64, String> {
    parse_size(s).ok_or_else(|| format!("'{s}' is not a size such as 256M or 2G"))
}

/// A bandwidth: a size per second, at least 1 MiB.
pub(crate) fn bandwidth(s: &str) -> Result<u64, String> {
    match parse_size(s) {
        Some(n) if n >= 1 << 20 => Ok(n),
        Some(_) => Err(format!("'{s}' per second is below 1M")),
        None => Err(format!("'{s}' is not a size per second such as 100M or 1G")),
    }
}

/// The plugin directory: the one given, or the ferry binary's own.
pub(crate) fn plugin_dir(given: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(dir) = given {
        return Ok(dir);
    }
    let exe = std::env::current_exe().context("cannot find the ferry binary")?;
    exe.parent().map(PathBuf::from).ok_or_else(|| anyhow!("ferry binary has no directory"))
}
