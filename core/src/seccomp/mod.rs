//! seccomp for ferry's own threads, and the pieces a device process's
//! sandbox (`isolate/sandbox.rs`) shares with it: building a filter and
//! the SIGSYS handler that names a refused call in one line.
//!
//! ```text
//!  ferry run: build the VM (plugins, devices, KVM) ... then, before a vCPU runs:
//!    process filter (every thread, TSYNC): main loop, API, device workers, migrations
//!    vCPU threads: + the vCPU filter, each at its start
//!    a migration thread: + the migration filter, at its start
//! ```
//!
//! A filter is an allowlist; a call outside it traps. In ferry the
//! handler writes `ferry: error: thread NAME made a system call its seccomp
//! filter does not allow: CALL (NR); ferry ends` and ends ferry with status
//! [`EXIT_STATUS`]; in a device process it writes `ferry-sandbox: refused
//! system call CALL (NR)` and dies by SIGSYS, which ferry reports.
//! `--seccomp log` lets every call through and has the kernel log the ones
//! outside the lists (`dmesg`: `audit: type=1326 ... comm="vcpu0" ...
//! syscall=N`); `--seccomp off` installs nothing.

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicU8, Ordering},
};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch,
};

pub mod lists;
pub mod syscalls;

/// How a device process's sandbox starts its own lines on stderr (ferry
/// quotes them).
pub const SANDBOX_PREFIX: &str = "ferry-sandbox:";

/// What ferry's exit status is when its filter refused a call.
pub const EXIT_STATUS: i32 = 159;

/// `--seccomp`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Mode {
    /// Enforce: a call outside the list ends ferry with one line.
    #[default]
    On,
    /// Allow every call; the kernel logs those outside the list.
    Log,
    /// No filter.
    Off,
}

/// Why a filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
#[error("seccomp: {0}")]
pub struct SeccompError(pub String);

fn err(e: impl std::fmt::Display) -> SeccompError {
    SeccompError(e.to_string())
}

/// Rules by system call number.
pub type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// Compile an allowlist: `matched` for the calls in `rules`, `mismatch`
/// for the rest.
pub fn build(
    rules: Rules,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, SeccompError> {
    let f = SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64).map_err(err)?;
    BpfProgram::try_from(f).map_err(err)
}

/// Rules allowing each of `calls` whatever its arguments.
pub fn plain(calls: &[i64]) -> Rules {
    calls.iter().map(|&n| (n, vec![])).collect()
}

/// One condition on argument `arg`.
pub fn cond(
    arg: u8,
    len: SeccompCmpArgLen,
    op: SeccompCmpOp,
    value: u64,
) -> Result<SeccompCondition, SeccompError> {
    SeccompCondition::new(arg, len, op, value).map_err(err)
}

/// A rule: all of `conditions`.
pub fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, SeccompError> {
    SeccompRule::new(conditions).map_err(err)
}

/// Rules allowing `ioctl` with one of these request numbers only.
pub fn ioctls(requests: &[u64]) -> Result<Vec<SeccompRule>, SeccompError> {
    requests.iter().map(|&op| rule(vec![cond(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, op)?])).collect()
}

/// How the SIGSYS handler ends the process: 0 a device process (dies by
/// SIGSYS), 1 ferry (exits with [`EXIT_STATUS`]).
static STYLE: AtomicU8 = AtomicU8::new(0);

/// The handler's styles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// `ferry-sandbox: refused system call ...`, then death by SIGSYS.
    DeviceProcess,
    /// `ferry: error: thread ...`, then exit with [`EXIT_STATUS`].
    Ferry,
}

