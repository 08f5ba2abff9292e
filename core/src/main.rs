//! `ferry`: the command line.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use ferry::{
    boot::Kernel,
    machine::{self, DEFAULT_MACHINE},
    memory::parse_size,
    plugins::Registry,
    vm::{self, BootConfig, Outcome},
};

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

#[derive(Subcommand)]
enum CtlAction {
    /// State, machine type, devices.
    Info,
    /// Pause the guest.
    Pause,
    /// Resume the guest.
    Resume,
    /// Write a snapshot (the guest pauses while it is written).
    Snapshot {
        /// Where.
        file: PathBuf,
        /// Write it for another host (its `ferry plugins --manifest` file):
        /// older device state versions where that host needs them.
        #[arg(long, value_name = "HOST.json")]
        target: Option<PathBuf>,
    },
    /// End the VM.
    Shutdown,
    /// Move the VM live to another ferry (`ferry run --incoming URI`).
    Migrate {
        /// tcp:HOST:PORT or unix:PATH.
        uri: String,
        /// Downtime limit in milliseconds.
        #[arg(long, value_name = "MS", default_value_t = ferry::migration::converge::DEFAULT_MAX_DOWNTIME_MS)]
        max_downtime: u64,
        /// Print the destination's plan and stop; nothing is paused.
        #[arg(long)]
        dry_run: bool,
        /// Send memory at most this fast while the guest runs, per second
        /// (such as 100M); the stop-and-copy goes at full speed. A guest
        /// that dirties memory faster is throttled.
        #[arg(long, value_name = "SIZE", value_parser = bandwidth)]
        max_bandwidth: Option<u64>,
        /// tcp: with mutual TLS, using this host's TLS directory
        /// (`ferry tls init`): ca-cert.pem, client-cert.pem, client-key.pem.
        #[arg(long, value_name = "DIR", conflicts_with = "insecure_tcp")]
        tls_dir: Option<PathBuf>,
        /// The name the destination's certificate must carry (default: the
        /// host in the URI).
        #[arg(long, value_name = "NAME", requires = "tls_dir")]
        tls_name: Option<String>,
        /// tcp: without TLS: the VM travels unencrypted to a peer nobody
        /// authenticated. For trusted networks only.
        #[arg(long)]
        insecure_tcp: bool,
        /// If the guest outruns the link, move it at once and the rest of
        /// its memory after it (post-copy) instead of throttling it. Refused
        /// before anything moves if the destination cannot.
        #[arg(long)]
        postcopy: bool,
        /// Reconnect a post-copy whose connection broke, to URI (the
        /// destination listens again on its --incoming address). Answers at
        /// once; the `ferry ctl migrate` that started the migration reports
        /// its end.
        #[arg(long, conflicts_with_all = ["postcopy", "dry_run"])]
        resume: bool,
    },
    /// Give up a running migration; the guest keeps running here.
    MigrateCancel,
}

