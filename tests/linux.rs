//! End to end: Debian's cloud kernel boots on ferry, with virtio drivers
//! loaded from a busybox initramfs, to a shell that sees a disk and a
//! network interface. Runs only where guest code executes natively: a quick
//! calibration with the test guest decides, and the test says SKIPPED with
//! the measured figure where the KVM emulates guest instructions (there a
//! Linux boot would take hours).
//!
//! Inputs, fetched when missing (Debian's packages, unpacked into
//! target/linux-e2e, nothing installed on the host): `linux-image-cloud-amd64`
//! and `busybox-static`. `FERRY_LINUX_KERNEL` names a bzImage to use instead;
//! its modules are then looked up under the same package layout.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use ferry_tests::{ferry, kvm_or_skip, netns, repo_root, skip, TempDir};

/// Above this, guest code is emulated (native hardware: well under 1 ns).
const NATIVE_LOOP_NS: f64 = 20.0;

fn calibrate() -> Option<f64> {
    let run = ferry(&["run", "--cmdline", "calibrate exit=0"], Duration::from_secs(60));
    let line = run.stdout.lines().find(|l| l.starts_with("CALIBRATE"))?.to_string();
    line.split_whitespace().find_map(|w| w.strip_prefix("loop_ns=")).and_then(|v| v.parse().ok())
}

fn sh(cmd: &str, dir: &Path) -> Result<(), String> {
    let out = Command::new("sh").arg("-c").arg(cmd).current_dir(dir).output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("`{cmd}` failed: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Unpack a Debian package into `root` (download it first if needed).
fn unpack(package: &str, root: &Path) -> Result<(), String> {
    let debs = root.join("debs");
    std::fs::create_dir_all(&debs).map_err(|e| e.to_string())?;
    let have = std::fs::read_dir(&debs).map_err(|e| e.to_string())?.flatten().any(|e| {
        e.file_name()
            .to_string_lossy()
            .starts_with(&format!("{}_", package.split(':').next().unwrap_or(package)))
    });
    if !have {
        sh(&format!("apt-get download {package}"), &debs)?;
    }
    sh(&format!("for d in {package}_*.deb; do dpkg-deb -x \"$d\" ../fs; done"), &debs)
}

/// The newest file under `dir` whose name starts with `prefix`.
fn newest(dir: &Path, prefix: &str) -> Option<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(prefix)))
        .collect();
    v.sort();
    v.pop()
}

/// Modules (with their dependencies, in load order) for `wanted`, from
/// modules.dep; built-in drivers need nothing.
fn module_chain(moddir: &Path, wanted: &[&str]) -> Vec<PathBuf> {
    let deps = std::fs::read_to_string(moddir.join("modules.dep")).unwrap_or_default();
    let mut order: Vec<String> = Vec::new();
    fn visit(deps: &str, file: &str, order: &mut Vec<String>) {
        if order.iter().any(|o| o == file) {
            return;
        }
        if let Some(line) = deps.lines().find(|l| l.split(':').next() == Some(file)) {
            for dep in line.split(':').nth(1).unwrap_or("").split_whitespace() {
                visit(deps, dep, order);
            }
            order.push(file.to_string());
        }
    }
    for name in wanted {
        let file = deps.lines().filter_map(|l| l.split(':').next()).find(|f| {
            let base = Path::new(f).file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
            base.split('.').next() == Some(name)
        });
        if let Some(f) = file {
            visit(&deps, f, &mut order);
        }
    }
    order.into_iter().map(|f| moddir.join(f)).collect()
}

