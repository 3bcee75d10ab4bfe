//! The restricted unpickler on arbitrary `data.pkl` bytes: returns or refuses, never
//! panics, never allocates past its byte budgets.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = lavit_runtime::checkpoint::pickle::unpickle(data, std::path::Path::new("fuzz.pkl"));
});
