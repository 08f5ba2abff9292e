//! Putting a kernel into guest memory and the boot CPU into its entry state.
//!
//! Today: ELF kernels with a Xen PVH entry note (the bundled test guest is
//! one). The boot CPU starts in 32-bit protected mode at the PVH entry with
//! `ebx` pointing at `hvm_start_info`; the other vCPUs wait for INIT/SIPI.

pub mod cpu;
pub mod mptable;
pub mod pvh;

use std::path::PathBuf;

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
    /// Not something ferry knows how to boot.
    #[error("kernel {path} is not an ELF file with a PVH entry note: {reason}")]
    NotPvh {
        /// The path given.
        path: String,
        /// What the loader said.
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
