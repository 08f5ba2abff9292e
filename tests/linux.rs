//! Linux guests, with Linux's own drivers as the clients of ferry's
//! devices: the test kernel of `tests/linux/` (Debian's linux-source-6.1,
//! the project's config fragment and four patches for the instruction
//! emulator; `.ci/run` builds or reuses it), booted PVH, one ferry process
//! per VM, a shell on the serial console that each test types into.
//!
//! - disk, network and entropy: the guest reads what the host wrote to its
//!   disk and writes what the host reads back; ARP frames from Linux's
//!   virtio-net reach a tap, frames sent on the tap reach Linux; /dev/hwrng
//!   gives bytes that vary;
//! - snapshot and restore, and live migration, while the guest writes its
//!   disk and sends frames, with checksums the guest computes before and
//!   after;
//! - the release matrix with Linux's drivers (serial-16550 and virtio-blk
//!   between their releases both ways under pc-1, and the refusal before
//!   the pause once Linux negotiated the newer virtio-blk feature);
//! - two vCPUs (the SMP build of the same recipe) and the bzImage path;
//! - virtio-fs served by virtiofsd: Linux mounts the share, reads and
//!   writes, and keeps its open files across a live move to another
//!   virtiofsd.
//!
//! Without the kernel (`tests/linux/build.sh` not run) the tests say
//! SKIPPED with the command that builds it.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::Duration,
};

use ferry_tests::{
    ctl, ferry, ferry_bin, free_port, kvm_or_skip, migrate, netns, plugin_dir_copy, repo_root, skip,
    spawn_ferry, vhost::Virtiofsd, wait_for_path, Running, TempDir,
};

/// A Linux boot takes about a minute here; restores and moves seconds.
const BOOT: Duration = Duration::from_secs(600);
const STEP: Duration = Duration::from_secs(120);
/// Above this the test guest's calibration loop is too slow for a boot to
/// fit in [`BOOT`] (here: about 2 µs, and Linux boots in about a minute).
const MAX_LOOP_NS: f64 = 20_000.0;

/// The built test kernel.
struct Kernel {
    dir: PathBuf,
}

