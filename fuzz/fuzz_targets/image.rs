//! The image decoder front: format sniffing, size caps before decoding, decode, resize.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = lavit_encoder::LaVITImageProcessor::new(32).load_bytes(data);
});
