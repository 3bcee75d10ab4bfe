//! PyTorch zip checkpoints (what `torch.save` writes: `.bin`, `.pt`, `.pth`) read in
//! pure Rust without executing anything.
//!
//! A `torch.save` file is a zip archive `<name>/data.pkl` + `<name>/data/<key>` (one record
//! per storage). `data.pkl` is a pickle (protocol 2) whose only callables should be the
//! tensor rebuild functions, `OrderedDict` and the storage types. This reader is a small
//! pickle *interpreter* that knows those few globals as data constructors and refuses
//! every other global by name (`posix.system`, `builtins.eval`, ...), so nothing a file
//! says can run code. Sizes are checked before any allocation: storages must fit their
//! zip record, shapes and strides must stay inside their storage, and the pickle itself,
//! its memo and its stack are capped (pickle/memo/zip bombs).

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// Largest `data.pkl` accepted (the structure, not the weights): 64 MiB (LLaMA-70B's is
/// ~100 KiB).
const MAX_PICKLE_BYTES: u64 = 64 << 20;
/// Most values built while interpreting one pickle (each ~100 bytes): 2M, enough for
/// 100,000 tensors.
const MAX_VALUES: usize = 1 << 21;
/// Largest memo / stack / container accepted.
const MAX_MEMO: usize = 1 << 22;
const MAX_STACK: usize = 1 << 22;
/// Most opcodes executed; a real state dict needs a few per tensor.
const MAX_OPS: usize = 1 << 28;
/// Cap on the decompression ratio of a deflated record (zip bombs).
const MAX_DEFLATE_RATIO: u64 = 1000;
/// Deepest nesting of containers accepted (a real state dict nests 2–4 deep); deeper
/// values would overflow the stack when dropped.
const MAX_DEPTH: usize = 100;
/// Most bytes copied into and out of the memo (and by DUP) in all, counting each value's
/// own size and its strings, bytes and shape vectors: a memo bomb re-reads a value that
/// holds the previous one twice, doubling at each level, or re-reads one large string
/// many times. A real state dict copies a few hundred bytes per tensor.
pub const MAX_COPIED_BYTES: usize = 256 << 20;
/// Total decompressed bytes of the deflated records of one archive: at most this many
/// times the archive's length (plus [`DECOMPRESSED_SLACK`]). `torch.save` stores records
/// uncompressed; re-zipped real weights shrink by a few percent, not 16×.
const MAX_ARCHIVE_EXPANSION: u64 = 16;
const DECOMPRESSED_SLACK: u64 = 64 << 20;

/// A value produced by the restricted unpickler.
#[derive(Debug, Clone)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    /// Insertion-ordered (pickled dicts and OrderedDicts keep their order).
    Dict(Vec<(Value, Value)>),
    /// One of the allowed globals, not yet called.
    Global(Global),
    /// A persistent-id reference to a storage record.
    Storage(StorageRef),
    /// A tensor view on a storage.
    Tensor(TensorRef),
}

/// The allow-list. Anything else is refused with [`Error::UnsafePickle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Global {
    RebuildTensorV2,
    RebuildTensor,
    RebuildParameter,
    RebuildParameterWithState,
    OrderedDict,
    StorageType(Kind),
    /// `torch.serialization._get_layout` / `torch.strided` style markers are not needed;
    /// `torch._utils._rebuild_device_tensor_from_numpy` etc. are refused.
    Dtype(Kind),
}

#[derive(Debug, Clone)]
pub struct StorageRef {
    pub key: String,
    pub kind: Kind,
    pub numel: u64,
}

#[derive(Debug, Clone)]
pub struct TensorRef {
    pub storage: StorageRef,
    pub offset: u64,
    pub size: Vec<i64>,
    pub stride: Vec<i64>,
}

