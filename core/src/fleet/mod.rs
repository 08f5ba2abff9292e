//! A fleet's verdicts, offline, from its hosts' manifests (`ferry plugins
//! --manifest`): for every machine type, which hosts run it, and for every
//! ordered pair of hosts whether a guest of that type moves and how; the
//! machine types and CPU models every host runs. The same plan code as
//! `ferry compat` and the live handshake. `labels.rs` writes one host's
//! facts as node labels for schedulers.

pub mod labels;

use serde::Serialize;

use crate::{
    cpu::models::common_models,
    machine::MachineType,
    migration::plan::{make_plan, vm_manifest_on, HostManifest, Plan, Verdict},
};

/// One host of the fleet: a name (the manifest file's stem) and its manifest.
pub struct Host {
    pub name: String,
    pub manifest: HostManifest,
}

/// How a guest of one machine type moves from one host to another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "kebab-case")]
pub enum Move {
    /// Every device at the same state version.
    Same,
    /// The destination upgrades at least one device; none downgrades.
    Upgrade,
    /// The source downgrades at least one device; none upgrades.
    Downgrade,
    /// Some devices upgrade, others downgrade.
    UpgradeAndDowngrade,
    /// It cannot go: the plan's refusals, each naming its device or the CPU.
    Refused { reasons: Vec<String> },
    /// The source host does not run this machine type at all.
    NotOnSource { reason: String },
}

impl Move {
    fn of(plan: &Plan) -> Move {
        let mut reasons: Vec<String> = plan.cpu.iter().map(|c| format!("cpu: {c}")).collect();
        let (mut up, mut down) = (false, false);
        for d in &plan.devices {
            match &d.verdict {
                Verdict::Same { .. } => {}
                Verdict::Upgrade { .. } => up = true,
                Verdict::Downgrade { .. } => down = true,
                Verdict::Refused { reason } => {
                    reasons.push(format!("device {} ({}): {reason}", d.id, d.plugin))
                }
            }
        }
        match (reasons.is_empty(), up, down) {
            (false, ..) => Move::Refused { reasons },
            (true, false, false) => Move::Same,
            (true, true, false) => Move::Upgrade,
            (true, false, true) => Move::Downgrade,
            (true, true, true) => Move::UpgradeAndDowngrade,
        }
    }

    /// A table cell: a word a person reads at a glance.
    pub fn cell(&self) -> &'static str {
        match self {
            Move::Same => "same",
            Move::Upgrade => "upgrade",
            Move::Downgrade => "downgrade",
            Move::UpgradeAndDowngrade => "up+down",
            Move::Refused { .. } => "REFUSED",
            Move::NotOnSource { .. } => "-",
        }
    }
}

/// One ordered pair of hosts for one machine type.
#[derive(Debug, Clone, Serialize)]
pub struct PairMove {
    pub from: String,
    pub to: String,
    #[serde(flatten)]
    pub how: Move,
}

/// One machine type across the fleet.
#[derive(Debug, Clone, Serialize)]
pub struct MachineReport {
    pub machine: String,
    /// The CPU model the machine type gives its guest.
    pub cpu: String,
    /// Hosts that run it.
    pub runs_on: Vec<String>,
    /// Hosts that do not, with why (one line each).
    pub not_on: Vec<(String, String)>,
    /// Every ordered pair of different hosts.
    pub moves: Vec<PairMove>,
}

/// The whole fleet.
#[derive(Debug, Clone, Serialize)]
pub struct FleetReport {
    pub hosts: Vec<String>,
    pub machines: Vec<MachineReport>,
    /// Machine types every host runs and whose guests move between every
    /// pair: the safe choice for new guests during a rollout.
    pub everywhere: Vec<String>,
    /// CPU models every host runs, between which a guest can move.
    pub cpu_models: Vec<String>,
    /// Why other CPU models are not on that list (one line each).
    pub cpu_lines: Vec<String>,
}

