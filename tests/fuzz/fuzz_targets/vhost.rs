//! A vhost-user backend's answers, arbitrary: `ferry vhost-user probe`'s
//! reading of a backend (the `vhost` crate's reply parsing under ferry's
//! deadline) must end every input in an identity or a named error, never a
//! panic or a hang. The fake backend writes the input as its every reply,
//! then stops writing.
#![no_main]

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    time::Duration,
};

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok((ours, mut theirs)) = UnixStream::pair() else { return };
    let answers = data.to_vec();
    let backend = std::thread::spawn(move || {
        let _ = theirs.write_all(&answers);
        let _ = theirs.shutdown(std::net::Shutdown::Write);
        // Take the requests until the frontend hangs up.
        let mut sink = [0u8; 4096];
        while matches!(theirs.read(&mut sink), Ok(n) if n > 0) {}
    });
    let device = match data.first() {
        Some(b) if b & 1 == 0 => Some(ferry_vhost_user::Device::Blk),
        _ => Some(ferry_vhost_user::Device::Fs),
    };
    let _ = ferry_vhost_user::identify(ours, "fuzz", device, Duration::from_secs(2));
    let _ = backend.join();
});
