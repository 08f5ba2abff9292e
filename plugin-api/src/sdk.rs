//! The plugin author's side: plain Rust traits and helpers, and the
//! [`export_plugin!`](crate::export_plugin) macro that turns them into the
//! stable root module.
//!
//! Every entry point the macro generates runs the author's code inside
//! `catch_unwind`: a panic becomes an error returned to the core (which names
//! the device), and the device is then *poisoned*: every later call returns
//! the same error instead of touching state a panic left half-updated.

use std::panic::{catch_unwind, AssertUnwindSafe};

use abi_stable::{
    sabi_trait::TD_Opaque,
    std_types::{ROption, RResult, RSlice, RSliceMut, RString, RVec},
};

use crate::{
    Device, DeviceBox, DeviceConfig, DeviceParts, ErrorKind, HostBox, PciBar, PciFunction, PciFunctionBox,
    PluginDescriptor, PluginError, Property, PropertyKind, PropertySpec, Region, StateBlob, StateVersions,
};

/// What a plugin's device implements. Plain Rust: the macro wraps it.
pub trait PluginDevice: Send + 'static {
    /// The address ranges this device answers.
    fn regions(&self) -> Vec<Region>;

    /// A guest read at `offset` of region `region` (index into `regions`).
    fn read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), String>;

    /// A guest write at `offset` of region `region`.
    fn write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), String>;

    /// Stop worker threads from touching guest state. Must be idempotent.
    fn pause(&mut self) -> Result<(), String> {
        Ok(())
    }

    /// Restart what `pause` stopped. Must be idempotent.
    fn resume(&mut self) -> Result<(), String> {
        Ok(())
    }

    /// Save the device state at `version`.
    fn save_state(&mut self, version: u32) -> Result<StateBlob, String> {
        Err(format!("saving state v{version} is not supported by this plugin"))
    }

    /// Load a saved state.
    fn load_state(&mut self, state: StateBlob) -> Result<(), String> {
        Err(format!("loading state v{} is not supported by this plugin", state.version))
    }

    /// Back to the power-on state for a guest reboot, keeping host
    /// resources (plugin-api 1.1; see [`Device::reset`]). The default says
    /// unsupported, and the core recreates the device instead.
    fn reset(&mut self) -> Result<(), PluginError> {
        Err(PluginError::unsupported("this plugin does not reset its devices"))
    }

    /// Facts a destination must satisfy to take the device as it runs now
    /// (plugin-api 1.3; see [`Device::contract`]). The default: none.
    fn contract(&mut self) -> Result<Vec<(String, String)>, PluginError> {
        Err(PluginError::unsupported("this device has no contract"))
    }

    /// For PCI devices: the configuration-space side, taken once right
    /// after `create`. BAR accesses arrive through `read`/`write` with
    /// region [`PCI_BAR_REGION`](crate::PCI_BAR_REGION) + BAR number.
    fn take_pci_function(&mut self) -> Option<Box<dyn PciConfigSpace>> {
        None
    }
}

/// The configuration space of a PCI device (plain Rust: the SDK wraps it).
pub trait PciConfigSpace: Send + 'static {
    /// Read `data.len()` bytes at `offset`.
    fn config_read(&mut self, offset: u32, data: &mut [u8]);

    /// Write `data` at `offset`.
    fn config_write(&mut self, offset: u32, data: &[u8]) -> Result<(), String>;

    /// Every BAR the function implements.
    fn bars(&self) -> Vec<PciBar>;
}

/// A [`PciConfigSpace`] behind the stable ABI, with panics caught.
struct GuardedPci {
    inner: Box<dyn PciConfigSpace>,
    poisoned: Option<String>,
}

impl PciFunction for GuardedPci {
    fn config_read(&mut self, offset: u32, mut data: RSliceMut<'_, u8>) {
        let out = data.as_mut_slice();
        if self.poisoned.is_some() {
            out.fill(0xff);
            return;
        }
        let inner = &mut self.inner;
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| inner.config_read(offset, out))) {
            self.poisoned = Some(format!("plugin panicked in config_read: {}", panic_message(&*payload)));
        }
    }

    fn config_write(&mut self, offset: u32, data: RSlice<'_, u8>) -> RResult<(), PluginError> {
        if let Some(reason) = &self.poisoned {
            return RResult::RErr(poisoned(reason));
        }
        let inner = &mut self.inner;
        match catch_unwind(AssertUnwindSafe(|| inner.config_write(offset, data.as_slice()))) {
            Ok(r) => r.map_err(PluginError::other).into(),
            Err(payload) => {
                let msg = format!("plugin panicked in config_write: {}", panic_message(&*payload));
                self.poisoned = Some(msg.clone());
                RResult::RErr(PluginError::new(ErrorKind::PANIC, msg))
            }
        }
    }

    fn bars(&self) -> RVec<PciBar> {
        match catch_unwind(AssertUnwindSafe(|| self.inner.bars())) {
            Ok(b) => b.into_iter().collect(),
            Err(_) => RVec::new(),
        }
    }
}

