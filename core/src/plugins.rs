//! Finding and loading plugin libraries.
//!
//! A VM opens only the plugins its machine type (or its snapshot's or
//! source's manifest) names, each from the library named for it
//! ([`library_file`]); a plugin kept under another file name is found by
//! opening every library in the directory, as `ferry plugins` does. Every
//! library opened must be a Ferry plugin. Each is
//! opened through its own abi_stable library header (`lib_header_from_path`,
//! then `init_root_module`): `RootModule::load_from_file` would cache one
//! library per root-module type and hand back the first plugin for every
//! path. Before the layout check, the plugin's plugin-api version is
//! compared with ours, so a mismatch reads as two version numbers instead of
//! abi_stable's full layout dump.
//!
//! The layout check runs against plugin-api's *baseline* (the 1.0
//! declarations), which every 1.x plugin satisfies; the module is then
//! viewed through this build's declarations, where members a plugin lacks
//! read as absent. A plugin built against a newer 1.y loads unless its
//! descriptor says it needs a member this core lacks.

use std::path::{Path, PathBuf};

use abi_stable::library::{lib_header_from_path, LibraryError, RootModule};
use ferry_plugin_api::{
    baseline, DeviceConfig, DeviceParts, HostBox, PluginDescriptor, PluginModRef, PropertyKind, MEMBERS,
    PLUGIN_API_VERSION,
};
use thiserror::Error;

/// Plugin loading errors. Each names the file.
#[derive(Debug, Error)]
pub enum PluginError {
    /// The directory cannot be read.
    #[error("cannot read plugin directory {dir}: {source}")]
    Dir {
        /// The directory.
        dir: String,
        /// Why.
        source: std::io::Error,
    },
    /// dlopen failed.
    #[error("plugin {path}: cannot load the library: {reason}")]
    Open {
        /// File.
        path: String,
        /// dlopen's message.
        reason: String,
    },
    /// A shared library without a Ferry plugin header.
    #[error("{path} is not a Ferry plugin (it exports no plugin root module)")]
    NotAPlugin {
        /// File.
        path: String,
    },
    /// Built against an incompatible plugin-api.
    #[error("plugin {path} was built against plugin-api {theirs}; this ferry uses plugin-api {ours}, which cannot load it")]
    ApiVersion {
        /// File.
        path: String,
        /// Its plugin-api version.
        theirs: String,
        /// Ours.
        ours: String,
    },
    /// Built against a newer 1.y that needs a member this core lacks.
    #[error("plugin {path} was built against plugin-api {theirs} and needs {member}, which this ferry's plugin-api {ours} lacks")]
    NeedsMember {
        /// File.
        path: String,
        /// Its plugin-api version.
        theirs: String,
        /// Ours.
        ours: String,
        /// The member (`Host::set_status`).
        member: String,
    },
    /// A property kind from a newer plugin-api.
    #[error("plugin {path}: property '{property}' has kind {kind}, which this ferry's plugin-api {ours} does not know")]
    PropertyKind {
        /// File.
        path: String,
        /// Property name.
        property: String,
        /// The kind's number.
        kind: u32,
        /// Ours.
        ours: String,
    },
    /// Same version number but different types.
    #[error("plugin {path}: its plugin-api types do not match this ferry's: {summary}")]
    Layout {
        /// File.
        path: String,
        /// The decisive lines of abi_stable's report.
        summary: String,
    },
    /// The plugin's own code failed.
    #[error("plugin {path}: {reason}")]
    Plugin {
        /// File.
        path: String,
        /// What it said.
        reason: String,
    },
    /// Two libraries with one plugin name.
    #[error("plugin {name} is installed twice: {first} and {second}")]
    Duplicate {
        /// Plugin name.
        name: String,
        /// One file.
        first: String,
        /// The other.
        second: String,
    },
}

/// One loaded plugin library.
pub struct PluginLibrary {
    /// The file it came from.
    pub path: PathBuf,
    /// What it says about itself.
    pub descriptor: PluginDescriptor,
    /// The plugin-api version it was built against.
    pub api_version: String,
    module: PluginModRef,
}

impl PluginLibrary {
    /// Create a device through the plugin's `create`.
    pub fn create(
        &self,
        config: DeviceConfig,
        host: HostBox,
    ) -> Result<DeviceParts, ferry_plugin_api::PluginError> {
        self.module.create()(config, host).into_result()
    }

    /// The plugin's verdict on a device configured as `config` whose
    /// source says `contract` (`PluginMod::check`, plugin-api 1.3): `Ok`
    /// when it can take it or the plugin predates checks.
    pub fn check(
        &self,
        config: DeviceConfig,
        contract: &std::collections::BTreeMap<String, String>,
    ) -> Result<(), ferry_plugin_api::PluginError> {
        let Some(check) = self.module.check() else { return Ok(()) };
        let facts = contract
            .iter()
            .map(|(k, v)| ferry_plugin_api::Property { name: k.as_str().into(), value: v.as_str().into() })
            .collect();
        check(config, facts).into_result()
    }

