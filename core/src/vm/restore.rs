//! Restoring a snapshot: every section read and checked first, then the
//! verdict on the guest's CPU and the plugins' state versions, then the
//! VM built from the file's machine type with memory mapped from it
//! lazily, then the state loaded.

use std::{fs::File, path::Path};

use ferry_plugin_api::state::check_load;

use super::{build, RamSource, SnapshotFault, Vm, VmError, VmMemory};
use crate::{
    bindings::{self, Bindings, HostBindings},
    boot,
    cpu::{models::CpuModel, verdict, HostCpu, VmCpu},
    images::{Arrivals, ImageStore},
    machine::MachineType,
    migration::{
        manifest::{Manifest, MANIFEST_VERSION},
        stream::{self, Kind, StreamError},
        vmstate::{StateReader, VmState},
    },
    plugins::Registry,
    state,
};

/// Everything read from a snapshot before the VM is built.
struct SnapshotContents {
    manifest: Manifest,
    state: VmState,
    runs: Vec<(u64, u64, u64)>,
}

fn read_snapshot(
    file: &File,
    path: &str,
    verify_memory: bool,
    images: &ImageStore,
) -> Result<SnapshotContents, VmError> {
    let bad =
        |m: String| VmError::Snapshot { path: path.to_string(), fault: SnapshotFault::Unusable, message: m };
    let err = |e: StreamError| bad(e.to_string());
    let mut r = stream::Reader::new(file).map_err(err)?;
    let h = r.next_header().map_err(err)?;
    if h.kind != Kind::Manifest {
        return Err(bad(format!("section 0 is a {} section; a manifest must come first", h.kind.name())));
    }
    if h.version > MANIFEST_VERSION {
        return Err(bad(format!(
            "manifest v{} is newer than this ferry reads (v{MANIFEST_VERSION})",
            h.version
        )));
    }
    let manifest: Manifest =
        state::decode(&r.payload(&h).map_err(err)?).map_err(|e| bad(format!("section 0 (manifest): {e}")))?;
    if manifest.cpus == 0 || usize::from(manifest.cpus) > boot::mptable::MAX_CPUS as usize {
        return Err(bad(format!("manifest: {} vCPUs", manifest.cpus)));
    }
    let mut reader = StateReader::new(manifest.cpus, manifest.devices.iter().map(|d| d.id.clone()).collect());
    // The boot image goes to this host's store as it is read, checked
    // against its hash; one the store holds already is skipped.
    let wanted = manifest.boot.as_ref().map(|b| b.images().cloned().collect()).unwrap_or_default();
    let mut arrivals = Arrivals::new(images, wanted).map_err(|e| bad(format!("manifest: {e}")))?;
    let mut runs = Vec::new();
    loop {
        let h = r.next_header().map_err(err)?;
        match h.kind {
            Kind::End => break,
            Kind::Manifest => return Err(bad(format!("section {}: a second manifest", h.index))),
            k if StateReader::wants(k) => {
                let payload = r.payload(&h).map_err(err)?;
                reader.take(&h, payload).map_err(|e| bad(e.to_string()))?;
            }
            Kind::Memory => {
                let table = r.payload(&h).map_err(err)?;
                let table = r.runs(&h, &table, &manifest.ram).map_err(err)?;
                if verify_memory {
                    for (i, run) in table.iter().enumerate() {
                        r.verify_run(&h, i, run).map_err(err)?;
                    }
                }
                runs = table.iter().map(|x| (x.gpa, x.pages * 4096, x.data_at)).collect();
                r.skip_memory(&h, &table).map_err(err)?;
            }
            Kind::Image if arrivals.needs(&h.id) => {
                let piece = r.payload(&h).map_err(err)?;
                arrivals.take(&h.id, &piece).map_err(|e| bad(format!("section {}: {e}", h.index)))?;
            }
            Kind::Image => r.skip(&h).map_err(err)?,
            _ => {
                return Err(bad(format!(
                    "section {}: a {} message belongs to a live migration",
                    h.index,
                    h.kind.name()
                )))
            }
        }
    }
    let state = reader.finish().map_err(|e| bad(e.to_string()))?;
    arrivals.finish().map_err(|e| bad(e.to_string()))?;
    Ok(SnapshotContents { manifest, state, runs })
}

/// How restore verdicts introduce the guest's CPU.
const ORIGIN: &str = "the snapshot was written";

