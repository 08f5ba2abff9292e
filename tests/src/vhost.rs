//! vhost-user backends for tests: a qemu-storage-daemon exporting an image
//! as vhost-user-blk (Debian's qemu-system-common, which `.ci/run`
//! installs), started by the test and killed when dropped.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{skip, wait_for_path};

/// A qemu-storage-daemon exporting `image` on `socket`.
pub struct StorageDaemon {
    child: Child,
    socket: PathBuf,
}

impl StorageDaemon {
    /// Start one, waiting until its socket exists; None (said loudly) when
    /// qemu-storage-daemon is not installed. File locking is off, so two
    /// daemons (a migration's two hosts sharing storage) may export one
    /// image.
    pub fn start(image: &Path, socket: &Path) -> Option<Self> {
        let blockdev = format!("driver=file,node-name=disk,filename={},locking=off", image.display());
        let export = format!(
            "type=vhost-user-blk,id=e0,node-name=disk,addr.type=unix,addr.path={},writable=on,num-queues=1",
            socket.display()
        );
        let child = Command::new("qemu-storage-daemon")
            .args(["--blockdev", &blockdev, "--export", &export])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        match child {
            Ok(child) => {
                let d = StorageDaemon { child, socket: socket.to_path_buf() };
                assert!(wait_for_path(socket, Duration::from_secs(30)), "qemu-storage-daemon made no socket");
                Some(d)
            }
            Err(e) => {
                skip(
                    "vhost-user tests",
                    &format!("cannot start qemu-storage-daemon ({e}): install qemu-system-common"),
                );
                None
            }
        }
    }

    /// Its socket.
    pub fn socket(&self) -> String {
        self.socket.display().to_string()
    }

    /// Kill it now (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        self.kill();
    }
}
