//! Ferry's allowlists, one per kind of thread. The process list covers
//! every thread once the VM is built (the main loop, the API thread, the
//! device worker threads plugins start, migrations); vCPU and migration
//! threads narrow it further (a thread's filters all apply: a call must be
//! in each). Found by running the test suite with `--seccomp log` and
//! reading the kernel's log; kept as small as that allowed.
//!
//! Arguments are checked where a call could reach beyond ferry's own
//! objects: `ioctl` to KVM's and userfaultfd's requests and the few a
//! descriptor needs,
//! `kill` to SIGKILL (an isolated device that stopped answering),
//! `clone` to threads (unless devices are isolated, when a device process
//! may be started again at a reboot).

use libc::*;
use seccompiler::{SeccompCmpArgLen, SeccompCmpOp};

use super::{cond, ioctls, plain, rule, Rules, SeccompError};

/// Reading, writing and waiting on descriptors ferry holds, memory, time,
/// signals to itself, threads: what every thread may do.
const COMMON: &[i64] = &[
    SYS_read,
    SYS_write,
    SYS_readv,
    SYS_writev,
    SYS_pread64,
    SYS_pwrite64,
    SYS_preadv,
    SYS_pwritev,
    SYS_lseek,
    SYS_close,
    SYS_fstat,
    SYS_newfstatat,
    SYS_statx,
    SYS_fcntl,
    SYS_dup,
    SYS_poll,
    SYS_ppoll,
    SYS_epoll_create1,
    SYS_epoll_ctl,
    SYS_epoll_wait,
    SYS_epoll_pwait,
    SYS_eventfd2,
    SYS_futex,
    SYS_sched_yield,
    SYS_sched_getaffinity,
    SYS_nanosleep,
    SYS_clock_nanosleep,
    SYS_clock_gettime,
    SYS_gettimeofday,
    SYS_getrandom,
    SYS_mmap,
    SYS_munmap,
    SYS_mremap,
    SYS_mprotect,
    SYS_madvise,
    SYS_brk,
    SYS_rt_sigaction,
    SYS_rt_sigprocmask,
    SYS_rt_sigreturn,
    SYS_restart_syscall,
    SYS_sigaltstack,
    SYS_set_robust_list,
    SYS_rseq,
    SYS_prctl,
    SYS_getpid,
    SYS_gettid,
    SYS_getcwd,
    SYS_exit,
    SYS_exit_group,
    // A thread adding its own, narrower filter.
    SYS_seccomp,
    // Answered ENOSYS by `clone3_unsupported`; threads then use `clone`.
    SYS_clone3,
    SYS_sendmsg,
    SYS_recvmsg,
    SYS_sendto,
    SYS_recvfrom,
    SYS_shutdown,
];

/// Files, sockets and processes: the main loop (snapshots, reboots), the
/// API thread, and what device worker threads open.
const PROCESS: &[i64] = &[
    SYS_openat,
    SYS_readlink,
    SYS_access,
    SYS_fsync,
    SYS_fdatasync,
    SYS_fallocate,
    SYS_ftruncate,
    SYS_rename,
    SYS_renameat,
    SYS_renameat2,
    SYS_unlink,
    SYS_unlinkat,
    SYS_mkdir,
    SYS_mkdirat,
    SYS_getdents64,
    SYS_memfd_create,
    SYS_socket,
    SYS_socketpair,
    SYS_bind,
    SYS_listen,
    SYS_accept4,
    SYS_connect,
    SYS_getsockopt,
    SYS_setsockopt,
    SYS_getsockname,
    SYS_getpeername,
    SYS_set_tid_address,
    SYS_geteuid,
    SYS_getuid,
    SYS_umask,
    SYS_wait4,
    SYS_pipe2,
    SYS_tgkill,
    SYS_sysinfo,
    SYS_prlimit64,
];

/// What a device process needs between its start and its own sandbox, when
/// ferry starts one again after a reboot (isolated 1.0 plugins).
const SPAWN: &[i64] = &[
    SYS_execve,
    SYS_dup2,
    SYS_dup3,
    SYS_close_range,
    SYS_arch_prctl,
    SYS_setrlimit,
    SYS_unshare,
    SYS_mount,
    SYS_landlock_create_ruleset,
    SYS_landlock_add_rule,
    SYS_landlock_restrict_self,
];

/// ioctl requests of KVM's type (0xAE) on its descriptors.
const KVM_IOCTL_TYPE: u64 = 0xae00;

