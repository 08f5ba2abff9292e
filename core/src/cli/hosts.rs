//! Commands about hosts rather than a running VM: `ferry plugins`
//! (this host's plugin set, its manifest and labels), `compat` (a
//! migration's plan between two hosts' manifests, or the CPU models a
//! set of hosts share), `fleet` and `machines`.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{anyhow, Context, Result};
use ferry::{
    machine::{self, DEFAULT_MACHINE},
    plugins::Registry,
    vm,
};

use super::args::plugin_dir;

pub(crate) fn read_host_manifest(p: &std::path::Path) -> Result<ferry::migration::plan::HostManifest> {
    let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a `ferry plugins --manifest` file", p.display()))
}

/// `ferry compat`'s guest: a snapshotted one, and its backends on the
/// destination.
pub(crate) struct CompatGuest {
    pub(crate) snapshot: Option<PathBuf>,
    pub(crate) backends: Vec<String>,
}

impl CompatGuest {
    /// The snapshot's manifest, if one was given.
    fn manifest(&self) -> Result<Option<ferry::migration::manifest::Manifest>> {
        let Some(path) = &self.snapshot else { return Ok(None) };
        let report = ferry::migration::inspect::inspect(path).map_err(|e| anyhow!(e))?;
        match report.manifest {
            Some(m) => Ok(Some(m)),
            None => Err(anyhow!("{}: no readable manifest", path.display())),
        }
    }

    /// `--backend ID=PROBE.json`, read.
    fn backends(
        &self,
    ) -> Result<std::collections::BTreeMap<String, (String, ferry_vhost_user::BackendIdentity)>> {
        let mut out = std::collections::BTreeMap::new();
        for spec in &self.backends {
            let (id, file) =
                spec.split_once('=').ok_or_else(|| anyhow!("--backend {spec}: not ID=PROBE.json"))?;
            let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {file}"))?;
            let identity = serde_json::from_str(&text)
                .with_context(|| format!("{file} is not a `ferry vhost-user probe --json` answer"))?;
            out.insert(id.to_string(), (file.to_string(), identity));
        }
        Ok(out)
    }
}