/// Builds a [`PluginDescriptor`].
#[derive(Debug, Clone)]
pub struct DescriptorBuilder {
    descriptor: PluginDescriptor,
}

impl DescriptorBuilder {
    /// Start a descriptor; state versions default to 1..=1.
    pub fn new(name: &str, version: &str, description: &str) -> Self {
        DescriptorBuilder {
            descriptor: PluginDescriptor {
                name: name.into(),
                version: version.into(),
                description: description.into(),
                state: StateVersions { current: 1, oldest_load: 1, oldest_save: 1 },
                properties: RVec::new(),
                needs: RVec::new(),
            },
        }
    }

    /// Declare a member of a later plugin-api minor release this plugin
    /// cannot work without (`"Host::set_status"`): a core lacking it refuses
    /// the plugin at load, naming it.
    pub fn needs(mut self, member: &str) -> Self {
        self.descriptor.needs.push(member.into());
        self
    }

    /// Declare the state versions of `S`, the device's state type: the
    /// versions the descriptor announces are the ones the type loads and
    /// saves, said once.
    pub fn versioned<S: crate::state::Versioned>(mut self) -> Self {
        self.descriptor.state = crate::state::versions::<S>();
        self
    }

    /// Set the state versions by hand (plugins written before
    /// [`versioned`](Self::versioned); prefer that).
    pub fn state(mut self, current: u32, oldest_load: u32, oldest_save: u32) -> Self {
        self.descriptor.state = StateVersions { current, oldest_load, oldest_save };
        self
    }

    /// Add a host binding ([`PropertyKind::BINDING`]): a resource each
    /// host supplies (`default: None` makes it required), and the need
    /// that keeps cores without bindings from loading the plugin.
    pub fn binding(mut self, name: &str, default: Option<&str>, help: &str) -> Self {
        if !self.descriptor.needs.iter().any(|n| n.as_str() == "PropertyKind::BINDING") {
            self.descriptor.needs.push("PropertyKind::BINDING".into());
        }
        self.property(name, PropertyKind::BINDING, default, help)
    }

    /// Add a property; `default: None` makes it required.
    pub fn property(mut self, name: &str, kind: PropertyKind, default: Option<&str>, help: &str) -> Self {
        self.descriptor.properties.push(PropertySpec {
            name: name.into(),
            kind,
            default: default.map(RString::from).into(),
            help: help.into(),
        });
        self
    }

    /// Finish.
    pub fn build(self) -> PluginDescriptor {
        self.descriptor
    }
}

/// Typed access to a device's properties (the core has already checked
/// their kinds and filled in defaults).
#[derive(Debug, Clone, Copy)]
pub struct Properties<'a> {
    config: &'a DeviceConfig,
}

impl<'a> Properties<'a> {
    /// Wrap a config.
    pub fn new(config: &'a DeviceConfig) -> Self {
        Properties { config }
    }

    /// A property's value, if set.
    pub fn get(&self, name: &str) -> Option<&'a str> {
        self.config.properties.iter().find(|p| p.name.as_str() == name).map(|p| p.value.as_str())
    }

    /// A required string property.
    pub fn string(&self, name: &str) -> Result<&'a str, String> {
        self.get(name).ok_or_else(|| format!("property '{name}' is missing"))
    }

    /// A required integer property.
    pub fn integer(&self, name: &str) -> Result<u64, String> {
        let raw = self.string(name)?;
        parse_integer(raw).ok_or_else(|| format!("property '{name}': '{raw}' is not an integer"))
    }

    /// A required boolean property.
    pub fn boolean(&self, name: &str) -> Result<bool, String> {
        match self.string(name)? {
            "true" => Ok(true),
            "false" => Ok(false),
            other => Err(format!("property '{name}': '{other}' is not true or false")),
        }
    }
}

/// Parse an unsigned integer written in decimal or `0x` hex.
pub fn parse_integer(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_string()
    }
}

/// An SDK method's plain error: kind [`ErrorKind::OTHER`].
impl From<String> for PluginError {
    fn from(message: String) -> Self {
        PluginError::other(message)
    }
}

/// The error every call of a poisoned device returns.
fn poisoned(reason: &str) -> PluginError {
    PluginError::new(ErrorKind::PANIC, format!("device unusable after an earlier failure: {reason}"))
}

