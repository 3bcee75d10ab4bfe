//! `manifest.json`, HF `config.json` and the diffusers configs through their validators.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("manifest.json"), data).unwrap();
    let _ = lavit_runtime::manifest::LavitManifest::for_checkpoint(dir.path());
    let c = dir.path().join("config.json");
    std::fs::write(&c, data).unwrap();
    if let Ok(cfg) = lavit_llm::config::LlamaConfig::from_json_file(&c) {
        let _ = lavit_llm::modeling_llama::LlamaForCausalLM::param_shapes(&cfg);
    }
    if let Ok(cfg) = lavit_decoder::UNet2DConditionModelConfig::from_json_file(&c) {
        let _ = cfg.implied("fuzz");
    }
    if let Ok(cfg) = lavit_decoder::AutoencoderKLConfig::from_json_file(&c) {
        let _ = cfg.implied();
    }
    if let Ok(cfg) = lavit_decoder::SchedulerConfig::from_json_file(&c) {
        if let Ok(mut s) = lavit_decoder::schedulers::from_config(&cfg, None) {
            let _ = s.set_timesteps(25);
        }
    }
});