/// A newc cpio archive (what the kernel unpacks as initramfs).
fn cpio(entries: &[(String, u32, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut add =
        |name: &str, mode: u32, data: &[u8], ino: usize| {
            let header =
                format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            0, 0, 1, 0, data.len(), 0, 0, 0, 0, name.len() + 1, 0
        );
            out.extend_from_slice(header.as_bytes());
            out.extend_from_slice(name.as_bytes());
            out.push(0);
            while out.len() % 4 != 0 {
                out.push(0);
            }
            out.extend_from_slice(data);
            while out.len() % 4 != 0 {
                out.push(0);
            }
        };
    for (i, (name, mode, data)) in entries.iter().enumerate() {
        add(name, *mode, data, i + 1);
    }
    add("TRAILER!!!", 0, &[], 0);
    out
}

#[test]
fn debian_cloud_kernel_boots_to_a_shell_with_a_disk_and_a_network() {
    const TEST: &str = "debian_cloud_kernel_boots_to_a_shell_with_a_disk_and_a_network";
    if !kvm_or_skip(TEST) {
        return;
    }
    let Some(loop_ns) = calibrate() else { panic!("the test guest did not report a calibration") };
    if loop_ns > NATIVE_LOOP_NS {
        skip(
            TEST,
            &format!(
                "this KVM emulates guest instructions ({loop_ns:.1} ns per loop iteration, native is under 1 ns): \
                 a Linux boot would take hours"
            ),
        );
        return;
    }

    let root = repo_root().join("target").join("linux-e2e");
    let fs = root.join("fs");
    let kernel = match std::env::var_os("FERRY_LINUX_KERNEL") {
        Some(k) => PathBuf::from(k),
        None => {
            unpack("linux-image-cloud-amd64", &root).expect("fetch the Debian cloud kernel");
            let boot = fs.join("boot");
            if newest(&boot, "vmlinuz-").is_none() {
                // The meta package only depends on the versioned one.
                sh("apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/{print $2}' > dep", &root)
                    .expect("find the kernel package");
                let dep = std::fs::read_to_string(root.join("dep")).expect("dep").trim().to_string();
                unpack(&dep, &root).expect("fetch the versioned kernel package");
            }
            newest(&boot, "vmlinuz-").expect("a vmlinuz in the kernel package")
        }
    };
    unpack("busybox-static", &root).expect("fetch busybox-static");
    let busybox = std::fs::read(fs.join("bin/busybox")).expect("busybox binary");
    let moddir = newest(&fs.join("lib/modules"), "").unwrap_or_else(|| fs.join("lib/modules/none"));
    let modules = module_chain(&moddir, &["virtio_pci", "virtio_blk", "virtio_net"]);

    let mut entries = vec![
        ("bin".to_string(), 0o040755, Vec::new()),
        ("bin/busybox".to_string(), 0o100755, busybox),
        ("modules".to_string(), 0o040755, Vec::new()),
    ];
    let mut insmods = String::new();
    for (i, m) in modules.iter().enumerate() {
        let mut data = std::fs::read(m).expect("module");
        if m.extension().is_some_and(|e| e == "xz") {
            let out = Command::new("xz").args(["-dc"]).arg(m).output().expect("xz");
            data = out.stdout;
        }
        entries.push((format!("modules/{i}.ko"), 0o100644, data));
        insmods.push_str(&format!("insmod /modules/{i}.ko\n"));
    }
    let init = format!(
        "#!/bin/busybox sh\n/bin/busybox --install -s /bin\nmkdir -p /proc /sys /dev\n\
         mount -t proc proc /proc\nmount -t sysfs sys /sys\nmount -t devtmpfs dev /dev\n{insmods}\
         echo FERRY-LINUX-SHELL\nfor b in /sys/block/*; do echo FERRY-LINUX-BLOCK ${{b##*/}}; done\n\
         for n in /sys/class/net/*; do echo FERRY-LINUX-NET ${{n##*/}}; done\nreboot -f\n"
    );
    entries.push(("init".to_string(), 0o100755, init.into_bytes()));
    let dir = TempDir::new("linux");
    let initrd = dir.path().join("initrd.cpio");
    std::fs::write(&initrd, cpio(&entries)).expect("initramfs");
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 8 << 20]).expect("disk");

    let Some(ns) = netns::NetNs::with_tap("ftap0") else { return };
    let (k, i, d) = (kernel.display().to_string(), initrd.display().to_string(), disk.display().to_string());
    let disk_arg = format!("path={d}");
    // The same command a user would run, inside the test's namespace.
    let child = ns.spawn_ferry(
        &[],
        &[
            "--kernel",
            &k,
            "--initramfs",
            &i,
            "--cmdline",
            "console=ttyS0 panic=-1 reboot=k",
            "--cpus",
            "2",
            "--memory",
            "512M",
            "--disk",
            &disk_arg,
            "--net",
            "tap=ftap0",
        ],
    );
    let run = ferry_tests::wait_ferry(child, Duration::from_secs(300));
    assert_eq!(run.code(), 0, "stdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("FERRY-LINUX-SHELL"), "{}", run.stdout);
    assert!(run.stdout.contains("FERRY-LINUX-BLOCK vda"), "no virtio disk:\n{}", run.stdout);
    assert!(run.stdout.contains("FERRY-LINUX-NET eth0"), "no virtio NIC:\n{}", run.stdout);
}

#[test]
fn cpio_archives_follow_the_newc_format() {
    let a = cpio(&[("init".to_string(), 0o100755, b"#!/bin/sh\n".to_vec())]);
    assert!(a.starts_with(b"070701"));
    assert_eq!(a.len() % 4, 0);
    let text = String::from_utf8_lossy(&a);
    assert!(text.contains("init\0") && text.contains("TRAILER!!!\0"));
    // Header field 7 (file size) of the first entry: 10 bytes.
    assert_eq!(&a[6 + 6 * 8..6 + 7 * 8], b"0000000a");
}
