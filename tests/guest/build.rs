//! Passes the linker script (absolute path, so `--manifest-path` builds from
//! any directory work) and forces a non-PIE static link: the image is loaded
//! at its link address by the VMM and nothing would apply PIE relocations.

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR is set by cargo");
    let target = std::env::var("TARGET").unwrap_or_default();
    if target == "x86_64-unknown-none" {
        println!("cargo:rustc-link-arg=-T{dir}/linker.ld");
        println!("cargo:rustc-link-arg=--no-pie");
        println!("cargo:rustc-link-arg=-static");
    }
    println!("cargo:rerun-if-changed=linker.ld");
    println!("cargo:rerun-if-changed=build.rs");
}