pub(crate) fn compat(
    from: &std::path::Path,
    to: &std::path::Path,
    machine: &str,
    cpus: Option<u8>,
    memory: Option<u64>,
    guest: &CompatGuest,
) -> Result<ExitCode> {
    let (from_host, to_host) = (read_host_manifest(from)?, read_host_manifest(to)?);
    if to_host.cpu.is_none() {
        return Err(anyhow!(
            "{} has no CPU description (its host's KVM could not be read when it was written)",
            to.display()
        ));
    }
    let m = machine::load(machine)?;
    let memory = memory.or(m.memory).unwrap_or(vm::DEFAULT_MEMORY);
    let cpus = cpus.or(m.cpus).unwrap_or(1);
    let manifest = match guest.manifest()? {
        Some(m) => m,
        None => {
            ferry::migration::plan::vm_manifest_on(&m, &from_host, cpus, memory).map_err(|e| anyhow!(e))?
        }
    };
    let mut plan = ferry::migration::plan::make_plan(&manifest, &to_host.plugins, to_host.cpu.as_ref());
    let notes = ferry::migration::backends::check(&mut plan, &manifest, &guest.backends()?);
    for line in plan.lines().into_iter().chain(notes) {
        println!("{line}");
    }
    if plan.refused() {
        return Err(anyhow!("the destination would refuse this migration"));
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn plugins(dir: Option<PathBuf>, manifest: bool, labels: bool) -> Result<ExitCode> {
    let dir = plugin_dir(dir)?;
    let registry = Registry::load_dir(&dir)?;
    if manifest {
        let host = ferry::migration::hostinfo::host_manifest(&registry)?;
        println!("{}", serde_json::to_string_pretty(&host)?);
        return Ok(ExitCode::SUCCESS);
    }
    if labels {
        let host = ferry::migration::hostinfo::host_manifest(&registry)?;
        for line in ferry::fleet::labels::labels(&host, &machine::builtins()?) {
            println!("{line}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<[String; 5]> = registry
        .plugins()
        .iter()
        .map(|p| {
            let s = p.descriptor.state;
            let state = if s.oldest_load == s.current && s.oldest_save == s.current {
                format!("v{}", s.current)
            } else {
                format!("v{} (load v{}+, save v{}+)", s.current, s.oldest_load, s.oldest_save)
            };
            [
                p.name().to_string(),
                p.descriptor.version.to_string(),
                state,
                p.api_version.clone(),
                p.path.display().to_string(),
            ]
        })
        .collect();
    let header = ["PLUGIN", "VERSION", "STATE", "PLUGIN-API", "FILE"].map(String::from);
    // Each column as wide as its widest cell, so FILE lines up.
    let width = |c: usize| rows.iter().chain([&header]).map(|r| r[c].len()).max().unwrap_or(0);
    let (w0, w1, w2, w3) = (width(0), width(1), width(2), width(3));
    for r in std::iter::once(&header).chain(&rows) {
        println!("{:<w0$}  {:<w1$}  {:<w2$}  {:<w3$}  {}", r[0], r[1], r[2], r[3], r[4]);
    }
    Ok(ExitCode::SUCCESS)
}

/// `ferry fleet`: see the command's help.
pub(crate) fn fleet(paths: &[PathBuf], machines: &[String], json: bool) -> Result<ExitCode> {
    let mut hosts = Vec::new();
    for p in paths {
        let name = p.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
        if hosts.iter().any(|h: &ferry::fleet::Host| h.name == name) {
            return Err(anyhow!("two host manifests are named {name}: give each host its own file name"));
        }
        hosts.push(ferry::fleet::Host { name, manifest: read_host_manifest(p)? });
    }
    let machines = match machines {
        [] => machine::builtins()?,
        names => names.iter().map(|n| machine::load(n)).collect::<Result<Vec<_>, _>>()?,
    };
    let report = ferry::fleet::report(&hosts, &machines);
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.to_text());
        for line in &report.cpu_lines {
            println!("  {line}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `ferry compat --cpu-models`: for hosts that a guest must be able to
/// move among, which CPU models does every one of them run, and what
/// stops the others (one line each).
pub(crate) fn cpu_models(hosts: &[PathBuf]) -> Result<ExitCode> {
    let mut named = Vec::new();
    for p in hosts {
        let m = read_host_manifest(p)?;
        let cpu = m.cpu.ok_or_else(|| anyhow!("{} has no CPU description", p.display()))?;
        named.push((p.display().to_string(), cpu));
    }
    let report = ferry::cpu::models::common_models(&named);
    for line in &report.lines {
        println!("{line}");
    }
    if report.portable.is_empty() {
        return Err(anyhow!("no CPU model lets a guest move among all of these hosts"));
    }
    println!("give a guest that moves among these hosts: {}", report.portable.join(" or "));
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn machines() -> Result<ExitCode> {
    println!("{:<12} {:<8} {:<8} {:<14} DEVICES", "MACHINE", "CPUS", "MEMORY", "CPU");
    for m in machine::builtins()? {
        let devices: Vec<String> = m.devices.iter().map(|d| format!("{}:{}", d.id, d.plugin)).collect();
        let memory = m.memory.map(ferry::memory::human_size).unwrap_or_else(|| "-".into());
        let default = if m.name == DEFAULT_MACHINE { " (default)" } else { "" };
        println!(
            "{:<12} {:<8} {:<8} {:<14} {}\n             {}{default}",
            m.name,
            m.cpus.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
            memory.replace(' ', ""),
            m.cpu.id(),
            devices.join(", "),
            m.description
        );
    }
    Ok(ExitCode::SUCCESS)
}
