//! virtio-blk, virtio-net and virtio-rng driven by the test guest's own
//! virtio-pci drivers (PCI enumeration, MSI-X, one queue each), checked from
//! the host side: the image file, the tap, the bytes.

use std::time::Duration;

use ferry_tests::{
    blk_pattern_sector, ctl, ferry, fnv1a, kvm_or_skip, netns, spawn_ferry, wait_for_path, Running, TempDir,
    DEADLINE,
};

fn line<'a>(stdout: &'a str, prefix: &str) -> &'a str {
    stdout
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no '{prefix}' line in:\n{stdout}"))
}

fn irqs(line: &str) -> u64 {
    line.rsplit("irqs=").next().and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

#[test]
fn guest_sectors_reach_the_image_and_host_sectors_reach_the_guest() {
    if !kvm_or_skip("guest_sectors_reach_the_image_and_host_sectors_reach_the_guest") {
        return;
    }
    let dir = TempDir::new("blk");
    let image = dir.path().join("disk.img");
    // Sectors 100..104 hold host data for the guest to read.
    let mut disk = vec![0u8; 1 << 20];
    let host_data: Vec<u8> = (0..2048u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    disk[100 * 512..104 * 512].copy_from_slice(&host_data);
    std::fs::write(&image, &disk).expect("write image");
    let disk_arg = format!("path={},serial=ferry-disk-1", image.display());
    let run = ferry(
        &["run", "--disk", &disk_arg, "--cmdline", "blk-id blk-write=8:3:77 blk-flush blk-read=100:4 exit=0"],
        DEADLINE,
    );
    assert_eq!(run.code(), 0, "stdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("BLK ID ferry-disk-1 status=0"), "{}", run.stdout);
    let write = line(&run.stdout, "BLK WRITE");
    assert!(write.starts_with("BLK WRITE sector=8 count=3 status=0"), "{write}");
    assert!(irqs(write) >= 1, "completion came as an MSI-X interrupt: {write}");
    assert!(run.stdout.contains("BLK FLUSH status=0"));

    let after = std::fs::read(&image).expect("read image");
    for s in 8..11 {
        assert_eq!(
            &after[s * 512..(s + 1) * 512],
            &blk_pattern_sector(s as u64, 77)[..],
            "sector {s} on the host"
        );
    }
    assert!(after[11 * 512..100 * 512].iter().all(|b| *b == 0), "nothing else written");

    let read = line(&run.stdout, "BLK READ");
    let want = format!("BLK READ sector=100 count=4 status=0 fnv={:08x}", fnv1a(&host_data));
    assert!(read.starts_with(&want), "want '{want}', got '{read}'");
}

#[test]
fn a_readonly_disk_fails_guest_writes_with_the_virtio_error_status() {
    if !kvm_or_skip("a_readonly_disk_fails_guest_writes_with_the_virtio_error_status") {
        return;
    }
    let dir = TempDir::new("blkro");
    let image = dir.path().join("ro.img");
    std::fs::write(&image, vec![0x11u8; 64 * 1024]).expect("write image");
    let disk_arg = format!("path={},readonly=on", image.display());
    let run =
        ferry(&["run", "--disk", &disk_arg, "--cmdline", "blk-write=0:1:1 blk-read=0:1 exit=0"], DEADLINE);
    assert_eq!(run.code(), 0, "stderr: {}", run.stderr);
    assert!(
        line(&run.stdout, "BLK WRITE").starts_with("BLK WRITE sector=0 count=1 status=1"),
        "{}",
        run.stdout
    );
    let want = format!("BLK READ sector=0 count=1 status=0 fnv={:08x}", fnv1a(&[0x11u8; 512]));
    assert!(line(&run.stdout, "BLK READ").starts_with(&want), "{}", run.stdout);
    assert!(std::fs::read(&image).expect("image").iter().all(|b| *b == 0x11), "image untouched");
}

#[test]
fn ferry_ctl_info_shows_the_disks_request_counts() {
    if !kvm_or_skip("ferry_ctl_info_shows_the_disks_request_counts") {
        return;
    }
    // Published by virtio-blk through Host::set_status (plugin-api 1.1).
    let dir = TempDir::new("blkstatus");
    let image = dir.path().join("ro.img");
    std::fs::write(&image, vec![0u8; 64 * 1024]).expect("write image");
    let socket = dir.path().join("api.sock");
    let (d, s) = (format!("path={},readonly=on", image.display()), socket.display().to_string());
    let cmdline = "blk-read=0:1 blk-read=1:1 blk-write=0:1:1 ticks=500 exit=0";
    let mut vm = Running::new(spawn_ferry(&["run", "--disk", &d, "--api-socket", &s, "--cmdline", cmdline]));
    assert!(wait_for_path(&socket, DEADLINE), "no API socket");
    assert!(vm.wait_line("TICK", DEADLINE).is_some(), "the guest ticks");
    // A device process sends its latest line at most every 100 ms.
    let want = format!("{}: 2 reads, 0 writes, 0 flushes, 1 failed", image.display());
    let start = std::time::Instant::now();
    let (info, disk) = loop {
        let info: serde_json::Value = serde_json::from_str(&ctl(&socket, &["info"])).expect("JSON");
        let disk =
            info["devices"].as_array().and_then(|d| d.iter().find(|x| x["plugin"] == "virtio-blk")).cloned();
        let disk = disk.expect("a virtio-blk device");
        if disk["status"] == want.as_str() || start.elapsed() > Duration::from_secs(5) {
            break (info, disk);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(disk["status"], want, "{info}");
    assert_eq!(disk["plugin_api"], ferry_plugin_api::PLUGIN_API_VERSION, "{info}");
    ctl(&socket, &["shutdown"]);
    assert_eq!(vm.finish(DEADLINE).code(), 0);
}

#[test]
fn virtio_rng_returns_bytes_that_are_not_constant() {
    if !kvm_or_skip("virtio_rng_returns_bytes_that_are_not_constant") {
        return;
    }
    let run = ferry(&["run", "--rng", "--cmdline", "rng=32 rng=32 exit=0"], DEADLINE);
    assert_eq!(run.code(), 0, "stderr: {}", run.stderr);
    let hexes: Vec<&str> = run
        .stdout
        .lines()
        .filter(|l| l.starts_with("RNG len=32 hex="))
        .map(|l| l.split("hex=").nth(1).unwrap_or("").split_whitespace().next().unwrap_or(""))
        .collect();
    assert_eq!(hexes.len(), 2, "{}", run.stdout);
    assert_eq!(hexes[0].len(), 64);
    assert_ne!(hexes[0], hexes[1], "two requests, same bytes");
    assert!(hexes[0].as_bytes().chunks(2).any(|c| c != &hexes[0].as_bytes()[..2]), "constant bytes");
}

#[test]
fn the_guest_sees_every_device_on_the_pci_bus() {
    if !kvm_or_skip("the_guest_sees_every_device_on_the_pci_bus") {
        return;
    }
    let dir = TempDir::new("pci");
    let image = dir.path().join("d.img");
    std::fs::write(&image, vec![0u8; 4096]).expect("image");
    let disk_arg = format!("path={}", image.display());
    let run = ferry(&["run", "--disk", &disk_arg, "--rng", "--cmdline", "pci exit=0"], DEADLINE);
    assert_eq!(run.code(), 0, "stderr: {}", run.stderr);
    assert!(run.stdout.contains("PCI 00:00.0 vendor=8086 device=1237 class=060000"), "{}", run.stdout);
    assert!(run.stdout.contains("PCI 00:01.0 vendor=1af4 device=1042 class=010000"), "{}", run.stdout);
    assert!(run.stdout.contains("PCI 00:02.0 vendor=1af4 device=1044 class=00ff00"), "{}", run.stdout);
    assert!(run.stdout.contains("PCI DONE count=3"));
}

#[test]
fn frames_cross_between_the_guest_and_a_tap_in_a_namespace() {
    if !kvm_or_skip("frames_cross_between_the_guest_and_a_tap_in_a_namespace") {
        return;
    }
    let Some(ns) = netns::NetNs::with_tap("ftap0") else { return };
    let capture = ns.capture("ftap0", 3, Duration::from_secs(60));
    let inject = ns.injector("ftap0");
    // The guest sends three frames, then waits for two; the host sends two
    // once it has seen the guest's three.
    let mut guest = ferry_tests::Running::new(ns.spawn_ferry(
        &[],
        &["--net", "tap=ftap0,mac=52:54:00:12:34:56", "--cmdline", "net-send=3 net-recv=2 exit=0"],
    ));
    let frames = capture.join().expect("capture thread");
    assert_eq!(frames.len(), 3, "three frames reached the tap");
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(&f[0..6], &[0xff; 6], "broadcast");
        assert_eq!(&f[6..12], &[0x52, 0x54, 0x00, 0x12, 0x34, 0x56], "from the guest's MAC");
        assert_eq!(&f[12..14], &[0x88, 0xb5]);
        let payload = format!("FERRY-FRAME {}", i + 1);
        assert_eq!(&f[14..14 + payload.len()], payload.as_bytes());
    }
    // Send once the guest says it is listening.
    assert!(guest.wait_line("NET RECV READY", DEADLINE).is_some(), "guest never got ready to receive");
    for i in 0..2 {
        inject(format!("HOST-FRAME {i}").as_bytes());
    }
    let run = guest.finish(DEADLINE);
    assert_eq!(run.code(), 0, "stdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("NET SENT 3 mac=52:54:00:12:34:56"), "{}", run.stdout);
    for i in 0..2 {
        assert!(
            run.stdout.contains(&format!("NET RECV len=60 ethertype=88b5 payload=HOST-FRAME {i}")),
            "frame {i} missing:\n{}",
            run.stdout
        );
    }
    // Transmit completions come as MSI-X interrupts. (Whether the guest
    // counts a receive interrupt depends on whether the frames beat its
    // first halt, so that count is not asserted.)
    assert!(irqs(line(&run.stdout, "NET SENT")) >= 1, "{}", run.stdout);
}