/// Run `f`, turning a panic into an error that says where it happened.
pub fn catch<T>(what: &str, f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(payload) => Err(format!("plugin panicked in {what}: {}", panic_message(&*payload))),
    }
}

/// A [`PluginDevice`] behind the stable ABI, with panics caught.
pub struct Guarded<D> {
    inner: D,
    poisoned: Option<String>,
}

impl<D: PluginDevice> Guarded<D> {
    fn call<T, E: Into<PluginError>>(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut D) -> Result<T, E>,
    ) -> RResult<T, PluginError> {
        if let Some(reason) = &self.poisoned {
            return RResult::RErr(poisoned(reason));
        }
        let inner = &mut self.inner;
        match catch_unwind(AssertUnwindSafe(|| f(inner))) {
            Ok(Ok(v)) => RResult::ROk(v),
            Ok(Err(e)) => RResult::RErr(e.into()),
            Err(payload) => {
                let msg = format!("plugin panicked in {what}: {}", panic_message(&*payload));
                self.poisoned = Some(msg.clone());
                RResult::RErr(PluginError::new(ErrorKind::PANIC, msg))
            }
        }
    }
}

impl<D: PluginDevice> Device for Guarded<D> {
    fn regions(&self) -> RVec<Region> {
        // A panic here cannot be reported through the return type; an empty
        // list makes the core refuse the device (it claims nothing).
        match catch_unwind(AssertUnwindSafe(|| self.inner.regions())) {
            Ok(r) => r.into_iter().collect(),
            Err(_) => RVec::new(),
        }
    }

    fn read(&mut self, region: u32, offset: u64, mut data: RSliceMut<'_, u8>) -> RResult<(), PluginError> {
        self.call("read", |d| d.read(region, offset, data.as_mut_slice()))
    }

    fn write(&mut self, region: u32, offset: u64, data: RSlice<'_, u8>) -> RResult<(), PluginError> {
        self.call("write", |d| d.write(region, offset, data.as_slice()))
    }

    fn pause(&mut self) -> RResult<(), PluginError> {
        self.call("pause", |d| d.pause())
    }

    fn resume(&mut self) -> RResult<(), PluginError> {
        self.call("resume", |d| d.resume())
    }

    fn save_state(&mut self, version: u32) -> RResult<StateBlob, PluginError> {
        self.call("save_state", |d| d.save_state(version))
    }

    fn load_state(&mut self, state: StateBlob) -> RResult<(), PluginError> {
        self.call("load_state", |d| d.load_state(state))
    }

    fn reset(&mut self) -> RResult<(), PluginError> {
        self.call("reset", |d| d.reset())
    }

    fn contract(&mut self) -> RResult<RVec<Property>, PluginError> {
        self.call("contract", |d| {
            d.contract().map(|facts| {
                facts
                    .into_iter()
                    .map(|(name, value)| Property { name: name.into(), value: value.into() })
                    .collect()
            })
        })
    }
}

/// Used by [`export_plugin!`](crate::export_plugin): describe, panics caught.
pub fn describe_guarded(f: fn() -> PluginDescriptor) -> RResult<PluginDescriptor, PluginError> {
    catch("describe", || Ok(f())).map_err(|e| PluginError::new(ErrorKind::PANIC, e)).into()
}

/// Used by [`export_plugin!`](crate::export_plugin): create, panics caught.
pub fn create_guarded<D: PluginDevice>(
    config: DeviceConfig,
    host: HostBox,
    f: fn(&DeviceConfig, HostBox) -> Result<D, String>,
) -> RResult<DeviceParts, PluginError> {
    catch("create", || {
        let mut device = f(&config, host)?;
        let pci = device.take_pci_function();
        Ok((device, pci))
    })
    .map(|(d, pci)| DeviceParts {
        device: DeviceBox::from_value(Guarded { inner: d, poisoned: None }, TD_Opaque),
        pci: pci
            .map(|p| PciFunctionBox::from_value(GuardedPci { inner: p, poisoned: None }, TD_Opaque))
            .into(),
    })
    .map_err(PluginError::other)
    .into()
}

/// A plugin's check: can this host take a device configured so, whose
/// source states these facts (see [`PluginMod::check`](crate::PluginMod)).
pub type CheckFn = fn(&DeviceConfig, &[(String, String)]) -> Result<(), String>;

/// Used by [`export_plugin!`](crate::export_plugin): check, panics caught.
pub fn check_guarded(config: DeviceConfig, contract: RVec<Property>, f: CheckFn) -> RResult<(), PluginError> {
    let facts: Vec<(String, String)> =
        contract.iter().map(|p| (p.name.to_string(), p.value.to_string())).collect();
    catch("check", || f(&config, &facts)).map_err(|e| PluginError::new(ErrorKind::STATE, e)).into()
}

