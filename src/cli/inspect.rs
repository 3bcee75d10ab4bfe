//! `lavit inspect PATH`: keys, shapes, dtypes and totals of a checkpoint file or folder,
//! and `lavit convert SRC DST`: the same tensors written as safetensors, keys unchanged.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use lavit_runtime::checkpoint;

/// Every checkpoint file (or shard index) under `path`, or `path` itself.
fn checkpoint_files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    if !path.is_dir() {
        anyhow::bail!("{}: no such file or folder", path.display());
    }
    let mut out = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(path)
        .with_context(|| format!("reading {}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    let has_index = entries
        .iter()
        .any(|p| p.to_string_lossy().ends_with(".index.json"));
    for p in entries {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let weights = [".safetensors", ".bin", ".pt", ".pth"]
            .iter()
            .any(|e| name.ends_with(e));
        if name.ends_with(".index.json") || (!has_index && weights) {
            out.push(p);
        }
    }
    if out.is_empty() {
        anyhow::bail!(
            "{}: no checkpoint files (*.safetensors, *.bin, *.pt, *.index.json)",
            path.display()
        );
    }
    Ok(out)
}

pub fn inspect(path: &Path) -> Result<()> {
    let mut grand_params: i64 = 0;
    let mut grand_tensors = 0usize;
    for file in checkpoint_files(path)? {
        let sd = checkpoint::load_path(&file)?;
        println!("# {}", file.display());
        let mut params: i64 = 0;
        for (k, t) in &sd {
            let n: i64 = t.size().iter().product();
            params += n;
            println!("{k}\t{:?}\t{:?}", t.size(), t.kind());
        }
        println!("# {} tensors, {} parameters", sd.len(), params);
        grand_params += params;
        grand_tensors += sd.len();
    }
    println!("# total: {grand_tensors} tensors, {grand_params} parameters");
    Ok(())
}

pub fn convert(src: &Path, dst: &Path) -> Result<()> {
    let sd = checkpoint::load_path(src)?;
    checkpoint::save_safetensors(dst, &sd, None)?;
    println!("wrote {} tensors to {}", sd.len(), dst.display());
    Ok(())
}
