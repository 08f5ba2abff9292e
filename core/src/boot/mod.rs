//! Putting a kernel into guest memory and the boot CPU into its entry state.
//!
//! Two paths, picked from the kernel file itself:
//! - an ELF with a Xen PVH entry note (the bundled test guest is one): the
//!   boot CPU starts in 32-bit protected mode at the PVH entry with `ebx`
//!   pointing at `hvm_start_info` (pvh.rs);
//! - a bzImage: the Linux boot protocol's 64-bit entry, with the zero page
//!   in `rsi` (linux.rs).
//!
//! Either way the other vCPUs wait for the guest's INIT/SIPI, and an MP
//! table describes every vCPU.

pub mod cpu;
pub mod elf;
pub mod linux;
pub mod mptable;
pub mod pvh;

use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestRam;

use thiserror::Error;

/// The bundled test guest (built from `tests/guest` by `build.rs`).
pub static TEST_GUEST: &[u8] = include_bytes!(env!("FERRY_TEST_GUEST"));

/// Command line the bundled test guest gets when none is given.
pub const TEST_GUEST_CMDLINE: &str = "ready ticks=5 exit=0";

/// Which kernel to boot.
#[derive(Debug, Clone)]
pub enum Kernel {
    /// The bundled test guest.
    TestGuest,
    /// A kernel file.
    File(PathBuf),
}

impl Kernel {
    /// How to name the kernel in messages.
    pub fn describe(&self) -> String {
        match self {
            Kernel::TestGuest => "the bundled test guest".to_string(),
            Kernel::File(p) => p.display().to_string(),
        }
    }
}

/// Boot errors.
#[derive(Debug, Error)]
pub enum BootError {
    /// The kernel file cannot be read.
    #[error("cannot read kernel {path}: {source}")]
    KernelUnreadable {
        /// The path given.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// An ELF ferry cannot boot (not a PVH kernel, or malformed).
    #[error("kernel {path}: {reason}")]
    NotPvh {
        /// The path given.
        path: String,
        /// What the loader said.
        reason: String,
    },
    /// Neither an ELF nor a bzImage, or a broken bzImage.
    #[error("kernel {path} is not bootable (neither an ELF with a PVH entry note nor a bzImage): {reason}")]
    NotBootable {
        /// The path given.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The initramfs cannot be read.
    #[error("cannot read initramfs {path}: {source}")]
    InitramfsUnreadable {
        /// The path given.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The initramfs does not fit.
    #[error("initramfs {path} ({size} bytes) does not fit in guest RAM below 3 GiB above the kernel")]
    InitramfsTooBig {
        /// The path given.
        path: String,
        /// Its size.
        size: u64,
    },
    /// The command line is too long.
    #[error("kernel command line is {0} bytes; the limit is {max}", max = pvh::CMDLINE_MAX)]
    CmdlineTooLong(usize),
    /// The MP table cannot describe the vCPUs.
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    /// Writing boot structures failed.
    #[error("cannot write {what} into guest memory: {reason}")]
    GuestMemory {
        /// Which structure.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// A KVM call failed while setting up the boot CPU.
    #[error("cannot set up vCPU {cpu} for boot: {source}")]
    Vcpu {
        /// vCPU index.
        cpu: u8,
        /// The KVM error.
        source: kvm_ioctls::Error,
    },
}

/// Where the boot CPU starts, by boot protocol.
#[derive(Debug, Clone, Copy)]
pub enum Entry {
    /// PVH: 32-bit protected mode.
    Pvh(pvh::PvhEntry),
    /// Linux: 64-bit long mode.
    Linux(linux::LinuxEntry),
}

/// Write the command line and the MP table (both boot paths).
pub fn write_cmdline_and_mptable(ram: &GuestRam, cmdline: &str, cpus: u8) -> Result<(), BootError> {
    if cmdline.len() + 1 > pvh::CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    let mem_err = |what: &'static str| {
        move |e: vm_memory::GuestMemoryError| BootError::GuestMemory { what, reason: e.to_string() }
    };
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    ram.mem().write_slice(&bytes, GuestAddress(pvh::CMDLINE)).map_err(mem_err("command line"))?;
    let table = mptable::build(cpus)?;
    ram.mem().write_slice(&table, GuestAddress(mptable::MPTABLE_START)).map_err(mem_err("MP table"))?;
    // BIOS data area words that MP table searches start from, as firmware
    // leaves them: the EBDA segment, and base memory in KiB (up to the table).
    let ebda_segment = (mptable::MPTABLE_START >> 4) as u16;
    let base_kib = (mptable::MPTABLE_START >> 10) as u16;
    ram.mem().write_obj(ebda_segment, GuestAddress(BDA_EBDA_SEGMENT)).map_err(mem_err("BIOS data area"))?;
    ram.mem().write_obj(base_kib, GuestAddress(BDA_BASE_MEMORY_KIB)).map_err(mem_err("BIOS data area"))?;
    Ok(())
}

/// BIOS data area: segment of the extended BIOS data area.
const BDA_EBDA_SEGMENT: u64 = 0x40e;
/// BIOS data area: base memory size in KiB.
const BDA_BASE_MEMORY_KIB: u64 = 0x413;

/// Load `kernel` by the protocol its file format calls for.
pub fn load(
    ram: &GuestRam,
    kernel: &Kernel,
    initramfs: Option<&Path>,
    cmdline: &str,
    cpus: u8,
) -> Result<Entry, BootError> {
    match kernel {
        Kernel::TestGuest => pvh::load(ram, kernel, initramfs, cmdline, cpus).map(Entry::Pvh),
        Kernel::File(path) => match linux::sniff(path)? {
            linux::Format::Elf => pvh::load(ram, kernel, initramfs, cmdline, cpus).map(Entry::Pvh),
            linux::Format::BzImage => linux::load(ram, path, initramfs, cmdline, cpus).map(Entry::Linux),
            linux::Format::Unknown => Err(BootError::NotBootable {
                path: path.display().to_string(),
                reason: "no ELF magic and no bzImage header".to_string(),
            }),
        },
    }
}