/// What a plugin without a check answers: nothing to check.
pub fn check_nothing(_config: &DeviceConfig, _contract: &[(String, String)]) -> Result<(), String> {
    Ok(())
}

/// Convert an `ROption` to `Option` (helper for plugin code).
pub fn ropt<T>(o: ROption<T>) -> Option<T> {
    o.into_option()
}

/// Export a plugin's root module.
///
/// ```ignore
/// ferry_plugin_api::export_plugin! {
///     describe: crate::device::describe,   // fn() -> PluginDescriptor
///     create: crate::device::create,       // fn(&DeviceConfig, HostBox) -> Result<D, String>
/// }
/// ```
#[macro_export]
macro_rules! export_plugin {
    (describe: $describe:path, create: $create:path $(,)?) => {
        $crate::export_plugin! { describe: $describe, create: $create, check: $crate::sdk::check_nothing }
    };
    (describe: $describe:path, create: $create:path, check: $check:path $(,)?) => {
        extern "C" fn __ferry_plugin_describe(
        ) -> $crate::abi_stable::std_types::RResult<$crate::PluginDescriptor, $crate::PluginError> {
            $crate::sdk::describe_guarded($describe)
        }

        extern "C" fn __ferry_plugin_create(
            config: $crate::DeviceConfig,
            host: $crate::HostBox,
        ) -> $crate::abi_stable::std_types::RResult<$crate::DeviceParts, $crate::PluginError> {
            $crate::sdk::create_guarded(config, host, $create)
        }

        extern "C" fn __ferry_plugin_check(
            config: $crate::DeviceConfig,
            contract: $crate::abi_stable::std_types::RVec<$crate::Property>,
        ) -> $crate::abi_stable::std_types::RResult<(), $crate::PluginError> {
            $crate::sdk::check_guarded(config, contract, $check)
        }

        fn __ferry_plugin_root_module() -> $crate::PluginModRef {
            $crate::abi_stable::prefix_type::PrefixTypeTrait::leak_into_prefix($crate::PluginMod {
                describe: __ferry_plugin_describe,
                create: __ferry_plugin_create,
                check: __ferry_plugin_check,
            })
        }

        // The header abi_stable looks for; the name is abi_stable's
        // ROOT_MODULE_LOADER_NAME (checked by a plugin-api test).
        #[export_name = "_1as_0lib_1header_0root_bmodule_bloader"]
        #[doc(hidden)]
        pub static __FERRY_PLUGIN_HEADER: $crate::abi_stable::library::LibHeader = {
            extern "C" fn erased() -> $crate::abi_stable::library::RootModuleResult {
                $crate::abi_stable::library::__call_root_module_loader(__ferry_plugin_root_module)
            }
            // SAFETY: `erased` returns the prefix reference of a
            // `PluginModRef`, the module type named here.
            unsafe {
                $crate::abi_stable::library::LibHeader::from_constructor::<$crate::PluginModRef>(
                    erased,
                    $crate::abi_stable::library::CheckTypeLayout::Yes,
                )
            }
        };
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_name_matches_abi_stable() {
        assert_eq!(abi_stable::library::ROOT_MODULE_LOADER_NAME, "_1as_0lib_1header_0root_bmodule_bloader");
    }

    #[test]
    fn integers_parse_in_decimal_and_hex() {
        assert_eq!(parse_integer("1016"), Some(1016));
        assert_eq!(parse_integer("0x3f8"), Some(0x3f8));
        assert_eq!(parse_integer("x"), None);
        assert_eq!(parse_integer("-1"), None);
    }

    struct Boom;
    impl PluginDevice for Boom {
        fn regions(&self) -> Vec<Region> {
            vec![]
        }
        fn read(&mut self, _: u32, _: u64, _: &mut [u8]) -> Result<(), String> {
            panic!("register 7 exploded")
        }
        fn write(&mut self, _: u32, _: u64, _: &[u8]) -> Result<(), String> {
            Ok(())
        }
    }

    #[test]
    fn a_panic_becomes_an_error_and_poisons_the_device() {
        let mut dev = Guarded { inner: Boom, poisoned: None };
        let mut buf = [0u8; 1];
        let err = dev.read(0, 0, RSliceMut::from_mut_slice(&mut buf)).unwrap_err();
        assert!(err.message.contains("panicked in read: register 7 exploded"), "{err}");
        assert_eq!(err.kind, ErrorKind::PANIC);
        let again = dev.write(0, 0, RSlice::from_slice(&[1])).unwrap_err();
        assert!(again.message.contains("unusable after an earlier failure"), "{again}");
        assert_eq!(again.kind, ErrorKind::PANIC);
    }
}
