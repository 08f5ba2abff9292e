//! virtio-blk, ferry beside QEMU, on the same test guest and the same image
//! file, in one run: requests per second and host CPU time per request for
//! 4 KiB reads and writes, and the guest-measured notify-to-completion
//! latency. Ferry runs twice: the disk device in-process, and in a device
//! process of its own (`--isolate disk0`), whose CPU time is counted too.
//! The table is `ferry_tests::blk_bench::table` (the `isolation` benchmark
//! prints it too).
//!
//! ```sh
//! cargo build --release --workspace && cargo bench -p ferry-tests --bench virtio_blk
//! ```
//!
//! `FERRY_BENCH_REQUESTS` sets the request count (default 2000),
//! `FERRY_BENCH_ROUNDS` the rounds (default 9; every row is the median of
//! its rounds, with the range of requests/s beside it, and the rounds
//! interleave the VMMs). QEMU (Debian's `qemu-system-x86`) runs the same
//! guest ELF (`ferry test-guest`) with a modern-only virtio-blk-pci on the
//! same raw image; without it, only ferry's figures are printed.

use ferry_tests::TempDir;

fn main() {
    let dir = TempDir::new("bench-blk");
    let guest = dir.path().join("guest.elf");
    ferry_tests::write_test_guest(&guest);
    ferry_tests::blk_bench::table(&guest, dir.path());
    println!("\nThe guest's instructions are emulated on hosts with a nested, emulating KVM; the");
    println!("guest-side driver cost is the same for both VMMs, the difference is the VMM's.");
}
