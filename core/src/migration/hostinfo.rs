//! This host as another host's plan sees it: its plugin set and its CPU,
//! written by `ferry plugins --manifest` and used by the live handshake.

use super::{manifest::CpuidRecord, plan::{HostManifest, HostPlugin}};
use crate::{boot::cpu, plugins::Registry};

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

/// The CPUID KVM on this host gives vCPU 0 of a VM with `cpus` vCPUs.
pub fn host_cpuid(cpus: u8) -> Option<Vec<CpuidRecord>> {
    let kvm = kvm_ioctls::Kvm::new().ok()?;
    let base = kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES).ok()?;
    Some(cpuid_records(&cpu::cpuid_for(&base, 0, cpus)))
}

/// The entries of a CPUID table as the manifest records them.
pub fn cpuid_records(table: &kvm_bindings::CpuId) -> Vec<CpuidRecord> {
    table
        .as_slice()
        .iter()
        .map(|e| CpuidRecord {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        })
        .collect()
}

/// This host's plugin set and CPU, for `ferry plugins --manifest`.
pub fn host_manifest(registry: &Registry) -> HostManifest {
    HostManifest {
        ferry_version: env!("CARGO_PKG_VERSION").to_string(),
        plugin_api: ferry_plugin_api::PLUGIN_API_VERSION.to_string(),
        plugins: host_plugins(registry),
        // As for a multi-vCPU guest, so topology bits never read as missing.
        cpuid: host_cpuid(2).unwrap_or_default(),
    }
}
