//! Hugging Face `tokenizer.json` folders, read with the `tokenizers` crate, behind the same
//! encode / decode surface as [`SentencePiece`] (`tokenizer.model`), so a language-model folder
//! may carry either.
//!
//! [`TextTokenizer`] is that surface; [`load_text_tokenizer`] picks the file a folder has
//! (`tokenizer.model` first, as the official LaVIT folders ship it, then `tokenizer.json`).
//! BOS / EOS come from `tokenizer_config.json` beside the file when it names them, else from
//! the `<s>` / `</s>` tokens LLaMA uses.
//!
//! A `tokenizer.json` is untrusted input, checked before the `tokenizers` crate builds
//! anything from it ([`probe`]): its vocabulary, merges and added tokens are counted and
//! their ids bounded ([`MAX_VOCAB`], …) in one pass that stores nothing, and every regex of
//! its normaliser, pre-tokenizer and decoder must pass [`crate::regex_guard::check_linear`];
//! a refusal names the file and the key. The patterns that pass run under Oniguruma's retry
//! limits, and a matcher failure on one text fails only that request
//! ([`TextTokenizer::try_encode`]).

use std::fmt;
use std::path::Path;

use lavit_runtime::{Error, Result};
use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use tokenizers::Tokenizer;

use crate::sentencepiece::SentencePiece;

/// What the LLM needs from a text tokenizer.
pub trait TextTokenizer: Send + Sync {
    /// Text → ids, without BOS / EOS (an empty list where the text cannot be split).
    fn encode(&self, text: &str) -> Vec<i64>;
    /// Text from a request → ids, or an [`Error::Invalid`] when this text cannot be split
    /// (a tokenizer regex gave up on it): the request fails, the stage does not.
    fn try_encode(&self, text: &str) -> Result<Vec<i64>> {
        Ok(self.encode(text))
    }
    /// Ids → text; special tokens vanish, out-of-range ids are skipped.
    fn decode(&self, ids: &[i64]) -> String;
    fn vocab_size(&self) -> usize;
    fn bos_id(&self) -> i64;
    fn eos_id(&self) -> i64;
    /// Id of a token, or the unknown id (-1 when the vocabulary has none).
    fn piece_to_id(&self, piece: &str) -> i64;
}

impl TextTokenizer for SentencePiece {
    fn encode(&self, text: &str) -> Vec<i64> {
        SentencePiece::encode(self, text)
    }
    fn decode(&self, ids: &[i64]) -> String {
        SentencePiece::decode(self, ids)
    }
    fn vocab_size(&self) -> usize {
        SentencePiece::vocab_size(self)
    }
    fn bos_id(&self) -> i64 {
        SentencePiece::bos_id(self)
    }
    fn eos_id(&self) -> i64 {
        SentencePiece::eos_id(self)
    }
    fn piece_to_id(&self, piece: &str) -> i64 {
        SentencePiece::piece_to_id(self, piece)
    }
}

/// Largest `tokenizer.json` read (LLaMA-3's is 9 MB, Gemma-3's 33 MB).
pub const MAX_TOKENIZER_JSON: u64 = 64 << 20;
/// Most entries of `model.vocab`, and the bound on every token id (Gemma's 262k is the
/// largest real vocabulary).
pub const MAX_VOCAB: u64 = 1 << 20;
/// Most entries of `model.merges` (LLaMA-3 has 280k).
pub const MAX_MERGES: u64 = 1 << 21;
/// Most `added_tokens`.
pub const MAX_ADDED_TOKENS: u64 = 1 << 17;
/// Oniguruma's backtracking budget per match and per search (its default per match is 10 M,
/// per search unlimited): a linear pattern on a prompt needs a few steps per character.
const ONIG_RETRY_LIMIT: u64 = 1_000_000;

