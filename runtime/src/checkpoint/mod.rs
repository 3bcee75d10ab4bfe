//! Checkpoint I/O used by every stage: safetensors (single file or HF shards), PyTorch zip
//! pickles read without executing anything, HF `*.index.json` shard maps checked for
//! path escapes, strict loading into a `VarStore` with a report of every missing or
//! unexpected key and shape mismatch, and atomic safetensors saves.
//!
//! A model file is untrusted input: every failure here is an [`Error`] naming the file
//! and what was wrong, never a panic.

pub mod pickle;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use tch::{nn, Device, Kind, Tensor};

use crate::error::{Error, Result};

/// Tensors by checkpoint key, in key order, on the CPU with their stored dtype.
pub type StateDict = BTreeMap<String, Tensor>;

/// What kind of file a path holds, decided by its first bytes (not its extension).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    Safetensors,
    TorchZip,
}

pub fn sniff(path: &Path) -> Result<FileFormat> {
    use std::io::Read;
    let mut f = crate::fsread::open_regular(path)?;
    let mut head = [0u8; 9];
    let n = f.read(&mut head).map_err(|e| Error::io(path, e))?;
    if n >= 4 && &head[..4] == b"PK\x03\x04" {
        return Ok(FileFormat::TorchZip);
    }
    if n >= 9 && head[8] == b'{' {
        return Ok(FileFormat::Safetensors);
    }
    Err(Error::ckpt(
        path,
        "neither a safetensors file nor a PyTorch zip checkpoint (legacy tar/pickle files are not read)",
    ))
}

/// Load every tensor of one file (safetensors or `torch.save` zip).
/// A pickle whose root is a bare tensor gives one entry with key `""`.
pub fn load_file(path: &Path) -> Result<StateDict> {
    match sniff(path)? {
        FileFormat::Safetensors => load_safetensors(path),
        FileFormat::TorchZip => load_torch_zip(path),
    }
}

/// Largest safetensors header accepted (the `safetensors` crate enforces its own cap too).
const MAX_SAFETENSORS_HEADER: u64 = 100 << 20;
/// Most tensors in one safetensors file (a LaVIT part holds < 2,000; SDXL's U-Net 1,680).
/// Counted in the raw header before anything is built from it: 1.36 M empty tensors in a
/// 100 MB header otherwise cost 1.5 GiB of tensor objects before any key check.
pub const MAX_SAFETENSORS_TENSORS: usize = 1 << 17;

/// Every tensor of a safetensors file, without copying the data: the file is mapped once
/// (copy-on-write, through libtorch's own file mapping, which lives as long as any tensor
/// of it) and each tensor is a view of its bytes; the header is validated first (offsets
/// inside the file, sizes matching shapes). A tensor whose bytes are not aligned for its
/// dtype is copied out instead. Pages are read from disk when first used.
///
/// The views alias the file: replace a checkpoint by writing a new file and renaming it
/// over the old one (as every writer here does), never by rewriting it in place while a
/// process has it loaded.
pub fn load_safetensors(path: &Path) -> Result<StateDict> {
    let file = crate::fsread::open_regular(path)?;
    // SAFETY: the map is read-only and dropped before this function returns; a file
    // truncated under us would fault, which is the usual mmap caveat for model files.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    if let Some(&head) = map.first_chunk::<8>() {
        let n = u64::from_le_bytes(head);
        if n > MAX_SAFETENSORS_HEADER {
            return Err(Error::ckpt(
                path,
                format!(
                    "safetensors header of {n} bytes is over the {MAX_SAFETENSORS_HEADER}-byte cap"
                ),
            ));
        }
        // Each tensor's entry has one "data_offsets" key: their count bounds the tensors
        // (a name holding the word only makes the count larger).
        let header = map.get(8..8 + n as usize).unwrap_or(&[]);
        let tensors = count_occurrences(header, b"\"data_offsets\"");
        if tensors > MAX_SAFETENSORS_TENSORS {
            return Err(Error::ckpt(
                path,
                format!(
                    "the safetensors header lists {tensors} tensors, over the \
                     {MAX_SAFETENSORS_TENSORS}-tensor cap for one file"
                ),
            ));
        }
    }
    let st = safetensors::SafeTensors::deserialize(&map)
        .map_err(|e| Error::ckpt(path, format!("invalid safetensors: {e}")))?;
    let bytes = file_bytes(&file, path, map.len());
    let mut out = StateDict::new();
    for (name, view) in st.tensors() {
        let kind = st_kind(view.dtype()).ok_or_else(|| {
            Error::ckpt(
                path,
                format!("tensor `{name}` has unsupported dtype {:?}", view.dtype()),
            )
        })?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let data = view.data();
        let start = data.as_ptr() as usize - map.as_ptr() as usize;
        let viewed = bytes
            .as_ref()
            .filter(|_| !data.is_empty())
            .and_then(|b| byte_view(b, start, data.len(), kind, &shape).ok());
        let t = match viewed {
            Some(t) => t,
            None => Tensor::f_from_data_size(data, &shape, kind)
                .map_err(|e| Error::ckpt(path, format!("tensor `{name}`: {e}")))?,
        };
        out.insert(name, t);
    }
    Ok(out)
}

