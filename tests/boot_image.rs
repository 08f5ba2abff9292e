//! A guest's boot image (kernel, initramfs, command line) travels with it,
//! content-addressed: a guest moved live twice and then restored from a
//! snapshot on a third host reboots into its own kernel with its own
//! command line. Each "host" here is a ferry process with an image store
//! of its own (`--image-store`): the first move to a host without the
//! image carries it, a move to a host that holds it carries nothing, and a
//! snapshot holds it so that any host can restore and reboot the guest.

use std::path::Path;

use ferry_tests::{
    ctl, kvm_or_skip, migrate, report_num, spawn_ferry, spawn_ferry_env, wait_for_incoming, Running, TempDir,
    DEADLINE,
};

/// The test guest ELF as this ferry boots it (the bytes of the bundled one).
fn test_guest_size() -> u64 {
    ferry::boot::TEST_GUEST.len() as u64
}

/// The report's `boot_image_bytes`.
fn image_bytes(report: &str) -> u64 {
    report_num(report, "boot_image_bytes").unwrap_or_else(|| panic!("no boot_image_bytes:\n{report}")) as u64
}

/// The files a store holds.
fn held(store: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(store)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().to_string()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// `ferry run --incoming unix:DIR/NAME.in --image-store STORE` with an API
/// socket; returns it, its API socket and the URI.
fn destination(dir: &Path, name: &str, store: &Path) -> (Running, std::path::PathBuf, String) {
    let uri = format!("unix:{}", dir.join(format!("{name}.in")).display());
    let api = dir.join(format!("{name}.sock"));
    let vm = Running::new(spawn_ferry(&[
        "run",
        "--incoming",
        &uri,
        "--image-store",
        &store.display().to_string(),
        "--api-socket",
        &api.display().to_string(),
    ]));
    wait_for_incoming(&uri);
    (vm, api, uri)
}

#[test]
fn a_guest_moved_live_twice_and_restored_reboots_into_its_own_kernel() {
    if !kvm_or_skip("a_guest_moved_live_twice_and_restored_reboots_into_its_own_kernel") {
        return;
    }
    let dir = TempDir::new("boot-image");
    let store = |host: &str| dir.path().join(format!("store-{host}"));
    let (a, b, c) = (store("a"), store("b"), store("c"));

    // Host A boots the guest: its image goes into A's store. Its command
    // line is its own (the destinations are given none): after 60 ticks it
    // resets once, then says goodbye.
    let cmdline = "boot ticks=60 reboot-until=2 ticks=2 exit=0";
    let api_a = dir.path().join("a.sock");
    let mut on_a = Running::new(spawn_ferry(&[
        "run",
        "--image-store",
        &a.display().to_string(),
        "--api-socket",
        &api_a.display().to_string(),
        "--cmdline",
        cmdline,
    ]));
    assert!(on_a.wait_line("TICK 2", DEADLINE).is_some(), "the guest runs on A");
    assert_eq!(held(&a).len(), 1, "A's store holds the kernel: {:?}", held(&a));

    // Move 1, A -> B: B's store is empty, so the kernel travels.
    let (on_b, api_b, uri_b) = destination(dir.path(), "b", &b);
    let (ok, first) = migrate(&api_a, &uri_b, &[]);
    assert!(ok, "{first}");
    let first_bytes = image_bytes(&first);
    assert!(
        first_bytes >= test_guest_size() && first_bytes < test_guest_size() + 4096,
        "the first move carries the kernel ({} bytes) and little else: {first_bytes}\n{first}",
        test_guest_size()
    );
    assert_eq!(on_a.finish(DEADLINE).code(), 0);
    assert_eq!(held(&b), held(&a), "B holds the same image");

    // Move 2, B -> A again (a host that holds it): nothing travels.
    let (on_a2, api_a2, uri_a2) = destination(dir.path(), "a2", &a);
    let (ok, second) = migrate(&api_b, &uri_a2, &[]);
    assert!(ok, "{second}");
    assert_eq!(image_bytes(&second), 0, "a host holding the image is sent none:\n{second}");
    assert_eq!(on_b.finish(DEADLINE).code(), 0);

    // A snapshot, restored on host C whose store is empty.
    let snap = dir.path().join("guest.snap");
    ctl(&api_a2, &["snapshot", &snap.display().to_string()]);
    ctl(&api_a2, &["shutdown"]);
    let gone = on_a2.finish(DEADLINE);
    assert!(!gone.stdout.contains("BOOT 2"), "the guest has not reset yet:\n{}", gone.stdout);
    let on_c = Running::new(spawn_ferry_env(
        &["run", "--restore", &snap.display().to_string(), "--image-store", &c.display().to_string()],
        &[("FERRY_LOG", "info")],
    ));
    let out = on_c.finish(DEADLINE);
    assert_eq!(out.code(), 0, "stdout:\n{}\nstderr:\n{}", out.stdout, out.stderr);
    assert_eq!(held(&c), held(&a), "the restore took the image into C's store");
    assert!(out.stderr.contains("the guest rebooted"), "{}", out.stderr);
    let boots: Vec<&str> = out.stdout.lines().filter(|l| l.starts_with("BOOT ")).collect();
    assert_eq!(boots, ["BOOT 2"], "its own kernel and command line, booted again:\n{}", out.stdout);
    assert!(out.stdout.contains("TICK 2"), "and it runs to its end:\n{}", out.stdout);
    eprintln!(
        "boot image: the first move to a host without it carried {first_bytes} bytes (kernel {} bytes), the second 0",
        test_guest_size()
    );
}