    /// Plugin name.
    pub fn name(&self) -> &str {
        self.descriptor.name.as_str()
    }
}

/// The plugins of one directory that a process opened.
pub struct Registry {
    /// The directory.
    pub dir: PathBuf,
    plugins: Vec<PluginLibrary>,
}

/// The file a plugin's library is expected in: `lib` + its name with
/// dashes as underscores + `.so`, as cargo names a cdylib of the plugin's
/// crate (`virtio-blk` in `libvirtio_blk.so`).
pub fn library_file(name: &str) -> String {
    format!("lib{}.so", name.replace('-', "_"))
}

impl Registry {
    /// Open every `*.so` in `dir`, in name order (`ferry plugins`, and a
    /// host's manifest for other hosts' plans): each must load.
    pub fn load_dir(dir: &Path) -> Result<Self, PluginError> {
        let mut registry = Registry { dir: dir.to_path_buf(), plugins: Vec::new() };
        registry.scan()?;
        Ok(registry)
    }

    /// Open the plugins `names` (a machine type's or a manifest's): each
    /// from the library named for it ([`library_file`]) where that holds
    /// it. If a name is not found so, every library in `dir` is opened, as
    /// [`load_dir`](Self::load_dir) does, and then any library that cannot
    /// load is an error. A name no library provides is left out: callers
    /// say which device needs it.
    pub fn open(dir: &Path, names: &[&str]) -> Result<Self, PluginError> {
        let start = std::time::Instant::now();
        let mut registry = Registry { dir: dir.to_path_buf(), plugins: Vec::new() };
        let mut wanted: Vec<&str> = names.to_vec();
        wanted.sort_unstable();
        wanted.dedup();
        let mut by_name = true;
        for name in &wanted {
            let path = dir.join(library_file(name));
            if !path.is_file() {
                by_name = false;
                continue;
            }
            let lib = load_one(&path)?;
            if lib.name() != *name {
                by_name = false;
            }
            if registry.get(lib.name()).is_none() {
                registry.plugins.push(lib);
            }
        }
        if !by_name || wanted.iter().any(|n| registry.get(n).is_none()) {
            crate::log::info(&format!(
                "plugins: not every plugin of {} is in the library named for it; opening every library in {}",
                wanted.join(", "),
                dir.display()
            ));
            registry.plugins.clear();
            registry.scan()?;
        }
        crate::log::info(&format!(
            "plugins: opened {} {} from {} in {:.2} ms",
            registry.plugins.len(),
            if registry.plugins.len() == 1 { "library" } else { "libraries" },
            dir.display(),
            start.elapsed().as_secs_f64() * 1e3
        ));
        Ok(registry)
    }

    /// Refuse a plugin directory that cannot be read (before waiting for a
    /// migration whose manifest says which plugins to open).
    pub fn check_dir(dir: &Path) -> Result<(), PluginError> {
        std::fs::read_dir(dir)
            .map(drop)
            .map_err(|source| PluginError::Dir { dir: dir.display().to_string(), source })
    }

    /// Open every library in the directory (those not open yet).
    fn scan(&mut self) -> Result<(), PluginError> {
        let shown = self.dir.display().to_string();
        let entries =
            std::fs::read_dir(&self.dir).map_err(|source| PluginError::Dir { dir: shown.clone(), source })?;
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "so"))
            .collect();
        paths.sort();
        for path in paths {
            let lib = load_one(&path)?;
            if let Some(other) = self.plugins.iter().find(|p| p.name() == lib.name()) {
                return Err(PluginError::Duplicate {
                    name: lib.name().to_string(),
                    first: other.path.display().to_string(),
                    second: path.display().to_string(),
                });
            }
            self.plugins.push(lib);
        }
        Ok(())
    }

    /// A plugin by name.
    pub fn get(&self, name: &str) -> Option<&PluginLibrary> {
        self.plugins.iter().find(|p| p.name() == name)
    }

    /// The plugins opened, in file-name order after a scan.
    pub fn plugins(&self) -> &[PluginLibrary] {
        &self.plugins
    }
}

