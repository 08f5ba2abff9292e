//! The guest's CPU in the compatibility contract, on real guests: a guest
//! on the portable model (pc-2's x86-64-v1@1) records its model, vendor,
//! TSC and named MSRs, and snapshots, restores and migrates; a destination
//! that looks like another host (`FERRY_TEST_HOST_CPU`: a CPUID bit or an
//! MSR missing, another vendor, another TSC frequency) refuses a restore
//! before anything is created and a live migration in its plan while the
//! source keeps running, with the line `ferry compat` prints too; a model
//! the host cannot give is refused at boot naming the feature.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use ferry::cpu::{
    cpuid::{self, Reg, AMD, INTEL},
    models::CpuModel,
};
use ferry_tests::{
    ctl, ferry_bin, free_port, host_cpu, kvm_or_skip, migrate, skip, spawn_ferry, spawn_ferry_env,
    start_with_api, wait_for_path, wait_tick, Running, TempDir, DEADLINE,
};

const PORTABLE: &str = "x86-64-v1@1";

/// The vendor this host is not.
fn other_vendor() -> &'static str {
    if host_cpu().vendor == INTEL {
        AMD
    } else {
        INTEL
    }
}

/// A TSC frequency 1% off this host's.
fn other_tsc_khz() -> u32 {
    let khz = host_cpu().tsc_khz.expect("KVM_GET_TSC_KHZ works here");
    khz + khz / 100
}

/// A ticking guest on the default machine type (pc-2) with an API socket,
/// logging what it does (so a test can tell it never paused).
fn source(dir: &TempDir) -> (Running, PathBuf) {
    start_with_api(dir.path(), "src", &["--cmdline", "ticks=0"], &[("FERRY_LOG", "info")])
}

/// One snapshot of a ticking pc-2 guest for the whole run, and what the
/// guest printed before it.
fn portable_snapshot() -> &'static (TempDir, PathBuf, String) {
    static SNAP: OnceLock<(TempDir, PathBuf, String)> = OnceLock::new();
    SNAP.get_or_init(|| {
        let dir = TempDir::new("cpu-snap");
        let (mut vm, socket) = source(&dir);
        while wait_tick(&mut vm) < 3 {}
        let snap = dir.path().join("portable.snap");
        ctl(&socket, &["pause"]);
        ctl(&socket, &["snapshot", &snap.display().to_string()]);
        ctl(&socket, &["shutdown"]);
        let out = vm.finish(DEADLINE);
        (dir, snap, out.stdout)
    })
}

fn inspect_json(snap: &Path) -> serde_json::Value {
    let out = Command::new(ferry_bin()).arg("inspect").arg("--json").arg(snap).output().expect("inspect");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    serde_json::from_slice(&out.stdout).expect("inspect JSON")
}

