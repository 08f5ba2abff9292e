//! The declarations that cross the plugin boundary: every type reachable
//! from the root module [`PluginMod`]. A minor release of plugin-api may
//! only append here: a trait method with a default body after
//! `#[sabi(last_prefix_field)]`, a root-module field after it (read as an
//! `Option`), a named constant of a `u32` kind. `docs/plugin-guide.md` has
//! the rules; `baseline` keeps the 1.0 copy the core checks plugins with.

use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    package_version_strings, sabi_trait,
    sabi_types::VersionStrings,
    std_types::{RArc, RBox, ROption, RResult, RSlice, RSliceMut, RStr, RString, RVec},
    StableAbi,
};

/// Why a call across the plugin boundary failed: a kind the other side can
/// act on, and one line for people.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq, Eq)]
pub struct PluginError {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// What happened, one line.
    pub message: RString,
}

/// Kinds of [`PluginError`]. Later minor releases may add kinds; a receiver
/// treats a kind it does not know as [`ErrorKind::OTHER`].
#[repr(transparent)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ErrorKind(pub u32);

impl ErrorKind {
    /// Anything else.
    pub const OTHER: ErrorKind = ErrorKind(0);
    /// A property value or a request the device refuses.
    pub const INVALID_CONFIG: ErrorKind = ErrorKind(1);
    /// The callee does not implement this (a member of a later minor, or an
    /// optional part); the caller falls back as documented.
    pub const UNSUPPORTED: ErrorKind = ErrorKind(2);
    /// A state it cannot load, or cannot write at the version asked now.
    pub const STATE: ErrorKind = ErrorKind(3);
    /// A host resource failed (a file, a socket, a KVM call).
    pub const IO: ErrorKind = ErrorKind(4);
    /// The plugin panicked; the device answers every later call with this.
    pub const PANIC: ErrorKind = ErrorKind(5);
}

impl PluginError {
    /// An error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        PluginError { kind, message: message.into().into() }
    }

    /// An error of kind [`ErrorKind::OTHER`].
    pub fn other(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::OTHER, message)
    }

    /// An error of kind [`ErrorKind::UNSUPPORTED`].
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::UNSUPPORTED, message)
    }
}

impl std::fmt::Display for PluginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message.as_str())
    }
}

impl From<PluginError> for String {
    fn from(e: PluginError) -> String {
        e.message.into_string()
    }
}

/// Everything a plugin says about itself before any device exists.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct PluginDescriptor {
    /// Plugin name, as machine types refer to it (for example `serial-16550`).
    pub name: RString,
    /// The plugin's own version (semver).
    pub version: RString,
    /// One line for `ferry plugins`.
    pub description: RString,
    /// Which device-state versions this plugin writes and reads.
    pub state: StateVersions,
    /// Every property a machine type may set on this plugin's devices.
    pub properties: RVec<PropertySpec>,
    /// Members of later plugin-api minor releases this plugin cannot work
    /// without (`"Host::set_status"`): a core that lacks one refuses the
    /// plugin at load, naming it. Members the plugin can do without (their
    /// callers get [`ErrorKind::UNSUPPORTED`] and fall back) are not listed.
    pub needs: RVec<RString>,
}

/// The device-state (VMState) versions a plugin handles.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateVersions {
    /// The version this plugin writes by default.
    pub current: u32,
    /// The oldest version it can load (older sections are refused).
    pub oldest_load: u32,
    /// The oldest version it can write (through downgrade functions).
    pub oldest_save: u32,
}

/// The type of a property value. Values cross the ABI as strings; the core
/// checks them against this kind before a device is created. Later minor
/// releases may add kinds; a core refuses a plugin whose property has a
/// kind it does not know, naming it.
#[repr(transparent)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PropertyKind(pub u32);

