//! A vhost-user backend's answers, arbitrary: `ferry vhost-user probe`'s
//! reading of a backend (the `vhost` crate's reply parsing under ferry's
//! deadline), and a device's whole conversation with its backend (the
//! setup at DRIVER_OK with ferry's own SET_LOG_BASE, a ring stopped, the
//! backend's state saved and loaded through a pipe) must end every input in
//! a result or a named error, never a panic or a hang. The fake backend
//! writes the input as its every reply, then stops writing.
#![no_main]

use std::{
    io::{Read, Write},
    os::{fd::AsRawFd, unix::net::UnixStream},
    time::Duration,
};

use ferry_vhost_user::{Connection, RamRange, RingSpec, SharedRam};
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::EventFd;

/// A backend on the other end of a socket pair that answers with `data`
/// and takes every request until the frontend hangs up.
fn fake_backend(data: &[u8]) -> Option<(UnixStream, std::thread::JoinHandle<()>)> {
    let (ours, mut theirs) = UnixStream::pair().ok()?;
    let answers = data.to_vec();
    let backend = std::thread::spawn(move || {
        let _ = theirs.write_all(&answers);
        let _ = theirs.shutdown(std::net::Shutdown::Write);
        let mut sink = [0u8; 4096];
        while matches!(theirs.read(&mut sink), Ok(n) if n > 0) {}
    });
    Some((ours, backend))
}

/// A closed pipe or socket gives EPIPE, as in ferry: Rust's runtime sets
/// SIGPIPE to be ignored before `main`, but libFuzzer's `main` is its own,
/// and a write to the state pipe after the fake backend dropped the read
/// end it was sent (a race) ended the whole run with the signal.
fn ignore_sigpipe() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: installs the SIG_IGN disposition for SIGPIPE, which
        // touches no memory of ours and is what every Rust binary runs with.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    });
}

fuzz_target!(|data: &[u8]| {
    ignore_sigpipe();
    let device = match data.first() {
        Some(b) if b & 1 == 0 => ferry_vhost_user::Device::Blk,
        _ => ferry_vhost_user::Device::Fs,
    };
    let Some((ours, backend)) = fake_backend(data) else { return };
    let _ = ferry_vhost_user::identify(ours, "fuzz", Some(device), Duration::from_secs(2));
    let _ = backend.join();

    let Some((ours, backend)) = fake_backend(data) else { return };
    if let Ok(mut c) = Connection::on_stream(ours, "fuzz", device, 2, Duration::from_secs(2)) {
        let (Ok(file), Ok(kick), Ok(call)) =
            (std::fs::File::open("/dev/null"), EventFd::new(libc::EFD_NONBLOCK), EventFd::new(libc::EFD_NONBLOCK))
        else {
            return;
        };
        let ram = SharedRam {
            fd: file.as_raw_fd(),
            ranges: vec![RamRange { gpa: 0, len: 1 << 20, offset: 0, host_addr: 0x7000_0000_0000 }],
            log: Some((file.as_raw_fd(), 32)),
        };
        let ring = RingSpec {
            index: 0,
            size: 16,
            desc: 0x1000,
            avail: 0x2000,
            used: 0x3000,
            next_avail: 0,
            kick: &kick,
            call: Some(&call),
        };
        let _ = c.start(1 << 32, &ram, &[ring]);
        let _ = c.stop();
        let _ = c.save_state();
        let _ = c.load_state(b"state");
        let _ = c.hung_up();
    }
    let _ = backend.join();
});
