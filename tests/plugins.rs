//! Integration tests: plugins. The example plugins (plugins/residual-vq, plugins/convnet) and
//! the test plugins (plugins/testing/*) are loaded as dylibs through the host, as a user's
//! config would load them. The root crate dev-depends on them so cargo builds their cdylibs
//! (target/<profile>/deps/lib<crate>.so) before this binary runs; they are never linked in.

use std::path::{Path, PathBuf};

use lavit::tokenizer::{LoadParts, VisualTokenizer};
use lavit_decoder::feature_decoder::{FeatureDecoderConfig, VQDecoder};
use lavit_plugin_api::{Backbone, Codebook, API_VERSION};
use lavit_runtime::manifest::LavitManifest;
use lavit_runtime::plugin_host::{PluginComponent, PluginHost, PluginHostError, PluginsConfig};
use lavit_selector::SelectionMode;
use tch::{nn, nn::Module, nn::OptimizerConfig, Device, Kind, Tensor};

/// The dylib of workspace crate `krate` (its lib name: dashes → underscores), next to this
/// test binary: cargo builds it in target/<profile>/deps because the root crate dev-depends
/// on the plugin crates (`cargo build -p <crate>` also puts it in target/<profile>/).
pub(crate) fn dylib(krate: &str) -> PathBuf {
    let file = format!(
        "{}{}{}",
        std::env::consts::DLL_PREFIX,
        krate.replace('-', "_"),
        std::env::consts::DLL_SUFFIX
    );
    let exe = std::env::current_exe().expect("test binary path");
    let deps = exe.parent().expect("target/<profile>/deps");
    let candidates = [deps.join(&file), deps.join("..").join(&file)];
    candidates.iter().find(|p| p.exists()).cloned().unwrap_or_else(|| {
        panic!(
            "{file} not found in {} or its parent: run `cargo build -p {krate}` (cargo test builds it \
             as a dev-dependency of the root crate)",
            deps.display()
        )
    })
}

fn component(plugin: &str, config: serde_json::Value) -> PluginComponent {
    PluginComponent {
        plugin: plugin.into(),
        weights: None,
        config,
    }
}

fn example_host() -> PluginHost {
    let cfg: PluginsConfig = serde_json::from_value(serde_json::json!({
        "load": [dylib("lavit-plugin-rvq"), dylib("lavit-plugin-convnet")]
    }))
    .unwrap();
    let host = PluginHost::from_config(&cfg).expect("load the example plugins");
    let names: Vec<_> = host.plugins().iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["lavit-plugin-rvq", "lavit-plugin-convnet"]);
    host
}

/// Residual quantisation written out independently of the plugin: per level, the nearest
/// code of the residual; id = Σ id_l·K^l.
fn reference_rvq(z: &Tensor, books: &[Tensor]) -> (Tensor, Tensor) {
    let k = books[0].size()[0];
    let mut residual = z.copy();
    let mut ids = Tensor::zeros([z.size()[0]], (Kind::Int64, Device::Cpu));
    let mut recon = z.zeros_like();
    let mut radix = 1;
    for c in books {
        // (T, 1, D) − (1, K, D) → (T, K)
        let d = (residual.unsqueeze(1) - c.unsqueeze(0))
            .square()
            .sum_dim_intlist(2, false, Kind::Float);
        let id = d.argmin(1, false);
        let code = c.index_select(0, &id);
        residual -= &code;
        recon += &code;
        ids += id * radix;
        radix *= k;
    }
    (ids, recon)
}

