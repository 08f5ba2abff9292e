//! Machine types: TOML files in `machines/` that list devices, each with the
//! plugin that provides it and its properties. The files in the repository's
//! `machines/` are built into ferry; `--machine PATH` reads any other file.
//!
//! ```toml
//! name = "pc-1"
//! description = "..."
//! cpus = 1            # default, --cpus overrides
//! memory = "256M"     # default, --memory overrides
//! cpu = "x86-64-v1@1" # the guest's CPU model; "host" when left out
//!
//! [[device]]
//! id = "com1"
//! plugin = "serial-16550"
//! properties = { port = 0x3f8, irq = 4 }
//! ```

use std::{collections::BTreeMap, path::Path};

use ferry_plugin_api::{sdk::parse_integer, Property, PropertyKind};
use serde::Deserialize;
use thiserror::Error;

use crate::{cpu::CpuModel, plugins::Registry};

include!(concat!(env!("OUT_DIR"), "/machines.rs"));

/// The machine type used when `--machine` is not given.
pub const DEFAULT_MACHINE: &str = "pc-2";

/// Machine-type errors. Each names the file or the device.
#[derive(Debug, Error)]
pub enum MachineError {
    /// No such built-in machine and no such file.
    #[error("unknown machine type '{name}' (built in: {known}; or give a path to a .toml file)")]
    Unknown {
        /// What was asked for.
        name: String,
        /// Built-in names.
        known: String,
    },
    /// The file cannot be read.
    #[error("cannot read machine type {path}: {source}")]
    Read {
        /// File.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Bad TOML, or a field of the wrong type.
    #[error("machine type {source_name}: {location}: {message}")]
    Parse {
        /// File or built-in name.
        source_name: String,
        /// "line L, column C (`text`)".
        location: String,
        /// What was wrong.
        message: String,
    },
    /// A semantic problem with one device or field.
    #[error("machine type {machine}: {message}")]
    Invalid {
        /// Machine name.
        machine: String,
        /// What is wrong.
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MachineFile {
    name: String,
    #[serde(default)]
    description: String,
    cpus: Option<u8>,
    memory: Option<String>,
    cpu: Option<String>,
    #[serde(default, rename = "device")]
    devices: Vec<DeviceFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceFile {
    id: String,
    plugin: String,
    #[serde(default)]
    properties: BTreeMap<String, toml::Value>,
}

/// A property value as written in the machine type.
#[derive(Debug, Clone, PartialEq)]
pub enum PropValue {
    /// Integer.
    Int(i64),
    /// Boolean.
    Bool(bool),
    /// String.
    Str(String),
}

impl PropValue {
    /// The value as the string a plugin would get.
    pub fn as_string(&self) -> String {
        match self {
            PropValue::Int(i) => i.to_string(),
            PropValue::Bool(b) => b.to_string(),
            PropValue::Str(s) => s.clone(),
        }
    }
}

/// One device of a machine type.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceSpec {
    /// Device id (unique in the machine).
    pub id: String,
    /// Plugin name.
    pub plugin: String,
    /// Properties as written.
    pub properties: BTreeMap<String, PropValue>,
}

/// A parsed machine type.
#[derive(Debug, Clone, PartialEq)]
pub struct MachineType {
    /// Name.
    pub name: String,
    /// One line.
    pub description: String,
    /// Default vCPU count.
    pub cpus: Option<u8>,
    /// Default memory size in bytes.
    pub memory: Option<u64>,
    /// The guest's CPU model (`host` when the file does not say: what
    /// every machine type meant before models existed).
    pub cpu: CpuModel,
    /// Devices in order.
    pub devices: Vec<DeviceSpec>,
    /// Where it came from ("built-in" or a path).
    pub origin: String,
}

/// A device ready to create: plugin found, properties checked and complete.
#[derive(Debug, Clone)]
pub struct DevicePlan {
    /// Device id.
    pub id: String,
    /// Plugin name.
    pub plugin: String,
    /// Every property the plugin declares, defaults filled in.
    pub properties: Vec<Property>,
}

/// Names of the built-in machine types.
pub fn builtin_names() -> Vec<String> {
    BUILTIN_MACHINES.iter().filter_map(|(_, text)| parse(text, "built-in").ok().map(|m| m.name)).collect()
}

/// Every built-in machine type.
pub fn builtins() -> Result<Vec<MachineType>, MachineError> {
    BUILTIN_MACHINES.iter().map(|(file, text)| parse(text, &format!("built-in {file}"))).collect()
}

/// A machine type by built-in name, or from a file path.
pub fn load(name_or_path: &str) -> Result<MachineType, MachineError> {
    let looks_like_path = name_or_path.contains('/') || name_or_path.ends_with(".toml");
    if !looks_like_path {
        for m in builtins()? {
            if m.name == name_or_path {
                return Ok(m);
            }
        }
        return Err(MachineError::Unknown {
            name: name_or_path.to_string(),
            known: builtin_names().join(", "),
        });
    }
    let path = Path::new(name_or_path);
    let text = std::fs::read_to_string(path)
        .map_err(|source| MachineError::Read { path: name_or_path.to_string(), source })?;
    let mut m = parse(&text, name_or_path)?;
    m.origin = name_or_path.to_string();
    Ok(m)
}

/// Line and column (1-based) of byte offset `at`.
fn line_col(text: &str, at: usize) -> (usize, usize) {
    let before = &text[..at.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(before.len(), |nl| before.len() - nl - 1) + 1;
    (line, col)
}

/// Parse a machine type.
pub fn parse(text: &str, source_name: &str) -> Result<MachineType, MachineError> {
    let file: MachineFile = toml::from_str(text).map_err(|e| {
        let (location, message) = match e.span() {
            Some(span) => {
                let (line, col) = line_col(text, span.start);
                let snippet = text.lines().nth(line - 1).unwrap_or("").trim();
                (format!("line {line}, column {col} (`{snippet}`)"), e.message().to_string())
            }
            None => ("top level".to_string(), e.message().to_string()),
        };
        MachineError::Parse {
            source_name: source_name.to_string(),
            location,
            message: message.split_whitespace().collect::<Vec<_>>().join(" "),
        }
    })?;
    let invalid = |message: String| MachineError::Invalid { machine: file.name.clone(), message };

    let memory = match &file.memory {
        Some(s) => Some(
            crate::memory::parse_size(s)
                .ok_or_else(|| invalid(format!("field memory: '{s}' is not a size such as 256M or 2G")))?,
        ),
        None => None,
    };
    let cpu = match &file.cpu {
        Some(name) => CpuModel::parse(name).map_err(|e| invalid(format!("field cpu: {e}")))?,
        None => CpuModel::Host,
    };
    let mut devices = Vec::with_capacity(file.devices.len());
    for d in &file.devices {
        if d.id.is_empty() {
            return Err(invalid(format!("a device of plugin {} has an empty id", d.plugin)));
        }
        if devices.iter().any(|x: &DeviceSpec| x.id == d.id) {
            return Err(invalid(format!("device id '{}' is used twice", d.id)));
        }
        let mut properties = BTreeMap::new();
        for (k, v) in &d.properties {
            let value = match v {
                toml::Value::Integer(i) => PropValue::Int(*i),
                toml::Value::Boolean(b) => PropValue::Bool(*b),
                toml::Value::String(s) => PropValue::Str(s.clone()),
                other => {
                    return Err(invalid(format!(
                        "device {}: property {k}: a {} is not allowed (integers, booleans and strings are)",
                        d.id,
                        other.type_str()
                    )))
                }
            };
            properties.insert(k.clone(), value);
        }
        devices.push(DeviceSpec { id: d.id.clone(), plugin: d.plugin.clone(), properties });
    }
    Ok(MachineType {
        name: file.name,
        description: file.description,
        cpus: file.cpus,
        memory,
        cpu,
        devices,
        origin: "built-in".to_string(),
    })
}

impl MachineType {
    /// Add a device (from the command line). Ids must stay unique.
    pub fn add_device(&mut self, device: DeviceSpec) -> Result<(), MachineError> {
        if self.devices.iter().any(|d| d.id == device.id) {
            return Err(MachineError::Invalid {
                machine: self.name.clone(),
                message: format!("device id '{}' is used twice", device.id),
            });
        }
        self.devices.push(device);
        Ok(())
    }

    /// The first id `prefix0`, `prefix1`, ... not used yet.
    pub fn free_id(&self, prefix: &str) -> String {
        (0..)
            .map(|n| format!("{prefix}{n}"))
            .find(|id| !self.devices.iter().any(|d| &d.id == id))
            .unwrap_or_else(|| prefix.to_string())
    }
}

/// A device from a command-line option such as `--disk path=a.img,readonly=on`:
/// `key=value` pairs, separated by commas, become the plugin's properties
/// (checked against the plugin like any machine-type property).
pub fn device_from_option(
    option: &str,
    id: String,
    plugin: &str,
    spec: &str,
) -> Result<DeviceSpec, MachineError> {
    let mut properties = BTreeMap::new();
    for pair in spec.split(',').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').ok_or_else(|| MachineError::Invalid {
            machine: "command line".to_string(),
            message: format!("{option} {spec}: '{pair}' is not key=value"),
        })?;
        properties.insert(key.trim().to_string(), PropValue::Str(value.trim().to_string()));
    }
    Ok(DeviceSpec { id, plugin: plugin.to_string(), properties })
}

/// Why a property value does not fit its kind.
#[derive(Debug, Error)]
enum ValueError {
    #[error("'{0}' is not a non-negative integer")]
    NotAnInteger(String),
    #[error("expected {expected}, found {found}")]
    Kind { expected: &'static str, found: String },
    #[error("property kind {0} is not known to this ferry")]
    UnknownKind(u32),
}

/// Check a value against a property kind; returns the canonical string.
fn check_value(kind: PropertyKind, value: &PropValue) -> Result<String, ValueError> {
    let wrong = |expected, other: &PropValue| ValueError::Kind { expected, found: format!("{other:?}") };
    match (kind, value) {
        (PropertyKind::INTEGER, PropValue::Int(i)) if *i >= 0 => Ok(i.to_string()),
        (PropertyKind::INTEGER, PropValue::Str(s)) => {
            parse_integer(s).map(|n| n.to_string()).ok_or_else(|| ValueError::NotAnInteger(s.clone()))
        }
        (PropertyKind::INTEGER, other) => Err(wrong("a non-negative integer", other)),
        (PropertyKind::BOOL, PropValue::Bool(b)) => Ok(b.to_string()),
        (PropertyKind::BOOL, PropValue::Str(s)) if s == "true" || s == "false" || s == "on" || s == "off" => {
            Ok((s == "true" || s == "on").to_string())
        }
        (PropertyKind::BOOL, other) => Err(wrong("true or false", other)),
        (PropertyKind::STRING | PropertyKind::BINDING, PropValue::Str(s)) => Ok(s.clone()),
        (PropertyKind::STRING | PropertyKind::BINDING, PropValue::Int(i)) => Ok(i.to_string()),
        (PropertyKind::STRING | PropertyKind::BINDING, PropValue::Bool(b)) => Ok(b.to_string()),
        // Plugins with kinds this core does not know are refused at load.
        (PropertyKind(other), _) => Err(ValueError::UnknownKind(other)),
    }
}

/// Match a machine type against the installed plugins: every plugin present,
/// every property known and well-typed, defaults filled in.
pub fn resolve(machine: &MachineType, registry: &Registry) -> Result<Vec<DevicePlan>, MachineError> {
    let invalid = |message: String| MachineError::Invalid { machine: machine.name.clone(), message };
    let mut plans = Vec::with_capacity(machine.devices.len());
    for d in &machine.devices {
        let Some(lib) = registry.get(&d.plugin) else {
            let installed: Vec<&str> = registry.plugins().iter().map(|p| p.name()).collect();
            return Err(invalid(format!(
                "device {} needs plugin '{}', which is not installed in {} (installed: {})",
                d.id,
                d.plugin,
                registry.dir.display(),
                if installed.is_empty() { "none".to_string() } else { installed.join(", ") }
            )));
        };
        let specs = &lib.descriptor.properties;
        for name in d.properties.keys() {
            if !specs.iter().any(|s| s.name.as_str() == name) {
                let known: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
                return Err(invalid(format!(
                    "device {}: unknown property '{name}' for plugin {} (known: {})",
                    d.id,
                    d.plugin,
                    if known.is_empty() { "none".to_string() } else { known.join(", ") }
                )));
            }
        }
        let mut properties = Vec::with_capacity(specs.len());
        for spec in specs.iter() {
            let value = match (d.properties.get(spec.name.as_str()), spec.default.as_ref().into_option()) {
                (Some(v), _) => check_value(spec.kind, v)
                    .map_err(|e| invalid(format!("device {}: property {}: {e}", d.id, spec.name)))?,
                (None, Some(default)) => default.to_string(),
                (None, None) => {
                    return Err(invalid(format!("device {}: property {} is required", d.id, spec.name)))
                }
            };
            properties.push(Property { name: spec.name.clone(), value: value.into() });
        }
        plans.push(DevicePlan { id: d.id.clone(), plugin: d.plugin.clone(), properties });
    }
    Ok(plans)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_machine_types_parse_and_include_the_default() {
        let all = builtins().unwrap();
        assert!(all.iter().any(|m| m.name == DEFAULT_MACHINE));
    }

    #[test]
    fn malformed_toml_names_line_and_text() {
        let err = parse("name = \"x\"\n[[device]]\nid = \"a\"\nplugin = \n", "m.toml").unwrap_err();
        let s = err.to_string();
        assert!(s.starts_with("machine type m.toml: line 4"), "{s}");
    }

    #[test]
    fn a_wrong_field_type_names_the_field() {
        let err = parse("name = \"x\"\ncpus = \"four\"\n", "m.toml").unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("cpus = \"four\""), "{err}");
        let err = parse("name = \"x\"\ncolour = 3\n", "m.toml").unwrap_err().to_string();
        assert!(err.contains("unknown field `colour`"), "{err}");
        assert!(!err.contains('\n'), "one line: {err}");
    }

