//! `ferry`: the command line. This file defines the commands and hands
//! each to its module in `cli/`.

mod cli;

use std::{path::PathBuf, process::ExitCode};

use anyhow::{anyhow, Context};
use clap::{Parser, Subcommand};
use cli::{
    args::{cpus_parser, memory_size},
    ctl::{ctl, CtlAction},
    hosts::{compat, cpu_models, fleet, machines, plugins, CompatGuest},
    run::{run, RunArgs},
};
use ferry::machine::DEFAULT_MACHINE;

#[derive(Parser)]
#[command(name = "ferry", version, about = "A virtual machine monitor whose devices are plugins")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
enum Command {
    /// Boot a VM and run it until the guest ends; ferry exits with the
    /// guest's exit status (a guest reset reboots it, or, with
    /// `--on-reset exit`, ends ferry with status 0).
    Run(RunArgs),
    /// List the installed plugins.
    Plugins {
        /// Plugin directory (default: beside the ferry binary).
        #[arg(long, value_name = "DIR")]
        plugins: Option<PathBuf>,
        /// Write this host's plugin set (versions, state versions,
        /// properties) and CPU as JSON, for `ferry compat` and `ferry fleet`.
        #[arg(long, conflicts_with = "labels")]
        manifest: bool,
        /// Write this host's facts as node labels, one `ferry.dev/NAME=VALUE`
        /// per line (node-feature-discovery's local-source format): the
        /// built-in machine types it runs, plugins and state versions, CPU
        /// vendor and models, TSC.
        #[arg(long)]
        labels: bool,
    },
    /// A fleet's verdicts from its hosts' `ferry plugins --manifest` files
    /// (each host named by its file's stem): for every machine type, which
    /// hosts run it and how a guest moves between every ordered pair; the
    /// machine types and CPU models every host runs.
    Fleet {
        /// Host manifests, two or more.
        #[arg(value_name = "HOST.json", num_args = 2.., required = true)]
        hosts: Vec<PathBuf>,
        /// Machine types to judge: built-in names or paths (default: every
        /// built-in one).
        #[arg(long, value_name = "NAME|PATH")]
        machine: Vec<String>,
        /// JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Plan a migration between two hosts offline, from their
    /// `ferry plugins --manifest` files: the plan the live handshake gives.
    /// With --cpu-models, name the CPU models every one of a set of hosts
    /// can run instead.
    Compat {
        /// The source host's manifest.
        #[arg(long, value_name = "FILE", required_unless_present = "cpu_models")]
        from: Option<PathBuf>,
        /// The destination host's manifest.
        #[arg(long, value_name = "FILE", required_unless_present = "cpu_models")]
        to: Option<PathBuf>,
        /// Host manifests: which CPU models can a guest that moves among
        /// all of them be given?
        #[arg(long, value_name = "HOST.json", num_args = 1.., conflicts_with_all = ["from", "to"])]
        cpu_models: Vec<PathBuf>,
        /// Machine type of the VM: a built-in name or a path.
        #[arg(long, value_name = "NAME|PATH", default_value = DEFAULT_MACHINE)]
        machine: String,
        /// vCPUs, 1 to 40 (default: the machine type's, or 1).
        #[arg(long, value_name = "N", value_parser = cpus_parser())]
        cpus: Option<u8>,
        /// Memory (default: the machine type's, or 256M).
        #[arg(long, value_name = "SIZE", value_parser = memory_size)]
        memory: Option<u64>,
        /// Plan for this guest as it ran when snapshotted (its machine
        /// type, devices and what each device's contract says) instead of
        /// a fresh VM of --machine.
        #[arg(long, value_name = "SNAPSHOT")]
        guest: Option<PathBuf>,
        /// The destination's vhost-user backend for device ID, as
        /// `ferry vhost-user probe SOCKET --device DEVICE --json` wrote it
        /// there. Repeatable.
        #[arg(long, value_name = "ID=PROBE.json")]
        backend: Vec<String>,
    },
    /// List the built-in machine types.
    Machines,
    /// Talk to a running ferry's control API.
    Ctl {
        /// The API socket (`ferry run --api-socket`).
        #[arg(long, value_name = "PATH")]
        api_socket: PathBuf,
        #[command(subcommand)]
        action: CtlAction,
    },
    /// Show a snapshot's manifest and sections, with CRC checks.
    Inspect {
        /// The snapshot file.
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run one isolated device (started by `ferry run --isolate`, with its
    /// sockets at descriptors 3 and 4; not for use by hand).
    #[command(hide = true)]
    DeviceProcess {
        /// The device's id, for `ps` to show (its configuration comes
        /// over the socket).
        #[arg(long)]
        device: Option<String>,
    },
    /// Credentials for migration over mutual TLS.
    Tls {
        #[command(subcommand)]
        action: TlsAction,
    },
    /// vhost-user backends (qemu-storage-daemon, virtiofsd).
    VhostUser {
        #[command(subcommand)]
        action: VhostUserAction,
    },
    /// Write the bundled test guest (an ELF with a PVH note that QEMU boots
    /// too) to FILE, for side-by-side runs.
    TestGuest {
        /// Where to write it.
        #[arg(long, value_name = "FILE")]
        output: PathBuf,
    },
}

#[derive(Subcommand)]
enum VhostUserAction {
    /// What the backend on SOCKET offers: its virtio and protocol
    /// features, queue count and configuration, without taking the device.
    Probe {
        /// The backend's unix socket.
        socket: PathBuf,
        /// The device it serves (names its feature bits and reads its
        /// configuration): blk or fs.
        #[arg(long, value_name = "blk|fs", value_parser = parse_vhost_device)]
        device: Option<ferry_vhost_user::Device>,
        /// The identity as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn parse_vhost_device(s: &str) -> Result<ferry_vhost_user::Device, String> {
    ferry_vhost_user::Device::parse(s)
        .ok_or_else(|| format!("'{s}' is not a vhost-user device ferry names: blk or fs"))
}

#[derive(Subcommand)]
enum TlsAction {
    /// Write a CA and, per host, a TLS directory (DIR/NAME: the CA
    /// certificate, server and client certificates for NAME, and their
    /// keys) for `--tls-dir`. The CA's key stays in DIR/ca-key.pem.
    Init {
        /// A new directory.
        dir: PathBuf,
        /// A host's name, as sources dial it (DNS name or IP address).
        /// Repeatable.
        #[arg(long = "host", value_name = "NAME", required = true)]
        hosts: Vec<String>,
    },
}

fn main() -> ExitCode {
    ferry::log::mark_start();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Plugins { plugins: dir, manifest, labels } => plugins(dir, manifest, labels),
        Command::Fleet { hosts, machine, json } => fleet(&hosts, &machine, json),
        Command::Compat { cpu_models: hosts, .. } if !hosts.is_empty() => cpu_models(&hosts),
        Command::Compat { from: Some(from), to: Some(to), machine, cpus, memory, guest, backend, .. } => {
            let guest = CompatGuest { snapshot: guest, backends: backend };
            compat(&from, &to, &machine, cpus, memory, &guest)
        }
        Command::Compat { .. } => Err(anyhow!("give --from and --to, or --cpu-models")),
        Command::Machines => machines(),
        Command::Ctl { api_socket, action } => ctl(&api_socket, action),
        Command::Inspect { file, json } => {
            ferry::migration::inspect::inspect(&file).map_err(|e| anyhow!(e)).map(|report| {
                if json {
                    println!("{}", serde_json::to_string_pretty(&report.to_json()).unwrap_or_default());
                } else {
                    print!("{}", report.to_text());
                }
                if report.ok() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            })
        }
        Command::DeviceProcess { .. } => Ok(ExitCode::from(ferry::isolate::process::main() as u8)),
        Command::VhostUser { action: VhostUserAction::Probe { socket, device, json } } => {
            ferry_vhost_user::probe(&socket, device).map_err(|e| anyhow!(e)).map(|id| {
                match json {
                    true => println!("{}", serde_json::to_string_pretty(&id).unwrap_or_default()),
                    false => id.lines().iter().for_each(|l| println!("{l}")),
                }
                ExitCode::SUCCESS
            })
        }
        Command::Tls { action: TlsAction::Init { dir, hosts } } => {
            ferry::migration::certs::init(&dir, &hosts).map_err(|e| anyhow!(e)).map(|made| {
                println!(
                    "CA: {} (keep {} off the hosts)",
                    dir.join("ca-cert.pem").display(),
                    dir.join("ca-key.pem").display()
                );
                for (host, d) in hosts.iter().zip(made) {
                    println!("{host}: --tls-dir {}", d.display());
                }
                ExitCode::SUCCESS
            })
        }
        Command::TestGuest { output } => std::fs::write(&output, ferry::boot::TEST_GUEST)
            .map(|()| ExitCode::SUCCESS)
            .with_context(|| format!("cannot write {}", output.display())),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry: error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each named once: a cause whose
/// text the message already carries (ferry's errors name their cause
/// themselves) is not repeated.
fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.is_empty() {
            out = text;
        } else if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}
