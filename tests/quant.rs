//! Integration tests: weight-only quantisation of the LLM's linear layers (int8 per output
//! channel, group-wise int4) on the tiny fixture, `lavit quantize` folders, and the errors of
//! bad settings.

use std::path::Path;
use std::process::Command;

use lavit_llm::quantize::{stored, QLinear};
use lavit_llm::{ForwardArgs, LlamaForCausalLM, LlmStageModel};
use lavit_runtime::checkpoint::{self, StateDict};
use lavit_runtime::manifest::QuantMode;
use tch::nn::Module;
use tch::{Device, Kind, Tensor};

use crate::common::fixture_dir;

fn load(dir: &Path, stored: QuantMode, target: QuantMode) -> LlamaForCausalLM {
    LlamaForCausalLM::from_pretrained_quantized(
        &dir.join("language_model"),
        Device::Cpu,
        Kind::Float,
        stored,
        target,
    )
    .unwrap()
    .1
}

/// Logits (T, V) of the fixture's sequences: the mixed image/text sequence, the text → image
/// prompt, the two greedy image-token references, and the understanding embeddings.
fn fixture_logits(m: &LlamaForCausalLM, expected: &StateDict) -> Vec<Tensor> {
    let _g = tch::no_grad_guard();
    let args = ForwardArgs::default();
    let mut out: Vec<Tensor> = [
        "mixed_sequence",
        "prompt_ids",
        "t2i_greedy_cfg_2",
        "t2i_greedy_cfg_4",
    ]
    .iter()
    .map(|k| {
        m.forward_ids(&expected[*k].unsqueeze(0), &args, None)
            .unwrap()
            .squeeze_dim(0)
    })
    .collect();
    let e = &expected["understanding_inputs_embeds"];
    out.push(
        m.forward_embeds(&e.unsqueeze(0), &args, None)
            .unwrap()
            .squeeze_dim(0),
    );
    out
}

/// (max |Δ logit|, share of positions whose arg-max agrees, positions).
fn agreement(a: &[Tensor], b: &[Tensor]) -> (f64, f64, i64) {
    let (mut diff, mut same, mut n) = (0.0f64, 0i64, 0i64);
    for (x, y) in a.iter().zip(b) {
        diff = diff.max((x - y).abs().max().double_value(&[]));
        same += x
            .argmax(-1, false)
            .eq_tensor(&y.argmax(-1, false))
            .sum(Kind::Int64)
            .int64_value(&[]);
        n += x.size()[0];
    }
    (diff, same as f64 / n as f64, n)
}

fn expected() -> StateDict {
    checkpoint::load_file(&fixture_dir().join("reference/expected.safetensors")).unwrap()
}

fn lavit(args: &[&std::ffi::OsStr]) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_lavit"))
        .args(args)
        .output()
        .unwrap();
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

#[test]
fn quantized_layers_compute_the_dequantized_weights() {
    tch::manual_seed(3);
    let _g = tch::no_grad_guard();
    let w = Tensor::randn([48, 128], (Kind::Float, Device::Cpu)) * 0.05;
    let x = Tensor::randn([3, 5, 128], (Kind::Float, Device::Cpu));
    // int8: w ≈ q·s per row, |w − q·s| ≤ s/2.
    let (q, s) = stored(QuantMode::Int8, &w).unwrap();
    assert_eq!(
        (q.kind(), q.size(), s.size()),
        (Kind::Int8, vec![48, 128], vec![48])
    );
    let deq8 = q.to_kind(Kind::Float) * s.unsqueeze(1);
    let err = (&deq8 - &w).abs() - s.unsqueeze(1) / 2.0;
    assert!(err.max().double_value(&[]) <= 1e-7);
    // int4: two values per byte, the even feature in the high nibble; w ≈ (q − 8)·s + zero.
    let g = 32;
    let (p, sz) = stored(QuantMode::Int4 { group_size: g }, &w).unwrap();
    assert_eq!(
        (p.kind(), p.size(), sz.size()),
        (Kind::Uint8, vec![48, 64], vec![4, 48, 2])
    );
    let p32 = p.to_kind(Kind::Int64);
    let q4 = Tensor::stack(
        &[p32.divide_scalar_mode(16i64, "floor"), p32.remainder(16i64)],
        -1,
    )
    .reshape([48, 128])
    .to_kind(Kind::Float); // (N, K)
    let (scale, zero) = (sz.select(2, 0).tr(), sz.select(2, 1).tr()); // (N, K/g)
    let deq4 = ((q4.reshape([48, 4, g]) - 8.0) * scale.unsqueeze(2) + zero.unsqueeze(2))
        .reshape([48, 128]);
    let err4 = (&deq4 - &w).abs() - scale.repeat_interleave_self_int(g, 1i64, None::<i64>) / 2.0;
    assert!(err4.max().double_value(&[]) <= 1e-6);
    // The packed kernels compute x·deqᵀ (in bf16: within 1 % of the largest output).
    for (mode, deq) in [
        (QuantMode::Int8, &deq8),
        (QuantMode::Int4 { group_size: g }, &deq4),
    ] {
        let l = QLinear::quantize(mode, &w, None, Kind::Float).unwrap();
        let y = l.forward(&x);
        assert_eq!((y.size(), y.kind()), (vec![3, 5, 48], Kind::Float));
        let want = x.matmul(&deq.tr());
        let rel = (&y - &want).abs().max().double_value(&[]) / want.abs().max().double_value(&[]);
        assert!(rel < 1e-2, "{mode}: relative error {rel}");
    }
    // A shape the int4 packing cannot take is an error, not a crash.
    let odd = Tensor::randn([40, 128], (Kind::Float, Device::Cpu));
    let e = QLinear::quantize(QuantMode::Int4 { group_size: 32 }, &odd, None, Kind::Float)
        .unwrap_err()
        .to_string();
    assert!(e.contains("40 output features"), "{e}");
}

