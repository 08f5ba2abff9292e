//! The stable ABI between the Ferry core and its device plugins.
//!
//! A plugin is a shared library (`cdylib`) that exports one abi_stable root
//! module, [`PluginMod`]. The core loads every plugin library of its plugin
//! directory, reads each plugin's [`PluginDescriptor`] without creating
//! anything, and later calls [`PluginMod::create`] once per device instance
//! that the machine type asks for.
//!
//! ```text
//!   core                                   plugin (cdylib)
//!   ----                                   ---------------
//!   lib_header_from_path(path)  ------->   static root-module header
//!   init_root_module (layout check)
//!   describe()                  ------->   PluginDescriptor
//!   create(DeviceConfig, HostBox) ----->   DeviceBox (Device trait object)
//!   vCPU exit: read / write     ------->   device registers
//!   device: host.set_irq / stop_vm <----   (any thread)
//! ```
//!
//! Plugin authors do not write any of the FFI by hand: they implement
//! [`sdk::PluginDevice`] and call [`export_plugin!`], which also catches every
//! panic on the plugin side of the boundary and turns it into an error.
//!
//! Compatibility: abi_stable checks the layout of every type reachable from
//! the root module when the core loads a plugin, and this crate's version
//! (semver) is part of that check. See `docs/plugin-guide.md` for the policy.

#![warn(missing_docs)]

pub mod sdk;

use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    package_version_strings, sabi_trait,
    sabi_types::VersionStrings,
    std_types::{RArc, RBox, ROption, RResult, RSlice, RSliceMut, RStr, RString, RVec},
    StableAbi,
};

#[doc(hidden)]
pub use abi_stable;

/// The version of this crate, which is the version of the plugin ABI.
pub const PLUGIN_API_VERSION: &str = env!("CARGO_PKG_VERSION");

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
/// checks them against this kind before a device is created.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PropertyKind {
    /// An unsigned integer (decimal or `0x` hex in strings).
    Integer,
    /// `true` or `false`.
    Bool,
    /// Any string.
    String,
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

/// The address space of a [`Region`].
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AddressSpace {
    /// x86 I/O ports.
    Pio,
    /// Guest-physical memory-mapped I/O.
    Mmio,
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

/// Why a device asks the core to end the VM.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopKind {
    /// The guest reset the machine (i8042 pulse): a clean end, status 0.
    Reset,
    /// The guest chose an exit status (debug-exit port).
    Exit,
    /// The device failed and the VM cannot go on.
    Error,
}

/// Log levels for [`Host::log`].
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    /// Something failed.
    Error,
    /// Something looks wrong.
    Warn,
    /// Normal operation.
    Info,
    /// Detail for debugging.
    Debug,
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
    fn read(&mut self, region: u32, offset: u64, data: RSliceMut<'_, u8>) -> RResult<(), RString>;

    /// A guest write of `data` at `offset` in region `region`.
    fn write(&mut self, region: u32, offset: u64, data: RSlice<'_, u8>) -> RResult<(), RString>;

    /// Stop touching guest memory and raising interrupts until `resume`.
    /// Pausing a paused device does nothing.
    fn pause(&mut self) -> RResult<(), RString>;

    /// Undo `pause`.
    fn resume(&mut self) -> RResult<(), RString>;

    /// Save the device state at `version` (one of the versions the descriptor
    /// says it writes). The device is paused.
    fn save_state(&mut self, version: u32) -> RResult<StateBlob, RString>;

    /// Load a state saved by `save_state` (any version the descriptor says it
    /// loads). The device is paused.
    #[sabi(last_prefix_field)]
    fn load_state(&mut self, state: StateBlob) -> RResult<(), RString>;
}

/// An owned device trait object, as `create` returns it.
pub type DeviceBox = Device_TO<'static, RBox<()>>;

/// Services the core gives each device. Callable from any thread.
#[sabi_trait]
pub trait Host: Send + Sync + Clone {
    /// Set the level of an interrupt line (GSI) of the in-kernel irqchip.
    fn set_irq_level(&self, gsi: u32, level: bool) -> RResult<(), RString>;

    /// Ask the core to end the VM; `status` is the exit status for
    /// [`StopKind::Exit`].
    fn stop_vm(&self, kind: StopKind, status: i32);

    /// Write a line to ferry's log, tagged with the device id.
    #[sabi(last_prefix_field)]
    fn log(&self, level: LogLevel, message: RStr<'_>);
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
    pub describe: extern "C" fn() -> RResult<PluginDescriptor, RString>,

    /// Create one device instance.
    #[sabi(last_prefix_field)]
    pub create: extern "C" fn(config: DeviceConfig, host: HostBox) -> RResult<DeviceBox, RString>,
}

impl RootModule for PluginModRef {
    declare_root_module_statics! {PluginModRef}
    const BASE_NAME: &'static str = "ferry_plugin";
    const NAME: &'static str = "ferry plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}
