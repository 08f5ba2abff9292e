//! Bad input gets a clear one-line error and a non-zero exit, before any
//! vCPU runs.

use std::path::Path;

use ferry_tests::{
    ferry, fixture_plugin, plugin_dir_copy, spawn_ferry_env, Finished, Running, TempDir, DEADLINE,
};

/// ferry failed with exactly one line on stderr that contains every
/// fragment, and the guest never ran.
fn assert_refused(run: &Finished, fragments: &[&str]) {
    assert_ne!(run.code(), 0, "ferry should fail; stdout:\n{}", run.stdout);
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected, got:\n{}", run.stderr);
    assert!(lines[0].starts_with("ferry: error: "), "{}", lines[0]);
    for f in fragments {
        assert!(lines[0].contains(f), "'{f}' missing from: {}", lines[0]);
    }
    assert!(lines[0].matches("(os error").count() <= 1, "the cause is named once: {}", lines[0]);
    assert!(!run.stdout.contains("FERRY-GUEST"), "the guest ran:\n{}", run.stdout);
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write file");
    p.display().to_string()
}

#[test]
fn missing_kernel_file() {
    let run = ferry(&["run", "--kernel", "/nonexistent/vmlinux"], DEADLINE);
    assert_refused(
        &run,
        &["cannot read kernel /nonexistent/vmlinux: No such file or directory (os error 2)"],
    );
}

#[test]
fn missing_files_are_named_once_with_their_cause_once() {
    for (args, what) in [
        (vec!["run", "--machine", "/nonexistent/m.toml"], "cannot read machine type /nonexistent/m.toml"),
        (vec!["run", "--initramfs", "/nonexistent/initrd"], "cannot read initramfs /nonexistent/initrd"),
        (
            vec!["run", "--plugins", "/nonexistent/plugins"],
            "cannot read plugin directory /nonexistent/plugins",
        ),
        (vec!["run", "--restore", "/nonexistent/vm.snap"], "snapshot /nonexistent/vm.snap: cannot open"),
        (vec!["inspect", "/nonexistent/vm.snap"], "cannot open /nonexistent/vm.snap"),
    ] {
        let run = ferry(&args, DEADLINE);
        assert_refused(&run, &[&format!("{what}: No such file or directory (os error 2)")]);
    }
}

#[test]
fn kernel_that_is_not_an_elf() {
    let dir = TempDir::new("notelf");
    let k = write(dir.path(), "kernel.txt", "hello, I am plain text and no kernel\n");
    let run = ferry(&["run", "--kernel", &k], DEADLINE);
    assert_refused(&run, &[&k, "is not bootable (neither an ELF with a PVH entry note nor a bzImage)"]);
}

#[test]
fn elf_without_a_pvh_note() {
    // A host program: a real ELF, but no PVH entry note.
    let run = ferry(&["run", "--kernel", "/bin/true"], DEADLINE);
    assert_refused(
        &run,
        &["/bin/true", "an ELF without a PVH entry note (Xen note XEN_ELFNOTE_PHYS32_ENTRY)"],
    );
}

/// A machine type whose one device needs plugin `plugin`.
fn machine_needing(dir: &Path, plugin: &str) -> String {
    write(
        dir,
        "m.toml",
        &format!("name = \"needs-{plugin}\"\n[[device]]\nid = \"dev0\"\nplugin = \"{plugin}\"\n"),
    )
}

/// `ferry run` on a copy of the plugin directory holding `lib` as `file`,
/// with a machine type needing `plugin`.
fn run_needing(lib: &Path, file: &str, plugin: &str) -> Finished {
    let dir = plugin_dir_copy("badplugin");
    std::fs::copy(lib, dir.path().join(file)).expect("copy the library");
    let m = machine_needing(dir.path(), plugin);
    let plugins = dir.path().display().to_string();
    ferry(&["run", "--plugins", &plugins, "--machine", &m], DEADLINE)
}