/// How many times `needle` occurs in `hay` (non-overlapping).
fn count_occurrences(hay: &[u8], needle: &[u8]) -> usize {
    let Some((&first, _)) = needle.split_first() else {
        return 0;
    };
    let mut n = 0;
    let mut i = 0;
    while let Some(off) = hay[i..].iter().position(|&b| b == first) {
        i += off;
        if hay[i..].starts_with(needle) {
            n += 1;
            i += needle.len();
        } else {
            i += 1;
        }
    }
    n
}

/// The whole file as one uint8 tensor over libtorch's private file mapping, or None where
/// libtorch cannot map it (the caller copies then). Opened through `/proc/self/fd` on
/// Linux, so it is the very file `file` checked as regular.
pub(crate) fn file_bytes(file: &std::fs::File, path: &Path, len: usize) -> Option<Tensor> {
    #[cfg(target_os = "linux")]
    let name = {
        use std::os::unix::io::AsRawFd;
        format!("/proc/self/fd/{}", file.as_raw_fd())
    };
    #[cfg(not(target_os = "linux"))]
    let name = {
        let _ = file;
        path.to_str()?.to_string()
    };
    let len = i64::try_from(len).ok()?;
    match Tensor::f_from_file(&name, false, Some(len), (Kind::Uint8, Device::Cpu)) {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "not mapped; copying tensors");
            None
        }
    }
}

/// Bytes `start..start + len` of `bytes` seen as a tensor of `kind` and `shape` (no copy).
pub(crate) fn byte_view(
    bytes: &Tensor,
    start: usize,
    len: usize,
    kind: Kind,
    shape: &[i64],
) -> std::result::Result<Tensor, tch::TchError> {
    let (start, len) = (start as i64, len as i64);
    bytes
        .f_narrow(0, start, len)?
        .f_view_dtype(kind)?
        .f_view(shape)
}

fn st_kind(d: safetensors::Dtype) -> Option<Kind> {
    use safetensors::Dtype as D;
    Some(match d {
        D::F32 => Kind::Float,
        D::F16 => Kind::Half,
        D::BF16 => Kind::BFloat16,
        D::F64 => Kind::Double,
        D::I64 => Kind::Int64,
        D::I32 => Kind::Int,
        D::I16 => Kind::Int16,
        D::I8 => Kind::Int8,
        D::U8 => Kind::Uint8,
        D::BOOL => Kind::Bool,
        _ => return None,
    })
}

fn kind_st(k: Kind) -> Option<safetensors::Dtype> {
    use safetensors::Dtype as D;
    Some(match k {
        Kind::Float => D::F32,
        Kind::Half => D::F16,
        Kind::BFloat16 => D::BF16,
        Kind::Double => D::F64,
        Kind::Int64 => D::I64,
        Kind::Int => D::I32,
        Kind::Int16 => D::I16,
        Kind::Int8 => D::I8,
        Kind::Uint8 => D::U8,
        Kind::Bool => D::BOOL,
        _ => return None,
    })
}

