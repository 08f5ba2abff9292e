//! `ferry run`: boot a VM, restore one or wait for one to arrive, then
//! run it until the guest ends or leaves.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{anyhow, bail, Result};
use ferry::{
    boot::Kernel,
    machine::{self, DEFAULT_MACHINE},
    vm::{self, BootConfig, Outcome},
};

use super::args::{cpus_parser, memory_size, plugin_dir};

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
pub(crate) struct RunArgs {
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

pub(crate) fn run(args: RunArgs) -> Result<ExitCode> {
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
