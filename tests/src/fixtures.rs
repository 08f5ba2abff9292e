//! What tests install and build: temporary directories, copies of the
//! plugin directory, fixture plugins built on demand, the test guest as a
//! file.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use crate::process::{bin_dir, ferry_bin, repo_root};

/// A fresh temporary directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Create one whose name includes `tag`.
    pub fn new(tag: &str) -> Self {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("ferry-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The installed plugin libraries (`lib*.so` beside ferry).
pub fn plugin_libs() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(bin_dir())
        .expect("bin dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "so"))
        .collect();
    v.sort();
    v
}

/// A plugin directory holding copies of the installed plugins.
pub fn plugin_dir_copy(tag: &str) -> TempDir {
    let dir = TempDir::new(tag);
    for lib in plugin_libs() {
        std::fs::copy(&lib, dir.path().join(lib.file_name().expect("name"))).expect("copy plugin");
    }
    dir
}

/// The host's current year (UTC), from `date`.
pub fn host_year() -> String {
    let out = Command::new("date").args(["-u", "+%Y"]).output().expect("run date");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Build a fixture plugin under tests/fixtures and return the path of its
/// library.
pub fn fixture_plugin(name: &str) -> PathBuf {
    fixture_plugin_with(name, &[])
}

/// Build a fixture plugin with cargo `features` into target/fixtures and
/// return its library, copied to a path of its own (cargo's JSON messages
/// name the artifact, fresh or rebuilt).
pub fn fixture_plugin_with(name: &str, features: &[&str]) -> PathBuf {
    let manifest = repo_root().join("tests").join("fixtures").join(name).join("Cargo.toml");
    build_plugin(&manifest, None, name, features)
}

/// Build one of the workspace's plugins with `features` (for example its
/// previous release) into target/fixtures; returns its library.
pub fn workspace_plugin_release(package: &str, features: &[&str]) -> PathBuf {
    build_plugin(&repo_root().join("Cargo.toml"), Some(package), package, features)
}

fn build_plugin(manifest: &Path, package: Option<&str>, name: &str, features: &[&str]) -> PathBuf {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let target = repo_root().join("target").join("fixtures");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-j2", "--quiet", "--message-format=json", "--manifest-path"])
        .arg(manifest)
        .arg("--target-dir")
        .arg(&target);
    if let Some(p) = package {
        cmd.arg("-p").arg(p);
    }
    if !features.is_empty() {
        cmd.arg("--features").arg(features.join(","));
    }
    let out = cmd.stderr(Stdio::inherit()).output().expect("run cargo for a fixture");
    assert!(out.status.success(), "building fixture {name} {features:?} failed");
    let artifact = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact")
        .filter(|v| v["target"]["kind"].as_array().is_some_and(|k| k.iter().any(|x| x == "cdylib")))
        .flat_map(|v| v["filenames"].as_array().cloned().unwrap_or_default())
        .filter_map(|f| f.as_str().map(PathBuf::from))
        .find(|p| p.extension().is_some_and(|x| x == "so"))
        .expect("the fixture's shared library");
    let tag = if features.is_empty() { String::new() } else { format!("-{}", features.join("-")) };
    let out = target.join(format!("{name}{tag}.so"));
    // Copied beside it and renamed over it: another test may be copying
    // the previous one right now, and must never see half a library.
    let part = target.join(format!("{name}{tag}.so.{}", std::process::id()));
    std::fs::copy(&artifact, &part).expect("copy fixture");
    std::fs::rename(&part, &out).expect("install fixture");
    out
}

/// Write ferry's bundled test guest (an ELF QEMU boots too) to `path`, for
/// a benchmark's side-by-side runs.
pub fn write_test_guest(path: &Path) {
    let ok = Command::new(ferry_bin()).args(["test-guest", "--output"]).arg(path).status();
    assert!(ok.is_ok_and(|s| s.success()), "build the workspace first (cargo build --release --workspace)");
}