#[test]
fn int8_and_int4_logits_agree_with_float32_on_the_fixture() {
    let dir = fixture_dir();
    let expected = expected();
    let float = fixture_logits(&load(&dir, QuantMode::None, QuantMode::None), &expected);
    let int8 = load(&dir, QuantMode::None, QuantMode::Int8);
    assert_eq!(int8.quant_mode(), QuantMode::Int8);
    let (d8, top8, n) = agreement(&fixture_logits(&int8, &expected), &float);
    let int4 = load(&dir, QuantMode::None, QuantMode::Int4 { group_size: 32 });
    let (d4, top4, _) = agreement(&fixture_logits(&int4, &expected), &float);
    let scale = float
        .iter()
        .map(|t| t.abs().max().double_value(&[]))
        .fold(0.0, f64::max);
    println!(
        "fixture logits over {n} positions (largest |logit| {scale:.3}): int8 max|diff| {d8:.2e}, top-1 agree {:.1} %; int4 (g32) max|diff| {d4:.2e}, top-1 agree {:.1} %",
        100.0 * top8,
        100.0 * top4
    );
    // Measured (108 positions, largest |logit| 6.7): int8 0.32 and 95.4 %, int4 3.8 and
    // 54.6 %. The fixture's random weights (std 0.15 in every layer) amplify any rounding:
    // PyTorch on the same sequence gives 0.22 / 92.9 % with the int8-dequantised weights in
    // float32 and 0.15 / 92.9 % with bf16 matmuls alone. Bounds with margin:
    assert!(d8 < 0.5, "int8 max |diff| {d8}");
    assert!(top8 >= 0.9, "int8 top-1 agreement {top8}");
    assert!(d4 < 6.0, "int4 max |diff| {d4}");
    assert!(top4 >= 0.45, "int4 top-1 agreement {top4}");
    assert!(d4 > d8, "int4 ({d4}) is coarser than int8 ({d8})");
}