/// What [`probe`] reads of a `tokenizer.json`: counts and ids, and the parts holding regexes.
#[derive(Deserialize)]
struct Probe {
    #[serde(default, rename = "model")]
    _model: Option<ModelProbe>,
    #[serde(default, rename = "added_tokens")]
    _added_tokens: Option<Counted<AddedTokens>>,
    #[serde(default)]
    normalizer: Option<serde_json::Value>,
    #[serde(default)]
    pre_tokenizer: Option<serde_json::Value>,
    #[serde(default)]
    decoder: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ModelProbe {
    #[serde(default, rename = "vocab")]
    _vocab: Option<Counted<Vocab>>,
    #[serde(default, rename = "merges")]
    _merges: Option<Counted<Merges>>,
}

/// A bounded list or map of a `tokenizer.json`.
trait Bounded {
    /// Its key, for errors.
    const KEY: &'static str;
    /// Most entries.
    const CAP: u64;
}

/// `model.vocab`: a map token → id (BPE, WordPiece) or a list of [token, score] (Unigram).
struct Vocab;
impl Bounded for Vocab {
    const KEY: &'static str = "model.vocab";
    const CAP: u64 = MAX_VOCAB;
}
/// `model.merges`.
struct Merges;
impl Bounded for Merges {
    const KEY: &'static str = "model.merges";
    const CAP: u64 = MAX_MERGES;
}
/// `added_tokens`: a list of objects with an `id`.
struct AddedTokens;
impl Bounded for AddedTokens {
    const KEY: &'static str = "added_tokens";
    const CAP: u64 = MAX_ADDED_TOKENS;
}

/// A list or map of at most `B::CAP` entries, counted without being stored; every id it
/// holds (a map's values, an `id` field of a list's objects) must be below [`MAX_VOCAB`].
struct Counted<B>(std::marker::PhantomData<B>);

/// A list entry: anything, with its `id` read when it is an object that has one.
struct Entry(Option<u64>);

impl<'de> Deserialize<'de> for Entry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entry;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "an entry")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut a: A,
            ) -> std::result::Result<Entry, A::Error> {
                let mut id = None;
                while let Some(k) = a.next_key::<std::borrow::Cow<'de, str>>()? {
                    if k == "id" {
                        id = Some(a.next_value::<u64>()?);
                    } else {
                        a.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(Entry(id))
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> std::result::Result<Entry, A::Error> {
                while a.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Entry(None))
            }
            fn visit_str<E>(self, _: &str) -> std::result::Result<Entry, E> {
                Ok(Entry(None))
            }
            fn visit_f64<E>(self, _: f64) -> std::result::Result<Entry, E> {
                Ok(Entry(None))
            }
            fn visit_u64<E>(self, _: u64) -> std::result::Result<Entry, E> {
                Ok(Entry(None))
            }
            fn visit_i64<E>(self, _: i64) -> std::result::Result<Entry, E> {
                Ok(Entry(None))
            }
            fn visit_bool<E>(self, _: bool) -> std::result::Result<Entry, E> {
                Ok(Entry(None))
            }
            fn visit_unit<E>(self) -> std::result::Result<Entry, E> {
                Ok(Entry(None))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de, B: Bounded> Deserialize<'de> for Counted<B> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error as _;
        struct V<B>(std::marker::PhantomData<B>);
        impl<'de, B: Bounded> Visitor<'de> for V<B> {
            type Value = Counted<B>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "`{}`: a list or a map", B::KEY)
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut n = 0u64;
                while let Some(Entry(id)) = a.next_element::<Entry>()? {
                    n += 1;
                    if n > B::CAP {
                        return Err(A::Error::custom(format!(
                            "`{}` has more than {} entries",
                            B::KEY,
                            B::CAP
                        )));
                    }
                    if let Some(id) = id.filter(|&i| i >= MAX_VOCAB) {
                        return Err(A::Error::custom(format!(
                            "`{}`: token id {id} is not below {MAX_VOCAB}",
                            B::KEY
                        )));
                    }
                }
                Ok(Counted(std::marker::PhantomData))
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut a: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut n = 0u64;
                while let Some((_, id)) = a.next_entry::<IgnoredAny, u64>()? {
                    n += 1;
                    if n > B::CAP {
                        return Err(A::Error::custom(format!(
                            "`{}` has more than {} entries",
                            B::KEY,
                            B::CAP
                        )));
                    }
                    if id >= MAX_VOCAB {
                        return Err(A::Error::custom(format!(
                            "`{}`: token id {id} is not below {MAX_VOCAB}",
                            B::KEY
                        )));
                    }
                }
                Ok(Counted(std::marker::PhantomData))
            }
        }
        d.deserialize_any(V::<B>(std::marker::PhantomData))
    }
}