/// The ioctls a descriptor of ferry's may see outside KVM: non-blocking
/// mode, close-on-exec, a terminal's attributes, a tap's set-up.
const FD_IOCTLS: &[u64] = &[
    FIONBIO,
    FIOCLEX,
    TCGETS,
    TCSETS,
    TIOCGWINSZ,
    0x4004_54ca, // TUNSETIFF
    0x4004_54d0, // TUNSETOFFLOAD
    0x4004_54d8, // TUNSETVNETHDRSZ
    0x8004_54d7, // TUNGETVNETHDRSZ
    0x8004_54d2, // TUNGETIFF
];

fn with_ioctls(mut rules: Rules) -> Result<Rules, SeccompError> {
    let mut r = ioctls(FD_IOCTLS)?;
    r.push(rule(vec![cond(1, SeccompCmpArgLen::Dword, SeccompCmpOp::MaskedEq(0xff00), KVM_IOCTL_TYPE)?])?);
    // Post-copy's userfaultfd (fill, zero-fill and wake pages of guest RAM).
    r.push(rule(vec![cond(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(0xff00),
        crate::uffd::IOCTL_TYPE,
    )?])?);
    rules.insert(SYS_ioctl, r);
    Ok(rules)
}

fn kill_rule(rules: &mut Rules) -> Result<(), SeccompError> {
    let sigkill = SIGKILL as u64;
    rules.insert(SYS_kill, vec![rule(vec![cond(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, sigkill)?])?]);
    Ok(())
}

fn clone_threads(rules: &mut Rules) -> Result<(), SeccompError> {
    let thread = CLONE_THREAD as u64;
    rules.insert(
        SYS_clone,
        vec![rule(vec![cond(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(thread), thread)?])?],
    );
    Ok(())
}

/// Every thread once the VM is built. `isolating`: devices run in device
/// processes, which a reboot may start again.
pub fn process(isolating: bool) -> Result<Rules, SeccompError> {
    let mut rules = plain(COMMON);
    rules.extend(plain(PROCESS));
    kill_rule(&mut rules)?;
    if isolating {
        rules.extend(plain(SPAWN));
        rules.insert(SYS_clone, vec![]);
    } else {
        clone_threads(&mut rules)?;
    }
    with_ioctls(rules)
}

/// A vCPU thread: KVM_RUN and its own state, the devices it calls into
/// (registers, their eventfds and routes, their output), an isolated
/// device's socket and its end.
pub fn vcpu() -> Result<Rules, SeccompError> {
    let mut rules = plain(COMMON);
    rules.extend(plain(&[SYS_wait4, SYS_tgkill]));
    kill_rule(&mut rules)?;
    clone_threads(&mut rules)?;
    with_ioctls(rules)
}

/// A migration thread: its connection (TCP, TLS, a unix socket), the TLS
/// files, dirty logs, the memfd it hands over, and the pipe a vhost-user
/// backend writes its state into while the devices pause.
pub fn migration() -> Result<Rules, SeccompError> {
    let mut rules = plain(COMMON);
    rules.extend(plain(&[
        SYS_pipe2,
        SYS_openat,
        SYS_socket,
        SYS_connect,
        SYS_getsockopt,
        SYS_setsockopt,
        SYS_getsockname,
        SYS_getpeername,
        SYS_tgkill,
    ]));
    clone_threads(&mut rules)?;
    with_ioctls(rules)
}

#[cfg(test)]
mod tests {
    use super::*;

    use seccompiler::{BpfProgram, SeccompAction};

    /// How a call ended in a child process under the filters.
    #[derive(Debug, PartialEq, Eq)]
    enum Outcome {
        /// The call returned (the child exited 0, or 1 if it failed).
        Returned { ok: bool },
        /// The filter trapped it (SIGSYS, no handler in the child).
        Trapped,
    }