/// What a boot builds: the machine type, the kernel and the devices added
/// on the command line. A restore or an incoming migration takes all of
/// it from the snapshot or the source, so `--restore` and `--incoming`
/// exclude the whole group.
#[derive(clap::Args)]
#[group(id = "boot", multiple = true)]
struct BootArgs {
    /// Machine type: a built-in name or a path to a .toml file.
    #[arg(long, value_name = "NAME|PATH", default_value = DEFAULT_MACHINE)]
    machine: String,
    /// Kernel: an ELF with a PVH note (default: the bundled test guest).
    #[arg(long, value_name = "FILE")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk, passed as the first PVH module.
    #[arg(long, value_name = "FILE")]
    initramfs: Option<PathBuf>,
    /// Kernel command line (the test guest's default: "ready ticks=5 exit=0").
    #[arg(long, value_name = "STR")]
    cmdline: Option<String>,
    /// Number of vCPUs, 1 to 40 (default: the machine type's).
    #[arg(long, value_name = "N", value_parser = cpus_parser())]
    cpus: Option<u8>,
    /// Guest RAM, e.g. 256M or 2G (default: the machine type's).
    #[arg(long, value_name = "SIZE", value_parser = memory_size)]
    memory: Option<u64>,
    /// Add a virtio-rng entropy device.
    #[arg(long)]
    rng: bool,
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    boot: BootArgs,
    /// Booting: add a virtio-blk disk, path=FILE[,readonly=on][,serial=ID].
    /// With --restore or --incoming: bind an existing disk to this host's
    /// image, id=DEVICE,path=FILE. Repeatable.
    #[arg(long, value_name = "path=FILE[,readonly=on]|id=DEVICE,path=FILE")]
    disk: Vec<String>,
    /// Booting: add a virtio-net NIC on a tap device, tap=NAME[,mac=MAC].
    /// With --restore or --incoming: bind an existing NIC to this host's
    /// tap, id=DEVICE,tap=NAME. Repeatable.
    #[arg(long, value_name = "tap=NAME[,mac=MAC]|id=DEVICE,tap=NAME")]
    net: Vec<String>,
    /// Booting: add a device a vhost-user backend serves,
    /// type=blk|fs,socket=PATH[,id=DEVICE] (plugin vhost-user-blk or
    /// vhost-user-fs). With --restore or --incoming: bind an existing one
    /// to this host's backend, id=DEVICE,socket=PATH. Repeatable.
    #[arg(long, value_name = "type=blk|fs,socket=PATH[,id=DEVICE]|id=DEVICE,socket=PATH")]
    vhost_user: Vec<String>,
    /// With --restore or --incoming: set a host binding of a device
    /// (its image, tap, console file). Repeatable.
    #[arg(long, value_name = "DEVICE:PROPERTY=VALUE")]
    bind: Vec<String>,
    /// With --restore or --incoming: take the bindings this host does not
    /// give from the snapshot (from-snapshot) or the migration source
    /// (from-source; trusted fleets only) instead of refusing.
    #[arg(long, value_enum, value_name = "WHOSE", default_value_t = BindingsArg::Host)]
    bindings: BindingsArg,
    /// Plugin directory (default: beside the ferry binary).
    #[arg(long, value_name = "DIR")]
    plugins: Option<PathBuf>,
    /// Where this host keeps guests' kernels and initramfs by their hash:
    /// a boot puts its image there, a restore or an incoming migration
    /// takes the guest's own image into it, and a reboot loads it from
    /// there (default: ~/.cache/ferry/images).
    #[arg(long, value_name = "DIR")]
    image_store: Option<PathBuf>,
    /// Restore a snapshot instead of booting (its machine type, devices,
    /// vCPUs and memory come from the file).
    #[arg(long, value_name = "FILE", conflicts_with = "boot")]
    restore: Option<PathBuf>,
    /// With --restore: check every memory page's CRC before running.
    #[arg(long, requires = "restore")]
    verify_memory: bool,
    /// What a guest reset (i8042, triple fault) does: reboot the guest in
    /// place, or end ferry with status 0. A guest restored or migrated in
    /// reboots into its own kernel, which came with it.
    #[arg(long, value_enum, value_name = "WHAT", default_value_t = OnResetArg::Reboot)]
    on_reset: OnResetArg,
    /// Serve the control API (REST/JSON) on this unix socket (mode 0600;
    /// only root and ferry's own uid may connect, and --api-allow-uid).
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Further uids that may use the API socket and a unix: migration
    /// socket.
    #[arg(long, value_name = "UID[,UID...]", value_delimiter = ',')]
    api_allow_uid: Vec<u32>,
    /// Wait for a live migration on tcp:ADDR:PORT or unix:PATH instead of
    /// booting (the machine type and devices come from the source).
    #[arg(long, value_name = "URI", conflicts_with_all = ["boot", "restore"])]
    incoming: Option<String>,
    /// Run these devices (ids from the machine type, or all) each in a
    /// sandboxed device process of its own: a device that crashes or hangs
    /// stops the guest, not ferry. A host policy: the guest, its snapshots
    /// and its migrations are the same either way.
    #[arg(long, value_name = "ID[,ID...]|all", value_parser = parse_isolate)]
    isolate: Option<ferry::isolate::Isolate>,
    /// With --incoming tcp:, accept only sources with a certificate from
    /// this TLS directory's CA (`ferry tls init`): ca-cert.pem,
    /// server-cert.pem, server-key.pem; mutual TLS 1.3.
    #[arg(long, value_name = "DIR", requires = "incoming", conflicts_with = "insecure_tcp")]
    tls_dir: Option<PathBuf>,
    /// With --tls-dir: accept only client certificates valid for one of
    /// these names.
    #[arg(long, value_name = "NAME[,NAME...]", requires = "tls_dir", value_delimiter = ',')]
    tls_allow: Vec<String>,
    /// With --incoming tcp:, accept a plaintext, unauthenticated stream:
    /// anyone who reaches the port may send this host a VM. For trusted
    /// networks only.
    #[arg(long, requires = "incoming")]
    insecure_tcp: bool,
    /// seccomp for ferry's own threads: on (a call outside the allowlists
    /// ends ferry with one line naming the thread and the call), log (the
    /// kernel logs such calls, dmesg shows them), or off.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = SeccompArg::On)]
    seccomp: SeccompArg,
    /// How long an isolated device may take to answer a register access
    /// before it counts as failed, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = ferry::isolate::DEFAULT_TIMEOUT.as_millis() as u64, requires = "isolate")]
    device_timeout: u64,
}