/// Load one plugin library.
pub fn load_one(path: &Path) -> Result<PluginLibrary, PluginError> {
    let shown = path.display().to_string();
    let header = lib_header_from_path(path).map_err(|e| match e {
        LibraryError::GetSymbolError { .. } => PluginError::NotAPlugin { path: shown.clone() },
        LibraryError::OpenError { err, .. } => {
            PluginError::Open { path: shown.clone(), reason: err.to_string() }
        }
        other => PluginError::Open { path: shown.clone(), reason: one_line(&other.to_string()) },
    })?;

    let theirs = header.version_strings().version.as_str().to_string();
    let ours = <PluginModRef as RootModule>::VERSION_STRINGS.version.as_str();
    if !api_compatible(ours, &theirs) {
        return Err(PluginError::ApiVersion { path: shown, theirs, ours: PLUGIN_API_VERSION.to_string() });
    }

    let layout_error = |e: LibraryError| match e {
        LibraryError::AbiInstability(ref report) => {
            if std::env::var_os("FERRY_DUMP_LAYOUT").is_some() {
                eprintln!("{report}");
            }
            PluginError::Layout { path: shown.clone(), summary: summarize_layout_report(&report.to_string()) }
        }
        other => PluginError::Plugin { path: shown.clone(), reason: one_line(&other.to_string()) },
    };
    let checked = header.init_root_module::<baseline::PluginModRef>().map_err(layout_error)?;
    // SAFETY: the library passed abi_stable's layout check against the
    // baseline declarations, which a test keeps a prefix of the current
    // ones (same type names and package, members only appended). Viewed as
    // the current module, a member the library lacks reads as absent from
    // its prefix (accessors return `None`, trait methods run their default
    // bodies); nothing beyond the library's own prefix is read.
    let module = PluginModRef(unsafe { checked.0.cast() });
    let descriptor = module.describe()()
        .into_result()
        .map_err(|e| PluginError::Plugin { path: shown.clone(), reason: e.into() })?;
    if let Some(member) = descriptor.needs.iter().find(|m| !MEMBERS.contains(&m.as_str())) {
        return Err(PluginError::NeedsMember {
            path: shown,
            theirs,
            ours: PLUGIN_API_VERSION.to_string(),
            member: member.to_string(),
        });
    }
    let known = [PropertyKind::INTEGER, PropertyKind::BOOL, PropertyKind::STRING, PropertyKind::BINDING];
    if let Some(p) = descriptor.properties.iter().find(|p| !known.contains(&p.kind)) {
        return Err(PluginError::PropertyKind {
            path: shown,
            property: p.name.to_string(),
            kind: p.kind.0,
            ours: PLUGIN_API_VERSION.to_string(),
        });
    }
    Ok(PluginLibrary { path: path.to_path_buf(), descriptor, api_version: theirs, module })
}

/// The same major release, 1 or later: any 1.x plugin loads in any 1.y
/// core (older plugins through the baseline; newer ones unless they need a
/// member this core lacks). 0.x releases predate the stable ABI.
fn api_compatible(ours: &str, theirs: &str) -> bool {
    let major = |v: &str| -> Option<u64> { v.split('.').next()?.parse().ok() };
    let valid = |v: &str| v.split('.').count() == 3 && v.split('.').all(|n| n.parse::<u64>().is_ok());
    match (major(ours), major(theirs)) {
        (Some(o), Some(t)) => valid(theirs) && o >= 1 && o == t,
        _ => false,
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// abi_stable's layout report runs to hundreds of lines. Keep each
/// `Error:` block as "what: expected X, found Y", the first two of them.
pub fn summarize_layout_report(report: &str) -> String {
    fn pick(lines: &[&str]) -> String {
        let typed = lines.iter().find_map(|l| l.strip_prefix("type:"));
        let first = lines.iter().find(|l| !l.is_empty());
        typed.or(first.copied()).unwrap_or("?").to_string()
    }
    let lines: Vec<&str> = report.lines().map(str::trim).collect();
    let mut errors = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if let Some(kind) = lines[i].strip_prefix("Error:") {
            let mut j = i + 1;
            let (mut expected, mut found) = (Vec::new(), Vec::new());
            let mut side = 0;
            while j < lines.len() && !lines[j].starts_with("Error:") && !lines[j].contains("error(s)") {
                match lines[j] {
                    "Expected:" => side = 1,
                    "Found:" => side = 2,
                    l if side == 1 => expected.push(l),
                    l if side == 2 => found.push(l),
                    _ => {}
                }
                j += 1;
            }
            errors.push(format!("{}: expected {}, found {}", kind.trim(), pick(&expected), pick(&found)));
            i = j;
        } else {
            i += 1;
        }
    }
    match errors.len() {
        0 => "layout check failed".to_string(),
        1 | 2 => errors.join("; "),
        n => format!("{} (+{} more)", errors[..2].join("; "), n - 2),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_versions_follow_abi_stable_rules() {
        assert!(api_compatible("1.1.0", "1.0.0"), "an older 1.x plugin loads");
        assert!(api_compatible("1.1.0", "1.2.3"), "a newer 1.x plugin loads (its needs are checked)");
        assert!(!api_compatible("1.1.0", "2.0.0"), "another major does not");
        assert!(!api_compatible("1.1.0", "0.1.0"), "nor a 0.x plugin");
        assert!(!api_compatible("1.1.0", "garbage"));
        assert!(!api_compatible("1.1.0", "1.x.0"));
    }

    #[test]
    fn layout_reports_shrink_to_their_decisive_lines() {
        let report = "lots of\nlayout dump\n".repeat(300)
            + "Error:mismatched type\nExpected:\n    RResult\nFound:\n    RString\n3 error(s)inside:\n"
            + "Error:unexpected field\nExpected:\n  field_name:config\n  type:DeviceConfig\nFound:\n  field_name:port\n  type:u32\n"
            + "Error:too many fields\nExpected:\n 3\nFound:\n 2\n";
        let s = summarize_layout_report(&report);
        assert_eq!(
            s,
            "mismatched type: expected RResult, found RString; unexpected field: expected DeviceConfig, found u32 (+1 more)"
        );
    }
}
