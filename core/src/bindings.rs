//! Host bindings: what a device uses on the host it runs on (a disk
//! image, a tap, a console file or socket), as opposed to what the guest
//! sees. A plugin declares such a property with `PropertyKind::BINDING`.
//!
//! A binding belongs to the host, not to the guest: the machine type a
//! snapshot or a migration carries has none (its manifest keeps the
//! writer's values apart, in `bindings`), and each host supplies its own:
//!
//! ```text
//!  ferry run --restore F   --disk id=disk0,path=/srv/b/disk.img   (or --bind disk0:path=...)
//!  ferry run --incoming U  --net id=net0,tap=tap7
//!                          --bindings from-snapshot | from-source  (reuse the writer's values)
//! ```
//!
//! A required binding (one without a default) the host does not supply is
//! refused before anything happens: a restore before anything is created,
//! an incoming migration in its plan, before the source pauses. A manifest
//! written before bindings (version 2) had them among the machine type's
//! properties; reading moves them out ([`split`]), so they count as the
//! writer's values, as a new snapshot's do.

use std::collections::BTreeMap;

use ferry_plugin_api::PropertyKind;
use thiserror::Error;

use crate::{
    machine::{MachineType, PropValue},
    migration::manifest::MachineRecord,
    plugins::Registry,
};

/// Binding values by device id, then property.
pub type Bindings = BTreeMap<String, BTreeMap<String, String>>;

/// Whose values a host takes for the bindings it does not supply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Reuse {
    /// None: this host supplies every required binding.
    #[default]
    Host,
    /// The snapshot's (`--restore` only).
    FromSnapshot,
    /// The migration source's (`--incoming` only; trusted fleets).
    FromSource,
}

/// What this host brings: its bindings and whether to reuse the writer's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostBindings {
    /// Values given on this host's command line.
    pub supplied: Bindings,
    /// Where the rest come from.
    pub reuse: Reuse,
}

/// A binding that cannot be made.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum BindingError {
    /// A required binding this host does not supply.
    #[error(
        "device {device} ({plugin}): host binding {property} is not supplied on this host \
         (--bind {device}:{property}=VALUE{sugar}, or --bindings from-snapshot|from-source to reuse \
         the writer's)"
    )]
    Missing {
        /// Device id.
        device: String,
        /// Its plugin.
        plugin: String,
        /// The binding.
        property: String,
        /// The --disk / --net form, where there is one.
        sugar: String,
    },
    /// A value for a device the VM does not have.
    #[error("a binding names device {device}, which this VM does not have (its devices: {devices})")]
    NoSuchDevice {
        /// The id named.
        device: String,
        /// The VM's ids.
        devices: String,
    },
    /// A value for a property that is not a binding.
    #[error(
        "a binding sets {property} of device {device} ({plugin}), which is not one of its host \
         bindings ({bindings})"
    )]
    NotABinding {
        /// Device id.
        device: String,
        /// Its plugin.
        plugin: String,
        /// The property named.
        property: String,
        /// Its bindings.
        bindings: String,
    },
    /// A `--disk`, `--net` or `--bind` value that does not parse.
    #[error("{option} {spec}: {problem}")]
    Spec {
        /// The flag.
        option: String,
        /// Its value.
        spec: String,
        /// What is wrong with it.
        problem: String,
    },
}

/// Every binding that cannot be made, shown in one line.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct BindingErrors(pub Vec<BindingError>);

fn spec_error(option: &str, spec: &str, problem: impl Into<String>) -> BindingError {
    BindingError::Spec { option: option.into(), spec: spec.into(), problem: problem.into() }
}

/// The names of `plugin`'s binding properties, with whether each is
/// required (no default).
fn binding_specs<'r>(registry: &'r Registry, plugin: &str) -> Vec<(&'r str, bool)> {
    registry
        .get(plugin)
        .map(|lib| {
            lib.descriptor
                .properties
                .iter()
                .filter(|p| p.kind == PropertyKind::BINDING)
                .map(|p| (p.name.as_str(), p.default.is_none()))
                .collect()
        })
        .unwrap_or_default()
}

/// Does `plugin` (as installed here) declare `property` a binding?
pub fn is_binding(registry: &Registry, plugin: &str, property: &str) -> bool {
    binding_specs(registry, plugin).iter().any(|(name, _)| *name == property)
}

/// Move the binding properties out of `machine` (what `is_binding` says
/// is one), returning them by device.
pub fn split(machine: &mut MachineRecord, is_binding: impl Fn(&str, &str) -> bool) -> Bindings {
    let mut out = Bindings::new();
    for d in &mut machine.devices {
        let taken: Vec<String> = d.properties.keys().filter(|k| is_binding(&d.plugin, k)).cloned().collect();
        for key in taken {
            if let Some(value) = d.properties.remove(&key) {
                out.entry(d.id.clone()).or_default().insert(key, value);
            }
        }
    }
    out
}

/// The `--disk`/`--net` form of a binding, for messages.
fn sugar(plugin: &str, device: &str, property: &str) -> String {
    match (plugin, property) {
        ("virtio-blk", "path") => format!(" or --disk id={device},path=FILE"),
        ("virtio-net", "tap") => format!(" or --net id={device},tap=NAME"),
        _ => String::new(),
    }
}