#[test]
fn residual_vq_dylib_quantizes_with_weights_from_the_config() {
    let host = example_host();
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("rvq.safetensors");
    let books: Vec<Tensor> = (0..3)
        .map(|l| Tensor::randn([16, 8], (Kind::Float, Device::Cpu)) / (1 << l) as f64)
        .collect();
    let named: Vec<(String, &Tensor)> = books
        .iter()
        .enumerate()
        .map(|(l, t)| (format!("codebooks.{l}"), t))
        .collect();
    Tensor::write_safetensors(&named, &weights).unwrap();

    let mut spec = component(
        "residual-vq",
        serde_json::json!({"levels": 3, "codes_per_level": 16, "code_dim": 8}),
    );
    spec.weights = Some(weights.clone());
    let cb = host.codebook(&spec, Device::Cpu).unwrap();
    assert_eq!((cb.num_codes(), cb.code_dim()), (4096, 8));

    let z = Tensor::randn([40, 8], (Kind::Float, Device::Cpu));
    let ids = cb.quantize(&z).unwrap();
    let (want_ids, want_recon) = reference_rvq(&z, &books);
    assert!(ids.equal(&want_ids), "plugin ids differ from the reference");
    assert!(cb
        .embed(&ids)
        .unwrap()
        .allclose(&want_recon, 1e-5, 1e-5, false));
    // Bad input and bad config come back as errors naming the plugin.
    assert!(cb
        .quantize(&Tensor::zeros([4, 7], (Kind::Float, Device::Cpu)))
        .is_err());
    let e = host
        .codebook(
            &component("residual-vq", serde_json::json!({"levls": 2})),
            Device::Cpu,
        )
        .err()
        .unwrap();
    assert!(
        e.to_string().contains("lavit-plugin-rvq") && e.to_string().contains("levls"),
        "{e}"
    );
    spec.config = serde_json::json!({"levels": 2, "codes_per_level": 16, "code_dim": 8});
    let e = host.codebook(&spec, Device::Cpu).err().unwrap();
    assert!(e.to_string().contains("codebooks.2"), "{e}"); // strict load names the extra key
}

#[test]
fn convnet_dylib_gives_patch_features_and_reloads_its_weights() {
    let host = example_host();
    let cfg = serde_json::json!({"image_size": 32, "patch_size": 8, "depth": 2, "dim": 24});
    let a = host
        .backbone(&component("convnext", cfg.clone()), Device::Cpu)
        .unwrap();
    assert_eq!(
        (a.image_size(), a.patch_size(), a.width(), a.num_patches()),
        (32, 8, 24, 16)
    );
    let images = Tensor::randn([3, 3, 32, 32], (Kind::Float, Device::Cpu));
    let fa = a.forward(&images).unwrap();
    assert_eq!(fa.size(), [3, 16, 24]); // (B, N, C)

    // state_dict → safetensors → a second instance built from the config's weights path.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("convnext.safetensors");
    lavit_plugin_api::weights::save_safetensors(&a.state_dict().unwrap(), &path).unwrap();
    let mut spec = component("convnext", cfg);
    spec.weights = Some(path);
    let b = host.backbone(&spec, Device::Cpu).unwrap();
    assert!(b.forward(&images).unwrap().allclose(&fa, 1e-5, 1e-5, false));
    assert!(a
        .forward(&Tensor::zeros([1, 3, 16, 16], (Kind::Float, Device::Cpu)))
        .is_err());
    let e = host
        .backbone(&component("eva", serde_json::json!({})), Device::Cpu)
        .err()
        .unwrap();
    assert!(matches!(e, PluginHostError::Unknown { .. }) && e.to_string().contains("convnext"));
}

/// Both example plugins put their weights and outputs on the device the stage asks for.
#[test]
fn plugins_run_on_the_stage_device() {
    let host = example_host();
    let device = Device::cuda_if_available();
    let bb = host
        .backbone(
            &component(
                "convnext",
                serde_json::json!({"image_size": 16, "patch_size": 4, "depth": 1, "dim": 8}),
            ),
            device,
        )
        .unwrap();
    let feats = bb
        .forward(&Tensor::randn([1, 3, 16, 16], (Kind::Float, device)))
        .unwrap();
    assert_eq!((feats.device(), feats.size()), (device, vec![1, 16, 8]));
    let cb = host
        .codebook(
            &component("residual-vq", serde_json::json!({"code_dim": 8})),
            device,
        )
        .unwrap();
    let ids = cb.quantize(&feats.view([16, 8])).unwrap();
    assert_eq!(ids.device(), device);
    assert_eq!(cb.embed(&ids).unwrap().device(), device);
    assert!(cb
        .trainable_parameters()
        .iter()
        .all(|p| p.device() == device));
}