impl Kernel {
    fn file(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

/// The kernel, or why the test cannot run (said loudly).
fn kernel(test: &str) -> Option<&'static Kernel> {
    if !kvm_or_skip(test) {
        return None;
    }
    static KERNEL: OnceLock<Option<Kernel>> = OnceLock::new();
    static CALIBRATION: OnceLock<Option<f64>> = OnceLock::new();
    let loop_ns = *CALIBRATION.get_or_init(|| {
        let run = ferry(&["run", "--cmdline", "calibrate exit=0"], Duration::from_secs(60));
        let line = run.stdout.lines().find(|l| l.starts_with("CALIBRATE"))?.to_string();
        line.split_whitespace().find_map(|w| w.strip_prefix("loop_ns=")).and_then(|v| v.parse().ok())
    });
    match loop_ns {
        Some(ns) if ns > MAX_LOOP_NS => {
            skip(
                test,
                &format!(
                    "this KVM runs {ns:.0} ns per guest loop iteration: a Linux boot would not fit in {} s",
                    BOOT.as_secs()
                ),
            );
            return None;
        }
        None => panic!("the test guest did not report a calibration"),
        Some(_) => {}
    }
    let k = KERNEL.get_or_init(|| {
        let dir = std::env::var_os("FERRY_LINUX_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("target").join("linux"));
        ["vmlinux", "vmlinux-smp", "bzImage", "initramfs.cpio"]
            .iter()
            .all(|f| dir.join(f).is_file())
            .then_some(Kernel { dir })
    });
    let Some(k) = k.as_ref() else {
        skip(test, "no Linux test kernel in target/linux: build it with tests/linux/build.sh (.ci/run does)");
        return None;
    };
    static USER_SPACE: OnceLock<Result<(), String>> = OnceLock::new();
    if let Err(why) = USER_SPACE.get_or_init(|| probe_user_space(k)) {
        skip(test, why);
        return None;
    }
    Some(k)
}

/// Pipelines in the user-space probe.
const PROBE_RUNS: u32 = 20;

/// Whether Linux processes run reliably side by side on this KVM. On some
/// hosts of this kind they do not (measured on an AMD EPYC host: `busybox
/// dd ... | head -c 40` crashed in 5 of 20 and 15 of 40 runs, with general
/// protection faults and NULL reads in busybox; `head` alone 0 of 40). The
/// pipelines touch no ferry device (/dev/zero, a pipe, /dev/null), so on
/// such a host the Linux tests' results would be noise: they say SKIPPED
/// with the measured count.
fn probe_user_space(k: &Kernel) -> Result<(), String> {
    let args = linux_args(k, "vmlinux", &[]);
    let (mut linux, _) = Linux::boot(Running::new(spawn_ferry(&run_args(&args))));
    let out = linux.ok(&format!(
        "n=0; i=0; while [ $i -lt {PROBE_RUNS} ]; do busybox dd if=/dev/zero bs=512 count=1 2>/dev/null \
         | head -c 40 >/dev/null || n=$((n+1)); i=$((i+1)); done; echo CRASHED $n"
    ));
    let crashed: u32 = out
        .iter()
        .find_map(|l| l.strip_prefix("CRASHED ").and_then(|n| n.trim().parse().ok()))
        .ok_or_else(|| format!("the user-space probe printed no count: {out:?}"))?;
    eprintln!("linux: user-space probe: {crashed} of {PROBE_RUNS} `dd | head` pipelines crashed");
    if crashed == 0 {
        Ok(())
    } else {
        Err(format!(
            "this KVM does not run Linux processes side by side reliably: {crashed} of {PROBE_RUNS} \
             `dd | head` pipelines crashed in a probe guest (see docs/linux.md)"
        ))
    }
}

/// This host's TSC frequency (the kernel cannot calibrate it under
/// emulation).
fn tsc_khz() -> u32 {
    static KHZ: OnceLock<u32> = OnceLock::new();
    *KHZ.get_or_init(|| {
        let out = Command::new(ferry_bin()).args(["plugins", "--manifest"]).output().expect("ferry plugins");
        let m: ferry::migration::plan::HostManifest = serde_json::from_slice(&out.stdout).expect("manifest");
        m.cpu.and_then(|c| c.tsc_khz).expect("this host's TSC frequency")
    })
}

/// The kernel command line for these KVMs (docs/testing.md says why each
/// option is there).
fn cmdline() -> String {
    format!(
        "console=ttyS0 panic=-1 noxsave nofsgsbase clearcpuid=smap,smep,popcnt,erms,fsrm,rep_good \
         tsc_early_khz={} tsc=reliable",
        tsc_khz()
    )
}

/// A Linux guest at its shell on ferry's console.
struct Linux {
    vm: Running,
}

impl Linux {
    /// Wrap a started ferry and wait for the init marker; returns it too.
    fn boot(vm: Running) -> (Linux, String) {
        let mut linux = Linux { vm };
        let marker = linux.wait("FERRY-LINUX READY", BOOT);
        // No echo of what the test types: a line echoed by the terminal
        // can interleave with the shell's prompt. (The setting travels with
        // the guest through snapshots and moves.)
        linux.sh("busybox stty -echo");
        (linux, marker)
    }

    /// A guest restored or migrated in, already at its shell.
    fn resumed(vm: Running) -> Linux {
        Linux { vm }
    }

    fn wait(&mut self, prefix: &str, timeout: Duration) -> String {
        let start = std::time::Instant::now();
        loop {
            let left = timeout.checked_sub(start.elapsed()).unwrap_or_default();
            match self.vm.next_line(left) {
                Some(l) if l.starts_with(prefix) => return l,
                Some(_) => {}
                None => panic!("no `{prefix}` from the guest; it printed:\n{}", self.vm.seen()),
            }
        }
    }

    /// Type `cmd` into the guest's shell; its output lines and exit status.
    fn sh(&mut self, cmd: &str) -> (Vec<String>, i32) {
        self.sh_within(cmd, STEP)
    }

    /// [`Linux::sh`] for a command that may take up to `limit`.
    fn sh_within(&mut self, cmd: &str, limit: Duration) -> (Vec<String>, i32) {
        // A background job (`... &`) is already separated from the marker.
        let sep = if cmd.trim_end().ends_with('&') { " " } else { "; " };
        let line = format!("{cmd}{sep}echo ==DONE\"\"== $?\n");
        std::io::Write::write_all(self.vm.stdin().expect("stdin"), line.as_bytes()).expect("type");
        let mut out = Vec::new();
        let start = std::time::Instant::now();
        loop {
            let left = limit.checked_sub(start.elapsed()).unwrap_or_default();
            let Some(l) = self.vm.next_line(left) else {
                panic!(
                    "`{cmd}` did not finish in {} s; the guest printed:\n{}",
                    limit.as_secs(),
                    self.vm.seen()
                )
            };
            if let Some(code) = l.strip_prefix("# ").unwrap_or(&l).strip_prefix("==DONE== ") {
                return (out, code.trim().parse().unwrap_or(-1));
            }
            if !l.contains("==DONE\"\"==") {
                // The shell's prompt may come before the first line of output.
                out.push(l.strip_prefix("# ").unwrap_or(&l).to_string());
            }
        }
    }

    /// `cmd`, which must succeed; its output.
    fn ok(&mut self, cmd: &str) -> Vec<String> {
        let (out, code) = self.sh(cmd);
        assert_eq!(code, 0, "`{cmd}` failed:\n{}", out.join("\n"));
        out
    }
}

/// `ferry run ...` with the test kernel.
fn linux_args<'a>(k: &'a Kernel, vmlinux: &'a str, extra: &[&'a str]) -> Vec<String> {
    let mut args =
        vec!["--kernel".to_string(), k.file(vmlinux), "--initramfs".into(), k.file("initramfs.cpio")];
    args.extend(["--cmdline".to_string(), cmdline()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn run_args(args: &[String]) -> Vec<&str> {
    std::iter::once("run").chain(args.iter().map(String::as_str)).collect()
}

/// A disk image of 8 MiB with `marker` at sector 100.
fn disk(dir: &TempDir, marker: &str) -> PathBuf {
    let path = dir.path().join("disk.img");
    let mut bytes = vec![0u8; 8 << 20];
    bytes[100 * 512..100 * 512 + marker.len()].copy_from_slice(marker.as_bytes());
    std::fs::write(&path, bytes).expect("disk image");
    path
}

/// What the guest's background writer puts in block `i` (4 KiB blocks
/// from 1024): `BLOCK <i>` and a newline, zero-padded.
fn block(i: usize) -> Vec<u8> {
    let mut b = format!("BLOCK {i}\n").into_bytes();
    b.resize(4096, 0);
    b
}

/// Blocks the guest's background writer writes.
const BLOCKS: usize = 60;

/// A shell job writing blocks 0..BLOCKS, one `dd` with fsync each, in the
/// background.
fn writer() -> String {
    format!(
        "i=0; while [ $i -lt {BLOCKS} ]; do echo BLOCK $i | busybox dd of=/dev/vda bs=4096 seek=$((1024+i)) \
         conv=sync,notrunc,fsync 2>/dev/null; i=$((i+1)); done &"
    )
}

fn host_sha256(bytes: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sha256sum");
    std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), bytes).expect("write");
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("sha256sum");
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or("").to_string()
}

/// The guest's disk writes during a move all landed, in the file the host
/// holds, and the guest's own checksum of them says the same.
fn check_blocks(linux: &mut Linux, disk: &Path) {
    // The writer forks two processes per block; with another Linux guest
    // beside it on two cores that can take minutes here.
    let start = std::time::Instant::now();
    let (out, code) = linux.sh_within("wait", BOOT);
    assert_eq!(code, 0, "the writer: {out:?}");
    eprintln!("the guest's writer finished {:.1} s after the move", start.elapsed().as_secs_f64());
    let guest_sum = linux
        .ok(&format!("busybox dd if=/dev/vda bs=4096 skip=1024 count={BLOCKS} 2>/dev/null | sha256sum"))
        .join(" ");
    let expected: Vec<u8> = (0..BLOCKS).flat_map(block).collect();
    let file = std::fs::read(disk).expect("disk image");
    assert!(
        file[1024 * 4096..(1024 + BLOCKS) * 4096] == expected[..],
        "every block the guest wrote is in the file"
    );
    assert!(
        guest_sum.starts_with(&host_sha256(&expected)),
        "the guest reads back what it wrote: {guest_sum}"
    );
}

#[test]
fn linux_drives_ferrys_disk_network_and_rng_and_survives_a_snapshot() {
    const TEST: &str = "linux_drives_ferrys_disk_network_and_rng_and_survives_a_snapshot";
    let Some(k) = kernel(TEST) else { return };
    let Some(ns) = netns::NetNs::with_tap("ftapl0") else { return };
    let dir = TempDir::new("linux-io");
    let marker = format!("HOST-MARKER-{}", std::process::id());
    let disk = disk(&dir, &marker);
    let socket = dir.path().join("api.sock");
    let (d, s) = (format!("path={}", disk.display()), socket.display().to_string());
    let args = linux_args(
        k,
        "vmlinux",
        &["--api-socket", &s, "--disk", &d, "--net", "tap=ftapl0,mac=52:54:00:aa:00:01", "--rng"],
    );
    let (mut linux, ready) =
        Linux::boot(Running::new(ns.spawn_ferry(&[], &args.iter().map(String::as_str).collect::<Vec<_>>())));
    assert!(ready.contains("cpus=1"), "{ready}");

    // Disk: what the host wrote, and what the guest writes.
    let read = linux.ok("busybox dd if=/dev/vda bs=512 skip=100 count=1 2>/dev/null | head -c 40; echo");
    assert!(read.iter().any(|l| l.starts_with(&marker)), "the guest reads the host's marker: {read:?}");
    linux.ok(
        "echo GUEST-WROTE-THIS | busybox dd of=/dev/vda bs=512 seek=200 conv=sync,notrunc,fsync 2>/dev/null",
    );
    let file = std::fs::read(&disk).expect("disk");
    assert!(file[200 * 512..].starts_with(b"GUEST-WROTE-THIS\n"), "the host reads what the guest wrote");

    // Network: Linux's ARP requests reach the tap; frames sent on the tap
    // are counted by Linux.
    let arp = ns.capture_ethertype("ftapl0", 0x0806, 2, Duration::from_secs(60));
    linux.ok("ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0");
    linux.sh("arping -c 2 -w 10 -I eth0 10.0.2.2 >/dev/null");
    let frames = arp.join().expect("capture");
    assert!(frames.len() >= 2, "ARP frames from the guest on the tap: {}", frames.len());
    assert!(frames.iter().all(|f| f[6..12] == [0x52, 0x54, 0, 0xaa, 0, 1]), "sent by the guest's NIC");
    let rx = |linux: &mut Linux| -> u64 {
        linux
            .ok("cat /sys/class/net/eth0/statistics/rx_packets")
            .iter()
            .find_map(|l| l.trim().parse().ok())
            .expect("a count")
    };
    let before = rx(&mut linux);
    let inject = ns.injector("ftapl0");
    for i in 0..5 {
        inject(format!("HOST-FRAME {i}").as_bytes());
    }
    std::thread::sleep(Duration::from_secs(2));
    let after = rx(&mut linux);
    assert!(after >= before + 5, "Linux counted the host's frames: {before} -> {after}");

    // Entropy: bytes that vary.
    let a = linux.ok("busybox od -An -tx1 -N16 /dev/hwrng").join(" ");
    let b = linux.ok("busybox od -An -tx1 -N16 /dev/hwrng").join(" ");
    assert_ne!(a, b, "two reads of /dev/hwrng differ");
    let bytes: Vec<&str> = a.split_whitespace().collect();
    assert_eq!(bytes.len(), 16, "{a}");
    assert!(bytes.iter().any(|x| *x != bytes[0]), "not one byte repeated: {a}");

    // A snapshot while the guest writes its disk and sends frames.
    linux.ok("echo remembered-before > /tmp/mem && sha256sum /tmp/mem > /tmp/mem.sum");
    linux.ok(&writer());
    linux.ok("(arping -c 30 -I eth0 10.0.2.2 >/dev/null 2>&1 &)");
    std::thread::sleep(Duration::from_millis(500));
    let snap = dir.path().join("linux.snap").display().to_string();
    ctl(&socket, &["pause"]);
    ctl(&socket, &["snapshot", &snap]);
    ctl(&socket, &["shutdown"]);
    drop(linux);
    let arp = ns.capture_ethertype("ftapl0", 0x0806, 1, Duration::from_secs(60));
    let mut restored = Linux::resumed(Running::new(ns.spawn_ferry(&[], &["--restore", &snap])));
    check_blocks(&mut restored, &disk);
    restored.ok("sha256sum -c /tmp/mem.sum");
    assert!(!arp.join().expect("capture").is_empty(), "the restored guest's frames reach the tap");
}

#[test]
fn linux_migrates_live_while_it_writes_its_disk_and_sends_frames() {
    const TEST: &str = "linux_migrates_live_while_it_writes_its_disk_and_sends_frames";
    let Some(k) = kernel(TEST) else { return };
    let Some(hosts) = netns::TwoHosts::new("ftapl1") else { return };
    let dir = TempDir::new("linux-mig");
    let disk = disk(&dir, "shared storage");
    let uri = "tcp:10.200.0.2:7793";
    let dst = Running::new(hosts.b.spawn_ferry(&[], &["--incoming", uri]));
    std::thread::sleep(Duration::from_millis(300));
    let socket = dir.path().join("src.sock");
    let (d, s) = (format!("path={}", disk.display()), socket.display().to_string());
    let args = linux_args(
        k,
        "vmlinux",
        &["--api-socket", &s, "--disk", &d, "--net", "tap=ftapl1,mac=52:54:00:aa:00:02"],
    );
    let (mut linux, _) = Linux::boot(Running::new(
        hosts.a.spawn_ferry(&[], &args.iter().map(String::as_str).collect::<Vec<_>>()),
    ));
    linux.ok("ip link set eth0 up && ip addr add 10.0.2.16/24 dev eth0");
    linux.ok("echo remembered-before > /tmp/mem && sha256sum /tmp/mem > /tmp/mem.sum");
    linux.ok(&writer());
    linux.ok("(arping -c 60 -I eth0 10.0.2.2 >/dev/null 2>&1 &)");
    let on_b = hosts.b.capture_ethertype("ftapl1", 0x0806, 2, Duration::from_secs(90));
    std::thread::sleep(Duration::from_millis(500));
    let (ok, text) = migrate(&socket, uri, &[]);
    assert!(ok, "{text}");
    let src = linux.vm.finish(STEP);
    assert_eq!(src.code(), 0, "the source ends after the move: {}", src.stderr);
    let mut moved = Linux::resumed(dst);
    check_blocks(&mut moved, &disk);
    moved.ok("sha256sum -c /tmp/mem.sum");
    assert!(
        on_b.join().expect("capture").len() >= 2,
        "after the move the guest's frames leave through host B"
    );
}

/// A host with this build's plugins except serial-16550 and virtio-blk,
/// which are their previous releases (0.1.0, state v1).
fn old_host() -> &'static TempDir {
    static HOST: OnceLock<TempDir> = OnceLock::new();
    HOST.get_or_init(|| {
        let dir = plugin_dir_copy("linux-old");
        for (plugin, lib) in [("serial-16550", "libserial_16550.so"), ("virtio-blk", "libvirtio_blk.so")] {
            let built = ferry_tests::workspace_plugin_release(plugin, &["previous-release"]);
            std::fs::copy(&built, dir.path().join(lib)).expect("install the previous release");
        }
        dir
    })
}

