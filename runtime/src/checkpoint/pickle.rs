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

enum Slot {
    Mark,
    V(Value),
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Slot>,
    memo: HashMap<u32, Value>,
    path: &'a Path,
    /// Bytes copied into and out of the memo (and by DUP) so far.
    copied: std::cell::Cell<usize>,
    /// Values pushed so far.
    pushed: usize,
}

/// Bytes `v` occupies (each value's own size plus its heap payload: strings, bytes,
/// shapes), counting at most `limit` (then returns `limit + 1`).
fn value_bytes(v: &Value, limit: usize) -> usize {
    let own = std::mem::size_of::<Value>();
    let mut n = 0usize;
    let mut stack: Vec<&Value> = vec![v];
    while let Some(v) = stack.pop() {
        n = n.saturating_add(own);
        match v {
            Value::Str(x) => n = n.saturating_add(x.len()),
            Value::Bytes(x) => n = n.saturating_add(x.len()),
            Value::Tuple(x) | Value::List(x) => stack.extend(x),
            Value::Dict(kv) => {
                for (k, v) in kv {
                    stack.push(k);
                    stack.push(v);
                }
            }
            Value::Storage(st) => n = n.saturating_add(st.key.len()),
            Value::Tensor(t) => {
                n = n.saturating_add(t.storage.key.len() + 8 * (t.size.len() + t.stride.len()))
            }
            _ => {}
        }
        if n > limit {
            return limit + 1;
        }
    }
    n
}

/// Whether `v` nests containers deeper than `limit` levels.
fn deeper_than(v: &Value, limit: usize) -> bool {
    if limit == 0 {
        return matches!(v, Value::Tuple(_) | Value::List(_) | Value::Dict(_));
    }
    match v {
        Value::Tuple(x) | Value::List(x) => x.iter().any(|c| deeper_than(c, limit - 1)),
        Value::Dict(kv) => kv
            .iter()
            .any(|(k, c)| deeper_than(k, limit - 1) || deeper_than(c, limit - 1)),
        _ => false,
    }
}

