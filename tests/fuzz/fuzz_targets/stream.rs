//! The snapshot stream decoder on arbitrary bytes: every input must end in
//! a report (good or naming the damage), never a panic, a hang, or an
//! allocation sized by the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let report = ferry::migration::inspect::inspect_reader("fuzz", std::io::Cursor::new(data));
    let _ = report.to_text();
});
