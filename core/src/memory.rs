//! Guest RAM: one memfd, mapped shared into ferry and registered with KVM.
//!
//! ```text
//!  guest physical                          memfd offset
//!  0 ............... low_end  (<= 3 GiB)   0
//!  [ MMIO hole: 3 GiB .. 4 GiB: IOAPIC, LAPIC, PCI later ]
//!  4 GiB ........... 4 GiB + high          low_end
//! ```
//!
//! The memfd is what later lets a snapshot or a same-host migration hand
//! the RAM over without copying it.

use std::{fs::File, os::fd::FromRawFd};

use thiserror::Error;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

/// Where RAM below 4 GiB stops at the latest; above is the MMIO hole.
pub const LOW_RAM_LIMIT: u64 = 0xC000_0000;
/// Where RAM continues above the MMIO hole.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
/// Smallest guest ferry agrees to build.
pub const MIN_MEMORY: u64 = 8 << 20;

/// Guest RAM errors.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// Too small for the boot layout.
    #[error("memory {0} is below the minimum of 8 MiB")]
    TooSmall(String),
    /// More than this host has.
    #[error("memory {requested} is more than this host can give ({host} of RAM)")]
    MoreThanHost {
        /// What was asked for.
        requested: String,
        /// What the host has.
        host: String,
    },
    /// The memfd could not be created or sized.
    #[error("cannot allocate guest RAM ({size}): {source}")]
    Allocate {
        /// Requested size.
        size: String,
        /// OS error.
        source: std::io::Error,
    },
    /// The mapping failed.
    #[error("cannot map guest RAM: {0}")]
    Map(String),
}

/// One contiguous RAM range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRange {
    /// Guest-physical start.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// Offset of this range in the memfd.
    pub file_offset: u64,
}

/// The RAM layout for a given size.
pub fn layout(size: u64) -> Vec<RamRange> {
    let low = size.min(LOW_RAM_LIMIT);
    let mut ranges = vec![RamRange {
        gpa: 0,
        len: low,
        file_offset: 0,
    }];
    if size > low {
        ranges.push(RamRange {
            gpa: HIGH_RAM_START,
            len: size - low,
            file_offset: low,
        });
    }
    ranges
}

/// Guest RAM: the memfd, the layout and the mapping.
pub struct GuestRam {
    memfd: File,
    ranges: Vec<RamRange>,
    mem: GuestMemoryMmap,
}

impl GuestRam {
    /// Allocate `size` bytes of guest RAM (rounded up to 4 KiB).
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        let size = size.div_ceil(4096) * 4096;
        if size < MIN_MEMORY {
            return Err(MemoryError::TooSmall(human_size(size)));
        }
        if let Some(host) = host_memory() {
            if size > host {
                return Err(MemoryError::MoreThanHost {
                    requested: human_size(size),
                    host: human_size(host),
                });
            }
        }
        let memfd = create_memfd().map_err(|source| MemoryError::Allocate {
            size: human_size(size),
            source,
        })?;
        memfd
            .set_len(size)
            .map_err(|source| MemoryError::Allocate {
                size: human_size(size),
                source,
            })?;
        let ranges = layout(size);
        let mut regions = Vec::with_capacity(ranges.len());
        for r in &ranges {
            let fd = memfd
                .try_clone()
                .map_err(|e| MemoryError::Map(e.to_string()))?;
            let len = usize::try_from(r.len).map_err(|e| MemoryError::Map(e.to_string()))?;
            regions.push((
                GuestAddress(r.gpa),
                len,
                Some(FileOffset::new(fd, r.file_offset)),
            ));
        }
        let mem = GuestMemoryMmap::from_ranges_with_files(regions)
            .map_err(|e| MemoryError::Map(e.to_string()))?;
        Ok(GuestRam { memfd, ranges, mem })
    }

    /// The vm-memory view.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The RAM ranges, in guest-physical order.
    pub fn ranges(&self) -> &[RamRange] {
        &self.ranges
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.ranges.iter().map(|r| r.len).sum()
    }

    /// End of RAM below 4 GiB.
    pub fn low_end(&self) -> u64 {
        self.ranges[0].len
    }

    /// The backing memfd.
    pub fn memfd(&self) -> &File {
        &self.memfd
    }
}

fn create_memfd() -> std::io::Result<File> {
    // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns
    // a new fd or -1, and we take ownership of the fd only on success.
    let fd = unsafe { libc::memfd_create(c"ferry-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a freshly created descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Physical RAM of the host (MemTotal), if /proc says.
pub fn host_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Parse a size such as `512M`, `2G`, `1048576` or `64MiB`.
pub fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return None,
    };
    n.checked_mul(1u64 << shift)
}

/// Format a byte count for people.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (name, unit) in UNITS {
        if bytes >= unit {
            return if bytes % unit == 0 {
                format!("{} {name}", bytes / unit)
            } else {
                format!("{:.1} {name}", bytes as f64 / unit as f64)
            };
        }
    }
    format!("{bytes} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("64MiB"), Some(64 << 20));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("12Q"), None);
        assert_eq!(parse_size("99999999999T"), None);
    }

    #[test]
    fn layout_splits_around_the_mmio_hole() {
        assert_eq!(
            layout(256 << 20),
            vec![RamRange {
                gpa: 0,
                len: 256 << 20,
                file_offset: 0
            }]
        );
        let big = layout(4 << 30);
        assert_eq!(
            big[0],
            RamRange {
                gpa: 0,
                len: LOW_RAM_LIMIT,
                file_offset: 0
            }
        );
        assert_eq!(
            big[1],
            RamRange {
                gpa: HIGH_RAM_START,
                len: (4 << 30) - LOW_RAM_LIMIT,
                file_offset: LOW_RAM_LIMIT
            }
        );
    }

    #[test]
    fn more_than_the_host_is_refused() {
        let host = host_memory().expect("/proc/meminfo");
        let err = GuestRam::new(host + (1 << 30)).err().expect("must fail");
        assert!(
            err.to_string().contains("more than this host can give"),
            "{err}"
        );
    }

    #[test]
    fn ram_is_usable() {
        use vm_memory::Bytes;
        let ram = GuestRam::new(16 << 20).unwrap();
        ram.mem()
            .write_obj(0xdead_beefu32, GuestAddress(0x1000))
            .unwrap();
        assert_eq!(
            ram.mem().read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        assert_eq!(ram.size(), 16 << 20);
    }
}