fn global_from_name(module: &str, name: &str) -> Option<Global> {
    let storage = |k| Some(Global::StorageType(k));
    match (module, name) {
        ("torch._utils", "_rebuild_tensor_v2") => Some(Global::RebuildTensorV2),
        ("torch._utils", "_rebuild_tensor") => Some(Global::RebuildTensor),
        ("torch._utils", "_rebuild_parameter") => Some(Global::RebuildParameter),
        ("torch._utils", "_rebuild_parameter_with_state") => {
            Some(Global::RebuildParameterWithState)
        }
        ("collections", "OrderedDict") => Some(Global::OrderedDict),
        ("torch", "FloatStorage") => storage(Kind::Float),
        ("torch", "DoubleStorage") => storage(Kind::Double),
        ("torch", "HalfStorage") => storage(Kind::Half),
        ("torch", "BFloat16Storage") => storage(Kind::BFloat16),
        ("torch", "LongStorage") => storage(Kind::Int64),
        ("torch", "IntStorage") => storage(Kind::Int),
        ("torch", "ShortStorage") => storage(Kind::Int16),
        ("torch", "CharStorage") => storage(Kind::Int8),
        ("torch", "ByteStorage") => storage(Kind::Uint8),
        ("torch", "BoolStorage") => storage(Kind::Bool),
        ("torch", "float32") => Some(Global::Dtype(Kind::Float)),
        ("torch", "float16") => Some(Global::Dtype(Kind::Half)),
        ("torch", "bfloat16") => Some(Global::Dtype(Kind::BFloat16)),
        ("torch", "int64") => Some(Global::Dtype(Kind::Int64)),
        _ => None,
    }
}

/// Bytes per element of a storage kind.
pub fn kind_size(kind: Kind) -> u64 {
    match kind {
        Kind::Double | Kind::Int64 => 8,
        Kind::Float | Kind::Int => 4,
        Kind::Half | Kind::BFloat16 | Kind::Int16 => 2,
        _ => 1,
    }
}

mod unpickler;
pub use unpickler::unpickle;

/// A `torch.save` zip archive opened for reading.
pub struct TorchArchive {
    path: std::path::PathBuf,
    zip: zip::ZipArchive<std::fs::File>,
    prefix: String,
    /// The top-level object of `data.pkl`.
    pub root: Value,
    /// Bytes that [`Self::tensor`] may still read and materialise in all: twice the
    /// records' total size (tied weights share a storage) plus a slack, so a pickle that
    /// points a million tensors at one storage cannot multiply it.
    budget: u64,
    /// The whole file as bytes over libtorch's copy-on-write mapping of it (None where it
    /// cannot be mapped): stored records (what `torch.save` writes) are viewed in place.
    mapped: Option<Tensor>,
    file_len: u64,
}

impl TorchArchive {
    pub fn open(path: &Path) -> Result<Self> {
        let file = crate::fsread::open_regular(path)?;
        let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mapped = usize::try_from(file_len)
            .ok()
            .and_then(|len| super::file_bytes(&file, path, len));
        let mut zip = zip::ZipArchive::new(file).map_err(|e| {
            Error::ckpt(
                path,
                format!("not a PyTorch zip checkpoint ({e}); legacy (pre-1.6) tar/pickle files and TorchScript archives are not read"),
            )
        })?;
        let pkl_name = (0..zip.len())
            .filter_map(|i| zip.name_for_index(i).map(str::to_owned))
            .find(|n| n.ends_with("data.pkl") && n.matches('/').count() == 1)
            .ok_or_else(|| Error::ckpt(path, "zip has no `<archive>/data.pkl` record"))?;
        let prefix = pkl_name.trim_end_matches("data.pkl").to_owned();
        // Declared record sizes, checked before anything is decompressed: stored records
        // must fit the file, deflated ones together may expand only so far (zip bombs).
        let (mut total, mut deflated) = (0u64, 0u64);
        for i in 0..zip.len() {
            let f = zip
                .by_index_raw(i)
                .map_err(|e| Error::ckpt(path, format!("zip record {i}: {e}")))?;
            if f.compression() == zip::CompressionMethod::Stored {
                if f.size() > file_len {
                    return Err(Error::ckpt(
                        path,
                        format!(
                            "record `{}` claims {} bytes, more than the {file_len}-byte file",
                            f.name(),
                            f.size()
                        ),
                    ));
                }
            } else {
                deflated = deflated.saturating_add(f.size());
            }
            total = total.saturating_add(f.size());
        }
        let max_deflated = file_len
            .saturating_mul(MAX_ARCHIVE_EXPANSION)
            .saturating_add(DECOMPRESSED_SLACK);
        if deflated > max_deflated {
            return Err(Error::ckpt(
                path,
                format!(
                    "compressed records expand to {deflated} bytes from a {file_len}-byte file \
                     (cap {max_deflated}): refused as a zip bomb"
                ),
            ));
        }
        let bytes = read_record(&mut zip, &pkl_name, MAX_PICKLE_BYTES, path)?;
        let root = unpickle(&bytes, path)?;
        Ok(Self {
            path: path.to_path_buf(),
            zip,
            prefix,
            root,
            budget: total.saturating_mul(2).saturating_add(DECOMPRESSED_SLACK),
            mapped,
            file_len,
        })
    }

