//! The device process's sandbox, entered in two steps around the plugin's
//! `create` (which opens the device's host resources: a disk image, a tap
//! on the host's network):
//!
//! - [`before_plugin`], before any plugin code runs (the library's loading
//!   included): resource limits, `no_new_privs`, new mount, IPC and UTS
//!   namespaces, and a Landlock ruleset that lets the process open only the
//!   plugin library and the system libraries (read, execute), the files its
//!   device properties name and `/dev/net/tun` (read, write).
//! - [`after_create`], before the first guest access: a new network
//!   namespace (the tap stays the host's: it is open), and a seccomp
//!   allowlist on every thread. A system call outside it raises `SIGSYS`,
//!   whose handler writes one line naming the call and ends the process.
//!
//! There is no new PID namespace: the device process would be its init,
//! which the kernel shields from its own fatal signals (an `abort` would be
//! ignored). Instead seccomp lets it signal only itself and start threads
//! only, and Landlock hides `/proc`.

use std::{collections::BTreeMap, path::Path};

use landlock::{
    path_beneath_rules, Access, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, ABI,
};
use seccompiler::{BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

use super::protocol::SandboxSpec;
use crate::seccomp::{self, Rules, SANDBOX_PREFIX};

/// Address space a device process may use beyond guest RAM (its code,
/// heap, thread stacks and allocator arenas).
const SPARE_ADDRESS_SPACE: u64 = 4 << 30;
/// Descriptors it may hold.
const MAX_FDS: u64 = 256;
/// System libraries the plugin library may pull in when it loads.
const LIBRARY_DIRS: &[&str] = &["/lib", "/lib64", "/usr/lib", "/usr/lib64"];

/// Why a sandbox step failed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A system call the sandbox makes failed.
    #[error("{what}: {source}")]
    Os {
        /// What it was doing.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// Landlock refused the ruleset.
    #[error("Landlock: {0}")]
    Landlock(String),
    /// The seccomp filter could not be built or installed.
    #[error("seccomp: {0}")]
    Seccomp(String),
}

fn os(what: &'static str, r: libc::c_int) -> Result<(), SandboxError> {
    if r == 0 {
        Ok(())
    } else {
        Err(SandboxError::Os { what, source: std::io::Error::last_os_error() })
    }
}

fn limit(resource: libc::__rlimit_resource_t, value: u64, what: &'static str) -> Result<(), SandboxError> {
    let l = libc::rlimit { rlim_cur: value, rlim_max: value };
    // SAFETY: setrlimit reads one rlimit struct.
    os(what, unsafe { libc::setrlimit(resource, &l) })
}

/// Step one, before the plugin library loads.
pub fn before_plugin(spec: &SandboxSpec, plugin: &Path) -> Result<(), SandboxError> {
    limit(libc::RLIMIT_CORE, 0, "setting RLIMIT_CORE")?;
    limit(libc::RLIMIT_NOFILE, MAX_FDS, "setting RLIMIT_NOFILE")?;
    limit(libc::RLIMIT_AS, spec.ram_bytes.saturating_add(SPARE_ADDRESS_SPACE), "setting RLIMIT_AS")?;
    // SAFETY: prctl with integer arguments.
    os("setting no_new_privs", unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })?;
    // SAFETY: unshare with namespace flags; affects this process only.
    os("unsharing mount, IPC and UTS namespaces", unsafe {
        libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS)
    })?;
    // Mounts made here stay here.
    // SAFETY: a propagation change on "/" with no data.
    os("making mounts private", unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    })?;
    landlock_files(spec, plugin)
}

fn landlock_files(spec: &SandboxSpec, plugin: &Path) -> Result<(), SandboxError> {
    let abi = ABI::V5;
    let e = |e: landlock::RulesetError| SandboxError::Landlock(e.to_string());
    let read_exec = AccessFs::from_read(abi);
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .map_err(e)?
        .create()
        .map_err(e)?
        .add_rules(path_beneath_rules([plugin], read_exec))
        .map_err(e)?
        .add_rules(path_beneath_rules(LIBRARY_DIRS, read_exec))
        .map_err(e)?
        .add_rules(path_beneath_rules(spec.files.iter().map(Path::new), AccessFs::from_all(abi)))
        .map_err(e)?
        .add_rules(path_beneath_rules(["/dev/net/tun", "/dev/null"], AccessFs::from_all(abi)))
        .map_err(e)?
        .restrict_self()
        .map_err(e)?;
    if status.ruleset == RulesetStatus::NotEnforced {
        eprintln!("{SANDBOX_PREFIX} this kernel does not enforce Landlock: the device may open any file");
    }
    Ok(())
}

