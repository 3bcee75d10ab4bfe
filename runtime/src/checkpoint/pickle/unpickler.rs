//! The restricted unpickler: a stack machine for the pickle opcodes `torch.save` writes,
//! with every global on an allow-list and every budget (values, memo, stack, depth, copied
//! bytes, opcodes) checked as it runs.

use super::*;

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
