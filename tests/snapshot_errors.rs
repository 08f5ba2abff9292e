//! Corrupt or incompatible snapshots are refused with an error that names
//! the section, before any vCPU runs, without a panic.

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
};

use ferry::migration::{
    manifest::Manifest,
    stream::{Kind, Reader, Writer},
};
use ferry_tests::{
    ctl, ferry, kvm_or_skip, plugin_dir_copy, spawn_ferry, wait_for_path, Finished, Running, TempDir,
    DEADLINE,
};

/// One good snapshot of a ticking guest, made once per test run.
fn good_snapshot() -> &'static Path {
    static SNAP: OnceLock<(TempDir, PathBuf)> = OnceLock::new();
    &SNAP
        .get_or_init(|| {
            let dir = TempDir::new("snaperr");
            let socket = dir.path().join("api.sock");
            let socket_arg = socket.display().to_string();
            let snap = dir.path().join("good.snap");
            let mut vm = Running::new(spawn_ferry(&[
                "run",
                "--api-socket",
                &socket_arg,
                "--cmdline",
                "pattern=4 ticks=0",
            ]));
            assert!(wait_for_path(&socket, DEADLINE));
            vm.wait_line("TICK 2", DEADLINE).expect("ticks");
            ctl(&socket, &["pause"]);
            ctl(&socket, &["snapshot", &snap.display().to_string()]);
            ctl(&socket, &["shutdown"]);
            vm.finish(DEADLINE);
            (dir, snap)
        })
        .1
}

struct Section {
    kind: Kind,
    id: String,
    version: u32,
    payload: Vec<u8>,
    header_at: u64,
}

/// Every section, and the memory runs with their data.
fn read_all(path: &Path) -> (Vec<Section>, Vec<(u64, Vec<u8>)>) {
    let bytes = std::fs::read(path).expect("read snapshot");
    let file = std::fs::File::open(path).expect("open");
    let mut r = Reader::new(&file).expect("good snapshot");
    let (mut sections, mut memory, mut ram) = (Vec::new(), Vec::new(), Vec::new());
    loop {
        let h = r.next_header().expect("header");
        let header_at = h.payload_at - h.id.len() as u64 - 24;
        if h.kind == Kind::End {
            break;
        }
        let payload = r.payload(&h).expect("payload");
        if h.kind == Kind::Manifest {
            let m: Manifest = ferry::state::decode(&payload).expect("manifest");
            ram = m.ram.clone();
        }
        if h.kind == Kind::Memory {
            let runs = r.runs(&h, &payload, &ram).expect("runs");
            for run in &runs {
                let at = run.data_at as usize;
                memory.push((run.gpa, bytes[at..at + run.pages as usize * 4096].to_vec()));
            }
            let end = runs.last().map(|l| l.data_at + l.pages * 4096).expect("a run");
            r.skip_to(end.div_ceil(4096) * 4096).expect("skip");
            continue;
        }
        sections.push(Section { kind: h.kind, id: h.id, version: h.version, payload, header_at });
    }
    (sections, memory)
}

fn write_all(path: &Path, sections: &[Section], memory: &[(u64, Vec<u8>)]) {
    let file = std::fs::File::create(path).expect("create");
    let mut w = Writer::new(std::io::BufWriter::new(file)).expect("writer");
    for s in sections {
        w.section(s.kind, &s.id, s.version, &s.payload).expect("section");
    }
    let runs: Vec<(u64, &[u8])> = memory.iter().map(|(g, d)| (*g, d.as_slice())).collect();
    w.memory(&runs).expect("memory");
    w.finish().expect("finish");
}

/// Restore `path` and expect a one-line refusal containing `fragments`.
fn refused(path: &Path, extra: &[&str], fragments: &[&str]) -> Finished {
    let p = path.display().to_string();
    let mut args = vec!["run", "--restore", &p];
    args.extend_from_slice(extra);
    let run = ferry(&args, DEADLINE);
    assert_ne!(run.code(), 0, "must be refused; stdout:\n{}", run.stdout);
    assert!(!run.stderr.contains("panicked"), "no panic: {}", run.stderr);
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {}", run.stderr);
    for f in fragments {
        assert!(lines[0].contains(f), "'{f}' missing from: {}", lines[0]);
    }
    assert!(run.stdout.is_empty(), "the guest never ran: {}", run.stdout);
    run
}

fn corrupt(tag: &str, f: impl FnOnce(&mut Vec<u8>)) -> (TempDir, PathBuf) {
    let dir = TempDir::new(tag);
    let path = dir.path().join("bad.snap");
    let mut bytes = std::fs::read(good_snapshot()).expect("read");
    f(&mut bytes);
    std::fs::write(&path, bytes).expect("write");
    (dir, path)
}

fn rewrite(tag: &str, f: impl FnOnce(&mut Vec<Section>)) -> (TempDir, PathBuf) {
    let dir = TempDir::new(tag);
    let path = dir.path().join("bad.snap");
    let (mut sections, memory) = read_all(good_snapshot());
    f(&mut sections);
    write_all(&path, &sections, &memory);
    (dir, path)
}