fn parse_isolate(s: &str) -> Result<ferry::isolate::Isolate, String> {
    ferry::isolate::Isolate::parse(s).map_err(|e| e.to_string())
}

impl RunArgs {
    /// The host bindings given for a restore or an incoming migration.
    fn host_bindings(&self) -> Result<ferry::bindings::HostBindings> {
        use ferry::bindings::{parse_bind, parse_device_option, HostBindings, Reuse};
        let mut supplied = ferry::bindings::Bindings::new();
        for spec in &self.disk {
            parse_device_option("--disk", spec, &mut supplied).map_err(|e| anyhow!(e))?;
        }
        for spec in &self.net {
            parse_device_option("--net", spec, &mut supplied).map_err(|e| anyhow!(e))?;
        }
        for spec in &self.vhost_user {
            // The device type is the guest's, fixed at boot: only the socket binds.
            let spec: Vec<&str> = spec.split(',').filter(|p| !p.starts_with("type=")).collect();
            parse_device_option("--vhost-user", &spec.join(","), &mut supplied).map_err(|e| anyhow!(e))?;
        }
        for spec in &self.bind {
            parse_bind(spec, &mut supplied).map_err(|e| anyhow!(e))?;
        }
        let reuse = match (self.bindings, self.restore.is_some(), self.incoming.is_some()) {
            (BindingsArg::Host, _, _) => Reuse::Host,
            (BindingsArg::FromSnapshot, true, _) => Reuse::FromSnapshot,
            (BindingsArg::FromSource, _, true) => Reuse::FromSource,
            (BindingsArg::FromSnapshot, _, _) => {
                return Err(anyhow!("--bindings from-snapshot is for --restore"))
            }
            (BindingsArg::FromSource, _, _) => {
                return Err(anyhow!("--bindings from-source is for --incoming"))
            }
        };
        Ok(HostBindings { supplied, reuse })
    }

    fn peers(&self) -> ferry::unix_socket::Peers {
        ferry::unix_socket::Peers { allowed: self.api_allow_uid.clone() }
    }

    fn images(&self) -> ferry::images::ImageStore {
        ferry::images::ImageStore::new(
            self.image_store.clone().unwrap_or_else(ferry::images::ImageStore::default_dir),
        )
    }

    fn isolation(&self) -> ferry::isolate::Isolation {
        ferry::isolate::Isolation {
            devices: self.isolate.clone().unwrap_or_default(),
            timeout: std::time::Duration::from_millis(self.device_timeout.max(1)),
        }
    }
}

/// `--seccomp`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SeccompArg {
    On,
    Log,
    Off,
}

/// `--bindings`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BindingsArg {
    /// Only what this host's command line gives.
    Host,
    /// The snapshot's, where this host gives none (--restore).
    FromSnapshot,
    /// The migration source's, where this host gives none (--incoming).
    FromSource,
}

/// `--on-reset`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum OnResetArg {
    Reboot,
    Exit,
}

/// `--cpus`: what the MP table can describe.
fn cpus_parser() -> clap::builder::RangedI64ValueParser<u8> {
    clap::value_parser!(u8).range(1..=i64::from(ferry::boot::mptable::MAX_CPUS))
}