    #[test]
    fn values_are_checked_against_kinds() {
        assert_eq!(check_value(PropertyKind::INTEGER, &PropValue::Int(0x3f8)).unwrap(), "1016");
        assert_eq!(check_value(PropertyKind::INTEGER, &PropValue::Str("0x3f8".into())).unwrap(), "1016");
        assert!(check_value(PropertyKind::INTEGER, &PropValue::Int(-1)).is_err());
        assert!(check_value(PropertyKind::BOOL, &PropValue::Int(1)).is_err());
        assert_eq!(check_value(PropertyKind::BOOL, &PropValue::Str("on".into())).unwrap(), "true");
    }

    #[test]
    fn command_line_devices_become_machine_devices() {
        let mut m = parse("name = \"x\"\n[[device]]\nid = \"disk0\"\nplugin = \"p\"\n", "m.toml").unwrap();
        let id = m.free_id("disk");
        assert_eq!(id, "disk1");
        let d = device_from_option("--disk", id, "virtio-blk", "path=/tmp/a.img,readonly=on").unwrap();
        assert_eq!(d.properties.get("readonly"), Some(&PropValue::Str("on".into())));
        m.add_device(d.clone()).unwrap();
        assert!(m.add_device(d).is_err());
        let err = device_from_option("--disk", "d".into(), "virtio-blk", "path").unwrap_err().to_string();
        assert_eq!(err, "machine type command line: --disk path: 'path' is not key=value");
    }

