//! The test guest boots on the default machine type: marker with CPU count
//! and RTC year, ticks, guest-chosen exit status, SMP bring-up, reset with
//! `--on-reset exit` (rebooting is in tests/reboot.rs).

use ferry_tests::{ferry, fnv1a, host_year, kvm_or_skip, test_guest_as, ElfClass, TempDir, DEADLINE};

fn marker_line(stdout: &str) -> &str {
    stdout
        .lines()
        .find(|l| l.starts_with("FERRY-GUEST READY"))
        .unwrap_or_else(|| panic!("no ready marker in:\n{stdout}"))
}

#[test]
fn one_vcpu_boots_ticks_and_exits_with_the_status_it_chose() {
    if !kvm_or_skip("one_vcpu_boots_ticks_and_exits_with_the_status_it_chose") {
        return;
    }
    let run = ferry(&["run", "--cpus", "1", "--cmdline", "ready ticks=3 exit=7"], DEADLINE);
    assert_eq!(run.code(), 7, "stderr: {}", run.stderr);
    let marker = marker_line(&run.stdout);
    assert!(marker.contains(" cpus=1 "), "{marker}");
    let year = host_year();
    assert!(marker.contains(&format!(" rtc={year}-")), "RTC year is not the host's {year}: {marker}");
    let ticks: Vec<&str> = run.stdout.lines().filter(|l| l.starts_with("TICK")).collect();
    assert_eq!(ticks, ["TICK 1", "TICK 2", "TICK 3"], "stdout:\n{}", run.stdout);
}

#[test]
fn four_vcpus_are_counted_and_all_start() {
    if !kvm_or_skip("four_vcpus_are_counted_and_all_start") {
        return;
    }
    let run = ferry(&["run", "--cpus", "4", "--cmdline", "ready smp exit=0"], DEADLINE);
    assert_eq!(run.code(), 0, "stderr: {}", run.stderr);
    assert!(marker_line(&run.stdout).contains(" cpus=4 "), "{}", run.stdout);
    assert!(run.stdout.contains("SMP OK cpus=4 started=4"), "{}", run.stdout);
    for ap in 1..4 {
        assert!(run.stdout.contains(&format!("AP {ap} up")), "AP {ap} missing:\n{}", run.stdout);
    }
}

#[test]
fn with_on_reset_exit_a_guest_reset_ends_ferry_with_status_0() {
    if !kvm_or_skip("with_on_reset_exit_a_guest_reset_ends_ferry_with_status_0") {
        return;
    }
    // exit=9 after reset must never run: the reset ends the VM first (and
    // does not reboot it: READY comes once).
    let run = ferry(&["run", "--on-reset", "exit", "--cmdline", "ready reset exit=9"], DEADLINE);
    assert_eq!(run.code(), 0, "stdout: {}\nstderr: {}", run.stdout, run.stderr);
    assert_eq!(run.stdout.matches("FERRY-GUEST READY").count(), 1, "{}", run.stdout);
    assert!(!run.stdout.contains("GUEST DONE"));
}

#[test]
fn memory_pattern_fills_and_verifies() {
    if !kvm_or_skip("memory_pattern_fills_and_verifies") {
        return;
    }
    let run = ferry(&["run", "--memory", "128M", "--cmdline", "pattern=32 verify exit=0"], DEADLINE);
    assert_eq!(run.code(), 0, "stdout: {}\nstderr: {}", run.stdout, run.stderr);
    let oks = run.stdout.lines().filter(|l| *l == "PATTERN OK pages=8192").count();
    assert_eq!(oks, 2, "fill and re-verify:\n{}", run.stdout);
}

#[test]
fn default_run_boots_the_bundled_guest() {
    if !kvm_or_skip("default_run_boots_the_bundled_guest") {
        return;
    }
    // What the README's first command does: no arguments at all.
    let run = ferry(&["run"], DEADLINE);
    assert_eq!(run.code(), 0, "stderr: {}", run.stderr);
    assert!(marker_line(&run.stdout).contains(" cpus=1 "));
    assert!(run.stdout.contains("TICK 5"), "{}", run.stdout);
}