/// `--memory`: a size such as 256M or 2G.
fn memory_size(s: &str) -> Result<u64, String> {
    parse_size(s).ok_or_else(|| format!("'{s}' is not a size such as 256M or 2G"))
}

/// A bandwidth: a size per second, at least 1 MiB.
fn bandwidth(s: &str) -> Result<u64, String> {
    match parse_size(s) {
        Some(n) if n >= 1 << 20 => Ok(n),
        Some(_) => Err(format!("'{s}' per second is below 1M")),
        None => Err(format!("'{s}' is not a size per second such as 100M or 1G")),
    }
}

/// The plugin directory: the one given, or the ferry binary's own.
fn plugin_dir(given: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(dir) = given {
        return Ok(dir);
    }
    let exe = std::env::current_exe().context("cannot find the ferry binary")?;
    exe.parent().map(PathBuf::from).ok_or_else(|| anyhow!("ferry binary has no directory"))
}

fn run(args: RunArgs) -> Result<ExitCode> {
    let mode = match args.seccomp {
        SeccompArg::On => ferry::seccomp::Mode::On,
        SeccompArg::Log => ferry::seccomp::Mode::Log,
        SeccompArg::Off => ferry::seccomp::Mode::Off,
    };
    ferry::seccomp::set_mode(mode);
    if mode == ferry::seccomp::Mode::On {
        ferry::seccomp::drop_backtrace_request();
        ferry::seccomp::install_sigsys_handler(ferry::seccomp::Style::Ferry).map_err(|e| anyhow!(e))?;
    }
    let plugins = plugin_dir(args.plugins.clone())?;
    // The API socket first: one another process serves is refused before
    // anything is built.
    let served = match &args.api_socket {
        Some(path) => Some(ferry::api::serve(path, args.peers()).map_err(|e| anyhow!(e))?),
        None => None,
    };
    let security = match &args.incoming {
        Some(uri) => {
            use ferry::migration::{conn::Endpoint, conn::TcpSecurity, tls::TlsSettings};
            let tls = args.tls_dir.as_ref().map(|dir| TlsSettings {
                dir: dir.clone(),
                allow: args.tls_allow.clone(),
                name: None,
            });
            TcpSecurity::choose(&Endpoint::parse(uri)?, tls, args.insecure_tcp)?
        }
        None => None,
    };
    let (vm, confirm) = match (&args.restore, &args.incoming) {
        (Some(file), _) => (
            vm::restore(
                file,
                &plugins,
                args.verify_memory,
                &args.host_bindings()?,
                &args.isolation(),
                &args.images(),
            )?,
            None,
        ),
        (None, Some(uri)) => {
            match vm::incoming(
                uri,
                security.as_ref(),
                &args.peers(),
                &args.host_bindings()?,
                &plugins,
                &args.isolation(),
                &args.images(),
            )? {
                Some((vm, link)) => (vm, Some(link)),
                None => {
                    eprintln!("ferry: dry run: the source only asked for the plan");
                    return Ok(ExitCode::SUCCESS);
                }
            }
        }
        (None, None) => {
            if !args.bind.is_empty() || args.bindings != BindingsArg::Host {
                return Err(anyhow!(
                    "--bind and --bindings are for --restore and --incoming; a boot gives --disk and --net"
                ));
            }
            (vm::boot(boot_config(&args, plugins)?)?, None)
        }
    };
    let policy = match args.on_reset {
        OnResetArg::Reboot => vm::OnReset::Reboot,
        OnResetArg::Exit => vm::OnReset::Exit,
    };
    let outcome = vm.on_reset(policy).run(served, confirm)?;
    Ok(match outcome {
        Outcome::Reset | Outcome::Shutdown => ExitCode::SUCCESS,
        Outcome::Exit(status) => ExitCode::from((status & 0xff) as u8),
        Outcome::Migrated(s) => {
            let throttled = match s.throttle_pct {
                0 => String::new(),
                t => format!(", vCPUs throttled up to {t}%"),
            };
            let postcopy = match s.mode.as_str() {
                "post-copy" => format!(
                    ", post-copy: {} page(s) after the switch-over ({} requested) in {:.1} ms",
                    s.postcopy_pages, s.postcopy_requests, s.postcopy_ms
                ),
                _ => String::new(),
            };
            eprintln!(
                "ferry: migrated: total {:.1} ms, downtime {:.1} ms, {} bytes sent, {} round(s){throttled}{postcopy}",
                s.total_ms, s.downtime_ms, s.bytes_sent, s.round
            );
            ExitCode::SUCCESS
        }
    })
}

