//! SentencePiece (Kudo & Richardson 2018) as LLaMA uses it: `tokenizer.model` (a protobuf
//! `ModelProto`) read with a minimal protobuf reader, normalisation (precompiled charsmap,
//! whitespace handling, dummy prefix), BPE encoding by piece score, byte fallback, decoding.
//! References: google/sentencepiece `src/sentencepiece_model.proto`, `src/normalizer.cc`,
//! `src/bpe_model.cc`, `src/sentencepiece_processor.cc`.

use std::collections::{BinaryHeap, HashMap};
use std::path::Path;

use lavit_runtime::{fsread, Error, Result};

/// `ModelProto.SentencePiece.Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl PieceType {
    fn from_proto(v: u64) -> Option<Self> {
        Some(match v {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => return None,
        })
    }
}

/// One vocabulary entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    pub piece: String,
    pub score: f32,
    pub kind: PieceType,
}

/// The `TrainerSpec` / `NormalizerSpec` fields encoding depends on (proto defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct SpecFlags {
    /// `trainer_spec.model_type` (1 unigram, 2 BPE, 3 word, 4 char).
    pub model_type: u64,
    pub byte_fallback: bool,
    pub unk_id: i64,
    pub bos_id: i64,
    pub eos_id: i64,
    pub pad_id: i64,
    pub treat_whitespace_as_suffix: bool,
    /// Surface of an unknown piece when decoding (" ⁇ ").
    pub unk_surface: String,
    /// `normalizer_spec.name` (e.g. `identity`, `nmt_nfkc`).
    pub normalizer_name: String,
    pub add_dummy_prefix: bool,
    pub remove_extra_whitespaces: bool,
    pub escape_whitespaces: bool,
}

impl Default for SpecFlags {
    fn default() -> Self {
        Self {
            model_type: 1,
            byte_fallback: false,
            unk_id: 0,
            bos_id: 1,
            eos_id: 2,
            pad_id: -1,
            treat_whitespace_as_suffix: false,
            unk_surface: " \u{2047} ".into(),
            normalizer_name: String::new(),
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
        }
    }
}

/// Protobuf wire reading: just enough for `ModelProto`.
mod proto {
    pub struct Reader<'a> {
        pub buf: &'a [u8],
        pub pos: usize,
    }

    pub enum Value<'a> {
        Varint(u64),
        Fixed64,
        Bytes(&'a [u8]),
        Fixed32(u32),
    }

    impl<'a> Reader<'a> {
        pub fn new(buf: &'a [u8]) -> Self {
            Self { buf, pos: 0 }
        }

        fn varint(&mut self) -> Result<u64, String> {
            let mut v = 0u64;
            for shift in (0..70).step_by(7) {
                let b = *self
                    .buf
                    .get(self.pos)
                    .ok_or_else(|| format!("truncated varint at byte {}", self.pos))?;
                self.pos += 1;
                if shift == 63 && b > 1 {
                    return Err(format!("varint overflow at byte {}", self.pos));
                }
                v |= u64::from(b & 0x7f) << shift;
                if b & 0x80 == 0 {
                    return Ok(v);
                }
            }
            Err(format!("varint too long at byte {}", self.pos))
        }

        fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
            let end = self
                .pos
                .checked_add(n)
                .filter(|&e| e <= self.buf.len())
                .ok_or_else(|| {
                    format!("field of {n} bytes runs past the end at byte {}", self.pos)
                })?;
            let s = &self.buf[self.pos..end];
            self.pos = end;
            Ok(s)
        }

        /// The next `N` bytes as an array.
        fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
            let mut a = [0u8; N];
            a.copy_from_slice(self.take(N)?);
            Ok(a)
        }

        /// Next (field number, value), or None at the end.
        pub fn field(&mut self) -> Result<Option<(u64, Value<'a>)>, String> {
            if self.pos >= self.buf.len() {
                return Ok(None);
            }
            let key = self.varint()?;
            let v = match key & 7 {
                0 => Value::Varint(self.varint()?),
                1 => {
                    self.take(8)?;
                    Value::Fixed64
                }
                2 => {
                    let n = usize::try_from(self.varint()?).map_err(|e| e.to_string())?;
                    Value::Bytes(self.take(n)?)
                }
                5 => Value::Fixed32(u32::from_le_bytes(self.array()?)),
                w => return Err(format!("unsupported wire type {w} at byte {}", self.pos)),
            };
            Ok(Some((key >> 3, v)))
        }
    }
}

