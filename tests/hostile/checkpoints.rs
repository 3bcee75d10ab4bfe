//! Hostile manifests, model configs and special files: refused naming file and key, unread.

use super::*;

/// The manifest cases of the issue, plus the categories they stand for.
#[test]
fn hostile_manifests_are_refused_naming_file_and_key() {
    let (_tmp, dir) = fixture_copy();
    let img = one_image(_tmp.path());
    let manifest = dir.join("manifest.json");
    let original = std::fs::read_to_string(&manifest).unwrap();
    type Edit = fn(&mut Value);
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "tokenizer.encoder_head_dim_out",
            |v| v["tokenizer"]["encoder_head_dim_out"] = json!(-5),
            "tokenize",
        ),
        (
            "tokenizer.img_size",
            |v| v["tokenizer"]["img_size"] = json!(1i64 << 40),
            "tokenize",
        ),
        (
            "tokenizer.merger_heads",
            |v| v["tokenizer"]["merger_heads"] = json!(3),
            "tokenize",
        ),
        // Inside every cap, but far more than the fixture's weight files hold.
        (
            "tokenizer.encoder_width",
            |v| v["tokenizer"]["encoder_width"] = json!(65536),
            "tokenize",
        ),
        (
            "feature_decoder.highres_attnpool_heads",
            |v| v["feature_decoder"]["highres_attnpool_heads"] = json!(0),
            "highres",
        ),
        (
            "feature_decoder.heads",
            |v| v["feature_decoder"]["heads"] = json!(5),
            "lowres",
        ),
        (
            "llm.image_start_id",
            |v| v["llm"]["image_start_id"] = json!(1_000_000),
            "caption",
        ),
        (
            "llm.visual_token_offset",
            |v| v["llm"]["visual_token_offset"] = json!(i64::MAX - 10),
            "caption",
        ),
        (
            "llm.vocab_size",
            |v| v["llm"]["visual_token_offset"] = json!(300),
            "caption",
        ),
        (
            "generation.t2i_max_new_tokens",
            |v| v["generation"]["t2i_max_new_tokens"] = json!(1_000_000_000),
            "lowres",
        ),
        // Under the manifest cap, over the language model's context (512).
        (
            "generation.t2i_max_new_tokens",
            |v| v["generation"]["t2i_max_new_tokens"] = json!(4096),
            "lowres",
        ),
        (
            "generation.ddim_steps",
            |v| v["generation"]["ddim_steps"] = json!(-1),
            "lowres",
        ),
        (
            "tokenizer.encoder_mlp_ratio",
            |v| v["tokenizer"]["encoder_mlp_ratio"] = json!(1e300),
            "tokenize",
        ),
    ];
    for (key, edit, cmd) in cases {
        std::fs::write(&manifest, &original).unwrap();
        edit_json(&manifest, edit);
        let out = match cmd {
            "tokenize" => tokenize(&dir, &img),
            "caption" => caption(&dir, &img),
            res => generate(&dir, res),
        };
        assert_refused(key, out, &["manifest.json", key]);
    }
}