/// Boot Linux on pc-1 (the older machine type) with a disk `extra`, on the
/// plugins in `plugins`, with an API socket in `dir`.
fn pc1_guest(k: &Kernel, dir: &TempDir, plugins: &Path, disk_spec: &str) -> (Linux, PathBuf) {
    let socket = dir.path().join(format!("vm-{}.sock", free_port()));
    let (s, p) = (socket.display().to_string(), plugins.display().to_string());
    let args = linux_args(
        k,
        "vmlinux",
        &["--machine", "pc-1", "--plugins", &p, "--api-socket", &s, "--disk", disk_spec],
    );
    let (linux, _) = Linux::boot(Running::new(spawn_ferry(&run_args(&args))));
    assert!(wait_for_path(&socket, STEP));
    (linux, socket)
}

/// Move the guest behind `socket` to a new ferry on `plugins`; returns the
/// destination (with its API socket) and what `ferry ctl migrate` printed.
fn move_to(socket: &Path, plugins: &Path, dir: &TempDir) -> (Running, PathBuf, String) {
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let next = dir.path().join(format!("vm-{}.sock", free_port()));
    let (p, n) = (plugins.display().to_string(), next.display().to_string());
    let dst = Running::new(spawn_ferry(&["run", "--plugins", &p, "--incoming", &uri, "--api-socket", &n]));
    ferry_tests::wait_for_incoming(&uri);
    let (ok, text) = migrate(socket, &uri, &[]);
    assert!(ok, "{text}");
    (dst, next, text)
}

