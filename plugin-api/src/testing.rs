//! The shared test harness every plugin runs (as `cargo test` unit tests):
//!
//! - [`check_round_trip`]: save at the current version and load gives the
//!   same state; every older version the plugin writes either saves (and
//!   loads back) or refuses with a reason;
//! - [`check_upgrades`]: blobs written by older releases load, through the
//!   upgrade chain, to the state expected today;
//! - [`check_refused_downgrade`]: a downgrade the guest's state forbids
//!   fails with a reason a person can read;
//! - [`check_through_abi`]: the plugin's exported root module describes
//!   itself, creates devices through the stable ABI, and a state saved from
//!   one device loads into a fresh one; pausing and resuming twice is
//!   harmless; a device that resets saves what a fresh one saves.
//!
//! [`FakeHost`] stands in for the core: it records interrupt lines and stop
//! requests and hands out real (test-owned) guest RAM with a dirty bitmap.

use std::{
    fmt::Debug,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use abi_stable::{
    sabi_trait::TD_Opaque,
    std_types::{RArc, RResult, RStr, RVec},
};

use crate::{
    state::{self, Versioned},
    DeviceConfig, GuestMemoryMap, Host, HostBox, LogLevel, MemoryRegion, MsiMessage, PluginError,
    PluginModRef, Property, StopKind,
};

/// Guest RAM and a dirty bitmap owned by a test (standing in for the core).
pub struct FakeRam {
    ptr: *mut u8,
    len: usize,
    bitmap: Vec<AtomicU64>,
}

// SAFETY: the mapping is plain anonymous memory owned by this value; the
// bitmap is atomics.
unsafe impl Send for FakeRam {}
// SAFETY: as above; shared access goes through atomics or the device's own
// synchronisation, as with the core's RAM.
unsafe impl Sync for FakeRam {}

impl FakeRam {
    /// `size` bytes of zeroed, page-aligned RAM at guest address 0.
    pub fn new(size: usize) -> Self {
        // SAFETY: an anonymous private mapping; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert!(ptr != libc::MAP_FAILED, "mmap of fake RAM failed");
        let ptr = ptr.cast::<u8>();
        let pages = size / 4096;
        FakeRam { ptr, len: size, bitmap: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect() }
    }

    /// The RAM bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr..ptr + len` is our live mapping.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// What the host would hand a device.
    pub fn map(&self) -> GuestMemoryMap {
        GuestMemoryMap {
            regions: RVec::from(vec![MemoryRegion {
                gpa: 0,
                len: self.len as u64,
                host_addr: self.ptr as u64,
                first_page: 0,
            }]),
            dirty_bitmap: self.bitmap.as_ptr() as u64,
            dirty_pages: (self.len / 4096) as u64,
        }
    }

    /// Dirty page numbers, in order.
    pub fn dirty_pages(&self) -> Vec<usize> {
        (0..self.len / 4096)
            .filter(|p| self.bitmap[p / 64].load(Ordering::Acquire) & (1 << (p % 64)) != 0)
            .collect()
    }

    /// Forget every dirty mark.
    pub fn clear_dirty(&self) {
        for w in &self.bitmap {
            w.store(0, Ordering::Release);
        }
    }
}

impl Drop for FakeRam {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in `new`, used by nothing now.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// What a [`FakeHost`] saw.
#[derive(Default, Debug)]
pub struct HostLog {
    /// `set_irq_level` calls.
    pub irqs: Vec<(u32, bool)>,
    /// `stop_vm` calls.
    pub stops: Vec<(StopKind, i32)>,
    /// `log` calls.
    pub logs: Vec<(LogLevel, String)>,
    /// The last `set_status`.
    pub status: Option<String>,
}

/// A host for plugin tests.
#[derive(Clone)]
pub struct FakeHost {
    /// What the device did.
    pub log: Arc<Mutex<HostLog>>,
    ram: Arc<FakeRam>,
}

impl FakeHost {
    /// A host with `ram_size` bytes of RAM.
    pub fn new(ram_size: usize) -> Self {
        FakeHost { log: Arc::new(Mutex::new(HostLog::default())), ram: Arc::new(FakeRam::new(ram_size)) }
    }

    /// The ABI handle to give `create`.
    pub fn handle(&self) -> HostBox {
        HostBox::from_ptr(RArc::new(self.clone()), TD_Opaque)
    }

    /// The RAM.
    pub fn ram(&self) -> &FakeRam {
        &self.ram
    }

    fn record(&self) -> std::sync::MutexGuard<'_, HostLog> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Host for FakeHost {
    fn set_irq_level(&self, gsi: u32, level: bool) -> RResult<(), PluginError> {
        self.record().irqs.push((gsi, level));
        RResult::ROk(())
    }
    fn stop_vm(&self, kind: StopKind, status: i32) {
        self.record().stops.push((kind, status));
    }
    fn log(&self, level: LogLevel, message: RStr<'_>) {
        self.record().logs.push((level, message.to_string()));
    }
    fn guest_memory(&self) -> GuestMemoryMap {
        self.ram.map()
    }
    fn msi_route(&self, _fd: i32, _message: MsiMessage) -> RResult<(), PluginError> {
        RResult::ROk(())
    }
    fn msi_unroute(&self, _fd: i32) -> RResult<(), PluginError> {
        RResult::ROk(())
    }
    fn ioeventfd(&self, _fd: i32, _address: u64) -> RResult<(), PluginError> {
        RResult::ROk(())
    }
    fn remove_ioeventfd(&self, _fd: i32, _address: u64) -> RResult<(), PluginError> {
        RResult::ROk(())
    }
    fn set_status(&self, status: RStr<'_>) -> RResult<(), PluginError> {
        self.record().status = Some(status.to_string());
        RResult::ROk(())
    }
}

/// Save at the current version, load: the same state. Every older version
/// the plugin declares it writes saves and loads back, or refuses with a
/// reason.
pub fn check_round_trip<S: Versioned + PartialEq + Debug>(samples: &[S]) {
    assert!(S::OLDEST_LOAD <= S::CURRENT && S::OLDEST_SAVE <= S::CURRENT, "declared versions are ordered");
    for s in samples {
        let blob = state::save(s, S::CURRENT).expect("save at the current version");
        assert_eq!(&state::load::<S>(&blob).expect("load what was saved"), s, "round trip");
        for v in S::OLDEST_SAVE..S::CURRENT {
            match state::save(s, v) {
                Ok(old) => {
                    state::load::<S>(&old).unwrap_or_else(|e| panic!("v{v} saved but does not load: {e}"));
                }
                Err(reason) => {
                    assert!(!reason.trim().is_empty(), "a refused downgrade to v{v} gives a reason")
                }
            }
        }
    }
}

/// Each `(version, bytes, expected)` written by an older release loads to
/// `expected` through the upgrade chain.
pub fn check_upgrades<S: Versioned + PartialEq + Debug>(old: &[(u32, Vec<u8>, S)]) {
    for (version, bytes, expected) in old {
        let blob = crate::StateBlob { version: *version, bytes: bytes.clone().into() };
        let got = state::load::<S>(&blob).unwrap_or_else(|e| panic!("v{version} does not load: {e}"));
        assert_eq!(&got, expected, "v{version} upgrades");
    }
}

/// Saving `state` at `version` is refused with a reason containing `why`.
pub fn check_refused_downgrade<S: Versioned>(state: &S, version: u32, why: &str) {
    match state::save(state, version) {
        Ok(_) => panic!("the downgrade to v{version} should be refused"),
        Err(reason) => assert!(reason.contains(why), "reason '{reason}' should mention '{why}'"),
    }
}

/// The plugin through its exported root module: describe, create two
/// devices with `properties`, save one and load into the other (same
/// bytes saved again), pause and resume twice each.
pub fn check_through_abi(root: fn() -> PluginModRef, properties: &[(&str, &str)]) {
    let module = root();
    let descriptor = module.describe()().into_result().expect("describe through the ABI");
    let config = || DeviceConfig {
        id: "dev0".into(),
        properties: descriptor
            .properties
            .iter()
            .map(|spec| {
                let given =
                    properties.iter().find(|(k, _)| *k == spec.name.as_str()).map(|(_, v)| v.to_string());
                let value = given.or_else(|| spec.default.clone().into_option().map(|d| d.to_string()));
                Property { name: spec.name.clone(), value: value.unwrap_or_default().into() }
            })
            .collect(),
    };
    let host = FakeHost::new(4 << 20);
    let mut a =
        module.create()(config(), host.handle()).into_result().expect("create through the ABI").device;
    let mut b =
        module.create()(config(), host.handle()).into_result().expect("create a second device").device;
    for d in [&mut a, &mut b] {
        d.pause().into_result().expect("pause");
        d.pause().into_result().expect("pause twice");
    }
    let current = descriptor.state.current;
    let saved = a.save_state(current).into_result().expect("save through the ABI");
    assert_eq!(saved.version, current);
    b.load_state(saved.clone()).into_result().expect("load through the ABI");
    let again = b.save_state(current).into_result().expect("save the loaded device");
    assert_eq!(again, saved, "a loaded device saves the same state");
    // A device that resets itself comes back as a fresh one saves; one
    // that cannot says so (the core then recreates it).
    let mut fresh =
        module.create()(config(), host.handle()).into_result().expect("create a third device").device;
    fresh.pause().into_result().expect("pause");
    let fresh_state = fresh.save_state(current).into_result().expect("save a fresh device");
    match b.reset().into_result() {
        Ok(()) => assert_eq!(
            b.save_state(current).into_result().expect("save after reset"),
            fresh_state,
            "a reset device saves the state of a fresh one"
        ),
        Err(e) => assert_eq!(e.kind, crate::ErrorKind::UNSUPPORTED, "reset failed: {e}"),
    }
    for d in [&mut a, &mut b] {
        d.resume().into_result().expect("resume");
        d.resume().into_result().expect("resume twice");
    }
}