use proto::{Reader, Value};

/// The double-array trie + replacement strings of `normalizer_spec.precompiled_charsmap`
/// (darts-clone format, as `normalizer.cc` reads it).
#[derive(Debug, Clone)]
struct CharsMap {
    units: Vec<u32>,
    normalized: Vec<u8>,
}

impl CharsMap {
    fn parse(blob: &[u8]) -> std::result::Result<Self, String> {
        let Some((&head, _)) = blob.split_first_chunk::<4>() else {
            return Err("precompiled_charsmap shorter than 4 bytes".into());
        };
        let trie_size = u32::from_le_bytes(head) as usize;
        if !trie_size.is_multiple_of(4) || 4 + trie_size > blob.len() {
            return Err(format!(
                "precompiled_charsmap trie size {trie_size} is invalid"
            ));
        }
        let (units, _) = blob[4..4 + trie_size].as_chunks::<4>();
        let units = units.iter().map(|&c| u32::from_le_bytes(c)).collect();
        Ok(Self {
            units,
            normalized: blob[4 + trie_size..].to_vec(),
        })
    }

    /// Longest rule matching a prefix of `input`: (replacement, consumed bytes).
    fn longest_match(&self, input: &[u8]) -> Option<(&[u8], usize)> {
        let unit = |p: usize| self.units.get(p).copied();
        let offset = |u: u32| ((u >> 10) << ((u & (1 << 9)) >> 6)) as usize;
        let label = |u: u32| u & ((1 << 31) | 0xff);
        let has_leaf = |u: u32| (u >> 8) & 1 == 1;
        let value = |u: u32| (u & ((1 << 31) - 1)) as usize;
        let mut best: Option<(usize, usize)> = None;
        let mut node = offset(unit(0)?);
        for (i, &c) in input.iter().enumerate() {
            node ^= c as usize;
            let u = unit(node)?;
            if label(u) != c as u32 {
                break;
            }
            node ^= offset(u);
            if has_leaf(u) {
                best = Some((value(unit(node)?), i + 1));
            }
        }
        let (v, len) = best?;
        let rest = self.normalized.get(v..)?;
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        Some((&rest[..end], len))
    }
}

const SPACE: &str = "\u{2581}";

/// A SentencePiece BPE model (LLaMA's `tokenizer.model`).
#[derive(Debug, Clone)]
pub struct SentencePiece {
    pub pieces: Vec<Piece>,
    pub flags: SpecFlags,
    charsmap: Option<CharsMap>,
    /// NORMAL / USER_DEFINED / UNUSED pieces (the ones merges may form).
    merge_ids: HashMap<String, usize>,
    /// CONTROL / UNKNOWN / BYTE pieces.
    reserved_ids: HashMap<String, usize>,
    /// `<0xNN>` piece id of each byte.
    byte_ids: Vec<Option<usize>>,
    user_defined: Vec<String>,
}

