//! The control API's request parsing on arbitrary bytes: the HTTP reader
//! and the route table with its JSON bodies must end every input in a
//! request or a named error, never a panic, a hang, or an allocation
//! sized by the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = ferry::api::http::parse_request(data) {
        let _ = ferry::api::route(&req.method, &req.path, &req.body);
    }
});