#[test]
fn linux_moves_between_device_releases_both_ways() {
    const TEST: &str = "linux_moves_between_device_releases_both_ways";
    let Some(k) = kernel(TEST) else { return };
    let dir = TempDir::new("linux-rel");
    let disk = disk(&dir, "release matrix");
    let new = ferry_tests::bin_dir();
    let old = old_host().path().to_path_buf();
    let (mut linux, socket) = pc1_guest(k, &dir, &new, &format!("path={}", disk.display()));
    linux.ok("echo on-new > /tmp/where");
    let (dst, socket, text) = move_to(&socket, &old, &dir);
    for want in [
        "device com1 (serial-16550 0.2.0 -> 0.1.0): source downgrades v2->v1",
        "device disk0 (virtio-blk 0.2.0 -> 0.1.0): source downgrades v2->v1",
    ] {
        assert!(text.contains(want), "{want}:\n{text}");
    }
    assert_eq!(linux.vm.finish(STEP).code(), 0);
    let mut linux = Linux::resumed(dst);
    linux.ok(
        "echo BACK-AND-FORTH | busybox dd of=/dev/vda bs=512 seek=300 conv=sync,notrunc,fsync 2>/dev/null",
    );
    assert!(linux.ok("cat /tmp/where").iter().any(|l| l == "on-new"), "the guest's memory came along");
    let (dst, _, text) = move_to(&socket, &new, &dir);
    for want in [
        "device com1 (serial-16550 0.1.0 -> 0.2.0): destination upgrades v1->v2",
        "device disk0 (virtio-blk 0.1.0 -> 0.2.0): destination upgrades v1->v2",
    ] {
        assert!(text.contains(want), "{want}:\n{text}");
    }
    assert_eq!(linux.vm.finish(STEP).code(), 0);
    let mut linux = Linux::resumed(dst);
    let read = linux.ok("busybox dd if=/dev/vda bs=512 skip=300 count=1 2>/dev/null | head -c 14; echo");
    assert!(read.iter().any(|l| l == "BACK-AND-FORTH"), "{read:?}");
}