impl SentencePiece {
    /// Read `tokenizer.model`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = fsread::read_capped(path, fsread::MAX_TOKENIZER_BYTES)?;
        Self::from_bytes(&bytes).map_err(|m| Error::ckpt(path, m))
    }

    /// Parse a serialized `ModelProto`.
    pub fn from_bytes(buf: &[u8]) -> std::result::Result<Self, String> {
        let mut pieces = Vec::new();
        let mut flags = SpecFlags::default();
        let mut charsmap_blob: Option<Vec<u8>> = None;
        let mut r = Reader::new(buf);
        while let Some((f, v)) = r.field()? {
            match (f, v) {
                (1, Value::Bytes(b)) => pieces.push(parse_piece(b)?),
                (2, Value::Bytes(b)) => parse_trainer(b, &mut flags)?,
                (3, Value::Bytes(b)) => parse_normalizer(b, &mut flags, &mut charsmap_blob)?,
                _ => {}
            }
        }
        if pieces.is_empty() {
            return Err("no pieces: not a SentencePiece model".into());
        }
        if flags.model_type != 2 {
            return Err(format!(
                "model_type {} is not BPE (2); only BPE models (LLaMA) are supported",
                flags.model_type
            ));
        }
        let n = pieces.len() as i64;
        if !(0..n).contains(&flags.unk_id) {
            return Err(format!("unk_id {} outside the {n} pieces", flags.unk_id));
        }
        let charsmap = match charsmap_blob {
            Some(b) if !b.is_empty() => Some(CharsMap::parse(&b)?),
            _ => None,
        };
        let mut merge_ids = HashMap::new();
        let mut reserved_ids = HashMap::new();
        let mut byte_ids = vec![None; 256];
        let mut user_defined = Vec::new();
        for (i, p) in pieces.iter().enumerate() {
            match p.kind {
                PieceType::Normal | PieceType::UserDefined | PieceType::Unused => {
                    merge_ids.insert(p.piece.clone(), i);
                    if p.kind == PieceType::UserDefined {
                        user_defined.push(p.piece.clone());
                    }
                }
                _ => {
                    reserved_ids.insert(p.piece.clone(), i);
                    if p.kind == PieceType::Byte {
                        let hex = p
                            .piece
                            .strip_prefix("<0x")
                            .and_then(|s| s.strip_suffix('>'))
                            .and_then(|h| u8::from_str_radix(h, 16).ok())
                            .ok_or_else(|| format!("byte piece `{}` is not <0xNN>", p.piece))?;
                        byte_ids[hex as usize] = Some(i);
                    }
                }
            }
        }
        user_defined.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Ok(Self {
            pieces,
            flags,
            charsmap,
            merge_ids,
            reserved_ids,
            byte_ids,
            user_defined,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    pub fn bos_id(&self) -> i64 {
        self.flags.bos_id
    }

    pub fn eos_id(&self) -> i64 {
        self.flags.eos_id
    }

    /// Id of a piece (any type), or the unknown id.
    pub fn piece_to_id(&self, piece: &str) -> i64 {
        self.merge_ids
            .get(piece)
            .or_else(|| self.reserved_ids.get(piece))
            .map_or(self.flags.unk_id, |&i| i as i64)
    }

    /// One normalisation step (`Normalizer::NormalizePrefix`): replacement and bytes consumed.
    ///
    /// Works on bytes, as `normalizer.cc` does: a charsmap rule may end inside a UTF-8
    /// character (a hostile or broken `tokenizer.model`), and the rest of that character is
    /// then an invalid sequence, replaced by U+FFFD one byte at a time (the C++ code's
    /// `kUnicodeError` handling) instead of being sliced as a `str`.
    fn normalize_prefix<'a>(&'a self, input: &'a [u8]) -> (&'a [u8], usize) {
        const REPLACEMENT: &[u8] = "\u{FFFD}".as_bytes();
        if let Some(u) = self
            .user_defined
            .iter()
            .find(|u| input.starts_with(u.as_bytes()))
        {
            return (u.as_bytes(), u.len());
        }
        if let Some((rep, n)) = self.charsmap.as_ref().and_then(|c| c.longest_match(input)) {
            if n > 0 {
                return (rep, n);
            }
        }
        match utf8_char_len(input) {
            Some(n) => (&input[..n], n),
            None => (REPLACEMENT, 1),
        }
    }

    /// `Normalizer::Normalize`: charsmap rules, whitespace trimming/collapsing, spaces → '▁',
    /// dummy prefix.
    pub fn normalize(&self, text: &str) -> String {
        let f = &self.flags;
        let mut input = text.as_bytes();
        let mut out: Vec<u8> = Vec::with_capacity(text.len() + 3);
        if f.remove_extra_whitespaces {
            while !input.is_empty() {
                let (rep, n) = self.normalize_prefix(input);
                if rep != b" " {
                    break;
                }
                input = &input[n..];
            }
        }
        if input.is_empty() {
            return String::new();
        }
        let ws: &[u8] = if f.escape_whitespaces {
            SPACE.as_bytes()
        } else {
            b" "
        };
        if f.add_dummy_prefix && !f.treat_whitespace_as_suffix {
            out.extend_from_slice(ws);
        }
        let mut prev_space = f.remove_extra_whitespaces;
        while !input.is_empty() {
            let (rep, n) = self.normalize_prefix(input);
            let mut sp = rep;
            if prev_space {
                while let Some(rest) = sp.strip_prefix(b" ") {
                    sp = rest;
                }
            }
            if !sp.is_empty() {
                for &b in sp {
                    if f.escape_whitespaces && b == b' ' {
                        out.extend_from_slice(SPACE.as_bytes());
                    } else {
                        out.push(b);
                    }
                }
                prev_space = sp.ends_with(b" ");
            }
            input = &input[n..];
            if !f.remove_extra_whitespaces {
                prev_space = false;
            }
        }
        if f.add_dummy_prefix && f.treat_whitespace_as_suffix {
            out.extend_from_slice(ws);
        }
        if f.remove_extra_whitespaces {
            while out.ends_with(ws) {
                out.truncate(out.len() - ws.len());
            }
        }
        // Replacement strings are UTF-8 in valid models; anything else becomes U+FFFD.
        String::from_utf8(out)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }

    /// Encode text to ids (no BOS/EOS), exactly as `SentencePieceProcessor::EncodeAsIds`.
    pub fn encode(&self, text: &str) -> Vec<i64> {
        let norm = self.normalize(text);
        let mut ids = Vec::new();
        let mut prev_unk = false;
        for piece in self.bpe(&norm) {
            match self.merge_ids.get(piece) {
                Some(&i) => {
                    ids.push(i as i64);
                    prev_unk = false;
                }
                None if self.flags.byte_fallback => {
                    for b in piece.bytes() {
                        ids.push(self.byte_ids[b as usize].map_or(self.flags.unk_id, |i| i as i64));
                    }
                    prev_unk = false;
                }
                None => {
                    // Runs of unknown pieces become one unknown id.
                    if !prev_unk {
                        ids.push(self.flags.unk_id);
                    }
                    prev_unk = true;
                }
            }
        }
        ids
    }

    /// Encode to piece strings (byte-fallback pieces as `<0xNN>`).
    pub fn encode_pieces(&self, text: &str) -> Vec<String> {
        self.encode(text)
            .into_iter()
            .map(|i| self.pieces[i as usize].piece.clone())
            .collect()
    }

    /// `bpe_model.cc` `Model::SampleEncode` without sampling: characters, then repeatedly the
    /// highest-scoring adjacent pair (leftmost on ties) that forms a vocabulary piece.
    fn bpe<'a>(&self, norm: &'a str) -> Vec<&'a str> {
        #[derive(Clone, Copy)]
        struct Sym {
            start: usize,
            end: usize,
            prev: isize,
            next: isize,
            freeze: bool,
        }
        #[derive(PartialEq)]
        struct Pair {
            score: f32,
            left: usize,
            right: usize,
            size: usize,
        }
        impl Eq for Pair {}
        impl Ord for Pair {
            fn cmp(&self, o: &Self) -> std::cmp::Ordering {
                self.score
                    .total_cmp(&o.score)
                    .then_with(|| o.left.cmp(&self.left))
            }
        }
        impl PartialOrd for Pair {
            fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(o))
            }
        }
        let mut syms: Vec<Sym> = Vec::new();
        let mut pos = 0;
        while pos < norm.len() {
            let rest = &norm[pos..];
            let (n, freeze) = match self
                .user_defined
                .iter()
                .find(|u| rest.starts_with(u.as_str()))
            {
                Some(u) => (u.len(), true),
                None => (rest.chars().next().map_or(1, char::len_utf8), false),
            };
            let i = syms.len() as isize;
            syms.push(Sym {
                start: pos,
                end: pos + n,
                prev: i - 1,
                next: if pos + n < norm.len() { i + 1 } else { -1 },
                freeze,
            });
            pos += n;
        }
        let mut agenda = BinaryHeap::new();
        let mut rev_merge: HashMap<&'a str, (&'a str, &'a str)> = HashMap::new();
        let add = |l: isize,
                   r: isize,
                   syms: &[Sym],
                   agenda: &mut BinaryHeap<Pair>,
                   rev: &mut HashMap<&'a str, (&'a str, &'a str)>| {
            if l < 0 || r < 0 {
                return;
            }
            let (a, b) = (syms[l as usize], syms[r as usize]);
            if a.freeze || b.freeze {
                return;
            }
            let piece = &norm[a.start..b.end];
            if let Some(&id) = self.merge_ids.get(piece) {
                agenda.push(Pair {
                    score: self.pieces[id].score,
                    left: l as usize,
                    right: r as usize,
                    size: piece.len(),
                });
                if self.pieces[id].kind == PieceType::Unused {
                    rev.insert(piece, (&norm[a.start..a.end], &norm[b.start..b.end]));
                }
            }
        };
        for i in 1..syms.len() {
            add(
                i as isize - 1,
                i as isize,
                &syms,
                &mut agenda,
                &mut rev_merge,
            );
        }
        while let Some(top) = agenda.pop() {
            let (l, r) = (syms[top.left], syms[top.right]);
            // Stale entry: one side was merged away or changed since it was queued.
            if l.start == l.end
                || r.start == r.end
                || l.next != top.right as isize
                || (r.end - l.start) != top.size
            {
                continue;
            }
            syms[top.left].end = r.end;
            syms[top.left].next = r.next;
            if r.next >= 0 {
                syms[r.next as usize].prev = top.left as isize;
            }
            syms[top.right].start = syms[top.right].end; // empty
            let (p, n) = (syms[top.left].prev, syms[top.left].next);
            add(p, top.left as isize, &syms, &mut agenda, &mut rev_merge);
            add(top.left as isize, n, &syms, &mut agenda, &mut rev_merge);
        }
        let mut out = Vec::new();
        fn resegment<'a>(
            w: &'a str,
            sp: &SentencePiece,
            rev: &HashMap<&'a str, (&'a str, &'a str)>,
            out: &mut Vec<&'a str>,
        ) {
            let unused = sp
                .merge_ids
                .get(w)
                .is_some_and(|&i| sp.pieces[i].kind == PieceType::Unused);
            match rev.get(w) {
                Some(&(a, b)) if unused => {
                    resegment(a, sp, rev, out);
                    resegment(b, sp, rev, out);
                }
                _ => out.push(w),
            }
        }
        let mut i: isize = if syms.is_empty() { -1 } else { 0 };
        while i >= 0 {
            let s = syms[i as usize];
            resegment(&norm[s.start..s.end], self, &rev_merge, &mut out);
            i = s.next;
        }
        out
    }

    /// Decode ids to text (`SentencePieceProcessor::DecodeIds`): control pieces vanish,
    /// unknowns become " ⁇ ", byte pieces are joined into UTF-8, '▁' becomes a space and the
    /// dummy-prefix space of the first piece is dropped. Out-of-range ids are skipped.
    pub fn decode(&self, ids: &[i64]) -> String {
        let mut out = String::new();
        let mut bytes: Vec<u8> = Vec::new();
        let mut first = true;
        let flush = |bytes: &mut Vec<u8>, out: &mut String| {
            if !bytes.is_empty() {
                out.push_str(&String::from_utf8_lossy(bytes));
                bytes.clear();
            }
        };
        for &id in ids {
            let Some(p) = usize::try_from(id).ok().and_then(|i| self.pieces.get(i)) else {
                continue;
            };
            match p.kind {
                PieceType::Control => continue,
                PieceType::Byte => {
                    let b = u8::from_str_radix(&p.piece[3..5], 16).unwrap_or(b'?');
                    bytes.push(b);
                    first = false;
                    continue;
                }
                _ => {}
            }
            flush(&mut bytes, &mut out);
            if p.kind == PieceType::Unknown {
                out.push_str(&self.flags.unk_surface);
                first = false;
                continue;
            }
            let mut s = p.piece.as_str();
            if first && (self.flags.add_dummy_prefix || self.flags.remove_extra_whitespaces) {
                s = s.strip_prefix(SPACE).unwrap_or(s);
            }
            out.push_str(&s.replace(SPACE, " "));
            first = false;
        }
        flush(&mut bytes, &mut out);
        out
    }
}

