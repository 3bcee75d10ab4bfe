//! Hugging Face `tokenizer.json` folders, read with the `tokenizers` crate, behind the same
//! encode / decode surface as [`SentencePiece`] (`tokenizer.model`), so a language-model folder
//! may carry either.
//!
//! [`TextTokenizer`] is that surface; [`load_text_tokenizer`] picks the file a folder has
//! (`tokenizer.model` first, as the official LaVIT folders ship it, then `tokenizer.json`).
//! BOS / EOS come from `tokenizer_config.json` beside the file when it names them, else from
//! the `<s>` / `</s>` tokens LLaMA uses.

use std::path::Path;

use lavit_runtime::{Error, Result};
use tokenizers::Tokenizer;

use crate::sentencepiece::SentencePiece;

/// What the LLM needs from a text tokenizer.
pub trait TextTokenizer: Send + Sync {
    /// Text → ids, without BOS / EOS.
    fn encode(&self, text: &str) -> Vec<i64>;
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

/// Largest `tokenizer.json` read (LLaMA-3's is 9 MB, the largest common ones ~20 MB).
pub const MAX_TOKENIZER_JSON: u64 = 256 << 20;

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
        match self.inner.encode(text, false) {
            Ok(enc) => enc.get_ids().iter().map(|&i| i as i64).collect(),
            // The tokenizers crate fails only on inputs its normaliser cannot handle; an
            // empty encoding is the conservative answer (the caller sees no tokens).
            Err(e) => {
                tracing::warn!("tokenizer.json: cannot encode the text: {e}");
                Vec::new()
            }
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