#[test]
fn linux_that_negotiated_the_cache_switch_is_refused_an_older_host_before_the_pause() {
    const TEST: &str = "linux_that_negotiated_the_cache_switch_is_refused_an_older_host_before_the_pause";
    let Some(k) = kernel(TEST) else { return };
    let dir = TempDir::new("linux-wce");
    let disk = disk(&dir, "cache switch");
    let (mut linux, socket) =
        pc1_guest(k, &dir, &ferry_tests::bin_dir(), &format!("path={},config-wce=on", disk.display()));
    let mode = linux.ok("cat /sys/block/vda/queue/write_cache");
    assert!(
        mode.iter().any(|l| l == "write back" || l == "write through"),
        "Linux sees the switch: {mode:?}"
    );
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let p = old_host().path().display().to_string();
    let dst = Running::new(spawn_ferry(&["run", "--plugins", &p, "--incoming", &uri]));
    ferry_tests::wait_for_incoming(&uri);
    let (ok, text) = migrate(&socket, &uri, &[]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("device disk0 (virtio-blk 0.2.0 -> 0.1.0): REFUSED: the source cannot downgrade state v2->v1 now: \
                       guest negotiated VIRTIO_BLK_F_CONFIG_WCE; v1 cannot express it"),
        "{text}"
    );
    assert!(linux.ok("echo still here").iter().any(|l| l == "still here"), "the guest keeps running");
    drop(dst);
}

