//! QEMU beside ferry, for benchmarks: the common command line and a
//! minimal QMP client.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

/// `qemu-system-x86_64` booting the test guest ELF `guest` the way the
/// benchmarks compare it with ferry: KVM, `-M pc`, `memory` of RAM, serial
/// on stdio, no network, the guest's command line `cmdline`, and the
/// debug-exit port at 0xf4. Callers add what their comparison needs.
pub fn qemu_command(guest: &Path, memory: &str, cmdline: &str) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-accel",
        "kvm",
        "-M",
        "pc",
        "-m",
        memory,
        "-nographic",
        "-no-reboot",
        "-net",
        "none",
        "-kernel",
    ])
    .arg(guest)
    .args(["-append", cmdline, "-device", "isa-debug-exit,iobase=0xf4,iosize=0x01"]);
    c
}

/// Is QEMU (Debian's `qemu-system-x86`) installed? Benchmarks print its
/// figures beside ferry's when it is.
pub fn qemu_installed() -> bool {
    Command::new("qemu-system-x86_64").arg("--version").output().is_ok_and(|o| o.status.success())
}

/// A minimal QMP client.
pub struct Qmp {
    stream: BufReader<UnixStream>,
}

impl Qmp {
    pub fn connect(path: &Path) -> Result<Self, String> {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if start.elapsed() < Duration::from_secs(30) => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => return Err(format!("QMP: {e}")),
            }
        };
        let mut q = Qmp { stream: BufReader::new(stream) };
        q.line()?; // greeting
        q.cmd(r#"{"execute":"qmp_capabilities"}"#)?;
        Ok(q)
    }

    fn line(&mut self) -> Result<String, String> {
        let mut l = String::new();
        self.stream.read_line(&mut l).map_err(|e| e.to_string())?;
        Ok(l)
    }

    /// Send a command, return its "return" line (events are skipped).
    pub fn cmd(&mut self, json: &str) -> Result<String, String> {
        self.stream.get_mut().write_all(json.as_bytes()).map_err(|e| e.to_string())?;
        self.stream.get_mut().write_all(b"\n").map_err(|e| e.to_string())?;
        loop {
            let l = self.line()?;
            if l.contains("\"return\"") || l.contains("\"error\"") || l.is_empty() {
                return Ok(l);
            }
        }
    }
}