#[test]
fn wrong_api_version_is_refused_before_any_call() {
    let mut host = PluginHost::new();
    // The bad plugin's register function aborts the process: reaching it fails this test.
    let err = host
        .load(&dylib("lavit-plugin-test-bad-version"))
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(matches!(err, PluginHostError::Version { .. }), "{msg}");
    assert!(msg.contains("plugin API version"), "{msg}");
    assert!(
        msg.contains(&format!("`{API_VERSION}`")),
        "host side missing: {msg}"
    );
    assert!(
        msg.contains(&format!("`{}`", API_VERSION + 1000)),
        "plugin side missing: {msg}"
    );
    assert!(host.plugins().is_empty());
    // The host goes on loading good plugins.
    host.load(&dylib("lavit-plugin-rvq")).unwrap();
    // Not a plugin at all: a clear error, no crash — a missing path is refused from its
    // metadata before dlopen, a file that is no library by dlopen.
    let e = host
        .load(std::path::Path::new("/nonexistent/libnothing.so"))
        .err()
        .unwrap();
    assert!(matches!(e, PluginHostError::File { .. }), "{e}");
    assert!(e.to_string().contains("/nonexistent/libnothing.so"), "{e}");
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("libtext.so");
    std::fs::write(&text, "not a shared library").unwrap();
    let e = host.load(&text).err().unwrap();
    assert!(matches!(e, PluginHostError::Open { .. }), "{e}");
}

#[test]
fn a_panicking_plugin_returns_errors_and_the_host_keeps_working() {
    let mut host = example_host();
    host.load(&dylib("lavit-plugin-test-panicky")).unwrap();
    let e = host
        .codebook(
            &component("panicky", serde_json::json!({"panic_in_factory": true})),
            Device::Cpu,
        )
        .err()
        .unwrap();
    assert!(e.to_string().contains("factory exploded"), "{e}");

    let mut cb = host
        .codebook(&component("panicky", serde_json::json!({})), Device::Cpu)
        .unwrap();
    let z = Tensor::zeros([3, 2], (Kind::Float, Device::Cpu));
    let e = cb.quantize(&z).unwrap_err();
    assert!(
        e.0.contains("quantize") && e.0.contains("exploded on purpose"),
        "{e}"
    );
    assert!(cb
        .quantize_train(&z)
        .err()
        .unwrap()
        .0
        .contains("out of bounds"));
    // The same object still answers calls that do not panic.
    assert_eq!(
        cb.embed(&Tensor::from_slice(&[0i64, 1])).unwrap().size(),
        [2, 2]
    );
    let bb = host
        .backbone(&component("panicky", serde_json::json!({})), Device::Cpu)
        .unwrap();
    assert!(bb
        .forward(&Tensor::zeros([1, 3, 8, 8], (Kind::Float, Device::Cpu)))
        .is_err());
    // And the other plugins keep serving.
    let rvq = host
        .codebook(
            &component("residual-vq", serde_json::json!({})),
            Device::Cpu,
        )
        .unwrap();
    let ids = rvq
        .quantize(&Tensor::randn([5, 32], (Kind::Float, Device::Cpu)))
        .unwrap();
    assert_eq!(ids.size(), [5]);
}

