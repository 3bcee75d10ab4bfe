//! The demo's text vocabulary, written as a SentencePiece BPE `tokenizer.model` (the file
//! LaVIT-7B-v2 ships and the LLM loader reads), so the demo checkpoint loads like the real one.
//!
//! Pieces: `<unk>`, `<s>`, `</s>`, then every printable ASCII character (so any prompt encodes),
//! then every prefix of `▁word` for each word of the captions, scored by length. Every multi-char
//! piece starts with `▁`, so BPE can only grow a symbol from the start of a word and each caption
//! word becomes exactly one token.
//!
//! Serialisation follows `sentencepiece_model.proto` (google/sentencepiece): `ModelProto.pieces`
//! = 1 (`piece` = 1, `score` = 2 float, `type` = 3), `trainer_spec` = 2 (`model_type` = 3, BPE = 2;
//! `vocab_size` = 4; `byte_fallback` = 35; `unk_id`/`bos_id`/`eos_id`/`pad_id` = 40–43),
//! `normalizer_spec` = 3 (`name` = 1, `add_dummy_prefix` = 3, `remove_extra_whitespaces` = 4,
//! `escape_whitespaces` = 5).

use std::collections::BTreeSet;

use super::data::{
    caption, phrase, CLASS_NAMES, HELD_OUT_TEMPLATES, PHRASE_CASES, PHRASE_FORMS, PROMPT_TEMPLATES,
    TEMPLATES,
};

const SPACE: char = '\u{2581}';

/// piece, score, type (1 normal, 2 unknown, 3 control).
pub type PieceRow = (String, f32, u64);

/// Every word of every caption the demo can produce and of every prompt phrasing it trains
/// or evaluates on (plurals, label names, letter cases: each a piece of its own).
pub fn caption_words() -> BTreeSet<String> {
    let mut words = BTreeSet::new();
    for c in 0..CLASS_NAMES.len() {
        for t in 0..TEMPLATES.len() {
            words.extend(caption(c, t).split_whitespace().map(str::to_string));
        }
        for t in PROMPT_TEMPLATES.iter().chain(&HELD_OUT_TEMPLATES) {
            for form in 0..PHRASE_FORMS {
                for case in 0..PHRASE_CASES {
                    for capital in [false, true] {
                        let p = phrase(c, t, form, case, capital);
                        words.extend(p.split_whitespace().map(str::to_string));
                    }
                }
            }
        }
    }
    words
}

/// The pieces in id order.
pub fn pieces() -> Vec<PieceRow> {
    let mut rows: Vec<PieceRow> = vec![
        ("<unk>".into(), 0.0, 2),
        ("<s>".into(), 0.0, 3),
        ("</s>".into(), 0.0, 3),
    ];
    let mut seen = BTreeSet::new();
    let mut push = |rows: &mut Vec<PieceRow>, p: String, score: f32| {
        if seen.insert(p.clone()) {
            rows.push((p, score, 1));
        }
    };
    push(&mut rows, SPACE.to_string(), 0.0);
    for ch in (0x21u8..0x7f).map(char::from) {
        push(&mut rows, ch.to_string(), 0.0);
    }
    for w in caption_words() {
        let word: Vec<char> = std::iter::once(SPACE).chain(w.chars()).collect();
        for len in 2..=word.len() {
            let p: String = word[..len].iter().collect();
            push(&mut rows, p, len as f32);
        }
    }
    rows
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn field_varint(out: &mut Vec<u8>, field: u64, v: u64) {
    varint(out, field << 3);
    varint(out, v);
}

fn field_bytes(out: &mut Vec<u8>, field: u64, b: &[u8]) {
    varint(out, (field << 3) | 2);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// The serialized `ModelProto`.
pub fn tokenizer_model() -> Vec<u8> {
    let rows = pieces();
    let mut out = Vec::new();
    for (piece, score, kind) in &rows {
        let mut p = Vec::new();
        field_bytes(&mut p, 1, piece.as_bytes());
        varint(&mut p, (2 << 3) | 5); // fixed32
        p.extend_from_slice(&score.to_le_bytes());
        field_varint(&mut p, 3, *kind);
        field_bytes(&mut out, 1, &p);
    }
    let mut trainer = Vec::new();
    field_varint(&mut trainer, 3, 2); // BPE
    field_varint(&mut trainer, 4, rows.len() as u64);
    field_varint(&mut trainer, 35, 0);
    field_varint(&mut trainer, 40, 0);
    field_varint(&mut trainer, 41, 1);
    field_varint(&mut trainer, 42, 2);
    field_varint(&mut trainer, 43, u64::MAX); // pad_id = -1 (int32, sign-extended)
    field_bytes(&mut out, 2, &trainer);
    let mut norm = Vec::new();
    field_bytes(&mut norm, 1, b"identity");
    field_varint(&mut norm, 3, 1);
    field_varint(&mut norm, 4, 1);
    field_varint(&mut norm, 5, 1);
    field_bytes(&mut out, 3, &norm);
    out
}

/// Number of text ids (`llm.text_vocab_size` of the demo checkpoint).
pub fn text_vocab_size() -> i64 {
    pieces().len() as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_caption_word_is_one_piece() {
        let rows = pieces();
        for w in caption_words() {
            let p = format!("{SPACE}{w}");
            assert!(rows.iter().any(|r| r.0 == p), "{p}");
        }
        let unique: BTreeSet<_> = rows.iter().map(|r| &r.0).collect();
        assert_eq!(unique.len(), rows.len());
        assert!(!tokenizer_model().is_empty());
    }
}