/// The CPU an existing guest (manifest `m`, its vCPUs saving `msrs`) gets
/// on `host`, or the verdict's problems.
pub(super) fn cpu_here(
    m: &Manifest,
    msrs: &[u32],
    origin: &str,
    host: &HostCpu,
) -> Result<VmCpu, Vec<String>> {
    let guest = m.guest_cpu(msrs, origin);
    let v = verdict::check(&guest, host);
    if !v.ok() {
        return Err(v.problems);
    }
    for note in &v.notes {
        crate::log::info(&format!("cpu: {note}"));
    }
    if guest.legacy {
        // As ferry did before CPU models: this host's CPU.
        let cpuid = CpuModel::Host.guest_cpuid(host, m.cpus).map_err(|p| {
            p.iter().map(|p| format!("this host cannot give its own CPU: {p}")).collect::<Vec<_>>()
        })?;
        return Ok(VmCpu::recorded("host", &host.vendor, cpuid, host.tsc_khz, false, host));
    }
    let scale = v.scale_tsc_khz.is_some();
    Ok(VmCpu::recorded(&guest.model, &guest.vendor, m.cpuid.clone(), guest.tsc_khz, scale, host))
}

/// The CPU the restored guest gets on `host`, or every reason it cannot
/// run here (one per line).
fn restored_cpu(c: &SnapshotContents, host: &HostCpu) -> Result<VmCpu, VmError> {
    // Every MSR any vCPU section holds (a v1 manifest does not list them).
    let mut msrs: Vec<u32> = c.state.vcpus.iter().flat_map(|v| v.msrs().iter().map(|m| m.index)).collect();
    msrs.sort_by_key(|&i| crate::cpu::msrs::restore_rank(i));
    msrs.dedup();
    cpu_here(&c.manifest, &msrs, ORIGIN, host).map_err(VmError::CpuRefused)
}

/// The manifest's machine type without host bindings, and the writer's
/// binding values (from a v3 manifest's `bindings`, or moved out of a v2
/// manifest's machine type).
pub(super) fn unbound_machine(m: &Manifest, registry: &Registry) -> (MachineType, Bindings) {
    let mut record = m.machine.clone();
    let mut carried = m.bindings.clone();
    for (device, values) in bindings::split(&mut record, |p, k| bindings::is_binding(registry, p, k)) {
        carried.entry(device).or_default().extend(values);
    }
    (record.to_machine_type(m.cpus, m.memory), carried)
}

/// Set `machine`'s host bindings from `host` (and `carried` where it
/// reuses them); every binding that cannot be made, in one line.
pub(super) fn bind(
    machine: &mut MachineType,
    registry: &Registry,
    host: &HostBindings,
    carried: &Bindings,
) -> Result<(), bindings::BindingErrors> {
    bindings::apply(machine, registry, host, carried).map_err(bindings::BindingErrors)
}

/// Leave out the properties this host's (older) plugins do not know: they
/// switch on features those plugins lack, which the plan allowed only for
/// downgrades, whose functions refused if the guest used the feature.
pub(super) fn drop_unknown_properties(machine: &mut MachineType, registry: &Registry) {
    for d in &mut machine.devices {
        if let Some(lib) = registry.get(&d.plugin) {
            d.properties.retain(|k, _| lib.descriptor.properties.iter().any(|p| p.name.as_str() == k));
        }
    }
}

/// Every device whose source carried a contract (`Device::contract`),
/// checked by its plugin here against `machine` (the manifest's, bound to
/// this host), before anything is created: (device id, why this host
/// cannot take it).
pub(super) fn contract_refusals(
    m: &Manifest,
    machine: &MachineType,
    registry: &Registry,
) -> Vec<(String, String)> {
    if m.devices.iter().all(|d| d.contract.is_empty()) {
        return Vec::new();
    }
    let mut machine = machine.clone();
    drop_unknown_properties(&mut machine, registry);
    let Ok(plans) = crate::machine::resolve(&machine, registry) else { return Vec::new() };
    let mut refused = Vec::new();
    for d in m.devices.iter().filter(|d| !d.contract.is_empty()) {
        let (Some(lib), Some(plan)) = (registry.get(&d.plugin), plans.iter().find(|p| p.id == d.id)) else {
            continue;
        };
        let config = ferry_plugin_api::DeviceConfig {
            id: plan.id.as_str().into(),
            properties: plan.properties.iter().cloned().collect(),
        };
        if let Err(e) = lib.check(config, &d.contract) {
            refused.push((d.id.clone(), e.message.to_string()));
        }
    }
    refused
}