/// `--vhost-user type=blk,socket=PATH[,id=ID]` at a boot: the plugin, the
/// remaining properties, and the device id (given, or the next free one).
fn vhost_user_device(spec: &str, machine: &machine::MachineType) -> Result<((String, String), String)> {
    let mut kind = None;
    let mut id = None;
    let mut rest = Vec::new();
    for pair in spec.split(',').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("type", v)) => kind = Some(v.trim().to_string()),
            Some(("id", v)) => id = Some(v.trim().to_string()),
            _ => rest.push(pair),
        }
    }
    let (plugin, stem) = match kind.as_deref() {
        Some("blk") => ("vhost-user-blk", "vblk"),
        Some("fs") => ("vhost-user-fs", "vfs"),
        Some(other) => {
            bail!("--vhost-user {spec}: type={other} is not a vhost-user device ferry has (blk, fs)")
        }
        None => bail!("--vhost-user {spec}: say which device the backend serves (type=blk or type=fs)"),
    };
    let id = id.unwrap_or_else(|| machine.free_id(stem));
    Ok(((plugin.to_string(), rest.join(",")), id))
}

fn boot_config(run: &RunArgs, plugins: PathBuf) -> Result<BootConfig> {
    let args = &run.boot;
    let mut machine = machine::load(&args.machine)?;
    for spec in &run.disk {
        let id = machine.free_id("disk");
        machine.add_device(machine::device_from_option("--disk", id, "virtio-blk", spec)?)?;
    }
    for spec in &run.net {
        let id = machine.free_id("net");
        machine.add_device(machine::device_from_option("--net", id, "virtio-net", spec)?)?;
    }
    for spec in &run.vhost_user {
        let (device, id) = vhost_user_device(spec, &machine)?;
        machine.add_device(machine::device_from_option("--vhost-user", id, &device.0, &device.1)?)?;
    }
    if args.rng {
        let id = machine.free_id("rng");
        machine.add_device(machine::device_from_option("--rng", id, "virtio-rng", "")?)?;
    }
    let kernel = match &args.kernel {
        Some(path) => Kernel::File(path.clone()),
        None => Kernel::TestGuest,
    };
    Ok(BootConfig {
        machine,
        kernel,
        initramfs: args.initramfs.clone(),
        cmdline: args.cmdline.clone(),
        cpus: args.cpus,
        memory: args.memory,
        plugins,
        isolation: run.isolation(),
        images: run.images(),
    })
}

fn ctl(socket: &std::path::Path, action: CtlAction) -> Result<ExitCode> {
    use ferry::api::{ApiRequest, MigrateRequest, SnapshotRequest};
    // The server resolves relative paths against its own directory.
    let absolute = |p: &PathBuf| std::path::absolute(p).with_context(|| format!("bad path {}", p.display()));
    let req = match action {
        CtlAction::Migrate {
            uri,
            max_downtime,
            dry_run,
            max_bandwidth,
            tls_dir,
            tls_name,
            insecure_tcp,
            postcopy,
            resume,
        } => {
            let tls_dir = tls_dir.as_ref().map(absolute).transpose()?;
            let req = MigrateRequest {
                uri,
                max_downtime_ms: max_downtime,
                dry_run,
                max_bandwidth,
                tls_dir,
                tls_name,
                insecure_tcp,
                postcopy,
                resume,
            };
            if resume {
                // The `ferry ctl migrate` that started it follows it to the end.
                let value = answer(ferry::api::send(socket, &ApiRequest::Migrate(req)))?;
                println!("{}", serde_json::to_string_pretty(&value).unwrap_or_default());
                return Ok(ExitCode::SUCCESS);
            }
            return migrate(socket, &ApiRequest::Migrate(req));
        }
        CtlAction::MigrateCancel => ApiRequest::MigrateCancel,
        CtlAction::Info => ApiRequest::Info,
        CtlAction::Pause => ApiRequest::Pause,
        CtlAction::Resume => ApiRequest::Resume,
        CtlAction::Shutdown => ApiRequest::Shutdown,
        CtlAction::Snapshot { file, target } => {
            let target = target.as_ref().map(|t| read_host_manifest(t).map(Box::new)).transpose()?;
            ApiRequest::Snapshot(SnapshotRequest { path: absolute(&file)?, target })
        }
    };
    let value = answer(ferry::api::send(socket, &req))?;
    println!("{}", serde_json::to_string_pretty(&value).unwrap_or_default());
    Ok(ExitCode::SUCCESS)
}