impl PropertyKind {
    /// An unsigned integer (decimal or `0x` hex in strings).
    pub const INTEGER: PropertyKind = PropertyKind(0);
    /// `true` or `false`.
    pub const BOOL: PropertyKind = PropertyKind(1);
    /// Any string.
    pub const STRING: PropertyKind = PropertyKind(2);
    /// A host resource the device uses (an image file, a tap, a console
    /// file or socket), given as a string: a *binding* of the host, not a
    /// property of the guest. Each host supplies its own (plugin-api 1.2):
    /// the core never carries one in a snapshot or a migration stream as
    /// part of the machine type, and a destination without it refuses the
    /// move before the guest pauses. A plugin using it lists
    /// `"PropertyKind::BINDING"` in its needs (`DescriptorBuilder::binding`
    /// does), so a core without bindings refuses it by name.
    pub const BINDING: PropertyKind = PropertyKind(3);
}

/// One property a plugin accepts.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct PropertySpec {
    /// Property name.
    pub name: RString,
    /// Value type.
    pub kind: PropertyKind,
    /// Default value, if the property is optional.
    pub default: ROption<RString>,
    /// One line of help.
    pub help: RString,
}

/// A property value as given to `create`: already checked against its kind.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq, Eq)]
pub struct Property {
    /// Property name.
    pub name: RString,
    /// Value, as a string (integers in decimal).
    pub value: RString,
}

/// What the core tells a plugin about the device it creates.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct DeviceConfig {
    /// Device id from the machine type (for example `com1`).
    pub id: RString,
    /// Every property, defaults filled in.
    pub properties: RVec<Property>,
}

/// The address space of a [`Region`]. A core refuses a region in a space
/// it does not know, naming it.
#[repr(transparent)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AddressSpace(pub u32);

impl AddressSpace {
    /// x86 I/O ports.
    pub const PIO: AddressSpace = AddressSpace(0);
    /// Guest-physical memory-mapped I/O.
    pub const MMIO: AddressSpace = AddressSpace(1);
}

/// A range of guest addresses that a device answers.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// Port or MMIO space.
    pub space: AddressSpace,
    /// First address.
    pub base: u64,
    /// Length in bytes (at least 1).
    pub len: u64,
}

/// A device's saved state, tagged with its state version. The bytes are the
/// plugin's own encoding (CBOR by convention); the core never reads them.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq, Eq)]
pub struct StateBlob {
    /// State version the bytes are written in.
    pub version: u32,
    /// Encoded state.
    pub bytes: RVec<u8>,
}

/// Why a device asks the core to stop the guest. Later minor releases may
/// add kinds; a core treats one it does not know as [`StopKind::ERROR`].
#[repr(transparent)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StopKind(pub u32);

impl StopKind {
    /// The guest reset the machine (i8042 pulse): the core reboots it or
    /// ends cleanly, as the host chose.
    pub const RESET: StopKind = StopKind(0);
    /// The guest chose an exit status (debug-exit port).
    pub const EXIT: StopKind = StopKind(1);
    /// The device failed and the VM cannot go on.
    pub const ERROR: StopKind = StopKind(2);
}

/// Log levels for [`Host::log`], most severe first (a smaller number is more
/// severe). A core shows a level it does not know as [`LogLevel::DEBUG`].
#[repr(transparent)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LogLevel(pub u32);

impl LogLevel {
    /// Something failed.
    pub const ERROR: LogLevel = LogLevel(0);
    /// Something looks wrong.
    pub const WARN: LogLevel = LogLevel(1);
    /// Normal operation.
    pub const INFO: LogLevel = LogLevel(2);
    /// Detail for debugging.
    pub const DEBUG: LogLevel = LogLevel(3);
}

/// A device instance, as the core sees it.
///
/// The core serialises calls to one device (it is `Send`, not `Sync`).
/// Addresses are given as the index of the region in [`Device::regions`] and
/// the offset inside it.
#[sabi_trait]
pub trait Device: Send {
    /// The address ranges this device answers, fixed after `create`.
    fn regions(&self) -> RVec<Region>;