impl<'a> Unpickler<'a> {
    fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::ckpt(self.path, format!("data.pkl at byte {}: {msg}", self.pos))
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.data.len() - self.pos < n {
            return Err(self.err(format!("truncated pickle (needs {n} more bytes)")));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    /// The next `N` bytes as an array.
    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.err("unterminated text line"))?;
        let s = String::from_utf8_lossy(&rest[..end]).into_owned();
        self.pos += end + 1;
        Ok(s)
    }
    /// Refuse a value about to be put into a container if it nests too deep.
    fn check_child(&self, v: &Value) -> Result<()> {
        if deeper_than(v, MAX_DEPTH) {
            return Err(self.err(format!(
                "containers nested more than {MAX_DEPTH} deep (not a state dict)"
            )));
        }
        Ok(())
    }
    /// Clone `v` for the memo or DUP, counted (in bytes) against the memo-bomb budget first.
    fn charged_clone(&self, v: &Value) -> Result<Value> {
        let left = MAX_COPIED_BYTES.saturating_sub(self.copied.get());
        let n = value_bytes(v, left);
        if n > left {
            return Err(self.err(format!(
                "memo references copy more than {MAX_COPIED_BYTES} bytes: refused as a pickle bomb"
            )));
        }
        self.copied.set(self.copied.get() + n);
        Ok(v.clone())
    }
    fn push(&mut self, v: Value) -> Result<()> {
        if self.stack.len() >= MAX_STACK {
            return Err(self.err("pickle stack too deep"));
        }
        self.pushed += 1;
        if self.pushed > MAX_VALUES {
            return Err(self.err(format!(
                "more than {MAX_VALUES} values built (a state dict needs ~15 per tensor): refused"
            )));
        }
        if let Value::Tuple(items) | Value::List(items) = &v {
            for c in items {
                self.check_child(c)?;
            }
        }
        self.stack.push(Slot::V(v));
        Ok(())
    }
    fn pop(&mut self) -> Result<Value> {
        match self.stack.pop() {
            Some(Slot::V(v)) => Ok(v),
            Some(Slot::Mark) => Err(self.err("unexpected MARK on the stack")),
            None => Err(self.err("pickle stack underflow")),
        }
    }
    fn top(&mut self) -> Result<&mut Value> {
        match self.stack.last_mut() {
            Some(Slot::V(v)) => Ok(v),
            _ => Err(Error::ckpt(self.path, "pickle stack underflow")),
        }
    }
    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let mut items = Vec::new();
        loop {
            match self.stack.pop() {
                Some(Slot::Mark) => break,
                Some(Slot::V(v)) => items.push(v),
                None => return Err(self.err("MARK not found")),
            }
        }
        items.reverse();
        Ok(items)
    }
    fn memo_put(&mut self, idx: u32) -> Result<()> {
        if self.memo.len() >= MAX_MEMO {
            return Err(self.err("pickle memo too large"));
        }
        let v = match self.stack.last() {
            Some(Slot::V(v)) => v,
            _ => return Err(self.err("PUT with empty stack")),
        };
        let v = self.charged_clone(v)?;
        self.memo.insert(idx, v);
        Ok(())
    }
    fn memo_get(&mut self, idx: u32) -> Result<()> {
        let v = self
            .memo
            .get(&idx)
            .ok_or_else(|| self.err(format!("memo key {idx} missing")))?;
        let v = self.charged_clone(v)?;
        self.push(v)
    }

    fn run(&mut self) -> Result<Value> {
        for _ in 0..MAX_OPS {
            let op = self.u8()?;
            match op {
                0x80 => {
                    // PROTO
                    let p = self.u8()?;
                    if p > 5 {
                        return Err(self.err(format!("unsupported pickle protocol {p}")));
                    }
                }
                0x95 => {
                    // FRAME (protocol 4): an 8-byte length we can ignore
                    self.take(8)?;
                }
                b'.' => return self.pop(),
                b'}' => self.push(Value::Dict(Vec::new()))?,
                b']' => self.push(Value::List(Vec::new()))?,
                b')' => self.push(Value::Tuple(Vec::new()))?,
                b'(' => {
                    if self.stack.len() >= MAX_STACK {
                        return Err(self.err("pickle stack too deep"));
                    }
                    self.stack.push(Slot::Mark)
                }
                b'N' => self.push(Value::None)?,
                0x88 => self.push(Value::Bool(true))?,
                0x89 => self.push(Value::Bool(false))?,
                b'J' => {
                    let v = i32::from_le_bytes(self.array()?);
                    self.push(Value::Int(v as i64))?
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v as i64))?
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Value::Int(v as i64))?
                }
                0x8a => {
                    // LONG1
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    if n > 8 {
                        return Err(self.err("integer wider than 64 bits"));
                    }
                    let mut buf = if n > 0 && b[n - 1] & 0x80 != 0 {
                        [0xffu8; 8]
                    } else {
                        [0u8; 8]
                    };
                    buf[..n].copy_from_slice(b);
                    self.push(Value::Int(i64::from_le_bytes(buf)))?
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.array()?);
                    self.push(Value::Float(v))?
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let s = std::str::from_utf8(self.take(n)?)
                        .map_err(|_| self.err("invalid UTF-8 in string"))?
                        .to_owned();
                    self.push(Value::Str(s))?
                }
                0x8c => {
                    // SHORT_BINUNICODE
                    let n = self.u8()? as usize;
                    let s = std::str::from_utf8(self.take(n)?)
                        .map_err(|_| self.err("invalid UTF-8 in string"))?
                        .to_owned();
                    self.push(Value::Str(s))?
                }
                b'C' => {
                    // SHORT_BINBYTES
                    let n = self.u8()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.push(Value::Bytes(b))?
                }
                b'B' => {
                    let n = self.u32()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.push(Value::Bytes(b))?
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    self.memo_put(i)?
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memo_put(i)?
                }
                0x94 => {
                    // MEMOIZE
                    let i = self.memo.len() as u32;
                    self.memo_put(i)?
                }
                b'h' => {
                    let i = self.u8()? as u32;
                    self.memo_get(i)?
                }
                b'j' => {
                    let i = self.u32()?;
                    self.memo_get(i)?
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push_global(&module, &name)?
                }
                0x93 => {
                    // STACK_GLOBAL
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.push_global(&m, &n)?,
                        _ => return Err(self.err("STACK_GLOBAL needs two strings")),
                    }
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(items))?
                }
                0x85 => {
                    let a = self.pop()?;
                    self.push(Value::Tuple(vec![a]))?
                }
                0x86 => {
                    let b = self.pop()?;
                    let a = self.pop()?;
                    self.push(Value::Tuple(vec![a, b]))?
                }
                0x87 => {
                    let c = self.pop()?;
                    let b = self.pop()?;
                    let a = self.pop()?;
                    self.push(Value::Tuple(vec![a, b, c]))?
                }
                b'a' => {
                    let v = self.pop()?;
                    self.check_child(&v)?;
                    match self.top()? {
                        Value::List(l) => l.push(v),
                        _ => return Err(self.err("APPEND to a non-list")),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    for c in &items {
                        self.check_child(c)?;
                    }
                    match self.top()? {
                        Value::List(l) => l.extend(items),
                        _ => return Err(self.err("APPENDS to a non-list")),
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.check_child(&k)?;
                    self.check_child(&v)?;
                    match self.top()? {
                        Value::Dict(d) => d.push((k, v)),
                        _ => return Err(self.err("SETITEM on a non-dict")),
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return Err(self.err("SETITEMS with an odd number of items"));
                    }
                    for c in &items {
                        self.check_child(c)?;
                    }
                    let mut it = items.into_iter();
                    let mut pairs = Vec::new();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        pairs.push((k, v));
                    }
                    match self.top()? {
                        Value::Dict(d) => d.extend(pairs),
                        _ => return Err(self.err("SETITEMS on a non-dict")),
                    }
                }
                b'Q' => {
                    // BINPERSID
                    let pid = self.pop()?;
                    let s = self.persistent_load(pid)?;
                    self.push(Value::Storage(s))?
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let v = self.reduce(func, args)?;
                    self.push(v)?
                }
                0x81 => {
                    // NEWOBJ: cls.__new__(cls, *args); only OrderedDict is allowed
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let v = self.reduce(cls, args)?;
                    self.push(v)?
                }
                b'b' => {
                    // BUILD: state for the object below; tensors get their
                    // (unused) python attributes here, OrderedDicts nothing useful.
                    let _state = self.pop()?;
                    self.top()?;
                }
                b'0' => {
                    self.pop()?;
                }
                b'2' => {
                    let v = match self.stack.last() {
                        Some(Slot::V(v)) => self.charged_clone(v)?,
                        _ => return Err(self.err("DUP of a MARK")),
                    };
                    self.push(v)?
                }
                other => {
                    return Err(self.err(format!(
                        "unsupported pickle opcode 0x{other:02x} (not produced by torch.save of a state dict)"
                    )))
                }
            }
        }
        Err(self.err("too many pickle opcodes"))
    }

    fn push_global(&mut self, module: &str, name: &str) -> Result<()> {
        match global_from_name(module, name) {
            Some(g) => self.push(Value::Global(g)),
            None => Err(Error::UnsafePickle {
                path: self.path.to_path_buf(),
                global: format!("{module}.{name}"),
            }),
        }
    }

    fn persistent_load(&self, pid: Value) -> Result<StorageRef> {
        // ('storage', storage_type, key, location, numel)
        let items = match pid {
            Value::Tuple(t) => t,
            _ => return Err(self.err("persistent id is not a tuple")),
        };
        match items.as_slice() {
            [Value::Str(tag), ty, Value::Str(key), _loc, Value::Int(numel)] if tag == "storage" => {
                let kind = match ty {
                    Value::Global(Global::StorageType(k)) => *k,
                    Value::Global(Global::Dtype(k)) => *k,
                    _ => return Err(self.err("persistent id with an unknown storage type")),
                };
                if *numel < 0 {
                    return Err(self.err(format!("storage `{key}` has negative size {numel}")));
                }
                if key.contains('/') || key.contains("..") {
                    return Err(self.err(format!("storage key `{key}` is not a plain name")));
                }
                Ok(StorageRef {
                    key: key.clone(),
                    kind,
                    numel: *numel as u64,
                })
            }
            _ => Err(self.err("persistent id is not ('storage', type, key, location, numel)")),
        }
    }

    fn reduce(&self, func: Value, args: Value) -> Result<Value> {
        let g = match func {
            Value::Global(g) => g,
            _ => return Err(self.err("REDUCE of a non-callable")),
        };
        let args = match args {
            Value::Tuple(a) => a,
            _ => return Err(self.err("REDUCE arguments are not a tuple")),
        };
        match g {
            Global::OrderedDict => Ok(Value::Dict(Vec::new())),
            Global::RebuildTensorV2 | Global::RebuildTensor => {
                // (storage, storage_offset, size, stride, [requires_grad, backward_hooks, [metadata]])
                if args.len() < 4 {
                    return Err(self.err("_rebuild_tensor with fewer than 4 arguments"));
                }
                let storage = match &args[0] {
                    Value::Storage(s) => s.clone(),
                    _ => return Err(self.err("_rebuild_tensor without a storage")),
                };
                let offset = match args[1] {
                    Value::Int(o) if o >= 0 => o as u64,
                    _ => return Err(self.err("bad storage offset")),
                };
                let size = self.int_tuple(&args[2], "size")?;
                let stride = self.int_tuple(&args[3], "stride")?;
                if size.len() != stride.len() {
                    return Err(self.err("size and stride have different lengths"));
                }
                Ok(Value::Tensor(TensorRef {
                    storage,
                    offset,
                    size,
                    stride,
                }))
            }
            Global::RebuildParameter | Global::RebuildParameterWithState => match args.first() {
                Some(t @ Value::Tensor(_)) => Ok(t.clone()),
                _ => Err(self.err("_rebuild_parameter without a tensor")),
            },
            Global::StorageType(_) | Global::Dtype(_) => {
                Err(self.err("calling a storage type or dtype is not supported"))
            }
        }
    }

    fn int_tuple(&self, v: &Value, what: &str) -> Result<Vec<i64>> {
        match v {
            Value::Tuple(items) => items
                .iter()
                .map(|x| match x {
                    Value::Int(i) if *i >= 0 => Ok(*i),
                    _ => Err(self.err(format!("tensor {what} must hold non-negative integers"))),
                })
                .collect(),
            _ => Err(self.err(format!("tensor {what} is not a tuple"))),
        }
    }
}

/// Interpret a pickle byte string with the restricted unpickler.
pub fn unpickle(data: &[u8], path: &Path) -> Result<Value> {
    let mut u = Unpickler {
        data,
        pos: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
        path,
        copied: std::cell::Cell::new(0),
        pushed: 0,
    };
    u.run()
}

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
