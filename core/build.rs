//! Build-time inputs of the core:
//! - the machine types in `machines/*.toml`, built in;
//! - the test guest in `tests/guest`, built for `x86_64-unknown-none` and
//!   embedded as the default kernel.

use std::{env, fs, path::PathBuf, process::Command};

const GUEST_TARGET: &str = "x86_64-unknown-none";

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest.parent().expect("core/ sits in the workspace").to_path_buf();
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));

    embed_machines(&root, &out);
    build_guest(&root, &out);
}

fn embed_machines(root: &std::path::Path, out: &std::path::Path) {
    let dir = root.join("machines");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .expect("machines/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    let mut code = String::from("/// Built-in machine types: (file name, TOML text).\npub const BUILTIN_MACHINES: &[(&str, &str)] = &[\n");
    for f in files {
        let name = f.file_name().expect("file").to_string_lossy().to_string();
        code.push_str(&format!("    ({name:?}, include_str!({:?})),\n", f.display().to_string()));
    }
    code.push_str("];\n");
    fs::write(out.join("machines.rs"), code).expect("write machines.rs");
}

fn build_guest(root: &std::path::Path, out: &std::path::Path) {
    // FERRY_TEST_GUEST_DIR builds another copy of the guest sources (for
    // example a snapshot while tests/guest is being edited).
    println!("cargo:rerun-if-env-changed=FERRY_TEST_GUEST_DIR");
    let guest = env::var_os("FERRY_TEST_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("tests").join("guest"));
    for p in ["src", "Cargo.toml", "build.rs", "linker.ld"] {
        println!("cargo:rerun-if-changed={}", guest.join(p).display());
    }
    let target_dir = out.join("guest-target");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--release", "--target", GUEST_TARGET, "--manifest-path"])
        .arg(guest.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    // The outer build's flags are for the host target, not the guest.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "RUSTC_WORKSPACE_WRAPPER",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("run cargo for the test guest");
    if !status.success() {
        panic!(
            "building the test guest (tests/guest) failed; is the target installed? \
             run: rustup target add {GUEST_TARGET}"
        );
    }
    let elf = target_dir.join(GUEST_TARGET).join("release").join("ferry-test-guest");
    assert!(elf.is_file(), "test guest ELF missing at {}", elf.display());
    println!("cargo:rustc-env=FERRY_TEST_GUEST={}", elf.display());
}