    /// A guest read of `data.len()` bytes at `offset` in region `region`.
    fn read(&mut self, region: u32, offset: u64, data: RSliceMut<'_, u8>) -> RResult<(), PluginError>;

    /// A guest write of `data` at `offset` in region `region`.
    fn write(&mut self, region: u32, offset: u64, data: RSlice<'_, u8>) -> RResult<(), PluginError>;

    /// Stop touching guest memory and raising interrupts until `resume`.
    /// Pausing a paused device does nothing.
    fn pause(&mut self) -> RResult<(), PluginError>;

    /// Undo `pause`.
    fn resume(&mut self) -> RResult<(), PluginError>;

    /// Save the device state at `version` (one of the versions the descriptor
    /// says it writes). The device is paused.
    fn save_state(&mut self, version: u32) -> RResult<StateBlob, PluginError>;

    /// Load a state saved by `save_state` (any version the descriptor says it
    /// loads). The device is paused.
    #[sabi(last_prefix_field)]
    fn load_state(&mut self, state: StateBlob) -> RResult<(), PluginError>;

    /// Put the device back in its power-on state, as `create` left it with
    /// the same configuration, keeping its host resources (files, taps,
    /// the console): the guest rebooted. Undo every MSI route and
    /// ioeventfd it set up. The device is paused; `resume` follows.
    ///
    /// Added in plugin-api 1.1. A plugin built against 1.0 answers
    /// [`ErrorKind::UNSUPPORTED`] (this body), and the core then drops the
    /// device and creates a new one from its machine-type configuration.
    fn reset(&mut self) -> RResult<(), PluginError> {
        RResult::RErr(PluginError::unsupported("Device::reset (plugin-api 1.1) is not implemented"))
    }

    /// What a destination must offer to take this device as it runs now,
    /// as facts (`name=value`) the plugin's own `PluginMod::check` reads
    /// on the destination: a backend's features and what the guest
    /// negotiated, say. The core asks while the guest runs, before any
    /// pause, and carries the facts in the manifest; the destination's
    /// plan (and a restore) refuses the device, before the guest pauses,
    /// if its plugin's check does.
    ///
    /// Added in plugin-api 1.3. [`ErrorKind::UNSUPPORTED`] (this body):
    /// the device has no facts beyond its plugin's version and state
    /// versions, which the plan checks anyway.
    fn contract(&mut self) -> RResult<RVec<Property>, PluginError> {
        RResult::RErr(PluginError::unsupported("Device::contract (plugin-api 1.3) is not implemented"))
    }
}

/// An owned device trait object, as `create` returns it.
pub type DeviceBox = Device_TO<'static, RBox<()>>;

/// Region index under which a PCI function's BAR `n` arrives in
/// [`Device::read`] / [`Device::write`]: `PCI_BAR_REGION + n`.
pub const PCI_BAR_REGION: u32 = 0x100;

/// One base address register of a PCI function.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciBar {
    /// BAR number (0-5).
    pub index: u32,
    /// Size in bytes (a power of two).
    pub size: u64,
    /// Current guest-physical address (0: unassigned).
    pub address: u64,
    /// A 64-bit memory BAR (occupies `index` and `index + 1`).
    pub is_64bit: bool,
    /// The function decodes it now (memory space enabled, address set).
    pub enabled: bool,
}

/// The optional PCI part of a device: its configuration space.
///
/// The core's host bridge forwards configuration accesses (mechanism 1,
/// ports 0xCF8/0xCFC) to the function in the device's slot, and maps each
/// enabled BAR onto the bus; after every configuration write it asks
/// `bars()` again, so the guest may move BARs.
#[sabi_trait]
pub trait PciFunction: Send {
    /// Read `data.len()` bytes (1, 2 or 4) at `offset` of the 4 KiB
    /// configuration space.
    fn config_read(&mut self, offset: u32, data: RSliceMut<'_, u8>);

    /// Write `data` at `offset` of the configuration space.
    fn config_write(&mut self, offset: u32, data: RSlice<'_, u8>) -> RResult<(), PluginError>;

    /// Every BAR the function implements.
    #[sabi(last_prefix_field)]
    fn bars(&self) -> RVec<PciBar>;
}

/// An owned PCI function trait object.
pub type PciFunctionBox = PciFunction_TO<'static, RBox<()>>;

/// What `create` returns: the device, and its PCI function if it is one.
#[repr(C)]
#[derive(StableAbi)]
pub struct DeviceParts {
    /// Register accesses, pause/resume, state.
    pub device: DeviceBox,
    /// Configuration space, for PCI devices.
    pub pci: ROption<PciFunctionBox>,
}

/// Services the core gives each device. Callable from any thread.
#[sabi_trait]
pub trait Host: Send + Sync + Clone {
    /// Set the level of an interrupt line (GSI) of the in-kernel irqchip.
    fn set_irq_level(&self, gsi: u32, level: bool) -> RResult<(), PluginError>;

    /// Ask the core to end the VM; `status` is the exit status for
    /// [`StopKind::Exit`].
    fn stop_vm(&self, kind: StopKind, status: i32);

    /// Write a line to ferry's log, tagged with the device id.
    fn log(&self, level: LogLevel, message: RStr<'_>);

    /// Guest RAM and the dirty bitmap the device marks when it writes to
    /// guest memory (KVM's dirty log does not see device writes).
    fn guest_memory(&self) -> GuestMemoryMap;

    /// Route MSI `message` through the eventfd `fd` (owned by the device):
    /// once routed, writing 1 to `fd` raises the interrupt without leaving
    /// the kernel. Calling it again for the same `fd` changes the message.
    fn msi_route(&self, fd: i32, message: MsiMessage) -> RResult<(), PluginError>;

    /// Undo `msi_route` for `fd`.
    fn msi_unroute(&self, fd: i32) -> RResult<(), PluginError>;

    /// Make guest writes to MMIO `address` (any length) signal eventfd `fd`
    /// in the kernel, with no exit to ferry.
    fn ioeventfd(&self, fd: i32, address: u64) -> RResult<(), PluginError>;

    /// Undo `ioeventfd`.
    #[sabi(last_prefix_field)]
    fn remove_ioeventfd(&self, fd: i32, address: u64) -> RResult<(), PluginError>;

    /// Publish one line about the device's health for the operator
    /// (`ferry ctl info` shows it as the device's `status`), replacing the
    /// previous one; for example a disk's request and error counts.
    ///
    /// Added in plugin-api 1.1. A core built with 1.0 answers
    /// [`ErrorKind::UNSUPPORTED`] (this body): the plugin then logs what it
    /// would have published, when it matters.
    fn set_status(&self, status: RStr<'_>) -> RResult<(), PluginError> {
        let _ = status;
        RResult::RErr(PluginError::unsupported("Host::set_status (plugin-api 1.1) is not in this core"))
    }

    /// The files behind guest RAM and the dirty bitmap, for a device whose
    /// work is done by another program that maps guest RAM itself (a
    /// vhost-user backend). The descriptors stay the host's: a plugin that
    /// keeps one past the call duplicates it.
    ///
    /// Added in plugin-api 1.3. A core built with an earlier 1.y answers
    /// [`ErrorKind::UNSUPPORTED`] (this body), as does a core whose RAM is
    /// not in a file it can share; a plugin that cannot work without it
    /// lists `"Host::memory_fds"` in its needs, which also tells a core
    /// restoring a snapshot to read the guest's RAM into a shareable file.
    fn memory_fds(&self) -> RResult<MemoryFds, PluginError> {
        RResult::RErr(PluginError::unsupported("Host::memory_fds (plugin-api 1.3) is not in this core"))
    }

    /// The device cannot go on (its backend died, say): stop the guest and
    /// keep it as it is, with `message` (one line: what failed) as the
    /// cause. The core logs the line naming the device, and the control
    /// API keeps answering, as when a device process dies.
    ///
    /// Added in plugin-api 1.3. A core built with an earlier 1.y answers
    /// [`ErrorKind::UNSUPPORTED`] (this body): the plugin then logs the
    /// line and calls `stop_vm` with [`StopKind::ERROR`].
    fn fail(&self, message: RStr<'_>) -> RResult<(), PluginError> {
        let _ = message;
        RResult::RErr(PluginError::unsupported("Host::fail (plugin-api 1.3) is not in this core"))
    }
}

/// One range of guest RAM and where it sits in the RAM file.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryFdRange {
    /// Guest-physical start.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// Offset of its first byte in the RAM file.
    pub offset: u64,
    /// Host virtual address of its first byte in this process.
    pub host_addr: u64,
}

/// The files behind guest RAM (plugin-api 1.3, [`Host::memory_fds`]).
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq, Eq)]
pub struct MemoryFds {
    /// A file descriptor of the RAM file (a memfd), owned by the host.
    pub ram: i32,
    /// RAM ranges, in guest-physical order.
    pub ranges: RVec<MemoryFdRange>,
    /// A file descriptor of the dirty bitmap's file, owned by the host: the
    /// words of [`GuestMemoryMap::dirty_bitmap`], one bit per 4 KiB page of
    /// the RAM file (bit `p % 64` of little-endian word `p / 64` is the page
    /// at offset `4096 * p`).
    pub dirty_bitmap: i32,
    /// Its length in bytes.
    pub dirty_bitmap_len: u64,
}

/// One range of guest RAM, mapped in ferry's address space.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRegion {
    /// Guest-physical start.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// Host virtual address of the first byte.
    pub host_addr: u64,
    /// Index in the dirty bitmap of this range's first 4 KiB page.
    pub first_page: u64,
}