#[test]
fn quantized_folder_round_trips_and_loads_without_float_layers() {
    let dir = fixture_dir();
    let expected = expected();
    let tmp = tempfile::tempdir().unwrap();
    for (mode, args) in [
        (QuantMode::Int8, vec!["--mode", "int8"]),
        (
            QuantMode::Int4 { group_size: 32 },
            vec!["--mode", "int4", "--group-size", "32"],
        ),
    ] {
        let out = tmp.path().join(mode.name());
        let mut a: Vec<&std::ffi::OsStr> =
            vec!["quantize".as_ref(), dir.as_os_str(), out.as_os_str()];
        a.extend(args.iter().map(|s| std::ffi::OsStr::new(*s)));
        let (ok, log) = lavit(&a);
        assert!(ok, "{log}");
        // The manifest records the mode; the other parts of the folder are there.
        let m = lavit_runtime::manifest::LavitManifest::for_checkpoint(&out).unwrap();
        assert_eq!(m.llm.quant_mode(), mode);
        for part in [
            "visual_tokenizer",
            "pixel_decoding",
            "language_model/tokenizer.model",
        ] {
            assert!(out.join(part).exists(), "{part} missing");
        }
        // Stored: int8 / packed uint8 weights, no float copy of a linear layer.
        let sd = checkpoint::load_path(&out.join("language_model")).unwrap();
        for (k, t) in &sd {
            if lavit_llm::quantize::is_quantizable(k) {
                assert_eq!(t.kind(), Kind::Int8, "{k}");
            }
        }
        assert!(
            sd.contains_key("model.layers.0.mlp.down_proj.scales")
                || sd.contains_key("model.layers.0.mlp.down_proj.scales_and_zeros")
        );
        assert_eq!(
            sd["model.embed_tokens.weight"].kind(),
            Kind::Float,
            "the embeddings stay float"
        );
        // The folder through the stage's loader (as stored, whatever `quantize` says but
        // another mode) gives the logits of quantising at load, bit for bit.
        let st = LlmStageModel::load(&out, Device::Cpu, Kind::Float).unwrap();
        assert_eq!(st.model.quant_mode(), mode);
        let again = LlmStageModel::load_quantized(&out, Device::Cpu, Kind::Float, mode).unwrap();
        let at_load = load(&dir, QuantMode::None, mode);
        let (d, top, _) = agreement(
            &fixture_logits(&st.model, &expected),
            &fixture_logits(&at_load, &expected),
        );
        assert_eq!((d, top), (0.0, 1.0), "{mode}");
        let (d, _, _) = agreement(
            &fixture_logits(&again.model, &expected),
            &fixture_logits(&at_load, &expected),
        );
        assert_eq!(d, 0.0);
        // No float variable of a linear layer in the VarStore.
        let vars = st.vs.variables();
        assert!(
            vars.keys().all(|k| !k.contains("_proj")),
            "{:?}",
            vars.keys()
        );
        assert!(vars.contains_key("model.embed_tokens.weight"));
        // Another quantisation of a quantised folder is refused, naming the folder.
        let other = if mode == QuantMode::Int8 {
            QuantMode::Int4 { group_size: 32 }
        } else {
            QuantMode::Int8
        };
        let e = LlmStageModel::load_quantized(&out, Device::Cpu, Kind::Float, other)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("language_model") && e.contains("llm.quantization"),
            "{e}"
        );
        // And `lavit quantize` of it.
        let again_out = tmp.path().join("twice");
        let (ok, log) = lavit(&[
            "quantize".as_ref(),
            out.as_os_str(),
            again_out.as_os_str(),
            "--mode".as_ref(),
            "int8".as_ref(),
        ]);
        assert!(!ok && log.contains("quantised already"), "{log}");
    }
}

#[test]
fn bad_quantize_settings_name_the_file_and_key() {
    let dir = fixture_dir();
    // A group size that does not divide a layer's input features: the folder and the layer.
    let e = LlamaForCausalLM::from_pretrained_quantized(
        &dir.join("language_model"),
        Device::Cpu,
        Kind::Float,
        QuantMode::None,
        QuantMode::Int4 { group_size: 64 },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("language_model")
            && e.contains("model.layers.0.")
            && e.contains("96 input features")
            && e.contains("group size 64"),
        "{e}"
    );
    // The pipeline config: the file and the key.
    let tmp = tempfile::tempdir().unwrap();
    for (text, key, needle) in [
        (
            "[pipeline]\nquantize = \"int5\"\n",
            "pipeline.quantize",
            "int5",
        ),
        (
            "[pipeline]\nquantize = \"int4\"\nquantize_group_size = 48\n",
            "pipeline.quantize_group_size",
            "48",
        ),
    ] {
        let p = tmp.path().join("q.toml");
        std::fs::write(&p, text).unwrap();
        let e = lavit::pipeline::PipelineConfig::from_file(&p)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("q.toml") && e.contains(key) && e.contains(needle),
            "{e}"
        );
    }
    let p = tmp.path().join("ok.toml");
    std::fs::write(
        &p,
        "[pipeline]\nquantize = \"int4\"\nquantize_group_size = 64\n",
    )
    .unwrap();
    let c = lavit::pipeline::PipelineConfig::from_file(&p).unwrap();
    assert_eq!(c.quant_mode(), QuantMode::Int4 { group_size: 64 });
    // A manifest recording an unknown quantisation.
    let m = tmp.path().join("ckpt");
    std::fs::create_dir_all(&m).unwrap();
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    v["llm"]["quantization"] = serde_json::json!({"mode": "int3"});
    std::fs::write(m.join("manifest.json"), v.to_string()).unwrap();
    let e = lavit_runtime::manifest::LavitManifest::for_checkpoint(&m)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("manifest.json") && e.contains("llm.quantization.mode") && e.contains("int3"),
        "{e}"
    );
    // The command line: bad mode and group size.
    for (args, needle) in [
        (vec!["--mode", "int5"], "--mode"),
        (vec!["--mode", "int4", "--group-size", "48"], "--group-size"),
    ] {
        let out = tmp.path().join("never");
        let mut a: Vec<&std::ffi::OsStr> =
            vec!["quantize".as_ref(), dir.as_os_str(), out.as_os_str()];
        a.extend(args.iter().map(|s| std::ffi::OsStr::new(*s)));
        let (ok, log) = lavit(&a);
        assert!(!ok && log.contains(needle), "{log}");
        assert!(!out.exists());
    }
}