/// Build a VM from a snapshot: the machine type comes from the file; memory
/// is mapped from it lazily. Every section is checked before the VM runs.
///
/// Two threads share the work: while this one opens the plugins, a second
/// maps the guest's RAM, creates the KVM VM holding it, and reads this
/// host's CPU from that VM. The verdicts come in the same order as ever
/// (the CPU, then the plugins' versions, then the bindings); a refusal
/// drops what was made before any device exists.
pub fn restore(
    path: &Path,
    plugins: &Path,
    verify_memory: bool,
    bindings: &HostBindings,
    isolation: &crate::isolate::Isolation,
    images: &ImageStore,
) -> Result<Vm, VmError> {
    let shown = path.display().to_string();
    let bad =
        |m: String| VmError::Snapshot { path: shown.clone(), fault: SnapshotFault::Unusable, message: m };
    let file = File::open(path).map_err(|e| bad(format!("cannot open: {e}")))?;
    let c = read_snapshot(&file, &shown, verify_memory, images)?;
    crate::log::step("restore: snapshot read and checked");
    let m = &c.manifest;
    let names: Vec<&str> = m.devices.iter().map(|d| d.plugin.as_str()).collect();
    let (made, registry) = std::thread::scope(|s| {
        let source = RamSource::Snapshot { size: m.memory, file: &file, runs: c.runs.clone() };
        let (cpus, shared) = (m.cpus, isolation.devices.any());
        let made = s.spawn(move || -> Result<_, VmError> {
            let memory = VmMemory::new(source, cpus, shared)?;
            let host = HostCpu::probe_on(&memory.kvm.vm)?;
            crate::log::step("restore: host CPU probed");
            Ok((memory, host))
        });
        let registry = Registry::open(plugins, &names);
        (made.join(), registry)
    });
    let (memory, host) = made.map_err(|_| VmError::Helper("making guest RAM and the VM"))??;
    let cpu = restored_cpu(&c, &host).map_err(|e| bad(e.to_string()))?;

    // Versions next: a state this host cannot load is named before any
    // device is created.
    let registry = registry?;
    for d in &m.devices {
        let Some(lib) = registry.get(&d.plugin) else {
            return Err(bad(format!(
                "device {}: plugin {} {} is not installed in {}",
                d.id,
                d.plugin,
                d.plugin_version,
                registry.dir.display()
            )));
        };
        check_load(lib.descriptor.state, d.state_version, "this host")
            .map_err(|e| bad(format!("device {} ({}): {e}", d.id, d.plugin)))?;
    }
    // Then the host's resources: this host's bindings (or, when told, the
    // snapshot's), every required one present.
    let (machine, carried) = unbound_machine(m, &registry);
    let mut machine = machine;
    bind(&mut machine, &registry, bindings, &carried).map_err(|e| bad(e.to_string()))?;
    if let Some((id, reason)) = contract_refusals(m, &machine, &registry).into_iter().next() {
        return Err(VmError::Snapshot {
            path: shown,
            fault: SnapshotFault::Refused,
            message: format!("device {id}: {reason}"),
        });
    }
    crate::log::step("restore: plugins opened, versions and bindings checked");

    // A device whose backend maps guest RAM itself (it needs
    // `Host::memory_fds`) cannot use a private mapping of the file: read
    // the pages into a memfd instead, as for device processes.
    let shares_ram = m.devices.iter().any(|d| {
        registry
            .get(&d.plugin)
            .is_some_and(|l| l.descriptor.needs.iter().any(|n| n.as_str() == "Host::memory_fds"))
    });
    let memory = match memory {
        memory if shares_ram && memory.ram.memfd().is_none() => {
            drop(memory);
            let source = RamSource::Snapshot { size: m.memory, file: &file, runs: c.runs.clone() };
            VmMemory::new(source, m.cpus, true)?
        }
        memory => memory,
    };
    let mut vm = build(machine, registry, m.cpus, cpu, memory, isolation)?;
    if vm.ram.ranges().iter().map(|r| (r.gpa, r.len)).collect::<Vec<_>>() != m.ram {
        return Err(bad("the memory layout differs from this ferry's for the same size".into()));
    }
    c.state.load(&vm, &vm.vcpus).map_err(|e| bad(e.to_string()))?;
    crate::log::step("restore: state loaded");
    super::boot::adopt_image(&mut vm, m.boot.as_ref(), images);
    crate::log::info(&format!(
        "restored {shown}: machine type {}, {} vCPU(s) of cpu {} ({}), {} of RAM",
        vm.machine.name,
        vm.cpus,
        vm.cpu.model,
        vm.cpu.vendor,
        crate::memory::human_size(vm.ram.size())
    ));
    Ok(vm)
}