/// Load a `torch.save` zip. Nested dicts are flattened with `.` (e.g. `{"model": {...}}`
/// gives `model.<key>`); a bare tensor gives the key `""`.
pub fn load_torch_zip(path: &Path) -> Result<StateDict> {
    use pickle::Value;
    let mut ar = pickle::TorchArchive::open(path)?;
    let root = std::mem::replace(&mut ar.root, Value::None);
    let mut refs = Vec::new();
    let mut key_bytes = 0usize;
    flatten(&root, String::new(), &mut refs, &mut key_bytes, path)?;
    let mut out = StateDict::new();
    for (k, r) in refs {
        let t = ar.tensor(&r)?;
        if out.insert(k.clone(), t).is_some() {
            return Err(Error::ckpt(path, format!("key `{k}` appears twice")));
        }
    }
    Ok(out)
}

/// Total bytes of the flattened keys of one pickle (nested dicts repeat each prefix in
/// every key below it): 64 MiB. LLaMA-70B's 723 keys take ~40 KiB.
const MAX_KEY_BYTES: usize = 64 << 20;

fn flatten(
    v: &pickle::Value,
    prefix: String,
    out: &mut Vec<(String, pickle::TensorRef)>,
    key_bytes: &mut usize,
    path: &Path,
) -> Result<()> {
    use pickle::Value;
    *key_bytes = key_bytes.saturating_add(prefix.len());
    if *key_bytes > MAX_KEY_BYTES {
        return Err(Error::ckpt(
            path,
            format!("state dict keys take more than {MAX_KEY_BYTES} bytes in all: refused"),
        ));
    }
    match v {
        Value::Tensor(t) => out.push((prefix, t.clone())),
        Value::Dict(items) => {
            for (k, v) in items {
                let k = match k {
                    Value::Str(s) => s.clone(),
                    Value::Int(i) => i.to_string(),
                    _ => return Err(Error::ckpt(path, "state dict key is not a string")),
                };
                let key = if prefix.is_empty() {
                    k
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(v, key, out, key_bytes, path)?;
            }
        }
        // Non-tensor entries (e.g. an `epoch` int or `_metadata`) carry no weights.
        _ => {}
    }
    Ok(())
}

/// HF shard index (`model.safetensors.index.json`, `pytorch_model.bin.index.json`).
#[derive(Debug, serde::Deserialize)]
struct ShardIndex {
    weight_map: UniqueMap,
}

/// A JSON object read into a map, refusing a key that appears twice (serde_json would
/// keep the last silently).
#[derive(Debug)]
struct UniqueMap(BTreeMap<String, String>);

impl<'de> serde::Deserialize<'de> for UniqueMap {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = UniqueMap;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object mapping tensor names to shard file names")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> std::result::Result<UniqueMap, A::Error> {
                let mut m = BTreeMap::new();
                while let Some((k, v)) = a.next_entry::<String, String>()? {
                    if m.contains_key(&k) {
                        return Err(serde::de::Error::custom(format!(
                            "tensor `{k}` is listed twice in weight_map"
                        )));
                    }
                    m.insert(k, v);
                }
                Ok(UniqueMap(m))
            }
        }
        d.deserialize_map(V)
    }
}

/// Resolve a shard name from an index: a plain file name inside `dir`, no `..`, no
/// absolute path, no symlink that leaves the folder, and the file must exist.
pub fn safe_shard_path(dir: &Path, index: &Path, name: &str) -> Result<PathBuf> {
    let p = Path::new(name);
    let plain = p.components().count() == 1
        && matches!(p.components().next(), Some(std::path::Component::Normal(_)));
    if !plain {
        return Err(Error::ckpt(
            index,
            format!("shard `{name}` is not a plain file name inside the model folder"),
        ));
    }
    let full = dir.join(p);
    let canon_dir = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
    let canon = full.canonicalize().map_err(|_| {
        Error::ckpt(
            index,
            format!("shard `{name}` is missing from {}", dir.display()),
        )
    })?;
    if canon.parent() != Some(canon_dir.as_path()) {
        return Err(Error::ckpt(
            index,
            format!(
                "shard `{name}` resolves outside the model folder (to {})",
                canon.display()
            ),
        ));
    }
    if !canon.is_file() {
        return Err(Error::ckpt(
            index,
            format!("shard `{name}` is not a regular file"),
        ));
    }
    Ok(full)
}

