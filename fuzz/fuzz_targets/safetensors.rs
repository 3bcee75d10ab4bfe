//! A safetensors file through `load_file`, and the same bytes as a shard index.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("fuzz.safetensors");
    std::fs::write(&p, data).unwrap();
    let _ = lavit_runtime::checkpoint::load_file(&p);
    let idx = dir.path().join("model.safetensors.index.json");
    std::fs::write(&idx, data).unwrap();
    let _ = lavit_runtime::checkpoint::load_sharded(&idx);
});