/// A stage-1-shaped training run with both example plugins from their dylibs: images →
/// convnext (frozen) → patch features x [B·N, C] → encoder → residual VQ (straight-through,
/// commitment loss) → decoder → x_rec; loss = mean(1 − cos(x, x_rec)) + VQ loss, trained with
/// Adam over the encoder, decoder and the plugin codebook's own parameters.
#[test]
fn training_with_the_plugin_codebook_lowers_the_loss() {
    tch::manual_seed(0);
    let host = example_host();
    let backbone = host
        .backbone(
            &component(
                "convnext",
                serde_json::json!({"image_size": 32, "patch_size": 8, "depth": 1, "dim": 32}),
            ),
            Device::Cpu,
        )
        .unwrap();
    let mut codebook = host
        .codebook(
            &component(
                "residual-vq",
                serde_json::json!({"levels": 2, "codes_per_level": 16, "code_dim": 8}),
            ),
            Device::Cpu,
        )
        .unwrap();
    let params = codebook.trainable_parameters();
    assert_eq!(params.len(), 2, "one [K, D] table per level");

    let vs = nn::VarStore::new(Device::Cpu);
    let enc = nn::seq()
        .add(nn::linear(
            &vs.root() / "enc" / 0,
            32,
            32,
            Default::default(),
        ))
        .add_fn(|x| x.tanh())
        .add(nn::linear(
            &vs.root() / "enc" / 2,
            32,
            8,
            Default::default(),
        ));
    let dec = nn::seq()
        .add(nn::linear(
            &vs.root() / "dec" / 0,
            8,
            64,
            Default::default(),
        ))
        .add_fn(|x| x.gelu("none"))
        .add(nn::linear(
            &vs.root() / "dec" / 2,
            64,
            32,
            Default::default(),
        ));
    for (i, p) in params.iter().enumerate() {
        let _ = (vs.root() / "codebook").add(&i.to_string(), p.shallow_clone(), true);
    }
    let mut opt = nn::Adam::default().build(&vs, 3e-3).unwrap();

    let images = Tensor::randn([4, 3, 32, 32], (Kind::Float, Device::Cpu));
    let x = tch::no_grad(|| backbone.forward(&images).unwrap()).reshape([-1, 32]); // (B·N, C)
    let before = params[0].copy();
    let mut losses = Vec::new();
    for _ in 0..150 {
        let out = codebook.quantize_train(&enc.forward(&x)).unwrap();
        let rec = dec.forward(&out.quantized);
        let cos = Tensor::cosine_similarity(&x, &rec, 1, 1e-8);
        let loss = cos.neg().mean(Kind::Float) + 1.0 + &out.loss;
        opt.backward_step(&loss);
        codebook.update(&x, &out.ids).unwrap();
        losses.push(loss.double_value(&[]));
    }
    let first = losses[..10].iter().sum::<f64>() / 10.0;
    let last = losses[losses.len() - 10..].iter().sum::<f64>() / 10.0;
    eprintln!("plugin codebook training: loss {first:.4} → {last:.4}");
    assert!(last < 0.5 * first, "loss {first:.4} → {last:.4}");
    assert!(
        !params[0].allclose(&before, 0.0, 0.0, false),
        "the codebook was not trained"
    );
    // Inference with the trained codebook: ids in range, embed = the quantised vectors.
    let z = enc.forward(&x);
    let ids = codebook.quantize(&z).unwrap();
    assert!(ids.max().int64_value(&[]) < codebook.num_codes());
    let q = codebook.quantize_train(&z).unwrap();
    assert!(codebook
        .embed(&ids)
        .unwrap()
        .allclose(&q.quantized, 1e-4, 1e-4, false));
}

/// The tiny fixture's tokenizer geometry (112 px, patch 14, width 64, code_dim 16,
/// n_code 256) with the plugins in place of EVA and the built-in codebook.
fn fixture_plugins(host: &PluginHost) -> (LavitManifest, Box<dyn Backbone>, Box<dyn Codebook>) {
    let manifest = LavitManifest::for_checkpoint(&crate::common::fixture_dir()).unwrap();
    let t = &manifest.tokenizer;
    let backbone = host
        .backbone(
            &component(
                "convnext",
                serde_json::json!({"image_size": t.img_size, "patch_size": t.patch_size, "depth": 1, "dim": t.encoder_width}),
            ),
            Device::Cpu,
        )
        .unwrap();
    // 2 levels × 16 codes = 256 ids: the fixture LLM's visual vocabulary is unchanged.
    let codebook = host
        .codebook(
            &component(
                "residual-vq",
                serde_json::json!({"levels": 2, "codes_per_level": 16, "code_dim": t.code_dim}),
            ),
            Device::Cpu,
        )
        .unwrap();
    assert_eq!(codebook.num_codes(), t.n_code);
    (manifest, backbone, codebook)
}