/// Length of the valid UTF-8 character that starts `b`, or `None` when `b` does not start
/// with one (a stray continuation byte, a truncated or overlong sequence).
fn utf8_char_len(b: &[u8]) -> Option<usize> {
    let n = match *b.first()? {
        0x00..=0x7f => 1,
        0xc2..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf4 => 4,
        _ => return None,
    };
    let c = b.get(..n)?;
    std::str::from_utf8(c).ok().map(|_| n)
}

fn parse_piece(b: &[u8]) -> std::result::Result<Piece, String> {
    let mut p = Piece {
        piece: String::new(),
        score: 0.0,
        kind: PieceType::Normal,
    };
    let mut r = Reader::new(b);
    while let Some((f, v)) = r.field()? {
        match (f, v) {
            (1, Value::Bytes(s)) => {
                p.piece =
                    String::from_utf8(s.to_vec()).map_err(|_| "piece is not UTF-8".to_string())?
            }
            (2, Value::Fixed32(x)) => p.score = f32::from_bits(x),
            (3, Value::Varint(t)) => {
                p.kind =
                    PieceType::from_proto(t).ok_or_else(|| format!("unknown piece type {t}"))?
            }
            _ => {}
        }
    }
    Ok(p)
}

fn int32(v: u64) -> i64 {
    v as i32 as i64
}

