//! The seeded fuzz loops, one per reader, loader and request parser.

use super::*;

#[test]
fn fuzz_torch_zip_reader() {
    let zips = torch_zip_seeds();
    let tmp = fast_tmp();
    run_target("torch_zip", 2, &zips, cases(), |d| {
        torch_zip_target(tmp.path(), d)
    });
}

#[test]
fn fuzz_safetensors_loader() {
    let tmp = fast_tmp();
    let seeds = safetensors_seeds(tmp.path());
    run_target("safetensors", 3, &seeds, cases(), |d| {
        safetensors_target(tmp.path(), d)
    });
}

#[test]
fn fuzz_shard_index_loader() {
    let dir = fast_tmp();
    let seeds = index_seeds(dir.path());
    run_target("index", 4, &seeds, cases(), |d| index_target(dir.path(), d));
}

#[test]
fn fuzz_sentencepiece_reader_and_normaliser() {
    let seeds = sentencepiece_seeds();
    run_target("sentencepiece", 5, &seeds, cases(), sentencepiece_target);
}

#[test]
fn fuzz_config_manifest() {
    fuzz_config(ConfigKind::Manifest, 0);
}

#[test]
fn fuzz_config_llama() {
    fuzz_config(ConfigKind::Llama, 1);
}

#[test]
fn fuzz_config_unet() {
    fuzz_config(ConfigKind::UNet, 2);
}

#[test]
fn fuzz_config_vae() {
    fuzz_config(ConfigKind::Vae, 3);
}

#[test]
fn fuzz_config_scheduler() {
    fuzz_config(ConfigKind::Scheduler, 4);
}

#[test]
fn fuzz_http_request_validators() {
    let seeds = http_seeds();
    let mut rng = Rng::new(200);
    // Half the cases hostile numbers in valid JSON, half raw byte mutations.
    run_target("http", 12, &seeds, cases(), |d| {
        if rng.below(2) == 0 {
            let s = rng.below(seeds.len());
            http_target(&mutate_json_numbers(&mut rng, &seeds[s]))
        } else {
            http_target(d)
        }
    });
}

#[test]
fn fuzz_image_decoder_front() {
    let seeds = image_seeds();
    let p = lavit_encoder::LaVITImageProcessor::new(32);
    run_target("image", 11, &seeds, cases(), |d| image_target_with(&p, d));
}

/// Every input that once crashed a target, replayed (`tests/data/fuzz/<target>/*`).
#[test]
fn fuzz_regressions_replay() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fuzz");
    let tmp = fast_tmp();
    let _ = index_seeds(tmp.path());
    let mut n = 0;
    let Ok(dirs) = std::fs::read_dir(&root) else {
        return;
    };
    for d in dirs {
        let d = d.unwrap();
        let target = d.file_name().to_string_lossy().into_owned();
        let mut files: Vec<PathBuf> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for f in files {
            let data = read(&f);
            let _ = match target.as_str() {
                "pickle" => pickle_target(&data),
                "torch_zip" => torch_zip_target(tmp.path(), &data),
                "safetensors" => safetensors_target(tmp.path(), &data),
                "index" => index_target(tmp.path(), &data),
                "sentencepiece" => sentencepiece_target(&data),
                "config-manifest" => config_target(tmp.path(), ConfigKind::Manifest, &data),
                "config-llama" => config_target(tmp.path(), ConfigKind::Llama, &data),
                "config-unet" => config_target(tmp.path(), ConfigKind::UNet, &data),
                "config-vae" => config_target(tmp.path(), ConfigKind::Vae, &data),
                "config-scheduler" => config_target(tmp.path(), ConfigKind::Scheduler, &data),
                "image" => image_target(&data),
                "http" => http_target(&data),
                other => panic!("tests/data/fuzz/{other}: unknown target"),
            };
            n += 1;
        }
    }
    eprintln!("fuzz regressions: {n} inputs replayed without a panic");
}
