//! vhost-user-blk: one qemu-storage-daemon exporting a 64 MiB image,
//! fronted by ferry (`vhost-user-blk`) and by QEMU 7.2 (`-chardev socket
//! -device vhost-user-blk-pci`, RAM in a shared memfd), beside ferry's own
//! virtio-blk on the same image, in one run: requests/s, VMM CPU per
//! request (and the daemon's), 4 KiB reads and writes, one request in
//! flight and 16. The table is `ferry_tests::blk_bench::vhost_table`.
//!
//! ```sh
//! cargo build --release --workspace && cargo bench -p ferry-tests --bench vhost_user_blk
//! ```
//!
//! `FERRY_BENCH_REQUESTS` (default 2000) and `FERRY_BENCH_ROUNDS` (default
//! 9) as for the virtio_blk benchmark.

use ferry_tests::{vhost::StorageDaemon, TempDir};

fn main() {
    let dir = TempDir::new("bench-vhost");
    let guest = dir.path().join("guest.elf");
    ferry_tests::write_test_guest(&guest);
    let image = ferry_tests::blk_bench::bench_image(dir.path());
    let socket = dir.path().join("blk.sock");
    let Some(daemon) = StorageDaemon::start(&image, &socket) else { return };
    ferry_tests::blk_bench::vhost_table(&guest, &image, &daemon.socket(), daemon.pid());
    println!("\nThe guest's instructions are emulated on hosts with a nested, emulating KVM; the");
    println!("guest-side driver cost is the same for every VMM, the difference is the VMM's.");
}