#[test]
fn linux_boots_with_two_vcpus() {
    const TEST: &str = "linux_boots_with_two_vcpus";
    let Some(k) = kernel(TEST) else { return };
    let args = linux_args(k, "vmlinux-smp", &["--cpus", "2"]);
    let (mut linux, ready) = Linux::boot(Running::new(spawn_ferry(&run_args(&args))));
    assert!(ready.contains("cpus=2"), "{ready}");
    let online = linux.ok("cat /sys/devices/system/cpu/online");
    assert!(online.iter().any(|l| l == "0-1"), "both CPUs online: {online:?}");
}

#[test]
fn linux_boots_from_its_bzimage() {
    const TEST: &str = "linux_boots_from_its_bzimage";
    let Some(k) = kernel(TEST) else { return };
    let args = linux_args(k, "bzImage", &[]);
    let (mut linux, ready) = Linux::boot(Running::new(spawn_ferry(&run_args(&args))));
    assert!(ready.starts_with("FERRY-LINUX READY 6.1"), "{ready}");
    assert!(linux
        .ok("echo through the Linux boot protocol")
        .iter()
        .any(|l| l == "through the Linux boot protocol"));
}

#[test]
fn linux_moved_live_twice_and_restored_reboots_into_its_own_kernel() {
    const TEST: &str = "linux_moved_live_twice_and_restored_reboots_into_its_own_kernel";
    let Some(k) = kernel(TEST) else { return };
    let dir = TempDir::new("linux-reboot");
    let store = |host: &str| dir.path().join(format!("store-{host}")).display().to_string();
    let (a, b, c) = (store("a"), store("b"), store("c"));
    let socket = dir.path().join("a.sock");
    let s = socket.display().to_string();
    // The bzImage path, so the image differs from the PVH tests' kernel.
    let args = linux_args(k, "bzImage", &["--api-socket", &s, "--image-store", &a]);
    let (mut linux, _) = Linux::boot(Running::new(spawn_ferry(&run_args(&args))));
    assert!(wait_for_path(&socket, STEP));
    linux.ok("echo remembered-before > /tmp/mem && sha256sum /tmp/mem > /tmp/mem.sum");

    // Two moves: to a host whose store lacks the image (and runs every
    // device isolated), then to one that holds it (in-process).
    let hop = |from: &Path, store: &str, name: &str, isolate: &[&str]| -> (Running, PathBuf, String) {
        let uri = format!("tcp:127.0.0.1:{}", free_port());
        let next = dir.path().join(format!("{name}.sock"));
        let n = next.display().to_string();
        let mut args = vec!["run", "--incoming", &uri, "--api-socket", &n, "--image-store", store];
        args.extend_from_slice(isolate);
        let dst = Running::new(spawn_ferry(&args));
        ferry_tests::wait_for_incoming(&uri);
        let (ok, text) = migrate(from, &uri, &[]);
        assert!(ok, "{text}");
        (dst, next, text)
    };
    let (on_b, socket_b, first) = hop(&socket, &b, "b", &["--isolate", "all"]);
    assert_eq!(linux.vm.finish(STEP).code(), 0);
    let (on_a, socket_a, second) = hop(&socket_b, &a, "a2", &[]);
    assert_eq!(Linux::resumed(on_b).vm.finish(STEP).code(), 0);
    let bytes = |report: &str| -> u64 {
        ferry_tests::report_num(report, "boot_image_bytes")
            .unwrap_or_else(|| panic!("no boot_image_bytes: {report}")) as u64
    };
    let image = std::fs::metadata(k.file("bzImage")).expect("bzImage").len()
        + std::fs::metadata(k.file("initramfs.cpio")).expect("initramfs").len();
    assert!(bytes(&first) >= image, "the first move carries kernel and initramfs ({image} bytes): {first}");
    assert_eq!(bytes(&second), 0, "the second carries none: {second}");

    // A snapshot, restored on a third host with every device isolated,
    // where the guest reboots.
    let snap = dir.path().join("linux.snap").display().to_string();
    ctl(&socket_a, &["snapshot", &snap]);
    ctl(&socket_a, &["shutdown"]);
    drop(on_a);
    let mut restored = Linux::resumed(Running::new(spawn_ferry(&[
        "run",
        "--restore",
        &snap,
        "--image-store",
        &c,
        "--isolate",
        "all",
    ])));
    restored.ok("sha256sum -c /tmp/mem.sum");
    // The shell never answers this one: the machine resets.
    std::io::Write::write_all(restored.vm.stdin().expect("stdin"), b"busybox reboot -f\n").expect("type");
    let ready = restored.wait("FERRY-LINUX READY", BOOT);
    assert!(ready.starts_with("FERRY-LINUX READY 6.1"), "its own kernel came up again: {ready}");
    restored.ok("busybox stty -echo");
    let (out, _) = restored.sh("cat /tmp/mem 2>&1");
    assert!(!out.iter().any(|l| l == "remembered-before"), "a fresh boot, not the old memory: {out:?}");
    eprintln!(
        "linux boot image: the first move carried {} bytes (bzImage + initramfs {image}), the second 0",
        bytes(&first)
    );
}

