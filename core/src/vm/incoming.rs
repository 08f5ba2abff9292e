//! An incoming live migration: the handshake and plan, the VM built from
//! the source's manifest, memory and state received, then loaded.

use std::path::Path;

use super::{
    build,
    restore::{apply_states, cpu_here},
    RamSource, Vm, VmError,
};
use crate::{
    cpu::HostCpu,
    migration::{hostinfo::host_plugins, plan::LIVE_ORIGIN, stream::Kind},
    plugins::Registry,
    state::{self, VcpuStateV2},
};

/// Wait for a live migration on `uri` (TLS or plaintext as `security`
/// says, for tcp:), plan it against the plugins in `plugins`, receive the
/// VM, and return it ready to run with the link to confirm on. None after
/// a dry run.
pub fn incoming(
    uri: &str,
    security: Option<&crate::migration::live::TcpSecurity>,
    plugins: &Path,
    isolation: &crate::isolate::Isolation,
) -> Result<Option<(Vm, crate::migration::live::IncomingLink)>, VmError> {
    use crate::migration::{live, plan};
    let fail = |m: String| VmError::Failed(format!("incoming migration: {m}"));
    let registry = Registry::load_dir(plugins)?;
    let host = host_plugins(&registry);
    let host_cpu = HostCpu::probe()?;
    // The same computation `ferry compat` makes from this host's manifest.
    let accepted = live::accept(uri, security, |m| plan::make_plan(m, &host, Some(&host_cpu)))
        .map_err(|e| fail(e.to_string()))?;
    drop(registry);
    let Some(mut incoming) = accepted else { return Ok(None) };
    let m = incoming.manifest.clone();
    let cpu = match cpu_here(&m, &m.msr_indexes(), LIVE_ORIGIN, &host_cpu) {
        Ok(cpu) => cpu,
        // The plan refused these already; a source that went on anyway
        // is told again.
        Err(problems) => {
            let reason = problems.join("; ");
            incoming.link.failed(&reason);
            return Err(fail(reason));
        }
    };
    let mut machine = m.machine.to_machine_type(m.cpus, m.memory);
    // Properties this host's (older) plugins do not know switch on features
    // they lack; the plan allowed them only for downgrades, whose functions
    // refused if the guest used the feature. Leave them out here.
    let registry = Registry::load_dir(plugins)?;
    for d in &mut machine.devices {
        if let Some(lib) = registry.get(&d.plugin) {
            d.properties.retain(|k, _| lib.descriptor.properties.iter().any(|p| p.name.as_str() == k));
        }
    }
    drop(registry);
    let ram = match incoming.memfd.take() {
        Some(file) => RamSource::Memfd(m.memory, file),
        None => RamSource::Fresh(m.memory),
    };
    let vm = match build(machine, plugins, m.cpus, cpu, ram, isolation) {
        Ok(vm) => vm,
        Err(e) => {
            incoming.link.failed(&e.to_string());
            return Err(e);
        }
    };
    let result = receive_state(&vm, &mut incoming.link);
    match result {
        Ok(()) => Ok(Some((vm, incoming.link))),
        Err(e) => {
            incoming.link.failed(&e);
            Err(fail(e))
        }
    }
}

/// Memory and state from the source, until END; then load the state.
fn receive_state(vm: &Vm, link: &mut crate::migration::live::IncomingLink) -> Result<(), String> {
    use vm_memory::{Bytes, GuestAddress};
    let mut machine = None;
    let mut vcpus: Vec<Option<(u32, Vec<u8>)>> = vec![None; usize::from(vm.cpus)];
    let mut devices = Vec::new();
    loop {
        let (h, payload) = link.receive().map_err(|e| e.to_string())?;
        match h.kind {
            Kind::Pages => {
                if payload.len() < 8 || (payload.len() - 8) % 4096 != 0 {
                    return Err(format!("message {}: malformed pages", h.index));
                }
                let gpa = u64::from_le_bytes(payload[..8].try_into().map_err(|_| "short")?);
                let data = &payload[8..];
                if vm.ram.bytes(gpa, data.len() as u64).is_none() {
                    return Err(format!("message {}: pages at {gpa:#x} outside guest RAM", h.index));
                }
                vm.ram.mem().write_slice(data, GuestAddress(gpa)).map_err(|e| e.to_string())?;
            }
            Kind::ZeroPages => {
                for pair in payload.chunks_exact(16) {
                    let gpa = u64::from_le_bytes(pair[..8].try_into().map_err(|_| "short")?);
                    let n = u64::from_le_bytes(pair[8..].try_into().map_err(|_| "short")?);
                    let len = n.checked_mul(4096).ok_or("zero run overflows")?;
                    if vm.ram.bytes(gpa, len).is_none() {
                        return Err(format!("message {}: zero pages at {gpa:#x} outside guest RAM", h.index));
                    }
                    let zero = [0u8; 4096];
                    for k in 0..n {
                        vm.ram
                            .mem()
                            .write_slice(&zero, GuestAddress(gpa + k * 4096))
                            .map_err(|e| e.to_string())?;
                    }
                }
            }
            Kind::Machine => machine = Some((h.version, payload)),
            Kind::Vcpu => {
                let slot =
                    h.id.strip_prefix("cpu")
                        .and_then(|n| n.parse::<usize>().ok())
                        .and_then(|n| vcpus.get_mut(n))
                        .ok_or_else(|| format!("message {}: no vCPU {}", h.index, h.id))?;
                *slot = Some((h.version, payload));
            }
            Kind::Device => {
                if !vm.bus.devices().iter().any(|d| d.id == h.id) {
                    return Err(format!("message {} (device {}): unknown device id", h.index, h.id));
                }
                devices.push((h.id, h.version, payload));
            }
            Kind::End => break,
            Kind::Decision if payload == b"sync" => {
                link.synced().map_err(|e| format!("answering a sync: {e}"))?
            }
            Kind::Failed => return Err(format!("the source gave up: {}", String::from_utf8_lossy(&payload))),
            other => return Err(format!("message {}: unexpected {}", h.index, other.name())),
        }
    }
    let machine = machine.ok_or("no machine state")?;
    let vcpus: Vec<VcpuStateV2> = vcpus
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let (version, bytes) = v.ok_or_else(|| format!("no state for vCPU {i}"))?;
            state::load_vcpu(version, &bytes).map_err(|e| format!("vcpu cpu{i}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    let t = std::time::Instant::now();
    let r = apply_states(vm, &machine, &vcpus, &devices);
    crate::log::info(&format!("incoming: state loaded in {:.2} ms", t.elapsed().as_secs_f64() * 1e3));
    r
}