/// Load a sharded checkpoint through its index: each tensor must be in the shard the index
/// names, exactly once; shards may hold nothing the index does not list.
pub fn load_sharded(index_path: &Path) -> Result<StateDict> {
    let dir = match index_path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let text = crate::fsread::read_to_string_capped(index_path, crate::fsread::MAX_INDEX_BYTES)?;
    let index: ShardIndex = serde_json::from_str(&text)
        .map_err(|e| Error::ckpt(index_path, format!("invalid shard index: {e}")))?;
    if index.weight_map.0.is_empty() {
        return Err(Error::ckpt(index_path, "shard index lists no tensors"));
    }
    let mut by_shard: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (t, shard) in &index.weight_map.0 {
        by_shard.entry(shard.clone()).or_default().insert(t.clone());
    }
    let mut out = StateDict::new();
    for (shard, names) in &by_shard {
        let path = safe_shard_path(dir, index_path, shard)?;
        let mut sd = load_file(&path)?;
        for n in names {
            let t = sd.remove(n).ok_or_else(|| {
                Error::ckpt(
                    &path,
                    format!("tensor `{n}` listed in {} is absent", index_path.display()),
                )
            })?;
            out.insert(n.clone(), t);
        }
        if let Some(extra) = sd.keys().next() {
            return Err(Error::ckpt(
                &path,
                format!(
                    "tensor `{extra}` is in the shard but the index lists it elsewhere or not at all ({} such)",
                    sd.len()
                ),
            ));
        }
    }
    Ok(out)
}

/// Load a file, or a folder holding one of: a shard index, `model.safetensors`,
/// `pytorch_model.bin`, `diffusion_pytorch_model.{safetensors,bin}`.
pub fn load_path(path: &Path) -> Result<StateDict> {
    if path.is_file() {
        if path.to_string_lossy().ends_with(".index.json") {
            return load_sharded(path);
        }
        return load_file(path);
    }
    if !path.is_dir() {
        return Err(Error::ckpt(path, "no such file or folder"));
    }
    for name in [
        "model.safetensors.index.json",
        "pytorch_model.bin.index.json",
        "diffusion_pytorch_model.safetensors.index.json",
        "diffusion_pytorch_model.bin.index.json",
    ] {
        let p = path.join(name);
        if p.is_file() {
            return load_sharded(&p);
        }
    }
    for name in [
        "model.safetensors",
        "diffusion_pytorch_model.safetensors",
        "pytorch_model.bin",
        "diffusion_pytorch_model.bin",
    ] {
        let p = path.join(name);
        if p.is_file() {
            return load_file(&p);
        }
    }
    Err(Error::ckpt(
        path,
        "folder holds no checkpoint (looked for *.index.json, model.safetensors, pytorch_model.bin, diffusion_pytorch_model.*)",
    ))
}

/// Options for [`load_into`]: checkpoint keys that may be absent from the model and model
/// variables that may be absent from the checkpoint (named exceptions, matched by suffix).
#[derive(Debug, Default, Clone)]
pub struct LoadOptions {
    pub allow_missing: Vec<String>,
    pub allow_unexpected: Vec<String>,
}

/// Summary of a strict load.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    pub loaded: usize,
    pub missing: Vec<String>,
    pub unexpected: Vec<String>,
    pub mismatched: Vec<String>,
}

impl LoadReport {
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.mismatched.is_empty()
    }
    pub fn render(&self) -> String {
        let mut s = String::new();
        for (title, v) in [
            ("missing from the checkpoint", &self.missing),
            ("unexpected in the checkpoint", &self.unexpected),
            ("shape mismatch", &self.mismatched),
        ] {
            if !v.is_empty() {
                s.push_str(&format!("  {title} ({}):\n", v.len()));
                for k in v.iter().take(50) {
                    s.push_str(&format!("    {k}\n"));
                }
                if v.len() > 50 {
                    s.push_str(&format!("    ... and {} more\n", v.len() - 50));
                }
            }
        }
        s
    }
}

