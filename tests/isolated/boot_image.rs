//! `tests/boot_image.rs` again with every device in a device process of its
//! own: the harness starts each `ferry run` of a binary named `*_isolated`
//! with `--isolate all` (`ferry_tests::isolating`).

#[path = "../boot_image.rs"]
mod in_device_processes;