#[test]
fn a_portable_guest_records_its_cpu_by_name_and_restores() {
    if !kvm_or_skip("a_portable_guest_records_its_cpu_by_name_and_restores") {
        return;
    }
    let (_, snap, before) = portable_snapshot();
    let host = host_cpu();
    let report = inspect_json(snap);
    let cpu = &report["cpu"];
    assert_eq!(cpu["model"], PORTABLE);
    assert_eq!(cpu["vendor"], host.vendor.as_str(), "the model runs with its host's vendor");
    assert_eq!(cpu["tsc_khz"].as_u64(), host.tsc_khz.map(u64::from));
    assert_eq!(cpu["brand"], "Ferry x86-64-v1@1 virtual CPU");
    let msrs = cpu["msrs"].as_array().expect("MSRs");
    assert!(msrs.iter().any(|m| m["index"] == 0x10 && m["name"] == "IA32_TSC"), "{msrs:?}");
    assert!(msrs.iter().all(|m| m["catalogued"] == true), "nothing outside the catalogue: {msrs:?}");
    assert!(!msrs.iter().any(|m| m["index"] == 0x3a), "no IA32_FEATURE_CONTROL without VMX");

    // The CPUID the stream carries is the model's, whatever this host has.
    let recorded: Vec<cpuid::CpuidEntry> =
        serde_json::from_value(report["manifest"]["cpuid"].clone()).expect("CPUID entries");
    let model = CpuModel::parse(PORTABLE).expect("model").guest_cpuid(host, 1).expect("this host runs it");
    assert_eq!(recorded, model);
    assert_eq!(cpuid::value(&recorded, 1, 0, Reg::Ecx), 1 << 31, "no feature beyond the baseline");

    let text = Command::new(ferry_bin()).arg("inspect").arg(snap).output().expect("inspect");
    let text = String::from_utf8_lossy(&text.stdout);
    let khz = host.tsc_khz.unwrap_or(0);
    assert!(text.contains(&format!("cpu: {PORTABLE} on {}, TSC {khz} kHz", host.vendor)), "{text}");
    assert!(text.contains("MSR 0x10 IA32_TSC, "), "{text}");

    let mut restored = Running::new(spawn_ferry(&["run", "--restore", &snap.display().to_string()]));
    wait_tick(&mut restored);
    ferry_tests::ticks_carry_on(before, &restored.seen()).expect("the restored guest carries on");
}

#[test]
fn the_guest_sees_its_model_where_this_kvm_lets_it() {
    if !kvm_or_skip("the_guest_sees_its_model_where_this_kvm_lets_it") {
        return;
    }
    let dir = TempDir::new("cpu-view");
    let socket = dir.path().join("view.sock");
    let s = socket.display().to_string();
    let leaves = [0u32, 1, 7, 0x4000_0000, 0x4000_0001, 0x8000_0000, 0x8000_0001, 0x8000_0002, 0x8000_0008];
    let mut cmdline: Vec<String> = leaves.iter().map(|l| format!("cpuid={l:#x}")).collect();
    cmdline.push("ticks=0".into());
    let mut vm = Running::new(spawn_ferry(&["run", "--api-socket", &s, "--cmdline", &cmdline.join(" ")]));
    assert!(wait_for_path(&socket, DEADLINE));
    let mut seen = Vec::new();
    for _ in leaves {
        seen.push(vm.wait_line("CPUID", DEADLINE).expect("a CPUID line"));
    }
    // Calibrate: which registers does this KVM hold other than ferry set?
    let info: serde_json::Value = serde_json::from_str(&ctl(&socket, &["info"])).expect("info");
    let rewrote: Vec<String> = info["cpu"]["kvm_rewrote"]
        .as_array()
        .expect("kvm_rewrote")
        .iter()
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    ctl(&socket, &["shutdown"]);
    vm.finish(DEADLINE);
    let model = CpuModel::parse(PORTABLE).expect("model").guest_cpuid(host_cpu(), 1).expect("runs here");
    let (mut checked, mut skipped) = (0, Vec::new());
    for (leaf, line) in leaves.iter().zip(&seen) {
        for (reg, name) in [(Reg::Eax, "eax"), (Reg::Ebx, "ebx"), (Reg::Ecx, "ecx"), (Reg::Edx, "edx")] {
            let got = line
                .split_whitespace()
                .find_map(|f| f.strip_prefix(&format!("{name}=0x")))
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .expect("a register in the guest's line");
            let want = cpuid::value(&model, *leaf, 0, reg);
            let label = format!("{}:{}", cpuid::leaf_label(*leaf, 0), reg.name());
            if rewrote.iter().any(|r| r.starts_with(&format!("{label} "))) {
                skipped.push(format!("{label} set {want:#010x}, the guest reads {got:#010x}"));
                continue;
            }
            assert_eq!(got, want, "{label} as the guest sees it:\n{line}");
            checked += 1;
        }
    }
    if !skipped.is_empty() {
        skip(
            &format!("the guest's view of {} CPUID register(s)", skipped.len()),
            &format!("this KVM holds other values than ferry set: {}", skipped.join("; ")),
        );
    }
    assert!(checked >= 20, "most of the model is visible as set ({checked} registers checked)");
}