/// Copy `sd` into the variables of `vs` whose names start with `vs_prefix` (pass `""` for
/// all). Checkpoint key `k` goes to variable `vs_prefix + k`. Strict in both directions:
/// any missing or unexpected key (outside `opts`) or shape mismatch is an error naming the
/// source. Values are converted to each variable's dtype and device.
pub fn load_into(
    vs: &nn::VarStore,
    vs_prefix: &str,
    sd: &StateDict,
    source: &str,
    opts: &LoadOptions,
) -> Result<LoadReport> {
    load_vars(vs, vs_prefix, sd, source, opts, false)
}

/// [`load_into`] that moves `sd` into the model instead of copying it: a variable whose
/// dtype, device and shape the checkpoint tensor already has takes that tensor's storage
/// (for [`load_safetensors`]' tensors: the file mapping, so a real-size model never exists
/// twice in memory); the others are converted and copied as [`load_into`] does. Build the
/// model with uninitialised variables first. Other handles to `sd`'s tensors (e.g. a
/// [`sub_dict`] of it) then alias the model's variables.
pub fn load_into_owned(
    vs: &nn::VarStore,
    vs_prefix: &str,
    sd: StateDict,
    source: &str,
    opts: &LoadOptions,
) -> Result<LoadReport> {
    load_vars(vs, vs_prefix, &sd, source, opts, true)
}

fn load_vars(
    vs: &nn::VarStore,
    vs_prefix: &str,
    sd: &StateDict,
    source: &str,
    opts: &LoadOptions,
    share: bool,
) -> Result<LoadReport> {
    let vars = vs.variables();
    let mut report = LoadReport::default();
    let ends = |list: &[String], k: &str| {
        list.iter()
            .any(|s| k == s || k.ends_with(&format!(".{s}")) || k.ends_with(s.as_str()))
    };
    let mut seen = BTreeSet::new();
    let _guard = tch::no_grad_guard();
    for (name, var) in vars.iter() {
        let Some(key) = name.strip_prefix(vs_prefix) else {
            continue;
        };
        match sd.get(key) {
            None => {
                if !ends(&opts.allow_missing, key) {
                    report.missing.push(format!("{key} {:?}", var.size()));
                }
            }
            Some(t) => {
                seen.insert(key.to_string());
                if t.size() != var.size() {
                    report.mismatched.push(format!(
                        "{key}: checkpoint {:?} {:?}, model {:?}",
                        t.size(),
                        t.kind(),
                        var.size()
                    ));
                    continue;
                }
                let mut v = var.shallow_clone();
                let fail = |e: tch::TchError| Error::ckpt(source, format!("`{key}`: {e}"));
                if share
                    && t.kind() == var.kind()
                    && t.device() == var.device()
                    && t.is_contiguous()
                    && !t.requires_grad()
                {
                    v.f_set_data(t).map_err(fail)?;
                } else {
                    let src = t
                        .f_to_kind(var.kind())
                        .and_then(|x| x.f_to_device(var.device()))
                        .map_err(fail)?;
                    v.f_copy_(&src).map_err(fail)?;
                }
                report.loaded += 1;
            }
        }
    }
    for (k, t) in sd {
        if !seen.contains(k) && !ends(&opts.allow_unexpected, k) {
            report
                .unexpected
                .push(format!("{k} {:?} {:?}", t.size(), t.kind()));
        }
    }
    if !report.is_clean() {
        return Err(Error::KeyMismatch {
            source_name: source.to_string(),
            target: if vs_prefix.is_empty() {
                "model".into()
            } else {
                format!("`{vs_prefix}*`")
            },
            report: report.render(),
        });
    }
    Ok(report)
}

/// Keep only the keys under `prefix.` (stripped), e.g. `causal_encoder` out of a full
/// tokenizer checkpoint.
pub fn sub_dict(sd: &StateDict, prefix: &str) -> StateDict {
    let p = format!("{prefix}.");
    sd.iter()
        .filter_map(|(k, v)| {
            k.strip_prefix(&p)
                .map(|s| (s.to_string(), v.shallow_clone()))
        })
        .collect()
}