#[test]
fn linux_mounts_virtiofs_reads_writes_and_keeps_its_open_files_across_a_move() {
    const TEST: &str = "linux_mounts_virtiofs_reads_writes_and_keeps_its_open_files_across_a_move";
    let Some(k) = kernel(TEST) else { return };
    let dir = TempDir::new("linux-fs");
    let share = dir.path().join("share");
    std::fs::create_dir_all(&share).expect("share");
    std::fs::write(share.join("hello.txt"), "from the host\n").expect("file");
    let Some(a) = Virtiofsd::start(&share, &dir.path().join("a.sock")) else { return };
    let Some(b) = Virtiofsd::start(&share, &dir.path().join("b.sock")) else { return };
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let bind = format!("id=vfs0,socket={}", b.socket());
    let dst = Running::new(spawn_ferry(&["run", "--incoming", &uri, "--vhost-user", &bind]));
    ferry_tests::wait_for_incoming(&uri);
    let socket = dir.path().join("src.sock");
    let (s, spec) = (socket.display().to_string(), format!("type=fs,socket={}", a.socket()));
    let args = linux_args(k, "vmlinux", &["--api-socket", &s, "--vhost-user", &spec]);
    let (mut linux, _) = Linux::boot(Running::new(spawn_ferry(&run_args(&args))));

    // Linux's virtio-fs driver mounts the share, reads what the host wrote,
    // and writes what the host reads.
    linux.ok("busybox mkdir -p /share && busybox mount -t virtiofs share /share");
    assert_eq!(linux.ok("busybox cat /share/hello.txt"), ["from the host"]);
    linux.ok("echo written-by-linux > /share/from-guest.txt");
    assert_eq!(
        std::fs::read_to_string(share.join("from-guest.txt")).expect("guest file"),
        "written-by-linux\n"
    );

    // Open files the shell keeps: one to read, one half written.
    linux.ok("exec 3< /share/hello.txt");
    linux.ok("exec 4> /share/log.txt && echo before-the-move >&4");
    let (ok, text) = migrate(&socket, &uri, &[]);
    assert!(ok, "{text}");
    let src = linux.vm.finish(STEP);
    assert_eq!(src.code(), 0, "the source ends after the move: {}", src.stderr);

    // On the destination (another virtiofsd): the same open files.
    let mut moved = Linux::resumed(dst);
    assert_eq!(moved.ok("busybox cat <&3"), ["from the host"], "the file opened before the move reads");
    moved.ok("echo after-the-move >&4 && exec 4>&-");
    assert_eq!(
        std::fs::read_to_string(share.join("log.txt")).expect("log"),
        "before-the-move\nafter-the-move\n",
        "the file opened for writing before the move takes the rest"
    );
    assert_eq!(moved.ok("busybox ls /share | busybox sort"), ["from-guest.txt", "hello.txt", "log.txt"]);
}