#[test]
fn plugins_load_side_by_side_and_each_answers() {
    // Four libraries, one root-module type: each must come from its own file.
    let list = ferry_tests::ferry(&["plugins"], DEADLINE);
    assert_eq!(list.code(), 0, "{}", list.stderr);
    for (name, file) in [
        ("cmos-rtc", "libcmos_rtc.so"),
        ("debug-exit", "libdebug_exit.so"),
        ("i8042", "libi8042.so"),
        ("serial-16550", "libserial_16550.so"),
    ] {
        let line = list
            .stdout
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} missing:\n{}", list.stdout));
        assert!(line.ends_with(file), "{name} is not from {file}: {line}");
    }
    if !kvm_or_skip("plugins_load_side_by_side_and_each_answers") {
        return;
    }
    // One VM, three plugins answering: the UART prints, the RTC gives the
    // year, the debug-exit port sets the status.
    let run = ferry(&["run", "--cmdline", "ready exit=42"], DEADLINE);
    assert_eq!(run.code(), 42, "debug-exit answered");
    assert!(marker_line(&run.stdout).contains(&format!("rtc={}-", host_year())), "serial + RTC answered");
}

#[test]
fn a_plugin_panic_is_an_error_naming_the_device() {
    if !kvm_or_skip("a_plugin_panic_is_an_error_naming_the_device") {
        return;
    }
    let lib = ferry_tests::fixture_plugin("panicking-plugin");
    let dir = ferry_tests::plugin_dir_copy("panic");
    std::fs::copy(&lib, dir.path().join("panicking-plugin.so")).expect("copy");
    let machine = dir.path().join("m.toml");
    std::fs::write(
        &machine,
        "name = \"boom\"\n\
         [[device]]\nid = \"com1\"\nplugin = \"serial-16550\"\nproperties = { input = \"none\" }\n\
         [[device]]\nid = \"rtc\"\nplugin = \"cmos-rtc\"\n\
         [[device]]\nid = \"boom0\"\nplugin = \"panicking-plugin\"\nproperties = { port = 0xf4 }\n",
    )
    .expect("write machine");
    let plugins = dir.path().display().to_string();
    let m = machine.display().to_string();
    let run = ferry(&["run", "--plugins", &plugins, "--machine", &m, "--cmdline", "ready exit=5"], DEADLINE);
    assert_eq!(run.code(), 1, "stdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("FERRY-GUEST READY"), "the guest ran up to the write");
    let last = run.stderr.lines().last().unwrap_or("");
    let expected = if ferry_tests::isolating() {
        // In a device process the panic ends the device for good.
        "ferry: error: device boom0 (panicking-plugin) failed: it panicked during a register write (region 0, \
         offset 0x0): plugin panicked in write: guest wrote 0x5, and this device cannot cope"
    } else {
        "ferry: error: device boom0 (panicking-plugin): plugin panicked in write: guest wrote 0x5, and this device cannot cope"
    };
    assert_eq!(last, expected);
}

#[test]
fn initramfs_reaches_the_guest_as_a_pvh_module() {
    if !kvm_or_skip("initramfs_reaches_the_guest_as_a_pvh_module") {
        return;
    }
    let dir = ferry_tests::TempDir::new("initrd");
    let data: Vec<u8> = (0..5000u32).map(|i| (i * 7 + i / 13) as u8).collect();
    let path = dir.path().join("initrd.img");
    std::fs::write(&path, &data).expect("write initramfs");
    let p = path.display().to_string();
    let run = ferry(&["run", "--initramfs", &p, "--cmdline", "initrd exit=0"], DEADLINE);
    assert_eq!(run.code(), 0, "stderr: {}", run.stderr);
    let want = format!("INITRD size=5000 fnv={:08x}", fnv1a(&data));
    assert!(run.stdout.contains(&want), "want {want} in:\n{}", run.stdout);

    let none = ferry(&["run", "--cmdline", "initrd exit=0"], DEADLINE);
    assert!(none.stdout.contains("INITRD none"), "{}", none.stdout);
}

#[test]
fn elf32_and_elf64_pvh_kernels_both_boot() {
    if !kvm_or_skip("elf32_and_elf64_pvh_kernels_both_boot") {
        return;
    }
    let dir = TempDir::new("elfclass");
    for (class, name) in [(ElfClass::Elf32, "guest32.elf"), (ElfClass::Elf64, "guest64.elf")] {
        let path = dir.path().join(name);
        std::fs::write(&path, test_guest_as(class)).expect("write kernel");
        let k = path.display().to_string();
        let run = ferry(&["run", "--kernel", &k, "--cmdline", "ready ticks=2 exit=5"], DEADLINE);
        assert_eq!(run.code(), 5, "{class:?}: {}", run.stderr);
        assert!(run.stdout.contains("TICK 2"), "{class:?}: {}", run.stdout);
        assert!(marker_line(&run.stdout).contains(" cpus=1 "));
    }
    // The ELF32 file really is one: class byte 1, machine EM_386.
    let k32 = std::fs::read(dir.path().join("guest32.elf")).expect("read");
    assert_eq!((k32[4], u16::from_le_bytes([k32[18], k32[19]])), (1, 3));
}