/// The official-layout fixture tokenizer (selector, merger, task layer, lowres decoder)
/// around the plugin backbone and codebook: image → ids → U-Net condition.
#[test]
fn the_fixture_tokenizer_runs_with_both_plugins() {
    let host = example_host();
    let (manifest, backbone, codebook) = fixture_plugins(&host);
    let parts = LoadParts {
        lowres_decoder: true,
        ..LoadParts::tokenize_only()
    };
    let mut tok = VisualTokenizer::from_checkpoint_with_encoder(
        &crate::common::fixture_dir(),
        Device::Cpu,
        parts,
        backbone,
    )
    .unwrap();
    tok.quantizer.quantize = codebook;
    assert!(
        tok.encoder.backbone.name().starts_with("convnext"),
        "{}",
        tok.encoder.backbone.name()
    );
    assert!(
        tok.quantizer.quantize.name().starts_with("residual-vq"),
        "{}",
        tok.quantizer.quantize.name()
    );

    let images = Tensor::randn([2, 3, 112, 112], (Kind::Float, Device::Cpu));
    let out = tok.tokenize(&images).unwrap();
    let off = manifest.llm.visual_token_offset;
    assert_eq!(out.ids.len(), 2);
    assert!(out.counts.iter().all(|&n| n > 0), "counts {:?}", out.counts);
    for (ids, &n) in out.ids.iter().zip(&out.counts) {
        assert_eq!(ids.len() as i64, n);
        assert!(
            ids.iter().all(|&id| (off..off + 256).contains(&id)),
            "{ids:?}"
        );
    }
    let cond = tok.decode_lowres(&out.ids).unwrap();
    let f = &manifest.feature_decoder;
    assert_eq!(cond.size(), [2, f.num_patches, f.lowres_unet_proj]);
    // Ids the plugin codebook does not have are refused, not looked up.
    assert!(tok.embed_ids(&[vec![off + 256]]).is_err());
}

/// Stage 1 through the tokenizer's own stages with both plugins: plugin backbone (frozen)
/// → token_predictor (Gumbel keep decisions) → causal_encoder → encode_task_layer → plugin
/// codebook `quantize_train` → feature decoder trunk → features; loss = mean(1 − cos(x,
/// x_rec)) + codebook loss, AdamW over the tokenizer, the decoder and the codebook.
#[test]
fn stage1_training_through_the_tokenizer_with_plugins_lowers_the_loss() {
    tch::manual_seed(1);
    let host = example_host();
    let (manifest, backbone, codebook) = fixture_plugins(&host);
    let mut tok = VisualTokenizer::with_parts(&manifest, Device::Cpu, backbone, codebook).unwrap();
    let dcfg = FeatureDecoderConfig::from_manifest(&manifest.feature_decoder);
    let vs = nn::VarStore::new(Device::Cpu);
    let dec = VQDecoder::new(&vs.root() / "decoder", &dcfg);
    let c = manifest.tokenizer.encoder_width;
    let head = nn::linear(
        &vs.root() / "head",
        dcfg.decoder_out_dim,
        c,
        Default::default(),
    );
    let tok_vars = tok
        .selector
        .vs
        .trainable_variables()
        .into_iter()
        .chain(tok.quantizer.vs.trainable_variables());
    for (i, p) in tok_vars.enumerate() {
        let _ = (vs.root() / "tokenizer").add(&i.to_string(), p, true);
    }
    for (i, p) in tok
        .quantizer
        .quantize
        .trainable_parameters()
        .into_iter()
        .enumerate()
    {
        let _ = (vs.root() / "codebook").add(&i.to_string(), p, true);
    }
    let mut opt = nn::AdamW::default().build(&vs, 3e-3).unwrap();

    let images = Tensor::randn([2, 3, 112, 112], (Kind::Float, Device::Cpu));
    let (mut losses, mut rec_losses) = (Vec::new(), Vec::new());
    for step in 0..16 {
        let mode = SelectionMode::Gumbel {
            seed: step,
            tau: 1.0,
        };
        let tr = tok.trace(&images, mode).unwrap();
        let (kept, counts) = VisualTokenizer::gather_kept(&tr.merged, &tr.decisions);
        let z = tok.quantizer.encode_task_layer.forward(&kept);
        let q = tok.quantizer.quantize.quantize_train(&z).unwrap();
        let rec = head.forward(&dec.trunk.decode(&q.quantized, &counts).unwrap()); // (B, N, C)
        let cos = Tensor::cosine_similarity(&tr.features, &rec, -1, 1e-8);
        let rec_loss = cos.neg().mean(Kind::Float) + 1.0;
        let loss = &rec_loss + &q.loss;
        opt.backward_step(&loss);
        tok.quantizer.quantize.update(&z.detach(), &q.ids).unwrap();
        losses.push(loss.double_value(&[]));
        rec_losses.push(rec_loss.double_value(&[]));
    }
    let first = losses[..3].iter().sum::<f64>() / 3.0;
    let last = losses[losses.len() - 3..].iter().sum::<f64>() / 3.0;
    let (rec_first, rec_last) = (rec_losses[0], rec_losses[rec_losses.len() - 1]);
    eprintln!(
        "stage-1 with plugins: loss {first:.4} → {last:.4}, 1 − cos {rec_first:.4} → {rec_last:.4}"
    );
    assert!(last < 0.7 * first, "loss {first:.4} → {last:.4}");
    assert!(
        rec_last < rec_first,
        "reconstruction {rec_first:.4} → {rec_last:.4}"
    );
}

