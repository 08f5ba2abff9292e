//! vCPU threads and the run control they share.
//!
//! ```text
//!            pause()            resume()
//!  Running ----------> Paused ----------> Running
//!     |                  |
//!     +---- stop() ------+--> Stopping (threads leave their loop)
//! ```
//!
//! Any thread may change the state; it then *kicks* every vCPU thread with a
//! signal whose handler sets the thread's `immediate_exit` flag, so a vCPU
//! inside KVM_RUN (or about to enter it) returns to its loop and sees the new
//! state. `pause()` returns once every vCPU thread is parked.
//!
//! A migration that the guest outruns *throttles* the vCPUs: at a throttle
//! of P percent, every [`THROTTLE_SLICE`] of running the throttler kicks
//! the vCPU threads and each sleeps `THROTTLE_SLICE * P / (100 - P)`
//! before entering the guest again, so the guest runs (100 - P)% of the
//! time. A pause, a stop or the throttle's end wakes a sleeping vCPU.

use std::{
    cell::Cell,
    sync::{
        atomic::{AtomicU64, AtomicU8, Ordering},
        Arc, Condvar, Mutex, MutexGuard,
    },
    thread::JoinHandle,
    time::Duration,
};

use crossbeam_channel::Sender;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::{
    bus::Bus,
    state::{StateError, VcpuStateV2},
};

/// vCPU thread errors.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The kick signal's handler could not be installed.
    #[error("cannot install vCPU signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    /// A vCPU thread did not start.
    #[error("cannot start vCPU thread: {0}")]
    Thread(std::io::Error),
    /// A vCPU had no state to give: it did not park.
    #[error("vCPU did not park")]
    NotParked,
    /// Saving its state failed.
    #[error(transparent)]
    State(#[from] StateError),
}

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopEvent {
    /// The guest reset the machine (i8042, triple fault, KVM reset event).
    Reset,
    /// The guest chose an exit status.
    Exit(i32),
    /// Something failed; the VM cannot go on.
    Error(String),
    /// An isolated device's process died or stopped answering
    /// (`isolate/`): the guest stays stopped, the API keeps answering.
    DeviceFailed {
        /// The device's bus index.
        index: usize,
        /// One line: device, plugin, cause.
        message: String,
    },
}

const RUNNING: u8 = 0;
const PAUSED: u8 = 1;
const STOPPING: u8 = 2;

struct Parking {
    parked: usize,
    threads: Vec<libc::pthread_t>,
    stop: Option<StopEvent>,
    /// Each vCPU's state, saved by its own thread when it parked last.
    states: Vec<Option<Result<VcpuStateV2, StateError>>>,
}

/// How long a throttled guest runs between two of the throttler's kicks.
pub const THROTTLE_SLICE: Duration = Duration::from_millis(10);

/// How long a vCPU throttled to `percent` sleeps after each slice.
pub fn throttle_sleep(percent: u8) -> Duration {
    let percent = u32::from(percent.min(99));
    THROTTLE_SLICE * percent / (100 - percent)
}

/// Run state shared by the vCPU threads, devices and the main thread.
pub struct VmControl {
    state: AtomicU8,
    /// Percent of the time the vCPUs sleep (0: not throttled).
    throttle: AtomicU8,
    /// Throttle periods begun (`throttle_tick`); each vCPU sleeps once per.
    throttle_ticks: AtomicU64,
    parking: Mutex<Parking>,
    changed: Condvar,
    stopped: Sender<StopEvent>,
}

