//! An incoming live migration: the handshake and plan, the VM built from
//! the source's manifest, memory and state received, then loaded.

use std::path::Path;

use super::{
    build,
    restore::{bind, contract_refusals, cpu_here, drop_unknown_properties, unbound_machine},
    RamSource, Vm, VmError, VmMemory,
};
use crate::{
    bindings::{self, HostBindings},
    cpu::HostCpu,
    images::ImageStore,
    migration::{
        conn::{MigrateError, TcpSecurity},
        destination::{self, IncomingLink},
        hostinfo::host_plugins,
        manifest::Manifest,
        plan::{self, Plan, Verdict, LIVE_ORIGIN},
        postcopy,
        vmstate::StateReader,
    },
    plugins::Registry,
};

/// Wait for a live migration on `uri` (TLS or plaintext as `security`
/// says, for tcp:), plan it against the plugins in `plugins`, receive the
/// VM, and return it ready to run with the link to confirm on. None after
/// a dry run.
pub fn incoming(
    uri: &str,
    security: Option<&TcpSecurity>,
    peers: &crate::unix_socket::Peers,
    bindings: &HostBindings,
    plugins: &Path,
    isolation: &crate::isolate::Isolation,
    images: &ImageStore,
) -> Result<Option<(Vm, IncomingLink)>, VmError> {
    // A directory that cannot be read is refused before waiting; the
    // plugins themselves are opened once the source says which it needs.
    Registry::check_dir(plugins)?;
    let host_cpu = HostCpu::probe()?;
    let mut opened = None;
    // The same computation `ferry compat` makes from this host's manifest.
    let accepted = destination::accept(uri, security, peers, images, |m| {
        let names: Vec<&str> = m.devices.iter().map(|d| d.plugin.as_str()).collect();
        let registry = Registry::open(plugins, &names)?;
        let mut plan = plan::make_plan(m, &host_plugins(&registry), Some(&host_cpu));
        refuse_unbound(&mut plan, m, &registry, bindings);
        // Bindings that cannot be made were refused just above, naming them.
        let (mut machine, carried) = unbound_machine(m, &registry);
        if bind(&mut machine, &registry, bindings, &carried).is_ok() {
            for (id, reason) in contract_refusals(m, &machine, &registry) {
                plan.refuse(&id, reason);
            }
        }
        plan.postcopy = postcopy::pull::unavailable(isolation.devices.any());
        // The boot image travels only where this host does not hold it.
        plan.images = m.boot.as_ref().map(|b| images.missing(b)).unwrap_or_default();
        opened = Some(registry);
        Ok(plan)
    })
    .map_err(VmError::Incoming)?;
    let (Some(mut incoming), Some(registry)) = (accepted, opened) else { return Ok(None) };
    let m = incoming.manifest.clone();
    let cpu = match cpu_here(&m, &m.msr_indexes(), LIVE_ORIGIN, &host_cpu) {
        Ok(cpu) => cpu,
        // The plan refused these already; a source that went on anyway
        // is told again.
        Err(problems) => {
            incoming.link.failed(&problems.join("; "));
            return Err(VmError::Incoming(MigrateError::Refused(problems)));
        }
    };
    let (mut machine, carried) = unbound_machine(&m, &registry);
    if let Err(e) = bind(&mut machine, &registry, bindings, &carried) {
        // The plan refused these already; a source that went on anyway
        // is told again.
        incoming.link.failed(&e.to_string());
        return Err(VmError::Incoming(MigrateError::Protocol(e.to_string())));
    }
    drop_unknown_properties(&mut machine, &registry);
    let ram = match incoming.memfd.take() {
        Some(file) => RamSource::Memfd(m.memory, file),
        None => RamSource::Fresh(m.memory),
    };
    let built = VmMemory::new(ram, m.cpus, isolation.devices.any())
        .and_then(|memory| build(machine, registry, m.cpus, cpu, memory, isolation));
    let mut vm = match built {
        Ok(vm) => vm,
        Err(e) => {
            incoming.link.failed(&e.to_string());
            return Err(e);
        }
    };
    let device_ids = vm.bus.devices().iter().map(|d| d.id.clone()).collect();
    let received = incoming.link.receive_vm(&vm.ram, StateReader::new(vm.cpus, device_ids));
    let t = std::time::Instant::now();
    crate::log::step("VM received");
    // After a post-copy switch-over the puller runs before any state is
    // loaded: a device that reads guest memory as it loads waits for it.
    let received = received.and_then(|state| incoming.link.postcopy(&vm.core).map(|()| state));
    let loaded = received.and_then(|state| Ok(state.load(&vm, &vm.vcpus)?));
    crate::log::info(&format!("incoming: state loaded in {:.2} ms", t.elapsed().as_secs_f64() * 1e3));
    match loaded {
        Ok(()) => {
            super::boot::adopt_image(&mut vm, m.boot.as_ref(), images);
            Ok(Some((vm, incoming.link)))
        }
        Err(e) => {
            incoming.link.failed(&e.to_string());
            Err(VmError::Incoming(e))
        }
    }
}

/// Turn every device line whose required host binding this host does not
/// supply (nor reuse) into a refusal: the source stops before it pauses,
/// told which device and which binding. Values naming a device or a
/// property the VM does not have refuse the whole plan.
fn refuse_unbound(plan: &mut Plan, m: &Manifest, registry: &Registry, host: &HostBindings) {
    let (machine, carried) = unbound_machine(m, registry);
    if let Err(e) = bindings::check_supplied(&machine, registry, host) {
        for line in &mut plan.devices {
            line.verdict = Verdict::Refused { reason: format!("this host's bindings: {e}") };
        }
        return;
    }
    for e in bindings::missing(&machine, registry, host, &carried) {
        let bindings::BindingError::Missing { device, property, sugar, .. } = e else { continue };
        if let Some(line) = plan.devices.iter_mut().find(|l| l.id == device) {
            line.verdict = Verdict::Refused {
                reason: format!(
                    "host binding {property} is not supplied on this host (--bind {device}:{property}=VALUE{sugar}, or --bindings from-source)"
                ),
            };
        }
    }
}
