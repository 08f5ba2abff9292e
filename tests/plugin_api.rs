//! plugin-api across releases: a plugin built against plugin-api 1.0 as
//! released (tests/fixtures/plugin-api-1.0, the `testdev` fixture built
//! against it) loads in this core, runs, moves live between two ferries of
//! this build, and survives a snapshot; `ferry plugins` says which
//! plugin-api each plugin was built against. The refusals (0.x, 2.0, a
//! newer 1.y needing what this core lacks) are in tests/errors.rs.

use std::{path::PathBuf, process::Command, sync::OnceLock};

use ferry_tests::{
    ctl, ferry_bin, fixture_plugin_with, free_port, kvm_or_skip, migrate, plugin_dir_copy, repo_root,
    spawn_ferry, spawn_ferry_env, start_with_api, wait_tick, Running, TempDir, DEADLINE,
};

const WRITES: &str = "dev-write=0:0x11 dev-write=1:0x22 dev-write=0x10:0x33 dev-write=0x17:0x44";
const CHECKS: &str = "dev-check=0:0x11 dev-check=1:0x22 dev-check=0x10:0x33 dev-check=0x17:0x44";

/// A plugin directory: this build's plugins, and testdev (release 3) built
/// against plugin-api 1.0.0. `libtestdev.so` sorts between this build's
/// libraries, so the core checks 1.0 and current plugins in both orders.
fn host_with_1_0_plugin() -> &'static TempDir {
    static HOST: OnceLock<TempDir> = OnceLock::new();
    HOST.get_or_init(|| {
        let lib = fixture_plugin_with("testdev-api-1.0", &["v3"]);
        let dir = plugin_dir_copy("api-1.0");
        std::fs::copy(&lib, dir.path().join("libtestdev.so")).expect("install testdev");
        dir
    })
}

fn plugins() -> String {
    host_with_1_0_plugin().path().display().to_string()
}

fn machine() -> String {
    repo_root().join("tests").join("machines").join("testdev-1.toml").display().to_string()
}

/// testdev-1 with the i8042 (the reset line).
fn reboot_machine() -> String {
    repo_root().join("tests").join("machines").join("testdev-reboot.toml").display().to_string()
}

/// A guest on the 1.0 plugin that wrote testdev's registers and ticks;
/// returns it and its API socket.
fn source(dir: &TempDir) -> (Running, PathBuf) {
    let (m, p) = (machine(), plugins());
    let cmdline = format!("{WRITES} ticks=25 {CHECKS} exit=0");
    let (mut src, socket) =
        start_with_api(dir.path(), "src", &["--plugins", &p, "--machine", &m, "--cmdline", &cmdline], &[]);
    while wait_tick(&mut src) < 3 {}
    (src, socket)
}

#[test]
fn the_released_1_0_declarations_are_the_baseline() {
    let root = repo_root();
    let released = root.join("tests/fixtures/plugin-api-1.0/src/abi.rs");
    let baseline = root.join("plugin-api/src/baseline/abi_1_0.rs");
    let (a, b) = (std::fs::read(&released).expect("released"), std::fs::read(&baseline).expect("baseline"));
    assert!(
        a == b,
        "{} and {} must stay identical: the baseline is the released 1.0",
        released.display(),
        baseline.display()
    );
}

#[test]
fn ferry_plugins_names_the_plugin_api_of_each_plugin() {
    let out =
        Command::new(ferry_bin()).args(["plugins", "--plugins", &plugins()]).output().expect("ferry plugins");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    // Columns are aligned: the plugin-api of a row starts where its header does.
    let header = text.lines().next().unwrap_or("");
    let col = header.find("PLUGIN-API").expect("a PLUGIN-API column");
    let row = |name: &str| -> String {
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no {name} row:\n{text}"));
        line.get(col..).and_then(|r| r.split_whitespace().next()).unwrap_or("").to_string()
    };
    assert_eq!(row("testdev"), "1.0.0", "{text}");
    assert_eq!(row("serial-16550"), ferry_plugin_api::PLUGIN_API_VERSION, "{text}");
}