impl VmControl {
    /// A control whose first stop event goes to `stopped`.
    pub fn new(stopped: Sender<StopEvent>) -> Arc<Self> {
        Arc::new(VmControl {
            state: AtomicU8::new(RUNNING),
            throttle: AtomicU8::new(0),
            throttle_ticks: AtomicU64::new(0),
            parking: Mutex::new(Parking { parked: 0, threads: Vec::new(), stop: None, states: Vec::new() }),
            changed: Condvar::new(),
            stopped,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Parking> {
        self.parking.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// End the VM. The first event wins; later ones are ignored.
    pub fn stop(&self, event: StopEvent) {
        let mut p = self.lock();
        if p.stop.is_some() {
            return;
        }
        p.stop = Some(event.clone());
        self.state.store(STOPPING, Ordering::SeqCst);
        kick_all(&p.threads);
        self.changed.notify_all();
        drop(p);
        let _ = self.stopped.send(event);
    }

    /// Park every vCPU; returns when all are parked (or the VM is stopping).
    pub fn pause(&self) {
        let mut p = self.lock();
        if self.state.load(Ordering::SeqCst) != RUNNING {
            return;
        }
        self.state.store(PAUSED, Ordering::SeqCst);
        kick_all(&p.threads);
        self.changed.notify_all(); // a throttled vCPU may be asleep
        while p.parked < p.threads.len() && self.state.load(Ordering::SeqCst) == PAUSED {
            p = self.changed.wait(p).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Let parked vCPUs run again.
    pub fn resume(&self) {
        let _p = self.lock();
        if self.state.compare_exchange(PAUSED, RUNNING, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
            self.changed.notify_all();
        }
    }

    /// Throttle the vCPUs to sleep `percent` (at most 99) of the time; 0
    /// lets them run freely again (waking any that sleep).
    pub fn set_throttle(&self, percent: u8) {
        let _p = self.lock();
        self.throttle.store(percent.min(99), Ordering::SeqCst);
        self.changed.notify_all();
    }

    /// The current throttle, in percent.
    pub fn throttle(&self) -> u8 {
        self.throttle.load(Ordering::SeqCst)
    }

    /// Begin a throttle period: every vCPU leaves the guest and sleeps its
    /// share (the throttler calls this every slice plus that share).
    pub fn throttle_tick(&self) {
        self.throttle_ticks.fetch_add(1, Ordering::SeqCst);
        kick_all(&self.lock().threads);
    }

    /// A vCPU thread between runs: if a throttle period began since
    /// `seen`, sleep this period's share, or less if the VM is paused,
    /// stopped or unthrottled meanwhile. Returns whether it slept (then
    /// the run state may have changed). One atomic load per exit when
    /// nothing is throttled.
    fn throttle_nap(&self, seen: &mut u64) -> bool {
        let ticks = self.throttle_ticks.load(Ordering::Acquire);
        if ticks == *seen {
            return false;
        }
        *seen = ticks;
        let percent = self.throttle();
        if percent == 0 {
            return false;
        }
        let p = self.lock();
        let _ = self.changed.wait_timeout_while(p, throttle_sleep(percent), |_| {
            self.state.load(Ordering::SeqCst) == RUNNING && self.throttle() != 0
        });
        true
    }

    /// Make a stopped control run again (a guest reboot): the vCPU threads
    /// were joined, and the next `stop` ends the VM or reboots it again.
    pub fn rearm(&self) {
        let mut p = self.lock();
        p.stop = None;
        p.parked = 0;
        p.threads.clear();
        p.states.clear();
        self.state.store(RUNNING, Ordering::SeqCst);
    }

    /// Is the VM ending or resetting (its vCPU threads leaving)?
    pub fn is_stopping(&self) -> bool {
        self.state.load(Ordering::SeqCst) == STOPPING
    }

    /// Is the VM paused?
    pub fn is_paused(&self) -> bool {
        self.state.load(Ordering::SeqCst) == PAUSED
    }

    fn register(&self, thread: libc::pthread_t) {
        self.lock().threads.push(thread);
    }

    /// Forget the vCPU threads before they are joined (no more kicks).
    fn forget_threads(&self) {
        self.lock().threads.clear();
    }

    /// The state each vCPU saved when it parked (call after `pause`).
    pub fn take_vcpu_states(&self) -> Vec<Result<VcpuStateV2, VcpuError>> {
        let mut p = self.lock();
        p.states
            .iter_mut()
            .map(|s| match s.take() {
                Some(state) => state.map_err(VcpuError::from),
                None => Err(VcpuError::NotParked),
            })
            .collect()
    }

    /// Called by a vCPU thread between runs: Ok(true) to run, Ok(false) to
    /// exit, Err(()) when it must park (then call `park`).
    fn check(&self) -> Option<bool> {
        match self.state.load(Ordering::Acquire) {
            RUNNING => Some(true),
            STOPPING => Some(false),
            _ => None,
        }
    }

    /// Park vCPU `index` with the state it just saved, until resumed.
    /// Returns false when it must exit instead.
    fn park(&self, index: usize, state: Result<VcpuStateV2, StateError>) -> bool {
        let mut p = self.lock();
        if p.states.len() <= index {
            p.states.resize_with(index + 1, || None);
        }
        p.states[index] = Some(state);
        p.parked += 1;
        self.changed.notify_all();
        while self.state.load(Ordering::SeqCst) == PAUSED {
            p = self.changed.wait(p).unwrap_or_else(|e| e.into_inner());
        }
        p.parked -= 1;
        self.state.load(Ordering::SeqCst) != STOPPING
    }
}

fn kick_all(threads: &[libc::pthread_t]) {
    for t in threads {
        // SAFETY: the thread ids belong to vCPU threads that are not joined
        // yet (they are removed from the list before joining); the signal
        // has a handler installed by `install_kick_handler`.
        unsafe {
            libc::pthread_kill(*t, SIGRTMIN());
        }
    }
}

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, for the kick signal handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let flag = IMMEDIATE_EXIT.with(|f| f.get());
    if !flag.is_null() {
        // SAFETY: the pointer is this thread's kvm_run mapping, set while the
        // VcpuFd is alive and cleared before it is dropped.
        unsafe { std::ptr::write_volatile(flag, 1) };
    }
}

/// Install the kick signal handler (once per process).
pub fn install_kick_handler() -> Result<(), VcpuError> {
    static ONCE: std::sync::OnceLock<Result<(), vmm_sys_util::errno::Error>> = std::sync::OnceLock::new();
    (*ONCE.get_or_init(|| register_signal_handler(SIGRTMIN(), kick_handler))).map_err(VcpuError::Signal)
}

/// Start one thread per vCPU. The threads run until the control stops;
/// each saves its own state (with the MSRs in `msrs`) whenever it parks,
/// and hands its vCPU back when it ends.
pub fn spawn(
    vcpus: Vec<VcpuFd>,
    bus: Arc<Bus>,
    control: Arc<VmControl>,
    msrs: Arc<Vec<(u32, &'static str)>>,
) -> Result<Vec<JoinHandle<VcpuFd>>, VcpuError> {
    let mut handles = Vec::with_capacity(vcpus.len());
    for (index, vcpu) in vcpus.into_iter().enumerate() {
        let (bus, ctl, msrs) = (bus.clone(), control.clone(), msrs.clone());
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || run_vcpu(index, vcpu, &bus, &ctl, &msrs))
            .map_err(VcpuError::Thread)?;
        handles.push(handle);
    }
    Ok(handles)
}

/// Stop the vCPU threads (the control must be stopping) and wait for them;
/// the vCPUs, in order (a thread that panicked loses its vCPU: the result
/// is then shorter than the handles).
pub fn join(handles: Vec<JoinHandle<VcpuFd>>, control: &VmControl) -> Vec<VcpuFd> {
    // Kicks already went out in stop(); threads see STOPPING at their next
    // checkpoint.
    control.forget_threads();
    handles.into_iter().filter_map(|h| h.join().ok()).collect()
}

fn run_vcpu(
    index: usize,
    mut vcpu: VcpuFd,
    bus: &Bus,
    control: &VmControl,
    msrs: &[(u32, &'static str)],
) -> VcpuFd {
    // Before the guest runs here: the vCPU thread's own allowlist.
    let filtered = crate::seccomp::lists::vcpu().and_then(|rules| crate::seccomp::install(rules, false));
    if let Err(e) = filtered {
        control.stop(StopEvent::Error(format!("vCPU {index}: {e}")));
        return vcpu;
    }
    let flag: *mut u8 = &mut vcpu.get_kvm_run().immediate_exit;
    IMMEDIATE_EXIT.with(|f| f.set(flag));
    // Registered from the thread itself, under the control's lock: a stop
    // that came earlier is seen by the first check, a later one kicks.
    // SAFETY: pthread_self has no preconditions.
    control.register(unsafe { libc::pthread_self() });
    let mut throttle_seen = control.throttle_ticks.load(Ordering::SeqCst);
    loop {
        match control.check() {
            Some(true) => {
                if control.throttle_nap(&mut throttle_seen) && control.check() != Some(true) {
                    continue;
                }
                if let Some(event) = run_once(index, &mut vcpu, bus) {
                    control.stop(event);
                }
            }
            Some(false) => break,
            None => {
                let state = save_parked(&mut vcpu, msrs);
                if !control.park(index, state) {
                    break;
                }
            }
        }
    }
    IMMEDIATE_EXIT.with(|f| f.set(std::ptr::null_mut()));
    vcpu
}

/// Save this vCPU's state on its way to parking. An I/O exit the vCPU
/// loop just answered is only completed by the next KVM_RUN, so run once
/// with `immediate_exit` set (KVM finishes the instruction and returns
/// EINTR without entering the guest) before reading the registers.
fn save_parked(vcpu: &mut VcpuFd, msrs: &[(u32, &'static str)]) -> Result<VcpuStateV2, StateError> {
    vcpu.set_kvm_immediate_exit(1);
    let _ = vcpu.run();
    vcpu.set_kvm_immediate_exit(0);
    crate::state::save_vcpu(vcpu, msrs)
}

/// One KVM_RUN and its exit. Returns a stop event when the VM must end.
fn run_once(index: usize, vcpu: &mut VcpuFd, bus: &Bus) -> Option<StopEvent> {
    let fault = |f: crate::bus::DeviceFault| Some(StopEvent::Error(f.to_string()));
    match vcpu.run() {
        Ok(VcpuExit::IoIn(port, data)) => bus.pio_read(port, data).err().and_then(fault),
        Ok(VcpuExit::IoOut(port, data)) => bus.pio_write(port, data).err().and_then(fault),
        Ok(VcpuExit::MmioRead(addr, data)) => bus.mmio_read(addr, data).err().and_then(fault),
        Ok(VcpuExit::MmioWrite(addr, data)) => bus.mmio_write(addr, data).err().and_then(fault),
        Ok(VcpuExit::Hlt) => None,
        Ok(VcpuExit::Shutdown) => {
            crate::log::info(&format!("vCPU {index}: guest triple fault, machine reset"));
            Some(StopEvent::Reset)
        }
        Ok(VcpuExit::SystemEvent(kind, _)) => {
            crate::log::info(&format!("vCPU {index}: system event {kind}, machine reset"));
            Some(StopEvent::Reset)
        }
        Ok(VcpuExit::InternalError) => Some(StopEvent::Error(format!(
            "vCPU {index}: KVM internal error (emulation failure){}",
            where_is(vcpu)
        ))),
        Ok(VcpuExit::FailEntry(reason, cpu)) => Some(StopEvent::Error(format!(
            "vCPU {index}: KVM entry failed (hardware reason {reason:#x}, cpu {cpu}){}",
            where_is(vcpu)
        ))),
        Ok(other) => Some(StopEvent::Error(format!("vCPU {index}: unexpected exit {other:?}"))),
        Err(e) if e.errno() == libc::EINTR => {
            vcpu.set_kvm_immediate_exit(0);
            None
        }
        // An AP waiting for INIT/SIPI returns EAGAIN; KVM blocked until an
        // event arrived, so retrying does not spin.
        Err(e) if e.errno() == libc::EAGAIN => None,
        Err(e) => Some(StopEvent::Error(format!("vCPU {index}: KVM_RUN failed: {e}"))),
    }
}

fn where_is(vcpu: &VcpuFd) -> String {
    match vcpu.get_regs() {
        Ok(r) => format!(" at rip={:#x}", r.rip),
        Err(_) => String::new(),
    }
}