    #[test]
    fn the_cpu_model_is_named_and_defaults_to_host() {
        assert_eq!(parse("name = \"x\"\n", "m.toml").unwrap().cpu, CpuModel::Host);
        let m = parse("name = \"x\"\ncpu = \"x86-64-v1@1\"\n", "m.toml").unwrap();
        assert_eq!(m.cpu.id(), "x86-64-v1@1");
        let err = parse("name = \"x\"\ncpu = \"x86-64-v1\"\n", "m.toml").unwrap_err().to_string();
        assert!(err.starts_with("machine type x: field cpu: cpu model 'x86-64-v1' needs a version"), "{err}");
        let pc2 = builtins().unwrap().into_iter().find(|m| m.name == "pc-2").unwrap();
        assert!(matches!(pc2.cpu, CpuModel::Named(_)), "the default machine type has a portable CPU");
        let pc1 = builtins().unwrap().into_iter().find(|m| m.name == "pc-1").unwrap();
        assert_eq!(pc1.cpu, CpuModel::Host, "pc-1 keeps its meaning");
    }

    #[test]
    fn duplicate_device_ids_are_refused() {
        let text =
            "name = \"x\"\n[[device]]\nid = \"a\"\nplugin = \"p\"\n[[device]]\nid = \"a\"\nplugin = \"q\"\n";
        let err = parse(text, "m.toml").unwrap_err().to_string();
        assert_eq!(err, "machine type x: device id 'a' is used twice");
    }
}