// ---- `lavit train tokenizer`, export and the pipeline with plugin parts ----------------

/// The fixture's sizes with `decoder_out_dim` = encoder width (stage 1 reconstructs the
/// patch features) and seeded Gumbel selection (after a few steps arg-max may keep nothing),
/// written as `dir/manifest.json`.
fn stage1_manifest(dir: &std::path::Path) -> (LavitManifest, PathBuf) {
    let mut m = LavitManifest::for_checkpoint(&crate::common::fixture_dir()).unwrap();
    m.feature_decoder.decoder_out_dim = m.tokenizer.encoder_width;
    m.tokenizer.selection = lavit_runtime::manifest::Selection::Gumbel;
    let p = dir.join("manifest.json");
    std::fs::write(&p, serde_json::to_vec(&m).unwrap()).unwrap();
    (m, p)
}

/// A `[plugins]` section loading both example dylibs: convnext (`dim`, with `weights` if
/// given) in place of EVA and a 2 × 16 residual VQ of width `code_dim` in place of the
/// built-in codebook.
fn plugins_toml(m: &LavitManifest, dim: i64, code_dim: i64, weights: Option<&Path>) -> String {
    let t = &m.tokenizer;
    let weights = weights.map_or(String::new(), |w| format!("weights = {w:?}\n"));
    format!(
        "[plugins]\nload = [{:?}, {:?}]\n\
         [plugins.backbone]\nplugin = \"convnext\"\n{weights}\
         config = {{ image_size = {}, patch_size = {}, depth = 1, dim = {dim} }}\n\
         [plugins.codebook]\nplugin = \"residual-vq\"\n\
         config = {{ levels = 2, codes_per_level = 16, code_dim = {code_dim} }}\n",
        dylib("lavit-plugin-rvq"),
        dylib("lavit-plugin-convnet"),
        t.img_size,
        t.patch_size,
    )
}

/// A "pretrained" ConvNeXt for the fixture geometry: a random one saved as safetensors (so
/// every run in this process uses the same frozen backbone).
fn convnext_weights(m: &LavitManifest, dir: &Path) -> PathBuf {
    let t = &m.tokenizer;
    let net = example_host()
        .backbone(
            &component(
                "convnext",
                serde_json::json!({"image_size": t.img_size, "patch_size": t.patch_size, "depth": 1, "dim": t.encoder_width}),
            ),
            Device::Cpu,
        )
        .unwrap();
    let p = dir.join("convnext.safetensors");
    lavit_plugin_api::weights::save_safetensors(&net.state_dict().unwrap(), &p).unwrap();
    p
}