/// Check a `tokenizer.json` text before it is built: sizes and ids (one pass, nothing
/// stored), then every `Regex` pattern of the normaliser, pre-tokenizer and decoder. The
/// error names the key.
pub fn probe(text: &str) -> std::result::Result<(), String> {
    let p: Probe = serde_json::from_str(text).map_err(|e| e.to_string())?;
    for (key, part) in [
        ("normalizer", &p.normalizer),
        ("pre_tokenizer", &p.pre_tokenizer),
        ("decoder", &p.decoder),
    ] {
        if let Some(v) = part {
            check_regexes(key, v)?;
        }
    }
    Ok(())
}

/// Every `{"Regex": pattern}` under `v` through the linear-time check.
fn check_regexes(key: &str, v: &serde_json::Value) -> std::result::Result<(), String> {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                let here = format!("{key}.{k}");
                if k == "Regex" {
                    if let Some(pat) = x.as_str() {
                        crate::regex_guard::check_linear(pat).map_err(|why| {
                            format!(
                                "key `{here}`: the pattern {} is not accepted: {why}",
                                lavit_runtime::fsread::excerpt(&format!("{pat:?}"), 120)
                            )
                        })?;
                    }
                }
                check_regexes(&here, x)?;
            }
        }
        serde_json::Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                check_regexes(&format!("{key}[{i}]"), x)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Oniguruma's retry limits, once per process.
fn bound_the_matcher() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: plain setters of two global counters, called once before any pattern of
        // a tokenizer.json is compiled or run by this process's tokenizers.
        unsafe {
            onig_sys::onig_set_retry_limit_in_match(ONIG_RETRY_LIMIT as _);
            onig_sys::onig_set_retry_limit_in_search(ONIG_RETRY_LIMIT as _);
        }
    });
}

/// A `tokenizer.json` (any model the `tokenizers` crate reads: BPE, Unigram, WordPiece, …).
pub struct HfTokenizer {
    inner: Tokenizer,
    bos_id: i64,
    eos_id: i64,
    unk_id: i64,
}

/// A token named in `tokenizer_config.json`: a string or `{"content": …}`.
fn config_token(cfg: &serde_json::Value, key: &str) -> Option<String> {
    match cfg.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        v => v.get("content")?.as_str().map(str::to_string),
    }
}

impl HfTokenizer {
    /// Read `tokenizer.json` (and `tokenizer_config.json` beside it, when present).
    pub fn from_file(path: &Path) -> Result<Self> {
        // A regular file, size-capped before it is read (never a FIFO or a device).
        let text = lavit_runtime::fsread::read_to_string_capped(path, MAX_TOKENIZER_JSON)?;
        probe(&text).map_err(|e| Error::ckpt(path, e))?;
        bound_the_matcher();
        let inner: Tokenizer = text
            .parse()
            .map_err(|e: tokenizers::Error| Error::ckpt(path, e.to_string()))?;
        let cfg_path = path.with_file_name("tokenizer_config.json");
        let cfg: serde_json::Value = if cfg_path.symlink_metadata().is_ok() {
            let t = lavit_runtime::fsread::read_config(&cfg_path)?;
            serde_json::from_str(&t).map_err(|e| Error::ckpt(&cfg_path, e.to_string()))?
        } else {
            serde_json::Value::Null
        };
        let id_of = |key: &str, default: &str| -> Result<i64> {
            let name = config_token(&cfg, key).unwrap_or_else(|| default.to_string());
            inner.token_to_id(&name).map(i64::from).ok_or_else(|| {
                Error::ckpt(
                    path,
                    format!(
                        "{key} `{name}` is not in the vocabulary of {}",
                        path.display()
                    ),
                )
            })
        };
        let bos_id = id_of("bos_token", "<s>")?;
        let eos_id = id_of("eos_token", "</s>")?;
        let unk_id = config_token(&cfg, "unk_token")
            .or_else(|| Some("<unk>".into()))
            .and_then(|u| inner.token_to_id(&u))
            .map_or(-1, i64::from);
        Ok(HfTokenizer {
            inner,
            bos_id,
            eos_id,
            unk_id,
        })
    }

