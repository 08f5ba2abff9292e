//! `virtio-blk`: a virtio block device backed by a raw image file.

mod device;
mod state;

ferry_plugin_api::export_plugin! {
    describe: device::describe,
    create: device::create,
}

#[cfg(test)]
mod abi_tests {
    #[test]
    fn the_plugin_works_through_the_abi() {
        let path = std::env::temp_dir().join(format!("ferry-blk-abi-{}.img", std::process::id()));
        std::fs::write(&path, vec![0u8; 64 * 1024]).unwrap();
        let p = path.display().to_string();
        ferry_plugin_api::testing::check_through_abi(crate::__ferry_plugin_root_module, &[("path", &p)]);
        let _ = std::fs::remove_file(&path);
    }
}