/// Write tensors as safetensors atomically: temp file in the same folder → fsync →
/// rename → fsync the folder. A crash leaves either the old file or the new one.
pub fn save_safetensors(
    path: &Path,
    tensors: &StateDict,
    metadata: Option<BTreeMap<String, String>>,
) -> Result<()> {
    let mut bufs: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> =
        Vec::with_capacity(tensors.len());
    for (k, t) in tensors {
        let t = t
            .f_to_device(Device::Cpu)
            .and_then(|t| t.f_contiguous())
            .map_err(|e| Error::ckpt(path, format!("`{k}`: {e}")))?;
        let dt = kind_st(t.kind()).ok_or_else(|| {
            Error::ckpt(path, format!("`{k}`: dtype {:?} not storable", t.kind()))
        })?;
        let numel = t.numel();
        let nbytes = numel * pickle::kind_size(t.kind()) as usize;
        let mut bytes = vec![0u8; nbytes];
        if nbytes > 0 {
            t.f_copy_data_u8(&mut bytes, numel)
                .map_err(|e| Error::ckpt(path, format!("`{k}`: {e}")))?;
        }
        let shape = t.size().iter().map(|&d| d as usize).collect();
        bufs.push((k.clone(), dt, shape, bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bufs
        .iter()
        .map(|(k, dt, shape, bytes)| {
            safetensors::tensor::TensorView::new(*dt, shape.clone(), bytes)
                .map(|v| (k.clone(), v))
                .map_err(|e| Error::ckpt(path, format!("`{k}`: {e}")))
        })
        .collect::<Result<_>>()?;
    let meta: Option<std::collections::HashMap<String, String>> =
        metadata.map(|m| m.into_iter().collect());
    let data = safetensors::serialize(views, meta)
        .map_err(|e| Error::ckpt(path, format!("serialize: {e}")))?;
    atomic_write(path, &data)
}

/// Write bytes atomically (same-folder temp file, fsync, rename, fsync folder).
pub fn atomic_write(path: &Path, data: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let fname = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{fname}.tmp-{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(data).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// What a model config implies about one tensor of the checkpoint it describes; checked by
/// [`check_implied`] before the model is built, so a hostile size in a config never reaches
/// an allocation (a config whose sizes are not the checkpoint's is refused at once).
#[derive(Debug, Clone, PartialEq)]
pub enum Implied {
    /// The tensor exists with exactly this shape.
    Shape(Vec<i64>),
    /// The tensor exists and its shape starts with these sizes.
    Leading(Vec<i64>),
    /// No tensor key starts with this prefix (the config has fewer blocks than the file).
    NoneUnder,
}

/// Check `implied` = (config key, tensor key or prefix, expectation) against `sd`; the
/// error names the config file (`origin`), the config key and the tensor.
pub fn check_implied(
    sd: &StateDict,
    implied: &[(&str, String, Implied)],
    origin: &str,
) -> Result<()> {
    for (cfg_key, tensor, want) in implied {
        let got = sd.get(tensor).map(|t| t.size());
        let ok = match want {
            Implied::Shape(s) => got.as_ref() == Some(s),
            Implied::Leading(s) => got.as_ref().is_some_and(|g| g.starts_with(s)),
            Implied::NoneUnder => !sd.keys().any(|k| k.starts_with(tensor.as_str())),
        };
        if !ok {
            let msg = match want {
                Implied::NoneUnder => format!(
                    "the checkpoint holds tensors under `{tensor}` that this value does not build"
                ),
                Implied::Shape(s) | Implied::Leading(s) => format!(
                    "implies `{tensor}` of shape {s:?}{}, the checkpoint holds {}",
                    if matches!(want, Implied::Leading(_)) {
                        "…"
                    } else {
                        ""
                    },
                    got.map_or("no such tensor".into(), |g| format!("{g:?}"))
                ),
            };
            return Err(Error::config(origin, *cfg_key, msg));
        }
    }
    Ok(())
}