    /// The wrapped `tokenizers` object.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

impl TextTokenizer for HfTokenizer {
    fn encode(&self, text: &str) -> Vec<i64> {
        self.try_encode(text).unwrap_or_else(|e| {
            // An empty encoding is the conservative answer (the caller sees no tokens).
            tracing::warn!("{e}");
            Vec::new()
        })
    }
    fn try_encode(&self, text: &str) -> Result<Vec<i64>> {
        // The `onig` binding panics when a search hits its retry limit: caught here, so
        // the text's request fails and the stage goes on.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.inner.encode(text, false)
        }));
        match r {
            Ok(Ok(enc)) => Ok(enc.get_ids().iter().map(|&i| i as i64).collect()),
            Ok(Err(e)) => Err(Error::invalid(format!(
                "tokenizer.json cannot encode this text: {e}"
            ))),
            Err(_) => Err(Error::invalid(
                "tokenizer.json cannot split this text: its regex gave up (backtracking limit)",
            )),
        }
    }
    fn decode(&self, ids: &[i64]) -> String {
        let n = self.vocab_size() as i64;
        let ids: Vec<u32> = ids
            .iter()
            .filter(|&&i| (0..n).contains(&i))
            .map(|&i| i as u32)
            .collect();
        self.inner.decode(&ids, true).unwrap_or_default()
    }
    fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
    fn bos_id(&self) -> i64 {
        self.bos_id
    }
    fn eos_id(&self) -> i64 {
        self.eos_id
    }
    fn piece_to_id(&self, piece: &str) -> i64 {
        self.inner.token_to_id(piece).map_or(self.unk_id, i64::from)
    }
}

/// The file [`load_text_tokenizer`] reads in `dir`: `tokenizer.model` whenever an entry of
/// that name exists (whatever it is: the reader refuses links to devices, FIFOs, …, naming
/// it), else `tokenizer.json`.
pub fn text_tokenizer_file(dir: &Path) -> &'static str {
    if dir.join("tokenizer.model").symlink_metadata().is_ok() {
        "tokenizer.model"
    } else {
        "tokenizer.json"
    }
}