/// Guest RAM as a device sees it.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq, Eq)]
pub struct GuestMemoryMap {
    /// RAM ranges, in guest-physical order.
    pub regions: RVec<MemoryRegion>,
    /// Host address of the dirty bitmap: an array of `AtomicU64` words, one
    /// bit per 4 KiB page (bit `p % 64` of word `p / 64`). Set bits with an
    /// atomic OR; never clear them.
    pub dirty_bitmap: u64,
    /// Pages the bitmap covers.
    pub dirty_pages: u64,
}

/// An MSI message: what the device writes, where, to raise an interrupt.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address (0xFEExxxxx on x86).
    pub address: u64,
    /// Message data (vector and delivery mode).
    pub data: u32,
}

/// A shared handle to the host services.
pub type HostBox = Host_TO<'static, RArc<()>>;

/// The root module every plugin library exports (through [`export_plugin!`]).
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
#[sabi(missing_field(panic))]
pub struct PluginMod {
    /// Describe the plugin. Creates nothing.
    pub describe: extern "C" fn() -> RResult<PluginDescriptor, PluginError>,

    /// Create one device instance.
    #[sabi(last_prefix_field)]
    pub create: extern "C" fn(config: DeviceConfig, host: HostBox) -> RResult<DeviceParts, PluginError>,

    /// Can this host take a device configured as `config` (this host's
    /// bindings in it) whose source says `contract` (its
    /// `Device::contract`)? `Ok` if so; an error's message is the reason,
    /// naming what is missing. Called before the guest pauses, before any
    /// device is created; it may hold on to what it opened (a connection
    /// to a backend) for the `create` that follows.
    ///
    /// Added in plugin-api 1.3 (absent from earlier plugins: nothing to
    /// check beyond versions).
    #[sabi(missing_field(option))]
    pub check: extern "C" fn(config: DeviceConfig, contract: RVec<Property>) -> RResult<(), PluginError>,
}

impl RootModule for PluginModRef {
    declare_root_module_statics! {PluginModRef}
    const BASE_NAME: &'static str = "ferry_plugin";
    const NAME: &'static str = "ferry plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}