fn libm() -> &'static Path {
    ["/lib/x86_64-linux-gnu/libm.so.6", "/usr/lib/x86_64-linux-gnu/libm.so.6"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
        .expect("libm on the host")
}

#[test]
fn shared_library_that_is_not_a_plugin() {
    // In the file named for the plugin the machine type needs.
    let run = run_needing(libm(), "libm.so", "m");
    assert_refused(&run, &["libm.so is not a Ferry plugin"]);
    // Or anywhere in the directory, when the plugin is in no file named
    // for it: every library is opened then.
    let run = run_needing(libm(), "libm.so", "virtio-gpu");
    assert_refused(&run, &["libm.so is not a Ferry plugin"]);
}

#[test]
fn a_broken_library_no_machine_type_names_is_not_opened_by_run_but_ferry_plugins_reports_it() {
    let dir = plugin_dir_copy("unnamed");
    std::fs::copy(libm(), dir.path().join("libm.so")).expect("copy libm");
    let plugins = dir.path().display().to_string();
    let run = ferry(&["run", "--plugins", &plugins], DEADLINE);
    assert_eq!(
        run.code(),
        0,
        "the default machine type's plugins are all in their own files:\n{}",
        run.stderr
    );
    assert!(run.stdout.contains("FERRY-GUEST READY"), "{}", run.stdout);
    let list = ferry(&["plugins", "--plugins", &plugins], DEADLINE);
    assert_refused(&list, &["libm.so is not a Ferry plugin"]);
}

#[test]
fn run_says_how_many_libraries_it_opened() {
    let dir = plugin_dir_copy("opened");
    let plugins = dir.path().display().to_string();
    let run = Running::new(spawn_ferry_env(&["run", "--plugins", &plugins], &[("FERRY_LOG", "info")]))
        .finish(DEADLINE);
    assert_eq!(run.code(), 0, "{}", run.stderr);
    let installed = std::fs::read_dir(dir.path()).expect("dir").count();
    let line = run.stderr.lines().find(|l| l.contains("plugins: opened")).unwrap_or_default().to_string();
    // pc-2's four devices' plugins; the virtio ones stay closed.
    assert!(line.contains("opened 4 libraries from"), "{line}\n{}", run.stderr);
    assert!(installed > 4, "the directory holds more: {installed}");
}

#[test]
fn plugin_built_against_an_older_plugin_api() {
    let run = run_needing(&fixture_plugin("old-api-plugin"), "old-api-plugin.so", "old-api-plugin");
    let ours = format!("plugin-api {}", ferry_plugin_api::PLUGIN_API_VERSION);
    assert_refused(&run, &["old-api-plugin.so", "plugin-api 0.0.9", &ours]);
}

#[test]
fn plugin_built_against_another_major_plugin_api() {
    let run = run_needing(&fixture_plugin("future-api-plugin"), "future-api-plugin.so", "future-api-plugin");
    let ours = format!("plugin-api {}", ferry_plugin_api::PLUGIN_API_VERSION);
    assert_refused(&run, &["future-api-plugin.so", "built against plugin-api 2.0.0", &ours]);
}

#[test]
fn plugin_built_against_a_newer_minor_that_needs_what_this_core_lacks() {
    let run = run_needing(&fixture_plugin("newer-api-plugin"), "libnewer_api_plugin.so", "newer-api-plugin");
    let ours = format!("plugin-api {}", ferry_plugin_api::PLUGIN_API_VERSION);
    assert_refused(
        &run,
        &["libnewer_api_plugin.so", "built against plugin-api 1.99.0", "needs Host::teleport", &ours],
    );
}

#[test]
fn plugin_whose_plugin_api_layout_differs() {
    let run =
        run_needing(&fixture_plugin("skewed-api-plugin"), "libskewed_api_plugin.so", "skewed-api-plugin");
    assert_refused(
        &run,
        &["libskewed_api_plugin.so", "types do not match", "expected RResult, found RString"],
    );
    assert!(run.stderr.len() < 400, "short message, not a layout dump: {}", run.stderr.len());
}

