//! Restoring a snapshot: every section read and checked first, then the
//! VM built from the file's machine type with memory mapped from it
//! lazily, then the state loaded.

use std::{fs::File, path::Path};

use ferry_plugin_api::StateBlob;

use super::{build, RamSource, Vm, VmError};
use crate::{
    boot,
    migration::{
        manifest::{Manifest, MANIFEST_VERSION},
        stream::{self, Kind, StreamError},
    },
    plugins::Registry,
    state::{self, MACHINE_STATE_VERSION, VCPU_STATE_VERSION},
};

/// Everything read from a snapshot before the VM is built.
struct SnapshotContents {
    manifest: Manifest,
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
    let mut contents = SnapshotContents {
        vcpus: vec![None; usize::from(manifest.cpus)],
        manifest,
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
                if !contents.manifest.devices.iter().any(|d| d.id == h.id) {
                    return Err(bad(format!("section {} (device {}): unknown device id", h.index, h.id)));
                }
                let payload = r.payload(&h).map_err(err)?;
                contents.devices.push((h.id.clone(), h.version, payload));
            }
            Kind::Memory => {
                let table = r.payload(&h).map_err(err)?;
                let runs = r.runs(&h, &table, &contents.manifest.ram).map_err(err)?;
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
    if contents.machine.is_none() {
        return Err(bad("no machine section".into()));
    }
    if let Some(i) = contents.vcpus.iter().position(Option::is_none) {
        return Err(bad(format!("no state for vCPU {i}")));
    }
    for d in &contents.manifest.devices {
        if !contents.devices.iter().any(|(id, _, _)| id == &d.id) {
            return Err(bad(format!("device {}: no state section", d.id)));
        }
    }
    Ok(contents)
}

/// Build a VM from a snapshot: the machine type comes from the file; memory
/// is mapped from it lazily. Every section is checked before the VM runs.
pub fn restore(path: &Path, plugins: &Path, verify_memory: bool) -> Result<Vm, VmError> {
    let shown = path.display().to_string();
    let bad = |m: String| VmError::Snapshot { path: shown.clone(), message: m };
    let file = File::open(path).map_err(|e| bad(format!("cannot open: {e}")))?;
    let c = read_snapshot(&file, &shown, verify_memory)?;
    let m = &c.manifest;
    let machine = m.machine.to_machine_type(m.cpus, m.memory);

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
        Some(m.cpus),
        RamSource::Snapshot { size: m.memory, file: &file, runs: c.runs.clone() },
    )?;
    if vm.ram.ranges().iter().map(|r| (r.gpa, r.len)).collect::<Vec<_>>() != m.ram {
        return Err(bad("the memory layout differs from this ferry's for the same size".into()));
    }
    let machine_state = c.machine.clone().expect("checked");
    let vcpus: Vec<(u32, Vec<u8>)> = c.vcpus.iter().map(|v| v.clone().expect("checked")).collect();
    apply_states(&vm, &machine_state, &vcpus, &c.devices).map_err(bad)?;
    crate::log::info(&format!(
        "restored {shown}: machine type {}, {} vCPU(s), {} of RAM",
        vm.machine.name,
        vm.cpus,
        crate::memory::human_size(vm.ram.size())
    ));
    Ok(vm)
}

/// Load machine, vCPU and device state into a freshly built VM, remap the
/// PCI BARs and let the devices run. Errors say which section.
pub(super) fn apply_states(
    vm: &Vm,
    machine: &(u32, Vec<u8>),
    vcpus: &[(u32, Vec<u8>)],
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
    for (i, (fd, (version, bytes))) in vm.vcpus.iter().zip(vcpus).enumerate() {
        if *version != VCPU_STATE_VERSION {
            return Err(format!("vcpu cpu{i}: state v{version}, this ferry loads v{VCPU_STATE_VERSION}"));
        }
        let st: state::VcpuStateV1 = state::decode(bytes).map_err(|e| format!("vcpu cpu{i}: {e}"))?;
        state::restore_vcpu(fd, &st).map_err(|e| format!("vcpu cpu{i}: {e}"))?;
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