#[test]
fn a_1_0_plugin_moves_live_between_two_cores_of_this_build() {
    if !kvm_or_skip("a_1_0_plugin_moves_live_between_two_cores_of_this_build") {
        return;
    }
    let dir = TempDir::new("api-1.0-mig");
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let dst = Running::new(spawn_ferry(&["run", "--plugins", &plugins(), "--incoming", &uri]));
    ferry_tests::wait_for_incoming(&uri);
    let (src, socket) = source(&dir);
    let (ok, text) = migrate(&socket, &uri, &[]);
    assert!(ok, "{text}");
    assert!(text.contains("device dev0 (testdev 3.0.0 -> 3.0.0): same state v3"), "{text}");
    assert_eq!(src.finish(DEADLINE).code(), 0);
    let out = dst.finish(DEADLINE);
    assert_eq!(out.code(), 0, "the guest's registers on the destination:\n{}\n{}", out.stdout, out.stderr);
    assert_eq!(out.stdout.matches("DEV OK").count(), 4, "{}", out.stdout);
}

#[test]
fn a_1_0_plugin_survives_a_snapshot_and_restore() {
    if !kvm_or_skip("a_1_0_plugin_survives_a_snapshot_and_restore") {
        return;
    }
    let dir = TempDir::new("api-1.0-snap");
    let (src, socket) = source(&dir);
    let snap_s = dir.path().join("vm.snap").display().to_string();
    ctl(&socket, &["pause"]);
    ctl(&socket, &["snapshot", &snap_s]);
    ctl(&socket, &["shutdown"]);
    assert_eq!(src.finish(DEADLINE).code(), 0);
    let out =
        Running::new(spawn_ferry(&["run", "--plugins", &plugins(), "--restore", &snap_s])).finish(DEADLINE);
    assert_eq!(out.code(), 0, "restored:\n{}\n{}", out.stdout, out.stderr);
    assert_eq!(out.stdout.matches("DEV OK").count(), 4, "{}", out.stdout);
}

/// Boot twice on `plugins` (testdev writes a register on each boot, which
/// must read fresh after the reboot); returns ferry's stderr.
fn reboot_with_testdev(plugins: &str) -> String {
    let cmdline = "boot dev-check=0x10:0 dev-write=0x10:0x33 dev-check=0x10:0x33 reboot-until=2 exit=0";
    let run = Running::new(spawn_ferry_env(
        &["run", "--plugins", plugins, "--machine", &reboot_machine(), "--cmdline", cmdline],
        &[("FERRY_LOG", "info")],
    ))
    .finish(DEADLINE);
    assert_eq!(run.code(), 0, "stdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("BOOT 2"), "{}", run.stdout);
    assert_eq!(
        run.stdout.matches("DEV OK").count(),
        4,
        "the register reads fresh after the reboot:\n{}",
        run.stdout
    );
    run.stderr
}

#[test]
fn at_a_reboot_a_1_0_plugin_is_recreated_and_a_1_1_plugin_resets_itself() {
    if !kvm_or_skip("at_a_reboot_a_1_0_plugin_is_recreated_and_a_1_1_plugin_resets_itself") {
        return;
    }
    let old = reboot_with_testdev(&plugins());
    assert!(
        old.contains("device dev0 (testdev, plugin-api 1.0.0) cannot reset itself: recreated from its machine-type configuration"),
        "{old}"
    );
    let lib = fixture_plugin_with("testdev", &["v3"]);
    let dir = plugin_dir_copy("api-current");
    std::fs::copy(&lib, dir.path().join("libtestdev.so")).expect("install testdev");
    let new = reboot_with_testdev(&dir.path().display().to_string());
    assert!(!new.contains("recreated"), "every plugin of this build resets itself:\n{new}");
    assert!(new.contains("the guest rebooted"), "{new}");
}
