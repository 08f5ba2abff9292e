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
//!   create(DeviceConfig, HostBox) ----->   DeviceParts (Device [+ PciFunction])
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
//!
//! Every enumeration that may gain values in a later minor release
//! ([`ErrorKind`], [`StopKind`], [`PropertyKind`], [`LogLevel`]) is a
//! `u32` with named constants rather than a Rust `enum`, so a value from a
//! newer release is a number the receiver can refuse or treat as the
//! nearest known one, never undefined behaviour.

#![warn(missing_docs)]

pub mod sdk;
pub mod state;
pub mod testing;

mod abi;
pub mod baseline;

pub use abi::*;

#[doc(hidden)]
pub use abi_stable;
/// serde, for deriving state types (`#[serde(crate = "ferry_plugin_api::serde")]`).
pub use serde;

/// The version of this crate, which is the version of the plugin ABI.
pub const PLUGIN_API_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The members added to the ABI after 1.0 that this release has, by name
/// (`"Device::reset"`): what a plugin built against a later 1.y may list in
/// its descriptor's `needs` and still load here.
pub const MEMBERS: &[&str] = &[
    // 1.1
    "Device::reset",
    "Host::set_status",
    // 1.2
    "PropertyKind::BINDING",
    // 1.3
    "Host::memory_fds",
    "Host::fail",
    "Device::contract",
    "PluginMod::check",
];