    /// One tensor reference as a contiguous CPU tensor of its stored dtype: a view of the
    /// file's mapping where its storage is a stored (uncompressed), aligned record and the
    /// tensor covers it in order (as `torch.save` writes a state dict), else a copy.
    pub fn tensor(&mut self, t: &TensorRef) -> Result<Tensor> {
        let name = format!("{}data/{}", self.prefix, t.storage.key);
        let elem = kind_size(t.storage.kind);
        let want =
            t.storage.numel.checked_mul(elem).ok_or_else(|| {
                Error::ckpt(&self.path, format!("storage `{name}`: size overflows"))
            })?;
        self.spend(want, &name)?;
        // The storage as a 1-D tensor and where it starts in its underlying storage (for a
        // view: the whole file), from which `as_strided` counts its offset.
        let (storage, base) = match self.stored_view(&name, want, t.storage.kind)? {
            Some(view) => view,
            None => {
                let bytes = read_record(&mut self.zip, &name, want, &self.path)?;
                if (bytes.len() as u64) < want {
                    return Err(Error::ckpt(
                        &self.path,
                        format!(
                            "storage `{name}` declares {} elements ({want} bytes) but its record holds {} bytes",
                            t.storage.numel,
                            bytes.len()
                        ),
                    ));
                }
                let copied = Tensor::f_from_data_size(
                    &bytes[..want as usize],
                    &[t.storage.numel as i64],
                    t.storage.kind,
                )
                .map_err(|e| Error::ckpt(&self.path, format!("`{name}`: {e}")))?;
                (copied, 0)
            }
        };
        // The largest element index the view touches must lie inside the storage.
        let mut last: u64 = t.offset;
        let mut empty = false;
        for (&s, &st) in t.size.iter().zip(&t.stride) {
            if s == 0 {
                empty = true;
            } else {
                let reach = (s as u64 - 1)
                    .checked_mul(st as u64)
                    .and_then(|r| last.checked_add(r))
                    .ok_or_else(|| {
                        Error::ckpt(&self.path, format!("`{name}`: shape × stride overflows"))
                    })?;
                last = reach;
            }
        }
        let numel_view: u64 = t
            .size
            .iter()
            .try_fold(1u64, |a, &s| a.checked_mul(s as u64))
            .ok_or_else(|| Error::ckpt(&self.path, format!("`{name}`: shape product overflows")))?;
        if !empty && numel_view > 0 && last >= t.storage.numel {
            return Err(Error::ckpt(
                &self.path,
                format!(
                    "tensor of shape {:?} (offset {}, stride {:?}) reads element {last} of storage `{name}` that has {} elements",
                    t.size, t.offset, t.stride, t.storage.numel
                ),
            ));
        }
        // A stride-0 or overlapping view would be materialised bigger than its storage
        // (a 4-byte storage viewed as [2^20, 2^20] with strides [0, 0] is 4 TiB).
        if numel_view > t.storage.numel {
            return Err(Error::ckpt(
                &self.path,
                format!(
                    "tensor of shape {:?} (stride {:?}) has more elements than its storage `{name}` ({}): stride-0/overlapping views are refused",
                    t.size, t.stride, t.storage.numel
                ),
            ));
        }
        self.spend(numel_view.saturating_mul(elem), &name)?;
        if empty || numel_view == 0 {
            return Tensor::f_zeros(&t.size, (t.storage.kind, tch::Device::Cpu))
                .map_err(|e| Error::ckpt(&self.path, format!("`{name}`: {e}")));
        }
        // `contiguous` of a view that already is contiguous is that view (no copy).
        let offset = base + t.offset as i64;
        storage
            .f_as_strided(&t.size, &t.stride, Some(offset))
            .and_then(|v| v.f_contiguous())
            .map_err(|e| Error::ckpt(&self.path, format!("`{name}`: {e}")))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Storage record `name` as a 1-D tensor of `kind` viewing the file's mapping, when the
    /// record is stored uncompressed, holds at least `want` bytes inside the file, and its
    /// offset is aligned for `kind`; None otherwise (the caller reads and copies it). With
    /// it, the record's offset in the file in elements of `kind`.
    fn stored_view(&mut self, name: &str, want: u64, kind: Kind) -> Result<Option<(Tensor, i64)>> {
        let Some(bytes) = &self.mapped else {
            return Ok(None);
        };
        let f = self
            .zip
            .by_name(name)
            .map_err(|e| Error::ckpt(&self.path, format!("record `{name}`: {e}")))?;
        let (start, size) = (f.data_start(), f.size());
        let fits = f.compression() == zip::CompressionMethod::Stored
            && size >= want
            && want > 0
            && start
                .checked_add(want)
                .is_some_and(|end| end <= self.file_len);
        if !fits {
            return Ok(None);
        }
        let elem = kind_size(kind);
        let numel = (want / elem) as i64;
        Ok(
            super::byte_view(bytes, start as usize, want as usize, kind, &[numel])
                .ok()
                .map(|v| (v, (start / elem) as i64)),
        )
    }

    fn spend(&mut self, bytes: u64, name: &str) -> Result<()> {
        if bytes > self.budget {
            return Err(Error::ckpt(
                &self.path,
                format!(
                    "`{name}`: the tensors read so far exceed twice the archive's record bytes: refused (storages referenced over and over)"
                ),
            ));
        }
        self.budget -= bytes;
        Ok(())
    }
}

fn read_record(
    zip: &mut zip::ZipArchive<std::fs::File>,
    name: &str,
    cap: u64,
    path: &Path,
) -> Result<Vec<u8>> {
    let mut f = zip
        .by_name(name)
        .map_err(|e| Error::ckpt(path, format!("record `{name}`: {e}")))?;
    let size = f.size();
    let csize = f.compressed_size();
    if size > cap.max(1) && name.ends_with("data.pkl") {
        return Err(Error::ckpt(
            path,
            format!("record `{name}` is {size} bytes, over the {cap}-byte cap"),
        ));
    }
    if f.compression() != zip::CompressionMethod::Stored
        && size > csize.saturating_mul(MAX_DEFLATE_RATIO)
    {
        return Err(Error::ckpt(
            path,
            format!("record `{name}` expands {csize} → {size} bytes: refused as a zip bomb"),
        ));
    }
    // Never read more than the record claims, nor more than needed (+1 to see truncation).
    let limit = size.min(cap.saturating_add(1));
    // The declared size is not trusted for the allocation: grow as bytes really arrive.
    let mut buf = Vec::with_capacity(limit.min(64 << 20) as usize);
    f.by_ref()
        .take(limit)
        .read_to_end(&mut buf)
        .map_err(|e| Error::ckpt(path, format!("record `{name}`: {e}")))?;
    Ok(buf)
}
