//! `ferry`: the command line.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{anyhow, Context, Result};
use clap::{Parser, Subcommand};
use ferry::{
    boot::Kernel,
    machine::{self, DEFAULT_MACHINE},
    memory::parse_size,
    plugins::Registry,
    vm::{self, Outcome, VmConfig},
};

#[derive(Parser)]
#[command(name = "ferry", version, about = "A virtual machine monitor whose devices are plugins")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a VM and run it until the guest ends; ferry exits with the
    /// guest's exit status (0 after a guest reset).
    Run(RunArgs),
    /// List the installed plugins.
    Plugins {
        /// Plugin directory (default: beside the ferry binary).
        #[arg(long, value_name = "DIR")]
        plugins: Option<PathBuf>,
    },
    /// List the built-in machine types.
    Machines,
    /// Write the bundled test guest (an ELF with a PVH note that QEMU boots
    /// too) to FILE, for side-by-side runs.
    TestGuest {
        /// Where to write it.
        #[arg(long, value_name = "FILE")]
        output: PathBuf,
    },
}

#[derive(clap::Args)]
struct RunArgs {
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
    /// Number of vCPUs (default: the machine type's).
    #[arg(long, value_name = "N")]
    cpus: Option<u8>,
    /// Guest RAM, e.g. 256M or 2G (default: the machine type's).
    #[arg(long, value_name = "SIZE")]
    memory: Option<String>,
    /// Plugin directory (default: beside the ferry binary).
    #[arg(long, value_name = "DIR")]
    plugins: Option<PathBuf>,
    /// Add a virtio-blk disk: path=FILE[,readonly=on][,serial=ID]. Repeatable.
    #[arg(long, value_name = "path=FILE[,readonly=on]")]
    disk: Vec<String>,
    /// Add a virtio-net NIC on a tap device: tap=NAME[,mac=MAC]. Repeatable.
    #[arg(long, value_name = "tap=NAME[,mac=MAC]")]
    net: Vec<String>,
    /// Add a virtio-rng entropy device.
    #[arg(long)]
    rng: bool,
}

fn default_plugin_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the ferry binary")?;
    exe.parent().map(PathBuf::from).ok_or_else(|| anyhow!("ferry binary has no directory"))
}

fn run(args: RunArgs) -> Result<ExitCode> {
    let mut machine = machine::load(&args.machine)?;
    for spec in &args.disk {
        let id = machine.free_id("disk");
        machine.add_device(machine::device_from_option("--disk", id, "virtio-blk", spec)?)?;
    }
    for spec in &args.net {
        let id = machine.free_id("net");
        machine.add_device(machine::device_from_option("--net", id, "virtio-net", spec)?)?;
    }
    if args.rng {
        let id = machine.free_id("rng");
        machine.add_device(machine::device_from_option("--rng", id, "virtio-rng", "")?)?;
    }
    let memory = match &args.memory {
        Some(s) => {
            Some(parse_size(s).ok_or_else(|| anyhow!("--memory '{s}' is not a size such as 256M or 2G"))?)
        }
        None => None,
    };
    let kernel = match args.kernel {
        Some(path) => Kernel::File(path),
        None => Kernel::TestGuest,
    };
    let plugins = match args.plugins {
        Some(dir) => dir,
        None => default_plugin_dir()?,
    };
    let config = VmConfig {
        machine,
        kernel,
        initramfs: args.initramfs,
        cmdline: args.cmdline,
        cpus: args.cpus,
        memory,
        plugins,
    };
    let outcome = vm::run(config)?;
    Ok(match outcome {
        Outcome::Reset => ExitCode::SUCCESS,
        Outcome::Exit(status) => ExitCode::from((status & 0xff) as u8),
    })
}

fn plugins(dir: Option<PathBuf>) -> Result<ExitCode> {
    let dir = match dir {
        Some(d) => d,
        None => default_plugin_dir()?,
    };
    let registry = Registry::load_dir(&dir)?;
    println!("{:<16} {:<10} {:<14} FILE", "PLUGIN", "VERSION", "STATE");
    for p in registry.plugins() {
        let s = p.descriptor.state;
        let state = if s.oldest_load == s.current && s.oldest_save == s.current {
            format!("v{}", s.current)
        } else {
            format!("v{} (load v{}+, save v{}+)", s.current, s.oldest_load, s.oldest_save)
        };
        println!("{:<16} {:<10} {:<14} {}", p.name(), p.descriptor.version, state, p.path.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn machines() -> Result<ExitCode> {
    println!("{:<12} {:<8} {:<8} DEVICES", "MACHINE", "CPUS", "MEMORY");
    for m in machine::builtins()? {
        let devices: Vec<String> = m.devices.iter().map(|d| format!("{}:{}", d.id, d.plugin)).collect();
        let memory = m.memory.map(ferry::memory::human_size).unwrap_or_else(|| "-".into());
        let default = if m.name == DEFAULT_MACHINE { " (default)" } else { "" };
        println!(
            "{:<12} {:<8} {:<8} {}\n             {}{default}",
            m.name,
            m.cpus.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
            memory.replace(' ', ""),
            devices.join(", "),
            m.description
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Plugins { plugins: dir } => plugins(dir),
        Command::Machines => machines(),
        Command::TestGuest { output } => std::fs::write(&output, ferry::boot::TEST_GUEST)
            .map(|()| ExitCode::SUCCESS)
            .with_context(|| format!("cannot write {}", output.display())),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