#[test]
fn hostile_model_configs_are_refused_naming_file_and_key() {
    let (_tmp, dir) = fixture_copy();
    let img = one_image(_tmp.path());
    type Edit = fn(&mut Value);
    // (file, key named in the error, edit, command)
    let cases: Vec<(&str, &str, Edit, &str)> = vec![
        (
            "language_model/config.json",
            "vocab_size",
            |v| v["vocab_size"] = json!(1_000_000_000_000i64),
            "caption",
        ),
        (
            "language_model/config.json",
            "num_hidden_layers",
            |v| v["num_hidden_layers"] = json!(1_000_000_000),
            "caption",
        ),
        (
            "language_model/config.json",
            "num_attention_heads",
            |v| {
                v["num_attention_heads"] = json!(0);
            },
            "caption",
        ),
        // Inside the caps: the shapes it implies are checked against the weight files.
        (
            "language_model/config.json",
            "(shapes)",
            |v| v["hidden_size"] = json!(65536),
            "caption",
        ),
        (
            "pixel_decoding/unet/config.json",
            "norm_num_groups",
            |v| v["norm_num_groups"] = json!(0),
            "lowres",
        ),
        (
            "pixel_decoding/unet/config.json",
            "layers_per_block",
            |v| v["layers_per_block"] = json!(1000),
            "lowres",
        ),
        (
            "pixel_decoding/unet/config.json",
            "in_channels",
            |v| v["block_out_channels"] = json!([65536, 65536]),
            "lowres",
        ),
        (
            "pixel_decoding/scheduler/scheduler_config.json",
            "num_train_timesteps",
            |v| v["num_train_timesteps"] = json!(1_000_000_000_000i64),
            "lowres",
        ),
        (
            "pixel_decoding/vae/config.json",
            "norm_num_groups",
            |v| v["norm_num_groups"] = json!(0),
            "lowres",
        ),
        (
            "pixel_decoding/vae/config.json",
            "in_channels",
            |v| v["block_out_channels"] = json!([8192, 8192]),
            "lowres",
        ),
        (
            "highres_pixel_decoding/unet/config.json",
            "transformer_layers_per_block",
            |v| v["transformer_layers_per_block"] = json!(500),
            "highres",
        ),
    ];
    for (file, key, edit, cmd) in cases {
        let p = dir.join(file);
        let original = std::fs::read_to_string(&p).unwrap();
        edit_json(&p, edit);
        let out = match cmd {
            "caption" => caption(&dir, &img),
            res => generate(&dir, res),
        };
        let base = Path::new(file).file_name().unwrap().to_str().unwrap();
        assert_refused(&format!("{file}: {key}"), out, &[base, key]);
        std::fs::write(&p, original).unwrap();
    }
}

/// FIFOs, devices and links to devices where a file is expected: refused at once.
#[cfg(unix)]
#[test]
fn special_files_are_refused_without_reading() {
    let (tmp, dir) = fixture_copy();
    let img = one_image(tmp.path());
    let mkfifo = |p: &Path| {
        let _ = std::fs::remove_file(p);
        assert!(Command::new("mkfifo").arg(p).status().unwrap().success());
    };
    let zero_link = |p: &Path| {
        let _ = std::fs::remove_file(p);
        std::os::unix::fs::symlink("/dev/zero", p).unwrap();
    };
    let lm = dir.join("language_model");

    let tok = lm.join("tokenizer.model");
    let saved = std::fs::read(&tok).unwrap();
    mkfifo(&tok);
    assert_refused(
        "FIFO tokenizer.model",
        caption(&dir, &img),
        &["tokenizer.model", "FIFO"],
    );
    std::fs::remove_file(&tok).unwrap();
    std::fs::write(&tok, &saved).unwrap();

    let cfg = lm.join("config.json");
    let saved = std::fs::read(&cfg).unwrap();
    zero_link(&cfg);
    assert_refused(
        "config.json → /dev/zero",
        caption(&dir, &img),
        &["config.json", "character device"],
    );
    std::fs::remove_file(&cfg).unwrap();
    std::fs::write(&cfg, &saved).unwrap();

    let man = dir.join("manifest.json");
    let saved = std::fs::read(&man).unwrap();
    zero_link(&man);
    assert_refused(
        "manifest.json → /dev/zero",
        tokenize(&dir, &img),
        &["manifest.json", "character device"],
    );
    std::fs::remove_file(&man).unwrap();
    std::fs::write(&man, &saved).unwrap();

    let idx = lm.join("model.safetensors.index.json");
    let saved = std::fs::read(&idx).unwrap();
    mkfifo(&idx);
    assert_refused("FIFO index", caption(&dir, &img), &["index.json"]);
    std::fs::remove_file(&idx).unwrap();
    std::fs::write(&idx, &saved).unwrap();

    let zimg = tmp.path().join("zero.png");
    zero_link(&zimg);
    assert_refused(
        "image → /dev/zero",
        tokenize(&dir, &zimg),
        &["zero.png", "character device"],
    );
    let fimg = tmp.path().join("fifo.png");
    mkfifo(&fimg);
    assert_refused("FIFO image", tokenize(&dir, &fimg), &["fifo.png", "FIFO"]);
}