fn parse_trainer(b: &[u8], f: &mut SpecFlags) -> std::result::Result<(), String> {
    let mut r = Reader::new(b);
    while let Some((n, v)) = r.field()? {
        match (n, v) {
            (3, Value::Varint(x)) => f.model_type = x,
            (24, Value::Varint(x)) => f.treat_whitespace_as_suffix = x != 0,
            (35, Value::Varint(x)) => f.byte_fallback = x != 0,
            (40, Value::Varint(x)) => f.unk_id = int32(x),
            (41, Value::Varint(x)) => f.bos_id = int32(x),
            (42, Value::Varint(x)) => f.eos_id = int32(x),
            (43, Value::Varint(x)) => f.pad_id = int32(x),
            (44, Value::Bytes(s)) => f.unk_surface = String::from_utf8_lossy(s).into_owned(),
            _ => {}
        }
    }
    Ok(())
}

fn parse_normalizer(
    b: &[u8],
    f: &mut SpecFlags,
    charsmap: &mut Option<Vec<u8>>,
) -> std::result::Result<(), String> {
    let mut r = Reader::new(b);
    while let Some((n, v)) = r.field()? {
        match (n, v) {
            (1, Value::Bytes(s)) => f.normalizer_name = String::from_utf8_lossy(s).into_owned(),
            (2, Value::Bytes(s)) => *charsmap = Some(s.to_vec()),
            (3, Value::Varint(x)) => f.add_dummy_prefix = x != 0,
            (4, Value::Varint(x)) => f.remove_extra_whitespaces = x != 0,
            (5, Value::Varint(x)) => f.escape_whitespaces = x != 0,
            _ => {}
        }
    }
    Ok(())
}