/// A restore of the portable snapshot on a host disguised by `disguise`:
/// refused, with `line`, before anything is created.
fn restore_is_refused(disguise: &str, line: &str) {
    let (dir, snap, _) = portable_snapshot();
    let socket = dir.path().join(format!("refused-{}.sock", free_port()));
    let args =
        ["run", "--restore", &snap.display().to_string(), "--api-socket", &socket.display().to_string()];
    let out = Running::new(spawn_ferry_env(&args, &[("FERRY_TEST_HOST_CPU", disguise)])).finish(DEADLINE);
    assert_ne!(out.code(), 0, "{}", out.stderr);
    assert!(
        out.stderr.contains("this host cannot run the guest's CPU; nothing was created"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains(line), "want `{line}` in:\n{}", out.stderr);
    assert!(!socket.exists(), "no API socket: nothing was created");
    assert!(out.stdout.trim().is_empty(), "the guest never ran: {}", out.stdout);
}

/// The `cpu: REFUSED:` lines of a plan, each once.
fn cpu_lines(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for l in text.lines().map(str::trim).filter(|l| l.starts_with("cpu: REFUSED: ")) {
        if !out.iter().any(|x| x == l) {
            out.push(l.to_string());
        }
    }
    out
}

/// `ferry plugins --manifest`, with `disguise` if any, into `path`.
fn manifest(path: &Path, disguise: Option<&str>) {
    let mut cmd = Command::new(ferry_bin());
    cmd.args(["plugins", "--manifest"]);
    if let Some(d) = disguise {
        cmd.env("FERRY_TEST_HOST_CPU", d);
    }
    let out = cmd.output().expect("ferry plugins --manifest");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(path, out.stdout).expect("write manifest");
}

/// A live migration of a ticking pc-2 guest to a destination disguised by
/// `disguise`: refused in the plan with `line` while the source keeps
/// ticking; `ferry compat` between the two hosts' manifests prints the
/// same line; then the guest moves to a fitting destination.
fn migration_is_refused(disguise: &str, line: &str) {
    let dir = TempDir::new("cpu-mig");
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let dst =
        Running::new(spawn_ferry_env(&["run", "--incoming", &uri], &[("FERRY_TEST_HOST_CPU", disguise)]));
    ferry_tests::wait_for_incoming(&uri);
    let (mut src, socket) = source(&dir);
    let before = wait_tick(&mut src);
    let (ok, live) = migrate(&socket, &uri, &[]);
    assert!(!ok, "refused: {live}");
    let live_lines = cpu_lines(&live);
    assert!(live_lines.iter().any(|l| l.contains(line)), "want `{line}` in:\n{live}");
    assert!(live.contains("the guest keeps running here"), "{live}");
    let status = ctl(&socket, &["info"]);
    assert!(status.contains("\"state\": \"running\""), "{status}");
    let t = wait_tick(&mut src);
    assert!(wait_tick(&mut src) > t && t > before, "the source guest keeps ticking");
    let dst_out = dst.finish(DEADLINE);
    assert_ne!(dst_out.code(), 0, "the disguised destination exits non-zero");

    let (a, b) = (dir.path().join("a.json"), dir.path().join("b.json"));
    manifest(&a, None);
    manifest(&b, Some(disguise));
    let offline = Command::new(ferry_bin())
        .arg("compat")
        .arg("--from")
        .arg(&a)
        .arg("--to")
        .arg(&b)
        .output()
        .expect("ferry compat");
    assert!(!offline.status.success());
    assert_eq!(cpu_lines(&String::from_utf8_lossy(&offline.stdout)), live_lines, "offline and live agree");

    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let fitting = Running::new(spawn_ferry(&["run", "--incoming", &uri]));
    ferry_tests::wait_for_incoming(&uri);
    let (ok, text) = migrate(&socket, &uri, &[]);
    assert!(ok, "a later migration to a fitting host succeeds:\n{text}");
    let src_out = src.finish(DEADLINE);
    let paused: Vec<&str> = src_out.stderr.lines().filter(|l| l.contains("stop-and-copy: paused")).collect();
    assert_eq!(
        paused.len(),
        1,
        "the guest paused once, for the migration that went ahead:\n{}",
        src_out.stderr
    );
    let mut fitting = fitting;
    wait_tick(&mut fitting);
    ferry_tests::ticks_carry_on(&src_out.stdout, &fitting.seen())
        .expect("the guest carries on at the destination");
}

#[test]
fn a_cpuid_feature_missing_on_the_destination_is_refused_up_front() {
    if !kvm_or_skip("a_cpuid_feature_missing_on_the_destination_is_refused_up_front") {
        return;
    }
    let line = "CPUID.01H:EDX.sse2 [bit 26]: the guest's CPU has it; this host's KVM does not offer it";
    restore_is_refused("hide-cpuid=sse2", line);
    migration_is_refused("hide-cpuid=sse2", line);
}

#[test]
fn an_msr_missing_on_the_destination_is_refused_up_front() {
    if !kvm_or_skip("an_msr_missing_on_the_destination_is_refused_up_front") {
        return;
    }
    let line = format!("MSR 0xc0000082 LSTAR: this host's KVM does not support it ({})", host_cpu().vendor);
    restore_is_refused("hide-msr=0xc0000082", &line);
    migration_is_refused("hide-msr=0xc0000082", &line);
}

#[test]
fn another_vendor_is_refused_up_front() {
    if !kvm_or_skip("another_vendor_is_refused_up_front") {
        return;
    }
    let disguise = format!("vendor={}", other_vendor());
    let restore_line = format!(
        "CPU vendor: the snapshot was written with cpu={PORTABLE} on {}; this host is {}",
        host_cpu().vendor,
        other_vendor()
    );
    restore_is_refused(&disguise, &restore_line);
    let live_line = format!(
        "CPU vendor: the source runs it with cpu={PORTABLE} on {}; this host is {}",
        host_cpu().vendor,
        other_vendor()
    );
    migration_is_refused(&disguise, &live_line);
}

#[test]
fn another_tsc_frequency_without_scaling_is_refused_up_front() {
    if !kvm_or_skip("another_tsc_frequency_without_scaling_is_refused_up_front") {
        return;
    }
    let (khz, other) = (host_cpu().tsc_khz.unwrap_or(0), other_tsc_khz());
    let disguise = format!("tsc-khz={other},tsc-scaling=off");
    let ppm = (i64::from(other) - i64::from(khz)) * 1_000_000 / i64::from(khz);
    let line =
        format!("at {khz} kHz; this host's runs at {other} kHz ({ppm:+} ppm, more than 250) and its KVM cannot scale it");
    restore_is_refused(&disguise, &line);
    migration_is_refused(&disguise, &line);
}

#[test]
fn booting_a_model_the_host_cannot_give_is_refused_naming_the_feature() {
    if !kvm_or_skip("booting_a_model_the_host_cannot_give_is_refused_naming_the_feature") {
        return;
    }
    let out = Running::new(spawn_ferry_env(&["run"], &[("FERRY_TEST_HOST_CPU", "hide-cpuid=sse2")]))
        .finish(DEADLINE);
    assert_ne!(out.code(), 0);
    let errors: Vec<&str> = out.stderr.lines().filter(|l| l.starts_with("ferry: error:")).collect();
    assert_eq!(
        errors,
        ["ferry: error: cpu model x86-64-v1@1: this host's KVM does not offer CPUID.01H:EDX.sse2 [bit 26]"],
        "{}",
        out.stderr
    );
    assert!(out.stdout.trim().is_empty(), "nothing ran: {}", out.stdout);

    // The richest model, undisguised: it boots where this host's KVM offers
    // it, and is refused naming what it lacks where not.
    let dir = TempDir::new("cpu-v3");
    let machine = dir.path().join("v3.toml");
    let pc2 = std::fs::read_to_string(ferry_tests::repo_root().join("machines/pc-2.toml")).expect("pc-2");
    std::fs::write(
        &machine,
        pc2.replace("name = \"pc-2\"", "name = \"v3\"").replace(PORTABLE, "x86-64-v3@1"),
    )
    .expect("machine type");
    let args = ["run", "--machine", &machine.display().to_string(), "--cmdline", "ready exit=0"];
    let out = Running::new(spawn_ferry(&args)).finish(DEADLINE);
    match CpuModel::parse("x86-64-v3@1").expect("model").guest_cpuid(host_cpu(), 1) {
        Ok(_) => assert_eq!(out.code(), 0, "this host offers x86-64-v3: {}", out.stderr),
        Err(missing) => {
            assert_ne!(out.code(), 0);
            let want = format!(
                "ferry: error: cpu model x86-64-v3@1: this host's KVM does not offer {}",
                missing.iter().map(|p| p.subject()).collect::<Vec<_>>().join(", ")
            );
            assert_eq!(out.stderr.lines().last(), Some(want.as_str()), "{}", out.stderr);
        }
    }
}

#[test]
fn compat_names_the_models_every_host_runs() {
    if !kvm_or_skip("compat_names_the_models_every_host_runs") {
        return;
    }
    let dir = TempDir::new("cpu-models");
    let (a, b, c) = (dir.path().join("a.json"), dir.path().join("b.json"), dir.path().join("c.json"));
    manifest(&a, None);
    manifest(&b, Some("hide-cpuid=sse2"));
    manifest(&c, Some(&format!("vendor={}", other_vendor())));
    let run = |hosts: &[&Path]| {
        let out =
            Command::new(ferry_bin()).arg("compat").arg("--cpu-models").args(hosts).output().expect("compat");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, text) = run(&[&a, &a]);
    assert!(ok, "{text}");
    assert!(text.contains(&format!("{PORTABLE}: runs on every host")), "{text}");
    assert!(text.contains("give a guest that moves among these hosts: x86-64-v1@1"), "{text}");

    let (ok, text) = run(&[&a, &b]);
    assert!(!ok, "{text}");
    let b_name = b.display().to_string();
    assert!(
        text.contains(&format!("{PORTABLE}: not on every host: {b_name} lacks CPUID.01H:EDX.sse2 [bit 26]")),
        "{text}"
    );
    assert!(text.contains("no CPU model lets a guest move among all of these hosts"), "{text}");

    let (ok, text) = run(&[&a, &c]);
    assert!(!ok, "{text}");
    assert!(text.contains("CPU vendor: the hosts mix vendors"), "{text}");
}

#[test]
fn a_snapshot_for_a_host_that_cannot_run_the_cpu_is_refused() {
    if !kvm_or_skip("a_snapshot_for_a_host_that_cannot_run_the_cpu_is_refused") {
        return;
    }
    let dir = TempDir::new("cpu-target");
    let target = dir.path().join("amd.json");
    manifest(&target, Some(&format!("vendor={}", other_vendor())));
    let (mut src, socket) = source(&dir);
    let before = wait_tick(&mut src);
    let snap = dir.path().join("for-other.snap");
    let out = Command::new(ferry_bin())
        .arg("ctl")
        .arg("--api-socket")
        .arg(&socket)
        .arg("snapshot")
        .arg(&snap)
        .arg("--target")
        .arg(&target)
        .output()
        .expect("ferry ctl snapshot");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("the target host cannot restore it: cpu: REFUSED: CPU vendor"), "{err}");
    assert!(!snap.exists() && !snap.with_extension("partial").exists(), "no file written");
    assert!(wait_tick(&mut src) > before, "the guest keeps running");
}