fn device_section(sections: &[Section], id: &str) -> usize {
    sections.iter().position(|s| s.kind == Kind::Device && s.id == id).expect("device section")
}

#[test]
fn the_good_snapshot_restores_and_rewriting_keeps_it_good() {
    if !kvm_or_skip("the_good_snapshot_restores_and_rewriting_keeps_it_good") {
        return;
    }
    // The control case: the tools below change only what each test says.
    let (_d, same) = rewrite("same", |_| {});
    let socket_dir = TempDir::new("goodapi");
    let socket = socket_dir.path().join("api.sock");
    let s = socket.display().to_string();
    let p = same.display().to_string();
    let mut vm = Running::new(spawn_ferry(&["run", "--restore", &p, "--api-socket", &s]));
    assert!(vm.wait_line("TICK 3", DEADLINE).is_some(), "the rewritten snapshot runs");
    assert!(wait_for_path(&socket, DEADLINE));
    ctl(&socket, &["shutdown"]);
    assert_eq!(vm.finish(DEADLINE).code(), 0);
}

#[test]
fn a_truncated_file_is_refused() {
    if !kvm_or_skip("a_truncated_file_is_refused") {
        return;
    }
    let (_d, path) = corrupt("trunc", |b| b.truncate(3000));
    refused(&path, &[], &["truncated"]);
}

#[test]
fn a_flipped_byte_fails_its_crc_naming_the_section() {
    if !kvm_or_skip("a_flipped_byte_fails_its_crc_naming_the_section") {
        return;
    }
    let (sections, _) = read_all(good_snapshot());
    let com1 = &sections[device_section(&sections, "com1")];
    let at = (com1.header_at + 24 + 4 + 3) as usize;
    let (_d, path) = corrupt("flip", |b| b[at] ^= 0x40);
    refused(&path, &[], &["(device com1): payload CRC mismatch"]);
}

#[test]
fn wrong_magic_and_a_future_format_are_refused() {
    if !kvm_or_skip("wrong_magic_and_a_future_format_are_refused") {
        return;
    }
    let (_d, path) = corrupt("magic", |b| b[0..8].copy_from_slice(b"QEMU\0VM\0"));
    refused(&path, &[], &["not a ferry snapshot"]);
    let (_d2, path) = corrupt("future", |b| {
        b[8..12].copy_from_slice(&7u32.to_le_bytes());
        let crc = crc32fast::hash(&b[..12]);
        b[12..16].copy_from_slice(&crc.to_le_bytes());
    });
    refused(&path, &[], &["stream format version 7 is newer than this ferry reads (1)"]);
}

#[test]
fn a_section_longer_than_the_file_is_refused() {
    if !kvm_or_skip("a_section_longer_than_the_file_is_refused") {
        return;
    }
    let (sections, _) = read_all(good_snapshot());
    let rtc = &sections[device_section(&sections, "rtc")];
    let h = rtc.header_at as usize;
    let id_len = rtc.id.len();
    let (_d, path) = corrupt("long", |b| {
        b[h + 8..h + 16].copy_from_slice(&(60u64 << 20).to_le_bytes());
        let mut covered = b[h..h + 20].to_vec();
        covered.extend_from_slice(&b[h + 24..h + 24 + id_len]);
        let c = crc32fast::hash(&covered);
        b[h + 20..h + 24].copy_from_slice(&c.to_le_bytes());
    });
    refused(&path, &[], &["truncated", "(device rtc) payload needs 62914560 bytes"]);
}

#[test]
fn an_unknown_device_id_is_refused() {
    if !kvm_or_skip("an_unknown_device_id_is_refused") {
        return;
    }
    let (_d, path) = rewrite("unknownid", |s| {
        let i = device_section(s, "rtc");
        s[i].id = "xyz".to_string();
    });
    refused(&path, &[], &["(device xyz): unknown device id"]);
}

#[test]
fn a_plugin_that_is_not_installed_is_named() {
    if !kvm_or_skip("a_plugin_that_is_not_installed_is_named") {
        return;
    }
    let plugins = plugin_dir_copy("noplugin-restore");
    std::fs::remove_file(plugins.path().join("libcmos_rtc.so")).expect("remove the RTC plugin");
    let dir = plugins.path().display().to_string();
    refused(good_snapshot(), &["--plugins", &dir], &["device rtc: plugin cmos-rtc 0.1.0 is not installed"]);
}

#[test]
fn a_state_version_newer_than_the_plugin_loads_is_refused() {
    if !kvm_or_skip("a_state_version_newer_than_the_plugin_loads_is_refused") {
        return;
    }
    let (_d, path) = rewrite("newer", |s| {
        let mut m: Manifest = ferry::state::decode(&s[0].payload).expect("manifest");
        for d in &mut m.devices {
            if d.id == "com1" {
                d.state_version = 3;
            }
        }
        s[0].payload = ferry::state::encode(&m).expect("encode");
        let i = device_section(s, "com1");
        s[i].version = 3;
    });
    refused(&path, &[], &["device com1 (serial-16550): state v3 is newer than this host loads (v1..v2)"]);
}