#[test]
fn machine_type_naming_a_plugin_that_is_not_installed() {
    let dir = TempDir::new("noplugin");
    let m = write(
        dir.path(),
        "m.toml",
        "name = \"needs-gpu\"\n[[device]]\nid = \"gpu0\"\nplugin = \"virtio-gpu\"\n",
    );
    let run = ferry(&["run", "--machine", &m], DEADLINE);
    assert_refused(&run, &["needs-gpu", "device gpu0", "plugin 'virtio-gpu'", "not installed"]);
}

#[test]
fn malformed_toml_names_line_and_field() {
    let dir = TempDir::new("badtoml");
    let m = write(
        dir.path(),
        "m.toml",
        "name = \"x\"\ncpus = 1\nmemory = 256\n[[device]]\nid = \"com1\"\nplugin = \"serial-16550\"\n",
    );
    let run = ferry(&["run", "--machine", &m], DEADLINE);
    assert_refused(&run, &["m.toml", "line 3", "memory = 256", "expected a string"]);

    let m2 = write(dir.path(), "m2.toml", "name = \"x\"\n[[device]\nid = 3\n");
    let run = ferry(&["run", "--machine", &m2], DEADLINE);
    assert_refused(&run, &["m2.toml", "line 2"]);
}

#[test]
fn unknown_property() {
    let dir = TempDir::new("unknownprop");
    let m = write(
        dir.path(),
        "m.toml",
        "name = \"x\"\n[[device]]\nid = \"com1\"\nplugin = \"serial-16550\"\nproperties = { port = 0x3f8, baud = 9600 }\n",
    );
    let run = ferry(&["run", "--machine", &m], DEADLINE);
    assert_refused(&run, &["device com1", "unknown property 'baud'", "serial-16550", "known: port"]);
}

#[test]
fn two_devices_claiming_overlapping_ports() {
    let dir = TempDir::new("overlap");
    let m = write(
        dir.path(),
        "m.toml",
        "name = \"x\"\n\
         [[device]]\nid = \"com1\"\nplugin = \"serial-16550\"\nproperties = { port = 0x3f8, input = \"none\" }\n\
         [[device]]\nid = \"com2\"\nplugin = \"serial-16550\"\nproperties = { port = 0x3fc, input = \"none\" }\n",
    );
    let run = ferry(&["run", "--machine", &m], DEADLINE);
    assert_refused(
        &run,
        &["device com1 (serial-16550)", "device com2 (serial-16550)", "I/O ports 0x3fc-0x3ff"],
    );
}

#[test]
fn more_memory_than_the_host_has() {
    let run = ferry(&["run", "--memory", "64T"], DEADLINE);
    assert_refused(&run, &["memory 64 TiB", "more than this host can give"]);
}

#[test]
fn unknown_machine_type() {
    let run = ferry(&["run", "--machine", "pc-99"], DEADLINE);
    assert_refused(&run, &["unknown machine type 'pc-99'", "pc-1"]);
}