    /// Fork, install `filters` in the child (built before the fork, so the
    /// child only makes system calls), run `call`, and report.
    fn under(filters: &[BpfProgram], call: fn() -> bool) -> Outcome {
        // SAFETY: the child only applies prepared filters, makes the call
        // and leaves with _exit; the parent waits for it.
        let pid = unsafe { fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            for f in filters {
                if seccompiler::apply_filter(f).is_err() {
                    // SAFETY: leaving the forked child.
                    unsafe { _exit(3) };
                }
            }
            let ok = call();
            // SAFETY: leaving the forked child.
            unsafe { _exit(if ok { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { waitpid(pid, &mut status, 0) }, pid);
        if WIFSIGNALED(status) && WTERMSIG(status) == SIGSYS {
            return Outcome::Trapped;
        }
        assert!(WIFEXITED(status) && WEXITSTATUS(status) < 2, "child ended with status {status:#x}");
        Outcome::Returned { ok: WEXITSTATUS(status) == 0 }
    }

    fn compile(rules: Result<Rules, SeccompError>) -> BpfProgram {
        super::super::build(rules.expect("rules"), SeccompAction::Trap, SeccompAction::Allow)
            .expect("a filter")
    }

    /// The filters a thread of the kind has: the process list and the
    /// clone3 filter, then its own list.
    fn enforced(own: Option<Result<Rules, SeccompError>>) -> Vec<BpfProgram> {
        let mut filters =
            vec![compile(process(false)), super::super::clone3_unsupported().expect("clone3 filter")];
        filters.extend(own.map(compile));
        filters
    }

    fn fionbio_on_stdin() -> bool {
        let mut on: c_int = 0;
        // SAFETY: FIONBIO reads one int from the pointer we pass.
        unsafe { ioctl(0, FIONBIO, &mut on) == 0 }
    }

    fn tiocsti_on_stdin() -> bool {
        let c = 0u8;
        // SAFETY: TIOCSTI reads one byte; the filter stops it first.
        unsafe { ioctl(0, TIOCSTI, &c) == 0 }
    }

    fn sigkill_to_no_process() -> bool {
        // SAFETY: a pid beyond pid_max: the call fails with ESRCH, if the
        // filter lets it through at all.
        unsafe { kill(0x7fff_fff0, SIGKILL) };
        true
    }

    fn sigterm_to_no_process() -> bool {
        // SAFETY: as above, with another signal.
        unsafe { kill(0x7fff_fff0, SIGTERM) };
        true
    }

    fn a_thread() -> bool {
        std::thread::spawn(|| 7).join().map(|v| v == 7).unwrap_or(false)
    }

    fn clone3_is_enosys() -> bool {
        // SAFETY: clone3 with a null argument: the filter answers first.
        let r = unsafe { syscall(SYS_clone3, std::ptr::null::<c_void>(), 0usize) };
        r == -1 && std::io::Error::last_os_error().raw_os_error() == Some(ENOSYS)
    }

    fn a_process() -> bool {
        // SAFETY: fork in the child under test; its own child (if the
        // filter allowed one) leaves at once.
        let pid = unsafe { fork() };
        if pid == 0 {
            // SAFETY: leaving the grandchild.
            unsafe { _exit(0) };
        }
        pid > 0
    }

    fn open_a_file() -> bool {
        // SAFETY: a NUL-terminated path.
        let fd = unsafe { open(c"/dev/null".as_ptr(), O_RDONLY | O_CLOEXEC) };
        fd >= 0
    }

    fn execve_true() -> bool {
        let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
        // SAFETY: NUL-terminated path and a null-terminated argv.
        unsafe { execv(c"/bin/true".as_ptr(), argv.as_ptr()) };
        false
    }

    #[test]
    fn ioctl_is_limited_to_kvm_and_the_named_descriptor_requests() {
        for list in [None, Some(vcpu()), Some(migration())] {
            let filters = enforced(list);
            assert_eq!(under(&filters, fionbio_on_stdin), Outcome::Returned { ok: true });
            assert_eq!(under(&filters, tiocsti_on_stdin), Outcome::Trapped);
        }
    }

    #[test]
    fn kill_is_limited_to_sigkill() {
        for list in [None, Some(vcpu())] {
            let filters = enforced(list);
            assert_eq!(under(&filters, sigkill_to_no_process), Outcome::Returned { ok: true });
            assert_eq!(under(&filters, sigterm_to_no_process), Outcome::Trapped);
        }
        assert_eq!(under(&enforced(Some(migration())), sigkill_to_no_process), Outcome::Trapped);
    }

    #[test]
    fn threads_start_but_processes_do_not_unless_devices_are_isolated() {
        for list in [None, Some(vcpu()), Some(migration())] {
            let filters = enforced(list);
            assert_eq!(under(&filters, clone3_is_enosys), Outcome::Returned { ok: true });
            assert_eq!(under(&filters, a_thread), Outcome::Returned { ok: true });
            assert_eq!(under(&filters, a_process), Outcome::Trapped);
            assert_eq!(under(&filters, execve_true), Outcome::Trapped);
        }
        let isolating =
            vec![compile(process(true)), super::super::clone3_unsupported().expect("clone3 filter")];
        assert_eq!(under(&isolating, a_process), Outcome::Returned { ok: true });
    }

    #[test]
    fn files_open_on_the_main_and_migration_threads_only() {
        assert_eq!(under(&enforced(None), open_a_file), Outcome::Returned { ok: true });
        assert_eq!(under(&enforced(Some(migration())), open_a_file), Outcome::Returned { ok: true });
        assert_eq!(under(&enforced(Some(vcpu())), open_a_file), Outcome::Trapped);
    }

    #[test]
    fn the_lists_compile() {
        for rules in [process(false), process(true), vcpu(), migration()] {
            let rules = rules.expect("rules");
            super::super::build(rules, seccompiler::SeccompAction::Trap, seccompiler::SeccompAction::Allow)
                .expect("a filter");
        }
    }
}