/// The JSON of a successful answer, or its error as ours.
fn answer(result: Result<(u16, serde_json::Value), ferry::api::CallError>) -> Result<serde_json::Value> {
    let (status, value) = result.map_err(|e| anyhow!(e))?;
    if !(200..300).contains(&status) {
        return Err(anyhow!("{}", value.get("error").and_then(|e| e.as_str()).unwrap_or("unknown error")));
    }
    Ok(value)
}

/// Start a migration through the API and follow it with a progress bar.
fn migrate(socket: &std::path::Path, req: &ferry::api::ApiRequest) -> Result<ExitCode> {
    answer(ferry::api::send(socket, req))?;
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    let final_status = loop {
        std::thread::sleep(std::time::Duration::from_millis(50));
        let (_, s) =
            ferry::api::send(socket, &ferry::api::ApiRequest::MigrationStatus).map_err(|e| anyhow!(e))?;
        let get = |k: &str| s.get(k).and_then(|v| v.as_f64()).unwrap_or(0.0);
        bar.set_message(format!(
            "{} round {} | {:.1} MiB sent | dirty {:.1} MiB/s | link {:.1} MiB/s | expected downtime {:.1} ms{}",
            s.get("phase").and_then(|v| v.as_str()).unwrap_or("?"),
            get("round"),
            get("bytes_sent") / 1048576.0,
            get("dirty_rate_bytes_per_s") / 1048576.0,
            get("bandwidth_bytes_per_s") / 1048576.0,
            get("expected_downtime_ms"),
            match get("throttle_pct") {
                t if t > 0.0 => format!(" | vCPUs throttled {t:.0}%"),
                _ => String::new(),
            },
        ) + &match get("postcopy_pages_left") {
            left if left > 0.0 => format!(" | post-copy: {left:.0} page(s) still here"),
            _ => String::new(),
        });
        bar.tick();
        if s.get("done").and_then(|v| v.as_bool()).unwrap_or(false) {
            break s;
        }
    };
    bar.finish_and_clear();
    for line in final_status.get("plan").and_then(|p| p.as_array()).into_iter().flatten() {
        println!("{}", line.as_str().unwrap_or(""));
    }
    if let Some(err) = final_status.get("error").and_then(|e| e.as_str()) {
        return Err(anyhow!("migration failed, the guest keeps running here: {err}"));
    }
    let transport = final_status.get("transport").and_then(|t| t.as_str()).unwrap_or("");
    if transport.starts_with("PLAINTEXT") {
        eprintln!("ferry: warning: this migration went over {transport}");
    }
    println!("{}", serde_json::to_string_pretty(&final_status).unwrap_or_default());
    Ok(ExitCode::SUCCESS)
}

fn read_host_manifest(p: &std::path::Path) -> Result<ferry::migration::plan::HostManifest> {
    let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a `ferry plugins --manifest` file", p.display()))
}

/// `ferry compat`'s guest: a snapshotted one, and its backends on the
/// destination.
struct CompatGuest {
    snapshot: Option<PathBuf>,
    backends: Vec<String>,
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

fn compat(
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

fn plugins(dir: Option<PathBuf>, manifest: bool, labels: bool) -> Result<ExitCode> {
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
fn fleet(paths: &[PathBuf], machines: &[String], json: bool) -> Result<ExitCode> {
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
fn cpu_models(hosts: &[PathBuf]) -> Result<ExitCode> {
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

fn machines() -> Result<ExitCode> {
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