/// Install the SIGSYS handler that names a refused call.
pub fn install_sigsys_handler(style: Style) -> Result<(), SeccompError> {
    STYLE.store(u8::from(style == Style::Ferry), Ordering::SeqCst);
    // SAFETY: a zeroed sigaction with our handler and SA_SIGINFO; the
    // handler only calls async-signal-safe functions.
    let r = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut())
    };
    if r != 0 {
        return Err(SeccompError(format!(
            "installing the SIGSYS handler: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// A line buffer the handler fills without allocating.
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn put(&mut self, b: &[u8]) {
        for &c in b {
            if self.len < self.buf.len() {
                self.buf[self.len] = c;
                self.len += 1;
            }
        }
    }

    fn number(&mut self, v: u32) {
        let mut digits = [0u8; 12];
        let mut d = digits.len();
        let mut v = v;
        loop {
            d -= 1;
            digits[d] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.put(&digits[d..]);
    }
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SIGSYS; `si_syscall`
    // is the int at byte 24 (after signo, errno, code, padding and the
    // call address) in the x86_64 layout.
    let nr = unsafe { std::ptr::read_unaligned((info as *const u8).add(24) as *const i32) };
    let name = syscalls::name(i64::from(nr)).unwrap_or("?").as_bytes();
    let mut line = Line { buf: [0; 256], len: 0 };
    if STYLE.load(Ordering::SeqCst) == 0 {
        line.put(SANDBOX_PREFIX.as_bytes());
        line.put(b" refused system call ");
        line.put(name);
        line.put(b" (");
        line.number(nr.unsigned_abs());
        line.put(b")\n");
        // SAFETY: write, signal and the tgkill system call are
        // async-signal-safe; the buffer is ours; SIGSYS stays blocked until
        // we return, and then kills the process with its default action.
        unsafe {
            libc::write(2, line.buf.as_ptr() as *const libc::c_void, line.len);
            libc::signal(libc::SIGSYS, libc::SIG_DFL);
            libc::syscall(libc::SYS_tgkill, libc::getpid(), libc::gettid(), libc::SIGSYS);
        }
        return;
    }
    let mut thread = [0u8; 17];
    // SAFETY: PR_GET_NAME writes at most 16 bytes and a NUL into a buffer
    // of 17; prctl is async-signal-safe (a system call).
    unsafe { libc::prctl(libc::PR_GET_NAME, thread.as_mut_ptr()) };
    let thread_len = thread.iter().position(|&b| b == 0).unwrap_or(16);
    line.put(b"ferry: error: thread ");
    line.put(&thread[..thread_len]);
    line.put(b" made a system call its seccomp filter does not allow: ");
    line.put(name);
    line.put(b" (");
    line.number(nr.unsigned_abs());
    line.put(b"); ferry ends (`--seccomp log` lets it through and logs it; an in-process plugin that needs more can run --isolate'd)\n");
    // SAFETY: write and _exit are async-signal-safe; the buffer is ours.
    unsafe {
        libc::write(2, line.buf.as_ptr() as *const libc::c_void, line.len);
        libc::_exit(EXIT_STATUS);
    }
}

/// The mode ferry runs with, set once from `--seccomp`.
static MODE: AtomicU8 = AtomicU8::new(0);

/// Set the mode for this process (before any filter is installed).
pub fn set_mode(mode: Mode) {
    MODE.store(
        match mode {
            Mode::On => 0,
            Mode::Log => 1,
            Mode::Off => 2,
        },
        Ordering::SeqCst,
    );
}

/// The mode set.
pub fn mode() -> Mode {
    match MODE.load(Ordering::SeqCst) {
        0 => Mode::On,
        1 => Mode::Log,
        _ => Mode::Off,
    }
}

/// Install `rules` in the current mode: on every thread of the process
/// (`all_threads`) or on the calling thread only.
pub fn install(rules: Rules, all_threads: bool) -> Result<(), SeccompError> {
    let mismatch = match mode() {
        Mode::Off => return Ok(()),
        Mode::On => SeccompAction::Trap,
        Mode::Log => SeccompAction::Log,
    };
    let program = build(rules, mismatch, SeccompAction::Allow)?;
    if all_threads {
        seccompiler::apply_filter_all_threads(&program).map_err(err)?;
        seccompiler::apply_filter_all_threads(&clone3_unsupported()?).map_err(err)
    } else {
        seccompiler::apply_filter(&program).map_err(err)
    }
}

/// A second filter, installed with the process list: `clone3` fails with
/// ENOSYS. Its flags sit in a structure a filter cannot read, so it could
/// start a process past `clone`'s thread-only rule; the C library then
/// starts threads with `clone`, whose flags the lists check. (Of two
/// filters' verdicts the kernel takes the stronger: ENOSYS over allow,
/// the allowlist's trap over ENOSYS; `clone3` stays in the allowlist so
/// that it reaches this one.)
pub fn clone3_unsupported() -> Result<BpfProgram, SeccompError> {
    let rules = Rules::from([(libc::SYS_clone3, vec![])]);
    build(rules, SeccompAction::Allow, SeccompAction::Errno(libc::ENOSYS as u32))
}

/// Drop `RUST_BACKTRACE` and `RUST_LIB_BACKTRACE` from ferry's environment.
/// Called before any thread starts when the filters will be enforced: a
/// panic with a backtrace asked for opens the binary to symbolise it, and
/// a plugin's panic on a vCPU thread (caught, and reported as its device's
/// error) would then end ferry through the vCPU filter instead. Every
/// plugin library has its own copy of the standard library and its panic
/// hook, which only the environment reaches. `--seccomp log` keeps
/// backtraces.
pub fn drop_backtrace_request() {
    std::env::remove_var("RUST_BACKTRACE");
    std::env::remove_var("RUST_LIB_BACKTRACE");
}
