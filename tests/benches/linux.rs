//! Linux start to its init marker, ferry beside QEMU, one run: the test
//! kernel of `tests/linux/` (PVH vmlinux and bzImage), the same initramfs
//! and command line, one vCPU, 256 MiB.
//!
//! ```sh
//! tests/linux/build.sh && cargo build --release --workspace && cargo bench -p ferry-tests --bench linux
//! ```
//!
//! Ferry boots the vmlinux through its PVH note and the bzImage through the
//! Linux boot protocol; QEMU 7.2 (`-M pc -accel kvm`, SeaBIOS first) boots
//! the same two files with `-kernel`. Time from spawning the VMM until the
//! init script prints `FERRY-LINUX READY`.

use std::{
    io::Read,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use ferry_tests::{bin_dir, repo_root};

const MARKER: &[u8] = b"FERRY-LINUX READY";
const LIMIT: Duration = Duration::from_secs(900);

fn seconds_to_marker(mut cmd: Command) -> Result<f64, String> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut out = child.stdout.take().ok_or("no stdout")?;
    let reader = std::thread::spawn(move || {
        let (mut seen, mut buf) = (Vec::new(), [0u8; 4096]);
        loop {
            match out.read(&mut buf) {
                Ok(0) | Err(_) => return None,
                Ok(n) => {
                    seen.extend_from_slice(&buf[..n]);
                    if seen.windows(MARKER.len()).any(|w| w == MARKER) {
                        return Some(Instant::now());
                    }
                }
            }
        }
    });
    while !reader.is_finished() && start.elapsed() < LIMIT {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    match reader.join().ok().flatten() {
        Some(at) => Ok(at.duration_since(start).as_secs_f64()),
        None => Err(format!("no init marker within {} s", LIMIT.as_secs())),
    }
}

fn main() {
    let dir = repo_root().join("target").join("linux");
    let file = |n: &str| -> PathBuf { dir.join(n) };
    if !file("vmlinux").is_file() {
        eprintln!("no Linux test kernel in {}: run tests/linux/build.sh first", dir.display());
        std::process::exit(1);
    }
    let manifest = Command::new(bin_dir().join("ferry")).args(["plugins", "--manifest"]).output();
    let tsc = manifest
        .ok()
        .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
        .and_then(|v| v["cpu"]["tsc_khz"].as_u64())
        .unwrap_or(0);
    let cmdline = format!(
        "console=ttyS0 panic=-1 noxsave nofsgsbase clearcpuid=smap,smep,popcnt,erms,fsrm,rep_good \
         tsc_early_khz={tsc} tsc=reliable"
    );
    let initramfs = file("initramfs.cpio");
    println!("Linux 6.1 test kernel to its init marker, one vCPU, 256 MiB, one run each\n");
    println!("| VMM   | kernel  | seconds |");
    println!("|-------|---------|--------:|");
    for kernel in ["vmlinux", "bzImage"] {
        let mut ferry = Command::new(bin_dir().join("ferry"));
        ferry
            .args(["run", "--memory", "256M", "--kernel"])
            .arg(file(kernel))
            .arg("--initramfs")
            .arg(&initramfs)
            .args(["--cmdline", &cmdline]);
        let mut qemu = Command::new("qemu-system-x86_64");
        qemu.args(["-accel", "kvm", "-M", "pc", "-m", "256", "-nographic", "-no-reboot", "-net", "none"])
            .arg("-kernel")
            .arg(file(kernel))
            .arg("-initrd")
            .arg(&initramfs)
            .args(["-append", &cmdline]);
        for (vmm, cmd) in [("ferry", ferry), ("qemu", qemu)] {
            match seconds_to_marker(cmd) {
                Ok(s) => println!("| {vmm:<5} | {kernel:<7} | {s:>7.1} |"),
                Err(e) => println!("| {vmm:<5} | {kernel:<7} | {e} |"),
            }
        }
    }
}
