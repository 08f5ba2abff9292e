//! This host as another host's plan sees it: its plugin set and its CPU,
//! written by `ferry plugins --manifest` and used by the live handshake.

use super::plan::{HostManifest, HostPlugin};
use crate::{
    cpu::{CpuError, HostCpu},
    plugins::Registry,
};

/// This host's plugins, as a migration plan sees them.
pub fn host_plugins(registry: &Registry) -> Vec<HostPlugin> {
    registry
        .plugins()
        .iter()
        .map(|p| HostPlugin {
            name: p.name().to_string(),
            version: p.descriptor.version.to_string(),
            current: p.descriptor.state.current,
            oldest_load: p.descriptor.state.oldest_load,
            oldest_save: p.descriptor.state.oldest_save,
            properties: p.descriptor.properties.iter().map(|q| q.name.to_string()).collect(),
            defaults: p
                .descriptor
                .properties
                .iter()
                .filter_map(|q| q.default.clone().into_option().map(|d| (q.name.to_string(), d.to_string())))
                .collect(),
        })
        .collect()
}

/// This host's plugin set and CPU, for `ferry plugins --manifest`. A
/// host whose KVM cannot be read is described without its CPU (plans
/// against it then leave the CPU unchecked); a malformed test disguise is
/// an error.
pub fn host_manifest(registry: &Registry) -> Result<HostManifest, CpuError> {
    let cpu = match HostCpu::probe() {
        Ok(cpu) => Some(cpu),
        Err(e @ CpuError::Disguise(_)) => return Err(e),
        Err(e) => {
            crate::log::warn(&format!("this host's CPU is left out of its manifest: {e}"));
            None
        }
    };
    Ok(HostManifest {
        ferry_version: env!("CARGO_PKG_VERSION").to_string(),
        plugin_api: ferry_plugin_api::PLUGIN_API_VERSION.to_string(),
        plugins: host_plugins(registry),
        cpu,
    })
}
