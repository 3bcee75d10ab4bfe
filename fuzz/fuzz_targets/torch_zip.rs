//! A whole `torch.save` zip (records, pickle, tensor views) through `load_file`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("fuzz.bin");
    std::fs::write(&p, data).unwrap();
    let _ = lavit_runtime::checkpoint::load_file(&p);
});
