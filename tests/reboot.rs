//! Guest reboots (`--on-reset reboot`, the default): the test guest resets
//! itself and counts its boots in CMOS RAM (tests/guest: `boot`, `fresh`,
//! `blk-boots`, `reboot-until`). Devices come back reset: the serial FIFO
//! empty although input was waiting in it, the virtio devices unconfigured
//! (status 0, MSI-X off) until the guest's driver sets them up again, and
//! the disk holding what earlier boots wrote; a second vCPU comes up again
//! at every boot. A VM that rebooted migrates;
//! a reset while a migration runs cancels the migration and reboots.
//! `--on-reset exit` is in tests/boot.rs.

use std::{io::Write, time::Duration};

use ferry_tests::{
    ctl, free_port, kvm_or_skip, migrate, spawn_ferry, spawn_ferry_env, wait_for_path, Running, TempDir,
    DEADLINE,
};

/// The lines of boot `n` (from `BOOT n` to the next `BOOT`).
fn boot_lines(stdout: &str, n: u32) -> Vec<&str> {
    let start = format!("BOOT {n}");
    stdout.lines().skip_while(|l| *l != start).skip(1).take_while(|l| !l.starts_with("BOOT ")).collect()
}

#[test]
fn the_guest_reboots_three_times_and_finds_its_devices_reset() {
    if !kvm_or_skip("the_guest_reboots_three_times_and_finds_its_devices_reset") {
        return;
    }
    let dir = TempDir::new("reboot");
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 4 << 20]).expect("disk image");
    let d = format!("path={}", disk.display());
    // ticks=30 on each boot: time for the test to type into boot 1's FIFO.
    let cmdline = "boot fresh blk-boots=100 rng=16 ticks=30 reboot-until=4 exit=0";
    let mut vm = Running::new(spawn_ferry_env(
        &["run", "--disk", &d, "--rng", "--cmdline", cmdline],
        &[("FERRY_LOG", "info")],
    ));
    assert!(vm.wait_line("BOOT 1", DEADLINE).is_some(), "the first boot");
    // Input the first boot never reads: it waits in the UART's FIFO.
    vm.stdin().expect("stdin").write_all(b"typed before the reboot\n").expect("type");
    let out = vm.finish(DEADLINE);
    assert_eq!(out.code(), 0, "stdout:\n{}\nstderr:\n{}", out.stdout, out.stderr);
    let boots: Vec<&str> = out.stdout.lines().filter(|l| l.starts_with("BOOT ")).collect();
    assert_eq!(boots, ["BOOT 1", "BOOT 2", "BOOT 3", "BOOT 4"], "counted in CMOS RAM across resets");
    assert_eq!(out.stderr.matches("the guest rebooted").count(), 3, "{}", out.stderr);
    for n in 1..=4u32 {
        let lines = boot_lines(&out.stdout, n);
        for want in ["SERIAL FRESH rx=empty", "BLK FRESH status=0 msix=off", "RNG FRESH status=0 msix=off"] {
            assert!(lines.contains(&want), "boot {n}: {want}:\n{}", lines.join("\n"));
        }
        let verified = lines.iter().filter(|l| l.starts_with("BLK VERIFY OK")).count();
        assert_eq!(
            verified,
            n as usize - 1,
            "boot {n} reads every earlier boot's sectors:\n{}",
            lines.join("\n")
        );
        assert!(
            lines.iter().any(|l| l.starts_with("BLK WRITE") && l.contains("status=0")),
            "boot {n} writes"
        );
        assert!(lines.iter().any(|l| l.starts_with("RNG len=16")), "boot {n}: the rng works again");
    }
}

#[test]
fn with_two_vcpus_the_second_comes_up_again_at_every_boot() {
    if !kvm_or_skip("with_two_vcpus_the_second_comes_up_again_at_every_boot") {
        return;
    }
    // The AP is back in wait-for-SIPI after each reset; the guest starts it
    // again with INIT/SIPI as at the first boot.
    let run =
        Running::new(spawn_ferry(&["run", "--cpus", "2", "--cmdline", "boot smp reboot-until=3 exit=0"]))
            .finish(DEADLINE);
    assert_eq!(run.code(), 0, "stdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    for n in 1..=3u32 {
        let lines = boot_lines(&run.stdout, n);
        assert!(lines.contains(&"SMP OK cpus=2 started=2"), "boot {n}:\n{}", run.stdout);
    }
}

#[test]
fn a_guest_that_rebooted_moves_live() {
    if !kvm_or_skip("a_guest_that_rebooted_moves_live") {
        return;
    }
    let dir = TempDir::new("reboot-mig");
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let dst = Running::new(spawn_ferry(&["run", "--incoming", &uri]));
    ferry_tests::wait_for_incoming(&uri);
    let socket = dir.path().join("src.sock");
    let s = socket.display().to_string();
    let mut src = Running::new(spawn_ferry(&[
        "run",
        "--api-socket",
        &s,
        "--cmdline",
        "boot reboot-until=2 ticks=40 exit=0",
    ]));
    assert!(wait_for_path(&socket, DEADLINE), "no API socket");
    assert!(src.wait_line("BOOT 2", DEADLINE).is_some(), "the guest rebooted");
    assert!(src.wait_line("TICK 3", DEADLINE).is_some(), "and runs");
    let info = ctl(&socket, &["info"]);
    assert!(info.contains("\"reboots\": 1"), "{info}");
    let (ok, text) = migrate(&socket, &uri, &[]);
    assert!(ok, "{text}");
    assert_eq!(src.finish(DEADLINE).code(), 0);
    let out = dst.finish(DEADLINE);
    assert_eq!(out.code(), 0, "destination:\n{}\n{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("TICK 40"), "the rebooted guest carries on there:\n{}", out.stdout);
    assert!(!out.stdout.contains("BOOT"), "and does not boot again:\n{}", out.stdout);
}

#[test]
fn a_reset_during_a_migration_cancels_it_and_the_guest_reboots_here() {
    if !kvm_or_skip("a_reset_during_a_migration_cancels_it_and_the_guest_reboots_here") {
        return;
    }
    // A destination that takes the connection and answers nothing for 60 s:
    // the migration is still in its handshake when the guest resets, about
    // a second after it booted, and the cancel must not wait for it.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = listener.local_addr().expect("addr").port();
    let held = std::thread::spawn(move || {
        if let Ok((conn, _)) = listener.accept() {
            std::thread::sleep(Duration::from_secs(60));
            drop(conn);
        }
    });
    let dir = TempDir::new("reboot-during-mig");
    let socket = dir.path().join("src.sock");
    let s = socket.display().to_string();
    let mut src = Running::new(spawn_ferry_env(
        &["run", "--api-socket", &s, "--cmdline", "boot ticks=100 reboot-until=2 ticks=5 exit=0"],
        &[("FERRY_LOG", "info")],
    ));
    assert!(wait_for_path(&socket, DEADLINE), "no API socket");
    assert!(src.wait_line("BOOT 1", DEADLINE).is_some(), "the first boot");
    let (ok, text) = migrate(&socket, &format!("tcp:127.0.0.1:{port}"), &[]);
    assert!(!ok, "the migration cannot succeed: {text}");
    assert!(text.contains("the guest reset the machine during the migration"), "{text}");
    let out = src.finish(DEADLINE);
    drop(held);
    assert_eq!(out.code(), 0, "stdout:\n{}\nstderr:\n{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("BOOT 2"), "the guest rebooted here:\n{}", out.stdout);
    assert!(out.stderr.contains("cancelling the migration"), "{}", out.stderr);
}
