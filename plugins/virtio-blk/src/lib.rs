//! `virtio-blk`: a virtio block device backed by a raw image file.

#[cfg_attr(feature = "fuzzing", allow(dead_code))]
mod device;
mod state;

#[cfg(not(feature = "fuzzing"))]
ferry_plugin_api::export_plugin! {
    describe: device::describe,
    create: device::create,
}

/// The device as the descriptor-chain fuzz target drives it.
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    pub use crate::device::{fuzzing_block as block, Block};
}

#[cfg(all(test, not(feature = "fuzzing")))]
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