#[test]
fn a_second_ferry_does_not_take_over_a_live_api_socket() {
    if !ferry_tests::kvm_or_skip("a_second_ferry_does_not_take_over_a_live_api_socket") {
        return;
    }
    let dir = TempDir::new("apisock");
    let socket = dir.path().join("vm.sock");
    let s = socket.display().to_string();
    let mut first = ferry_tests::Running::new(ferry_tests::spawn_ferry(&[
        "run",
        "--api-socket",
        &s,
        "--cmdline",
        "ticks=0",
    ]));
    assert!(ferry_tests::wait_for_path(&socket, DEADLINE));
    first.wait_line("TICK", DEADLINE).expect("the first guest ticks");
    let second = ferry(&["run", "--api-socket", &s, "--cmdline", "ready exit=0"], DEADLINE);
    assert_refused(&second, &[&format!("--api-socket {s}: another process is listening on it")]);
    let info = ferry_tests::ctl(&socket, &["info"]);
    assert!(info.contains("\"state\": \"running\""), "the first VM still answers: {info}");
    ferry_tests::ctl(&socket, &["shutdown"]);
    assert_eq!(first.finish(DEADLINE).code(), 0);
    assert!(!socket.exists(), "the first ferry removed its socket on the way out");

    // A socket nothing answers on (its ferry died) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind"));
    assert!(socket.exists());
    let mut third = ferry_tests::Running::new(ferry_tests::spawn_ferry(&[
        "run",
        "--api-socket",
        &s,
        "--cmdline",
        "ticks=0",
    ]));
    third.wait_line("TICK", DEADLINE).expect("starts over a stale socket");
    assert!(ferry_tests::ctl(&socket, &["info"]).contains("running"));
}

#[test]
fn a_second_incoming_ferry_does_not_take_over_a_waiting_one() {
    if !ferry_tests::kvm_or_skip("a_second_incoming_ferry_does_not_take_over_a_waiting_one") {
        return;
    }
    let dir = TempDir::new("insock");
    let path = dir.path().join("in.sock");
    let uri = format!("unix:{}", path.display());
    let waiting = ferry_tests::Running::new(ferry_tests::spawn_ferry(&["run", "--incoming", &uri]));
    assert!(ferry_tests::wait_for_path(&path, DEADLINE));
    let second = ferry(&["run", "--incoming", &uri], DEADLINE);
    assert_refused(&second, &[&format!("--incoming {}: another process is listening on it", path.display())]);
    // The first one still gets the migration.
    let socket = dir.path().join("src.sock");
    let s = socket.display().to_string();
    let mut src = ferry_tests::Running::new(ferry_tests::spawn_ferry(&[
        "run",
        "--api-socket",
        &s,
        "--cmdline",
        "ticks=0",
    ]));
    assert!(ferry_tests::wait_for_path(&socket, DEADLINE));
    src.wait_line("TICK", DEADLINE).expect("ticks");
    let (ok, text) = ferry_tests::migrate(&socket, &uri, &[]);
    assert!(ok, "the waiting ferry takes the guest: {text}");
    let mut waiting = waiting;
    waiting.wait_line("TICK", DEADLINE).expect("the guest runs on the first incoming ferry");
}

#[test]
fn the_vcpu_range_is_stated_and_enforced_by_the_parser() {
    let max = ferry::boot::mptable::MAX_CPUS;
    let help = ferry(&["run", "--help"], DEADLINE);
    assert!(help.stdout.contains(&format!("Number of vCPUs, 1 to {max}")), "{}", help.stdout);
    for bad in ["0".to_string(), (max + 1).to_string()] {
        let run = ferry(&["run", "--cpus", &bad], DEADLINE);
        assert_eq!(run.code(), 2, "a usage error");
        assert!(run.stderr.contains(&format!("{bad} is not in 1..={max}")), "{}", run.stderr);
        assert!(!run.stdout.contains("FERRY-GUEST"));
    }
}

#[test]
fn the_plugin_table_stays_aligned() {
    let run = ferry(&["plugins"], DEADLINE);
    assert_eq!(run.code(), 0, "{}", run.stderr);
    let lines: Vec<&str> = run.stdout.lines().collect();
    let file_at = lines[0].find("FILE").expect("a FILE column");
    assert!(
        lines.len() > 2 && lines.iter().any(|l| l.contains("load v1+")),
        "a plugin with several versions: {}",
        run.stdout
    );
    for l in &lines[1..] {
        assert_eq!(l.find('/'), Some(file_at), "FILE lines up:\n{}", run.stdout);
    }
}