/// The fleet's verdicts for `machines` (each with its default vCPUs and
/// memory) over `hosts`.
pub fn report(hosts: &[Host], machines: &[MachineType]) -> FleetReport {
    let machines: Vec<MachineReport> = machines.iter().map(|m| machine_report(hosts, m)).collect();
    let everywhere = machines
        .iter()
        .filter(|m| m.not_on.is_empty() && m.moves.iter().all(|p| !matches!(p.how, Move::Refused { .. })))
        .map(|m| m.machine.clone())
        .collect();
    let cpus: Vec<(String, crate::cpu::host::HostCpu)> =
        hosts.iter().filter_map(|h| h.manifest.cpu.clone().map(|c| (h.name.clone(), c))).collect();
    let mut cpu_lines = Vec::new();
    if cpus.len() < hosts.len() {
        cpu_lines.push("some manifests have no CPU description: no CPU model can be vouched for".to_string());
    }
    let common = common_models(&cpus);
    cpu_lines.extend(common.lines);
    let cpu_models = if cpus.len() == hosts.len() { common.portable } else { Vec::new() };
    FleetReport {
        hosts: hosts.iter().map(|h| h.name.clone()).collect(),
        machines,
        everywhere,
        cpu_models,
        cpu_lines,
    }
}

fn machine_report(hosts: &[Host], m: &MachineType) -> MachineReport {
    let (cpus, memory) = (m.cpus.unwrap_or(1), m.memory.unwrap_or(crate::vm::DEFAULT_MEMORY));
    let manifests: Vec<_> = hosts.iter().map(|h| vm_manifest_on(m, &h.manifest, cpus, memory)).collect();
    let mut report = MachineReport {
        machine: m.name.clone(),
        cpu: m.cpu.id(),
        runs_on: vec![],
        not_on: vec![],
        moves: vec![],
    };
    for (h, made) in hosts.iter().zip(&manifests) {
        match made {
            Ok(_) => report.runs_on.push(h.name.clone()),
            Err(e) => report.not_on.push((h.name.clone(), e.to_string())),
        }
    }
    for (from, made) in hosts.iter().zip(&manifests) {
        for to in hosts.iter().filter(|to| to.name != from.name) {
            let how = match made {
                Ok(manifest) => {
                    Move::of(&make_plan(manifest, &to.manifest.plugins, to.manifest.cpu.as_ref()))
                }
                Err(e) => Move::NotOnSource { reason: e.to_string() },
            };
            report.moves.push(PairMove { from: from.name.clone(), to: to.name.clone(), how });
        }
    }
    report
}

impl FleetReport {
    /// The report for a person: per machine type, who runs it and a
    /// from/to matrix, the refusals under it; then what every host shares.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let width = self.hosts.iter().map(String::len).chain([9, "from \\ to".len()]).max().unwrap_or(9);
        for m in &self.machines {
            out += &format!("machine type {} (cpu {}): runs on {}\n", m.machine, m.cpu, list(&m.runs_on));
            for (host, why) in &m.not_on {
                out += &format!("  not on {host}: {why}\n");
            }
            out += &format!("  {:<width$}", "from \\ to");
            for h in &self.hosts {
                out += &format!("  {h:<width$}");
            }
            out += "\n";
            let mut notes = Vec::new();
            for from in &self.hosts {
                out += &format!("  {from:<width$}");
                for to in &self.hosts {
                    let cell = match m.moves.iter().find(|p| &p.from == from && &p.to == to) {
                        None => "",
                        Some(p) => {
                            if let Move::Refused { reasons } = &p.how {
                                notes.extend(reasons.iter().map(|r| format!("  {from} -> {to}: {r}")));
                            }
                            p.how.cell()
                        }
                    };
                    out += &format!("  {cell:<width$}");
                }
                out += "\n";
            }
            for n in notes {
                out += &n;
                out += "\n";
            }
            out += "\n";
        }
        out +=
            &format!("machine types every host runs, moving between any two: {}\n", list(&self.everywhere));
        out += &format!("CPU models every host runs: {}\n", list(&self.cpu_models));
        out
    }
}

fn list(names: &[String]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}
