//! `lavit quantize CHECKPOINT OUT --mode int8|int4`: a copy of a checkpoint folder whose LLM
//! linear layers (q/k/v/o, gate/up/down) are stored quantised (see `lavit_llm::quantize`),
//! in the layout the loader reads: `language_model/` as safetensors shards with an index, the
//! manifest's `llm.quantization` recording the mode. Every other file is hard-linked (or
//! copied where links fail). The folder loads without a float copy of the quantised layers.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use lavit_llm::quantize::quantize_state_dict;
use lavit_llm::LlamaForCausalLM;
use lavit_runtime::checkpoint::{self, StateDict};
use lavit_runtime::manifest::{LavitManifest, QuantMode};

/// Arguments of `lavit quantize`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A LaVIT checkpoint folder with float LLM weights.
    pub checkpoint: PathBuf,
    /// The folder to write (must not exist, or be empty).
    pub out: PathBuf,
    /// `int8` (one scale per output channel) or `int4` (a scale and a zero per group).
    #[arg(long)]
    pub mode: String,
    /// Input features per int4 group: 32, 64 or 128.
    #[arg(long, default_value_t = 128)]
    pub group_size: i64,
}

/// Largest safetensors shard written (bytes of tensor data).
const SHARD_BYTES: i64 = 2 << 30;

pub fn run(a: Args) -> Result<()> {
    let mode = match QuantMode::parse(&a.mode, Some(a.group_size)) {
        Ok(QuantMode::None) => bail!("--mode none: nothing to quantise (int8 or int4)"),
        Ok(m) => m,
        Err((true, msg)) => bail!("--group-size {}: {msg}", a.group_size),
        Err((false, msg)) => bail!("--mode {msg}"),
    };
    let src = &a.checkpoint;
    if !src.is_dir() {
        bail!("{}: not a checkpoint folder", src.display());
    }
    let manifest = LavitManifest::for_checkpoint(src)?;
    if let Some(q) = &manifest.llm.quantization {
        bail!(
            "{}: its LLM is stored quantised already ({}; manifest llm.quantization): quantise the float checkpoint",
            src.join("manifest.json").display(),
            q.mode
        );
    }
    let out = &a.out;
    if out.exists()
        && std::fs::read_dir(out)
            .with_context(|| format!("{}: not a folder", out.display()))?
            .next()
            .is_some()
    {
        bail!("{}: exists and is not empty", out.display());
    }
    let lm = src.join("language_model");
    let (_cfg, sd) = LlamaForCausalLM::read_folder(&lm, QuantMode::None)?;
    let float_bytes = bytes(&sd);
    let qsd = quantize_state_dict(sd, mode, &lm.display().to_string())?;
    let q_bytes = bytes(&qsd);
    copy_tree(src, out, Path::new(""))?;
    let out_lm = out.join("language_model");
    write_shards(&out_lm, &qsd)?;
    // The manifest: the source's own keys kept, `llm.quantization` set.
    let mut value: serde_json::Value = match std::fs::symlink_metadata(src.join("manifest.json")) {
        Ok(_) => serde_json::from_str(&lavit_runtime::fsread::read_config(
            &src.join("manifest.json"),
        )?)
        .with_context(|| format!("{}", src.join("manifest.json").display()))?,
        Err(_) => serde_json::to_value(LavitManifest::official())?,
    };
    let llm = value
        .as_object_mut()
        .context("manifest.json is not an object")?
        .entry("llm")
        .or_insert_with(|| serde_json::json!({}));
    llm.as_object_mut()
        .context("manifest.json: `llm` is not an object")?
        .insert(
            "quantization".into(),
            serde_json::to_value(mode.manifest())?,
        );
    checkpoint::atomic_write(
        &out.join("manifest.json"),
        serde_json::to_string_pretty(&value)?.as_bytes(),
    )?;
    // What was written must read back as what the loader takes.
    let m = LavitManifest::for_checkpoint(out)?;
    LlamaForCausalLM::read_folder(&out_lm, m.llm.quant_mode())?;
    println!(
        "wrote {} ({mode}): the LLM's weights {:.1} MB -> {:.1} MB",
        out.display(),
        float_bytes as f64 / 1e6,
        q_bytes as f64 / 1e6
    );
    Ok(())
}

fn bytes(sd: &StateDict) -> i64 {
    sd.values()
        .map(|t| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64)
        .sum()
}

/// Whether `name` (in `language_model/`) is a weight file or a shard index the quantised
/// shards replace.
fn is_weight_file(name: &str) -> bool {
    let weights = (name.starts_with("model") && name.ends_with(".safetensors"))
        || (name.starts_with("pytorch_model") && name.ends_with(".bin"));
    weights || name.ends_with(".index.json")
}

/// Link (or copy) every regular file of `src/rel` into `dst/rel`, recursively, except the
/// root manifest and the LLM's weight files.
fn copy_tree(src: &Path, dst: &Path, rel: &Path) -> Result<()> {
    let from = src.join(rel);
    let to = dst.join(rel);
    std::fs::create_dir_all(&to).with_context(|| format!("creating {}", to.display()))?;
    for e in std::fs::read_dir(&from).with_context(|| format!("reading {}", from.display()))? {
        let e = e?;
        let name = e.file_name();
        let name_s = name.to_string_lossy();
        let r = rel.join(&name);
        let meta = std::fs::metadata(e.path())?;
        if meta.is_dir() {
            copy_tree(src, dst, &r)?;
            continue;
        }
        if !meta.is_file()
            || (rel.as_os_str().is_empty() && name_s == "manifest.json")
            || (rel == Path::new("language_model") && is_weight_file(&name_s))
        {
            continue;
        }
        let target = dst.join(&r);
        if std::fs::hard_link(e.path(), &target).is_err() {
            std::fs::copy(e.path(), &target).with_context(|| {
                format!("copying {} to {}", e.path().display(), target.display())
            })?;
        }
    }
    Ok(())
}

/// `sd` as safetensors shards of at most [`SHARD_BYTES`] each with a
/// `model.safetensors.index.json` (one `model.safetensors` when it fits in one).
fn write_shards(dir: &Path, sd: &StateDict) -> Result<()> {
    let mut shards: Vec<StateDict> = vec![StateDict::new()];
    let mut size = 0;
    for (k, t) in sd {
        let b = t.numel() as i64 * t.kind().elt_size_in_bytes() as i64;
        if size > 0 && size + b > SHARD_BYTES {
            shards.push(StateDict::new());
            size = 0;
        }
        size += b;
        if let Some(last) = shards.last_mut() {
            last.insert(k.clone(), t.shallow_clone());
        }
    }
    if shards.len() == 1 {
        checkpoint::save_safetensors(&dir.join("model.safetensors"), &shards[0], None)?;
        return Ok(());
    }
    let n = shards.len();
    let mut map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let name = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        checkpoint::save_safetensors(&dir.join(&name), shard, None)?;
        for k in shard.keys() {
            map.insert(k.clone(), serde_json::Value::String(name.clone()));
        }
    }
    let index = serde_json::json!({
        "metadata": {"total_size": bytes(sd)},
        "weight_map": map,
    });
    checkpoint::atomic_write(
        &dir.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index)?.as_bytes(),
    )?;
    Ok(())
}
