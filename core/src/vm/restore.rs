//! Restoring a snapshot: every section read and checked first, then the
//! verdict on the guest's CPU and the plugins' state versions, then the
//! VM built from the file's machine type with memory mapped from it
//! lazily, then the state loaded.

use std::{fs::File, path::Path};

use ferry_plugin_api::StateBlob;

use super::{build, RamSource, Vm, VmError};
use crate::{
    boot,
    cpu::{models::CpuModel, verdict, HostCpu, VmCpu},
    migration::{
        manifest::{Manifest, MANIFEST_VERSION},
        stream::{self, Kind, StreamError},
    },
    plugins::Registry,
    state::{self, VcpuStateV2, MACHINE_STATE_VERSION},
};

/// Everything read from a snapshot before the VM is built.
struct SnapshotContents {
    manifest: Manifest,
    machine: (u32, Vec<u8>),
    vcpus: Vec<VcpuStateV2>,
    devices: Vec<(String, u32, Vec<u8>)>,
    runs: Vec<(u64, u64, u64)>,
}

/// Sections as they are found, before the file is known to be whole.
struct Sections {
    machine: Option<(u32, Vec<u8>)>,
    vcpus: Vec<Option<(u32, Vec<u8>)>>,
    devices: Vec<(String, u32, Vec<u8>)>,
    runs: Vec<(u64, u64, u64)>,
}