/// Step two, after the device exists and before the guest reaches it.
pub fn after_create() -> Result<(), SandboxError> {
    // SAFETY: unshare with a namespace flag; affects this process only.
    os("unsharing the network namespace", unsafe { libc::unshare(libc::CLONE_NEWNET) })?;
    seccomp::install_sigsys_handler(seccomp::Style::DeviceProcess)
        .map_err(|e| SandboxError::Seccomp(e.to_string()))?;
    // clone3 cannot be checked (its flags are behind a pointer): it fails
    // with ENOSYS, and the C library falls back to clone, which is checked.
    let no_clone3 = filter(
        [(libc::SYS_clone3, vec![])].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
    )?;
    let allow = filter(allowlist()?, SeccompAction::Trap, SeccompAction::Allow)?;
    seccompiler::apply_filter_all_threads(&no_clone3).map_err(|e| SandboxError::Seccomp(e.to_string()))?;
    seccompiler::apply_filter_all_threads(&allow).map_err(|e| SandboxError::Seccomp(e.to_string()))
}

fn filter(rules: Rules, mismatch: SeccompAction, matched: SeccompAction) -> Result<BpfProgram, SandboxError> {
    seccomp::build(rules, mismatch, matched).map_err(|e| SandboxError::Seccomp(e.to_string()))
}

/// The system calls a device may make once it runs, with the conditions
/// on the arguments of the few that could reach beyond the process.
fn allowlist() -> Result<Rules, SandboxError> {
    let plain = [
        // Descriptors it holds: its files, eventfds, tap, sockets to ferry.
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_preadv2,
        libc::SYS_pwritev2,
        libc::SYS_lseek,
        libc::SYS_close,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_fcntl,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_fallocate,
        libc::SYS_ftruncate,
        libc::SYS_sendmsg,
        libc::SYS_recvmsg,
        libc::SYS_dup,
        // Landlock decides which files.
        libc::SYS_openat,
        // Waiting.
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_pwait2,
        libc::SYS_eventfd2,
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_nanosleep,
        libc::SYS_clock_nanosleep,
        libc::SYS_clock_gettime,
        libc::SYS_gettimeofday,
        libc::SYS_getrandom,
        // The panic message names its source file relative to this.
        libc::SYS_getcwd,
        // Memory.
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_mprotect,
        libc::SYS_madvise,
        libc::SYS_brk,
        // Signals (its own), threads, ending.
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        // A wait interrupted by a stop (SIGSTOP, a debugger) resumes
        // through this on SIGCONT.
        libc::SYS_restart_syscall,
        libc::SYS_sigaltstack,
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_prctl,
        libc::SYS_sched_getaffinity,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_exit,
        libc::SYS_exit_group,
        // Decided by the first filter (ENOSYS).
        libc::SYS_clone3,
    ];
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = plain.iter().map(|&n| (n, vec![])).collect();
    let cond = |arg: u8, op: SeccompCmpOp, value: u64| {
        SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value)
            .map_err(|e| SandboxError::Seccomp(e.to_string()))
    };
    let rule =
        |c: Vec<SeccompCondition>| SeccompRule::new(c).map_err(|e| SandboxError::Seccomp(e.to_string()));
    // Threads only: no new processes.
    let thread = libc::CLONE_THREAD as u64;
    rules.insert(libc::SYS_clone, vec![rule(vec![cond(0, SeccompCmpOp::MaskedEq(thread), thread)?])?]);
    // Signals to itself only (abort, thread signals).
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() } as u64;
    rules.insert(libc::SYS_tgkill, vec![rule(vec![cond(0, SeccompCmpOp::Eq, pid)?])?]);
    // The ioctls of its descriptors: non-blocking mode, close-on-exec, a
    // tap's offloads and header size, a terminal's attributes.
    let ioctls: [u64; 7] = [
        libc::FIONBIO,
        libc::FIOCLEX,
        libc::TCGETS,
        libc::TIOCGWINSZ,
        0x4004_54d0, // TUNSETOFFLOAD
        0x4004_54d8, // TUNSETVNETHDRSZ
        0x8004_54d7, // TUNGETVNETHDRSZ
    ];
    let mut ioctl_rules = Vec::new();
    for op in ioctls {
        ioctl_rules.push(rule(vec![SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            op,
        )
        .map_err(|e| SandboxError::Seccomp(e.to_string()))?])?);
    }
    rules.insert(libc::SYS_ioctl, ioctl_rules);
    Ok(rules)
}