/// The text tokenizer of a language-model folder: `tokenizer.model` (SentencePiece) when it is
/// there, else `tokenizer.json`.
pub fn load_text_tokenizer(dir: &Path) -> Result<Box<dyn TextTokenizer>> {
    let sp = dir.join("tokenizer.model");
    if text_tokenizer_file(dir) == "tokenizer.model" {
        return Ok(Box::new(SentencePiece::from_file(&sp)?));
    }
    let hf = dir.join("tokenizer.json");
    if hf.symlink_metadata().is_ok() {
        return Ok(Box::new(HfTokenizer::from_file(&hf)?));
    }
    Err(Error::io(
        dir,
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "neither tokenizer.model nor tokenizer.json in this folder",
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
    use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{AddedToken, TokenizerBuilder};

    const CORPUS: &[&str] = &[
        "a photo of a cat sitting on a chair",
        "a photo of a dog running on the grass",
        "an ankle boot, a sneaker and a sandal",
        "the cat sat on the mat, the dog sat on the log",
    ];

    /// Train a byte-level BPE on a few sentences and save it as `tokenizer.json`.
    fn write_tokenizer(dir: &Path, with_config: bool) {
        let mut trainer = BpeTrainerBuilder::new()
            .show_progress(false)
            .vocab_size(300)
            .min_frequency(1)
            .special_tokens(vec![
                AddedToken::from("<unk>", true),
                AddedToken::from("<s>", true),
                AddedToken::from("</s>", true),
                AddedToken::from("<bos>", true),
            ])
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        let mut tok = TokenizerBuilder::new()
            .with_model(BPE::default())
            .with_normalizer(None::<tokenizers::NormalizerWrapper>)
            .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)))
            .with_post_processor(None::<tokenizers::PostProcessorWrapper>)
            .with_decoder(Some(ByteLevelDecoder::default()))
            .build()
            .unwrap();
        let corpus = dir.join("corpus.txt");
        std::fs::write(&corpus, CORPUS.join("\n")).unwrap();
        tok.train_from_files(&mut trainer, vec![corpus.to_string_lossy().into_owned()])
            .unwrap();
        tok.save(dir.join("tokenizer.json"), false).unwrap();
        if with_config {
            std::fs::write(
                dir.join("tokenizer_config.json"),
                r#"{"bos_token": {"content": "<bos>"}, "eos_token": "</s>"}"#,
            )
            .unwrap();
        }
    }

    #[test]
    fn tokenizer_json_round_trips_text_and_names_its_specials() {
        let tmp = tempfile::tempdir().unwrap();
        write_tokenizer(tmp.path(), false);
        let t = load_text_tokenizer(tmp.path()).unwrap();
        for text in [
            "a photo of a cat sitting on a chair",
            "the dog sat on the chair",
            "unseen words: zebra, quartz — and ünïcödé ✓",
            "",
        ] {
            let ids = t.encode(text);
            assert_eq!(t.decode(&ids), text, "{ids:?}");
            assert!(ids.iter().all(|&i| (0..t.vocab_size() as i64).contains(&i)));
        }
        // Merges learned from the corpus: a frequent word is fewer tokens than its bytes.
        assert!(t.encode(" photo").len() < " photo".len());
        assert_eq!(t.bos_id(), t.piece_to_id("<s>"));
        assert_eq!(t.eos_id(), t.piece_to_id("</s>"));
        assert_ne!(t.bos_id(), t.eos_id());
        // Special tokens vanish on decode; out-of-range ids are skipped.
        let mut ids = vec![t.bos_id()];
        ids.extend(t.encode("a cat"));
        ids.extend([t.eos_id(), -5, 1 << 40]);
        assert_eq!(t.decode(&ids), "a cat");
        assert_eq!(t.piece_to_id("no such token"), t.piece_to_id("<unk>"));
    }

    #[test]
    fn tokenizer_config_names_bos_and_eos() {
        let tmp = tempfile::tempdir().unwrap();
        write_tokenizer(tmp.path(), true);
        let t = HfTokenizer::from_file(&tmp.path().join("tokenizer.json")).unwrap();
        assert_eq!(t.bos_id(), t.piece_to_id("<bos>"));
        assert_eq!(t.eos_id(), t.piece_to_id("</s>"));
        // A config naming a token the vocabulary lacks is refused, naming it.
        std::fs::write(
            tmp.path().join("tokenizer_config.json"),
            r#"{"bos_token": "<nope>"}"#,
        )
        .unwrap();
        let e = HfTokenizer::from_file(&tmp.path().join("tokenizer.json"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("<nope>") && e.contains("bos_token"), "{e}");
    }

    #[test]
    fn bad_files_are_refused_with_their_path() {
        let tmp = tempfile::tempdir().unwrap();
        let e = load_text_tokenizer(tmp.path()).err().unwrap().to_string();
        assert!(e.contains("tokenizer.json"), "{e}");
        let p = tmp.path().join("tokenizer.json");
        std::fs::write(&p, "{ not json").unwrap();
        let e = HfTokenizer::from_file(&p).err().unwrap().to_string();
        assert!(e.contains("tokenizer.json"), "{e}");
    }

    /// Put a `Split` on `pattern` before the byte-level step of the saved tokenizer.json.
    fn with_split(dir: &Path, pattern: &str) {
        let p = dir.join("tokenizer.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        v["pre_tokenizer"] = serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated",
             "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
             "use_regex": false}]});
        std::fs::write(&p, v.to_string()).unwrap();
    }

    #[test]
    fn backtracking_regexes_are_refused_at_load_naming_file_and_key() {
        let tmp = tempfile::tempdir().unwrap();
        write_tokenizer(tmp.path(), false);
        for (pattern, why) in [
            ("(a+)+$", "nested quantifiers"),
            ("(x|xy)*z", "alternation"),
            (r"(\w)\1", "backreference"),
        ] {
            with_split(tmp.path(), pattern);
            let e = HfTokenizer::from_file(&tmp.path().join("tokenizer.json"))
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains("tokenizer.json"), "{e}");
            assert!(
                e.contains("pre_tokenizer.pretokenizers[0].pattern.Regex") && e.contains(why),
                "{pattern}: {e}"
            );
        }
        // The GPT-2 pattern is accepted.
        with_split(
            tmp.path(),
            r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
        );
        let t = HfTokenizer::from_file(&tmp.path().join("tokenizer.json")).unwrap();
        assert_eq!(
            t.decode(&t.try_encode("a photo of a cat").unwrap()),
            "a photo of a cat"
        );
    }

    #[test]
    fn a_text_the_bounded_matcher_gives_up_on_fails_alone() {
        let tmp = tempfile::tempdir().unwrap();
        write_tokenizer(tmp.path(), false);
        // Linear enough to pass the load check, quadratic on a long run of spaces (no
        // match at any start: each start scans the rest).
        with_split(tmp.path(), r"\s*[\r\n]+|\S+");
        let t = HfTokenizer::from_file(&tmp.path().join("tokenizer.json")).unwrap();
        assert!(!t.try_encode("a cat on a mat").unwrap().is_empty());
        let start = std::time::Instant::now();
        let e = t.try_encode(&" ".repeat(30_000)).unwrap_err();
        assert!(
            matches!(e, Error::Invalid(_)) && e.to_string().contains("gave up"),
            "{e}"
        );
        assert!(start.elapsed().as_secs() < 20, "{:?}", start.elapsed());
        // The tokenizer goes on serving other texts.
        assert_eq!(t.decode(&t.try_encode("the dog").unwrap()), "the dog");
    }

    #[test]
    fn vocabulary_claims_are_bounded_before_building() {
        let tmp = tempfile::tempdir().unwrap();
        write_tokenizer(tmp.path(), false);
        let p = tmp.path().join("tokenizer.json");
        let orig: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        // A token id far past any vocabulary (an allocation of that many rows elsewhere).
        let mut v = orig.clone();
        v["model"]["vocab"]["zz"] = serde_json::json!(4_000_000_000u64);
        std::fs::write(&p, v.to_string()).unwrap();
        let e = HfTokenizer::from_file(&p).err().unwrap().to_string();
        assert!(e.contains("model.vocab") && e.contains("4000000000"), "{e}");
        let mut v = orig.clone();
        v["added_tokens"][0]["id"] = serde_json::json!(1u64 << 40);
        std::fs::write(&p, v.to_string()).unwrap();
        let e = HfTokenizer::from_file(&p).err().unwrap().to_string();
        assert!(e.contains("added_tokens"), "{e}");
        // More entries than any vocabulary: refused while counting, before anything is built.
        let mut text = String::from(r#"{"model": {"type": "BPE", "vocab": {"#);
        for i in 0..=MAX_VOCAB {
            if i > 0 {
                text.push(',');
            }
            text.push_str(&format!("\"t{i}\":{}", i % 1000));
        }
        text.push_str("}}}");
        std::fs::write(&p, &text).unwrap();
        let e = HfTokenizer::from_file(&p).err().unwrap().to_string();
        assert!(e.contains("model.vocab") && e.contains("more than"), "{e}");
    }

    #[test]
    fn the_official_sentencepiece_model_answers_through_the_same_trait() {
        let sp_path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/sp_llama_style.model");
        let sp = SentencePiece::from_file(&sp_path).unwrap();
        let direct = sp.encode("a photo of a cat");
        let tmp = tempfile::tempdir().unwrap();
        std::fs::copy(&sp_path, tmp.path().join("tokenizer.model")).unwrap();
        write_tokenizer(tmp.path(), false); // both present: tokenizer.model wins
        let t = load_text_tokenizer(tmp.path()).unwrap();
        assert_eq!(t.encode("a photo of a cat"), direct);
        assert_eq!(t.decode(&direct), sp.decode(&direct));
        assert_eq!(t.vocab_size(), sp.vocab_size());
    }
}