fn read_snapshot(file: &File, path: &str, verify_memory: bool) -> Result<SnapshotContents, VmError> {
    let err = |e: StreamError| VmError::Snapshot { path: path.to_string(), message: e.to_string() };
    let bad = |m: String| VmError::Snapshot { path: path.to_string(), message: m };
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
    let mut contents = Sections {
        vcpus: vec![None; usize::from(manifest.cpus)],
        machine: None,
        devices: Vec::new(),
        runs: Vec::new(),
    };
    loop {
        let h = r.next_header().map_err(err)?;
        match h.kind {
            Kind::End => break,
            Kind::Manifest => return Err(bad(format!("section {}: a second manifest", h.index))),
            Kind::Hello
            | Kind::Plan
            | Kind::Decision
            | Kind::Pages
            | Kind::ZeroPages
            | Kind::Resumed
            | Kind::Failed
            | Kind::Memfd => {
                return Err(bad(format!(
                    "section {}: a {} message belongs to a live migration",
                    h.index,
                    h.kind.name()
                )))
            }
            Kind::Machine => contents.machine = Some((h.version, r.payload(&h).map_err(err)?)),
            Kind::Vcpu => {
                let n = h.id.strip_prefix("cpu").and_then(|n| n.parse::<usize>().ok());
                let slot = n.and_then(|n| contents.vcpus.get_mut(n)).ok_or_else(|| {
                    bad(format!("section {} (vcpu {}): no such vCPU in the manifest", h.index, h.id))
                })?;
                *slot = Some((h.version, r.payload(&h).map_err(err)?));
            }
            Kind::Device => {
                if !manifest.devices.iter().any(|d| d.id == h.id) {
                    return Err(bad(format!("section {} (device {}): unknown device id", h.index, h.id)));
                }
                let payload = r.payload(&h).map_err(err)?;
                contents.devices.push((h.id.clone(), h.version, payload));
            }
            Kind::Memory => {
                let table = r.payload(&h).map_err(err)?;
                let runs = r.runs(&h, &table, &manifest.ram).map_err(err)?;
                if verify_memory {
                    for (i, run) in runs.iter().enumerate() {
                        r.verify_run(&h, i, run).map_err(err)?;
                    }
                }
                let end =
                    runs.last().map(|l| l.data_at + l.pages * 4096).unwrap_or(h.payload_at + h.payload_len);
                let end = end.div_ceil(4096) * 4096;
                contents.runs = runs.iter().map(|x| (x.gpa, x.pages * 4096, x.data_at)).collect();
                r.skip_to(end.max(h.payload_at + h.payload_len)).map_err(err)?;
            }
        }
    }
    let machine = contents.machine.ok_or_else(|| bad("no machine section".into()))?;
    let mut vcpus = Vec::with_capacity(contents.vcpus.len());
    for (i, v) in contents.vcpus.into_iter().enumerate() {
        let (version, bytes) = v.ok_or_else(|| bad(format!("no state for vCPU {i}")))?;
        vcpus.push(state::load_vcpu(version, &bytes).map_err(|e| bad(format!("vcpu cpu{i}: {e}")))?);
    }
    for d in &manifest.devices {
        if !contents.devices.iter().any(|(id, _, _)| id == &d.id) {
            return Err(bad(format!("device {}: no state section", d.id)));
        }
    }
    Ok(SnapshotContents { manifest, machine, vcpus, devices: contents.devices, runs: contents.runs })
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
fn restored_cpu(c: &SnapshotContents, host: &HostCpu) -> Result<VmCpu, String> {
    // Every MSR any vCPU section holds (a v1 manifest does not list them).
    let mut msrs: Vec<u32> = c.vcpus.iter().flat_map(|v| v.msrs().iter().map(|m| m.index)).collect();
    msrs.sort_by_key(|&i| crate::cpu::msrs::restore_rank(i));
    msrs.dedup();
    cpu_here(&c.manifest, &msrs, ORIGIN, host).map_err(|problems| {
        format!("this host cannot run the guest's CPU; nothing was created:\n  {}", problems.join("\n  "))
    })
}

/// Build a VM from a snapshot: the machine type comes from the file; memory
/// is mapped from it lazily. Every section is checked before the VM runs.
pub fn restore(
    path: &Path,
    plugins: &Path,
    verify_memory: bool,
    isolation: &crate::isolate::Isolation,
) -> Result<Vm, VmError> {
    let shown = path.display().to_string();
    let bad = |m: String| VmError::Snapshot { path: shown.clone(), message: m };
    let file = File::open(path).map_err(|e| bad(format!("cannot open: {e}")))?;
    let c = read_snapshot(&file, &shown, verify_memory)?;
    let m = &c.manifest;
    let machine = m.machine.to_machine_type(m.cpus, m.memory);
    let host = HostCpu::probe()?;
    let cpu = restored_cpu(&c, &host).map_err(bad)?;

    // Versions first: a state this host cannot load is named before any
    // device is created.
    let registry = Registry::load_dir(plugins)?;
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
        let v = lib.descriptor.state;
        if d.state_version < v.oldest_load || d.state_version > v.current {
            return Err(bad(format!(
                "device {}: {} state v{}, this host loads v{}..v{}",
                d.id, d.plugin, d.state_version, v.oldest_load, v.current
            )));
        }
    }
    drop(registry);

    let vm = build(
        machine,
        plugins,
        m.cpus,
        cpu,
        RamSource::Snapshot { size: m.memory, file: &file, runs: c.runs.clone() },
        isolation,
    )?;
    if vm.ram.ranges().iter().map(|r| (r.gpa, r.len)).collect::<Vec<_>>() != m.ram {
        return Err(bad("the memory layout differs from this ferry's for the same size".into()));
    }
    apply_states(&vm, &c.machine, &c.vcpus, &c.devices).map_err(bad)?;
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

/// Load machine, vCPU and device state into a freshly built VM, remap the
/// PCI BARs and let the devices run. Errors say which section.
pub(super) fn apply_states(
    vm: &Vm,
    machine: &(u32, Vec<u8>),
    vcpus: &[VcpuStateV2],
    devices: &[(String, u32, Vec<u8>)],
) -> Result<(), String> {
    let t0 = std::time::Instant::now();
    let (mv, machine_bytes) = machine;
    if *mv != MACHINE_STATE_VERSION {
        return Err(format!("machine state v{mv}, this ferry loads v{MACHINE_STATE_VERSION}"));
    }
    let ms: state::MachineStateV1 =
        state::decode(machine_bytes).map_err(|e| format!("machine section: {e}"))?;
    state::restore_machine(&vm.kvm.vm, &ms).map_err(|e| format!("machine section: {e}"))?;
    if vcpus.len() != vm.vcpus.len() {
        return Err(format!("{} vCPU sections for {} vCPUs", vcpus.len(), vm.vcpus.len()));
    }
    crate::log::debug(&format!("machine state loaded at {:.2} ms", t0.elapsed().as_secs_f64() * 1e3));
    for (i, (fd, st)) in vm.vcpus.iter().zip(vcpus).enumerate() {
        state::restore_vcpu(fd, st).map_err(|e| format!("vcpu cpu{i}: {e}"))?;
    }
    crate::log::debug(&format!("vCPU state loaded at {:.2} ms", t0.elapsed().as_secs_f64() * 1e3));
    for slot in vm.bus.devices() {
        let Some((_, version, bytes)) = devices.iter().find(|(id, _, _)| id == &slot.id) else {
            return Err(format!("device {}: no state section", slot.id));
        };
        let blob = StateBlob { version: *version, bytes: bytes.clone().into() };
        let mut dev = slot.device.lock().unwrap_or_else(|e| e.into_inner());
        dev.pause().into_result().map_err(|e| format!("device {}: {e}", slot.id))?;
        dev.load_state(blob)
            .into_result()
            .map_err(|e| format!("device {} ({}): {e}", slot.id, slot.plugin))?;
    }
    vm.bus.refresh_pci();
    vm.set_devices_paused(false)
}