/// A `lavit train tokenizer` config file with the plugins (what the CLI reads).
fn train_toml(tmp: &std::path::Path, run: &str, plugins: &str) -> PathBuf {
    let (_, manifest) = stage1_manifest(tmp);
    let text = format!(
        "data_dir = {:?}\nmanifest = {:?}\nout_dir = {:?}\nseed = 5\nbatch_size = 4\n\
         steps = 18\nsteps_no_quant = 6\nsave_every = 4\nlr = 3e-3\nwarmup_steps = 2\n\
         kmeans_batches = 3\n{plugins}",
        tmp.join("images"),
        manifest,
        tmp.join(run),
    );
    let p = tmp.join(format!("{run}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// `lavit train tokenizer` (the function the CLI calls, from a TOML config) with the
/// residual-VQ codebook and the ConvNeXt backbone loaded as dylibs: the loss falls, an
/// interrupted run resumes to exactly the straight run, and the exported folder tokenizes
/// through the pipeline (the stage actors) with the same `[plugins]` section, equal to the
/// trained model.
#[test]
fn train_tokenizer_with_plugin_dylibs_resumes_exactly_and_serves_the_export() {
    use lavit::train::tokenizer::{train, TokenizerTrainConfig};
    let tmp = tempfile::tempdir().unwrap();
    crate::common::write_images(&tmp.path().join("images"), 12);
    let (m, _) = stage1_manifest(tmp.path());
    let t = &m.tokenizer;
    let weights = convnext_weights(&m, tmp.path());
    let plugins = plugins_toml(&m, t.encoder_width, t.code_dim, Some(&weights));

    let cfg = TokenizerTrainConfig::from_toml_file(&train_toml(tmp.path(), "straight", &plugins))
        .unwrap();
    assert_eq!(cfg.plugins.codebook.as_ref().unwrap().plugin, "residual-vq");
    let straight = train(&cfg).unwrap();
    assert_eq!(straight.steps, 18);
    assert!(straight
        .tokenizer
        .encoder
        .backbone
        .name()
        .starts_with("convnext"));
    assert!(straight
        .tokenizer
        .quantizer
        .quantize
        .name()
        .starts_with("residual-vq"));
    let (loss, rec) = (straight.series("loss"), straight.series("rec_loss"));
    eprintln!(
        "stage-1 with plugin dylibs: loss {:.4} → {:.4}, 1 − cos {:.4} → {:.4}, perplexity {:?}",
        loss[0],
        loss[loss.len() - 1],
        rec[0],
        rec[rec.len() - 1],
        straight.series("perplexity").last()
    );
    assert!(
        mean(&loss[loss.len() - 3..]) < 0.8 * mean(&loss[..3]),
        "loss did not fall: {loss:?}"
    );
    assert!(*straight.series("perplexity").last().unwrap() > 2.0);

    // Interrupted after 9 steps (codebook initialised at step 6), then resumed.
    let resumed_toml = train_toml(tmp.path(), "resumed", &plugins);
    let mut first = TokenizerTrainConfig::from_toml_file(&resumed_toml).unwrap();
    first.stop_after = Some(9);
    assert_eq!(train(&first).unwrap().steps, 9);
    let resumed = train(&TokenizerTrainConfig::from_toml_file(&resumed_toml).unwrap()).unwrap();
    assert_eq!(resumed.steps, 18);
    let (a, b) = (straight.series("loss"), resumed.series("loss"));
    for (x, y) in a.iter().zip(&b) {
        // Earlier steps' values come back from the metrics log as text.
        assert!((x - y).abs() <= 1e-6 * x.abs(), "{a:?} vs {b:?}");
    }
    // The trained state (tokenizer and plugin codebook) equals the straight run's. Not
    // asserted bit for bit here: with the residual VQ a resumed run can drift from the
    // straight one by float rounding (a few ULP from the first resumed step on); the
    // built-in codebook resumes bit-exactly (tests/tokenizer.rs).
    let state = |r: &lavit::train::tokenizer::TrainReport| {
        let mut sd = lavit_runtime::train::var_store_state_dict(&r.tokenizer.selector.vs);
        sd.extend(lavit_runtime::train::var_store_state_dict(
            &r.tokenizer.quantizer.vs,
        ));
        sd.extend(r.tokenizer.quantizer.quantize.state_dict().unwrap());
        sd
    };
    let (sa, sb) = (state(&straight), state(&resumed));
    assert_eq!(sa.len(), sb.len());
    for (k, v) in &sa {
        assert!(
            v.allclose(&sb[k], 1e-5, 1e-6, false),
            "`{k}` differs after resume"
        );
    }
    assert!(sa.contains_key("codebooks.1"));

    // The export: plugin weights beside the official files, no EVA file.
    let export = straight.export_dir.clone().unwrap();
    let vt = export.join("visual_tokenizer");
    assert!(vt.join("backbone.safetensors").is_file() && vt.join("codebook.safetensors").is_file());
    assert!(!vt.join("eva_vitg_psz14.safetensors").exists());

    // Served with the same [plugins] section: a tokenizer-only pipeline on the export.
    let serve = tmp.path().join("serve.toml");
    std::fs::write(
        &serve,
        format!(
            "[pipeline]\ncheckpoint = {:?}\nstages = \"tokenizer\"\n{plugins}",
            export
        ),
    )
    .unwrap();
    let pcfg = lavit::pipeline::PipelineConfig::from_file(&serve).unwrap();
    let pipe = lavit::pipeline::Pipeline::build(&pcfg).unwrap();
    let paths: Vec<PathBuf> = (0..3)
        .map(|i| tmp.path().join(format!("images/img{i:02}.png")))
        .collect();
    let imgs: Vec<image::DynamicImage> = paths.iter().map(|p| image::open(p).unwrap()).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let served = rt.block_on(pipe.tokenize(&imgs)).unwrap();
    // The same as the trained model and as the folder loaded directly with the plugins.
    let x = straight.tokenizer.load_images(&paths).unwrap();
    let trained = straight.tokenizer.tokenize(&x).unwrap();
    let loaded = VisualTokenizer::load(
        &export,
        Device::Cpu,
        LoadParts::tokenize_only(),
        &lavit::tokenizer::TokenizerPlugins::load(&pcfg.plugins).unwrap(),
    )
    .unwrap();
    assert_eq!(loaded.tokenize(&x).unwrap(), trained);
    assert_eq!(served, trained.ids);
    assert!(served.iter().all(|ids| !ids.is_empty()), "{served:?}");
    // The absent stages refuse clearly.
    let e = rt
        .block_on(pipe.generate("a disc", Default::default()))
        .unwrap_err();
    assert!(e.to_string().contains("no llm stage"), "{e}");
}

/// Plugin parts whose geometry does not fit the tokenizer are refused before any forward,
/// naming both sides: directly, and from a training config.
#[test]
fn mismatched_plugin_geometry_is_refused_naming_both_sides() {
    let host = example_host();
    let tmp = tempfile::tempdir().unwrap();
    let (m, _) = stage1_manifest(tmp.path());
    let t = &m.tokenizer;
    let backbone = host
        .backbone(
            &component(
                "convnext",
                serde_json::json!({"image_size": t.img_size, "patch_size": t.patch_size, "depth": 1, "dim": 32}),
            ),
            Device::Cpu,
        )
        .unwrap();
    let codebook = host
        .codebook(
            &component(
                "residual-vq",
                serde_json::json!({"levels": 2, "codes_per_level": 16, "code_dim": 8}),
            ),
            Device::Cpu,
        )
        .unwrap();
    let e = VisualTokenizer::with_parts(&m, Device::Cpu, backbone, codebook)
        .err()
        .unwrap()
        .to_string();
    for want in [
        "backbone `convnext",
        "width is 32",
        &format!(
            "tokenizer.encoder_width (the token selector's and merger's input width) is {}",
            t.encoder_width
        ),
        "codebook `residual-vq",
        "code_dim is 8",
        &format!(
            "tokenizer.code_dim (encode_task_layer's output width) is {}",
            t.code_dim
        ),
    ] {
        assert!(e.contains(want), "`{want}` missing from: {e}");
    }

    crate::common::write_images(&tmp.path().join("images"), 4);
    let plugins = plugins_toml(&m, 32, t.code_dim, None);
    let cfg = lavit::train::tokenizer::TokenizerTrainConfig::from_toml_file(&train_toml(
        tmp.path(),
        "bad",
        &plugins,
    ))
    .unwrap();
    let e = format!("{:#}", lavit::train::tokenizer::train(&cfg).err().unwrap());
    assert!(
        e.contains("width is 32")
            && e.contains(&format!(
                "encoder_width (the token selector's and merger's input width) is {}",
                t.encoder_width
            )),
        "{e}"
    );
}