/// Check that every value `host` supplies is for a device of `machine`
/// and one of its plugin's bindings.
pub fn check_supplied(
    machine: &MachineType,
    registry: &Registry,
    host: &HostBindings,
) -> Result<(), BindingError> {
    for (device, values) in &host.supplied {
        let Some(d) = machine.devices.iter().find(|d| &d.id == device) else {
            let devices: Vec<&str> = machine.devices.iter().map(|d| d.id.as_str()).collect();
            return Err(BindingError::NoSuchDevice { device: device.clone(), devices: devices.join(", ") });
        };
        let specs = binding_specs(registry, &d.plugin);
        if let Some(property) = values.keys().find(|k| !specs.iter().any(|(name, _)| name == k)) {
            let names: Vec<&str> = specs.iter().map(|(n, _)| *n).collect();
            return Err(BindingError::NotABinding {
                device: device.clone(),
                plugin: d.plugin.clone(),
                property: property.clone(),
                bindings: if names.is_empty() { "none".into() } else { names.join(", ") },
            });
        }
    }
    Ok(())
}

/// The required bindings of `machine` neither `host` supplies nor the
/// writer's `carried` values give (when `host` reuses them), one error
/// each.
pub fn missing(
    machine: &MachineType,
    registry: &Registry,
    host: &HostBindings,
    carried: &Bindings,
) -> Vec<BindingError> {
    let mut out = Vec::new();
    for d in &machine.devices {
        for (property, required) in binding_specs(registry, &d.plugin) {
            let have = value(&d.id, property, host, carried).is_some();
            if required && !have {
                out.push(BindingError::Missing {
                    device: d.id.clone(),
                    plugin: d.plugin.clone(),
                    property: property.to_string(),
                    sugar: sugar(&d.plugin, &d.id, property),
                });
            }
        }
    }
    out
}

fn value<'a>(
    device: &str,
    property: &str,
    host: &'a HostBindings,
    carried: &'a Bindings,
) -> Option<&'a String> {
    let from = |b: &'a Bindings| b.get(device).and_then(|v| v.get(property));
    from(&host.supplied).or_else(|| if host.reuse == Reuse::Host { None } else { from(carried) })
}

/// Set `machine`'s binding properties from this host (or the writer's
/// values where `host` reuses them); a binding with neither keeps its
/// plugin's default. Fails with every required one missing.
pub fn apply(
    machine: &mut MachineType,
    registry: &Registry,
    host: &HostBindings,
    carried: &Bindings,
) -> Result<(), Vec<BindingError>> {
    check_supplied(machine, registry, host).map_err(|e| vec![e])?;
    let missing = missing(machine, registry, host, carried);
    if !missing.is_empty() {
        return Err(missing);
    }
    for d in &mut machine.devices {
        for (property, _) in binding_specs(registry, &d.plugin) {
            d.properties.remove(property);
            if let Some(v) = value(&d.id, property, host, carried) {
                d.properties.insert(property.to_string(), PropValue::Str(v.clone()));
            }
        }
    }
    Ok(())
}

/// Parse `--disk id=ID,path=FILE` / `--net id=ID,tap=NAME` as bindings of
/// an existing device (`option` names the flag in errors).
pub fn parse_device_option(option: &str, spec: &str, into: &mut Bindings) -> Result<(), BindingError> {
    let mut id = None;
    let mut values = BTreeMap::new();
    for pair in spec.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| spec_error(option, spec, format!("'{pair}' is not key=value")))?;
        match k.trim() {
            "id" => id = Some(v.trim().to_string()),
            key => {
                values.insert(key.to_string(), v.trim().to_string());
            }
        }
    }
    let id = id.ok_or_else(|| {
        spec_error(option, spec, "with --restore or --incoming, name the device it binds (id=DEVICE)")
    })?;
    into.entry(id).or_default().extend(values);
    Ok(())
}

/// Parse `--bind DEVICE:PROPERTY=VALUE`.
pub fn parse_bind(spec: &str, into: &mut Bindings) -> Result<(), BindingError> {
    let malformed = || spec_error("--bind", spec, "not DEVICE:PROPERTY=VALUE");
    let (target, value) = spec.split_once('=').ok_or_else(malformed)?;
    let (device, property) = target.split_once(':').ok_or_else(malformed)?;
    if device.is_empty() || property.is_empty() {
        return Err(malformed());
    }
    into.entry(device.to_string()).or_default().insert(property.to_string(), value.to_string());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::manifest::MachineDevice;

    #[test]
    fn a_version_2_machine_type_gives_up_its_paths_as_the_writer_s_bindings() {
        let mut record = MachineRecord {
            name: "pc-2".into(),
            description: String::new(),
            devices: vec![MachineDevice {
                id: "disk0".into(),
                plugin: "virtio-blk".into(),
                properties: [
                    ("path".to_string(), "/srv/a.img".to_string()),
                    ("readonly".into(), "true".into()),
                ]
                .into_iter()
                .collect(),
            }],
        };
        let bindings = split(&mut record, |plugin, prop| plugin == "virtio-blk" && prop == "path");
        assert_eq!(bindings["disk0"]["path"], "/srv/a.img");
        assert!(!record.devices[0].properties.contains_key("path"), "the machine type keeps no path");
        assert_eq!(record.devices[0].properties["readonly"], "true", "guest properties stay");
    }

    #[test]
    fn options_parse_into_bindings() {
        let mut b = Bindings::new();
        parse_device_option("--disk", "id=disk0,path=/srv/b.img", &mut b).unwrap();
        parse_bind("net0:tap=tap7", &mut b).unwrap();
        assert_eq!(b["disk0"]["path"], "/srv/b.img");
        assert_eq!(b["net0"]["tap"], "tap7");
        let err = parse_device_option("--disk", "path=/x", &mut b).unwrap_err();
        assert!(err.to_string().contains("name the device it binds (id=DEVICE)"), "{err}");
        assert!(parse_bind("net0=tap7", &mut b).is_err());
    }
}
