//! Pickle and zip bombs, a SentencePiece normaliser splitting UTF-8, and the regression files.

use super::*;

#[test]
fn pickle_and_zip_bombs_are_refused_within_budgets() {
    let tmp = tempfile::tempdir().unwrap();
    let f4 = 1.0f32.to_le_bytes().to_vec();

    let p = tmp.path().join("memo_bomb.bin");
    write_torch_zip(&p, &memo_bomb(), &[]);
    assert_refused("memo bomb", inspect(&p), &["memo_bomb.bin", "pickle bomb"]);

    let p = tmp.path().join("keys.bin");
    write_torch_zip(&p, &nested_key_bomb(), &[("0", f4.clone(), false)]);
    assert_refused(
        "nested-key bomb",
        inspect(&p),
        &["keys.bin", "keys take more than"],
    );

    // A stride-0 view of one float as [2^20, 2^20]: 4 TiB if materialised.
    let p = tmp.path().join("stride0.bin");
    let mut k = Pkl::new();
    k.op(b"}")
        .str("w")
        .tensor("0", 1, &[1 << 20, 1 << 20], &[0, 0])
        .op(b"s");
    write_torch_zip(&p, &k.end(), &[("0", f4.clone(), false)]);
    assert_refused("stride-0 view", inspect(&p), &["stride0.bin", "stride-0"]);

    // One storage viewed by 100,000 tensors: past twice the archive's bytes.
    let p = tmp.path().join("fanout.bin");
    let mut k = Pkl::new();
    k.op(b"}")
        .tensor("0", 1 << 18, &[1 << 18], &[1])
        .put(0)
        .op(b"0(");
    for i in 0..100_000 {
        k.str(&format!("t{i}")).get(0);
    }
    k.op(b"u");
    write_torch_zip(&p, &k.end(), &[("0", vec![0u8; 1 << 20], false)]);
    assert_refused("storage fan-out", inspect(&p), &["fanout.bin", "refused"]);

    // A deflated record of 256 MiB of zeros (~256 KB on disk).
    let p = tmp.path().join("deflate.bin");
    let mut k = Pkl::new();
    k.op(b"}")
        .str("w")
        .tensor("0", 1 << 26, &[1 << 26], &[1])
        .op(b"s");
    write_torch_zip(&p, &k.end(), &[("0", vec![0u8; 256 << 20], true)]);
    assert_refused("deflate bomb", inspect(&p), &["deflate.bin", "zip bomb"]);

    // A storage that claims more than its record holds.
    let p = tmp.path().join("short.bin");
    let mut k = Pkl::new();
    k.op(b"}")
        .str("w")
        .tensor("0", 1 << 40, &[1 << 20], &[1])
        .op(b"s");
    write_torch_zip(&p, &k.end(), &[("0", f4, false)]);
    assert_refused("storage size lie", inspect(&p), &["short.bin"]);
}

#[test]
fn sentencepiece_normaliser_splitting_utf8_does_not_panic() {
    use lavit_llm::sentencepiece::SentencePiece;
    let bytes = sentencepiece_model(&split_utf8_charsmap());
    // The regression file replays exactly this model.
    let reg = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/hostile/sp_split_utf8.model"),
    )
    .unwrap();
    assert_eq!(
        reg, bytes,
        "tests/data/hostile/sp_split_utf8.model is out of date"
    );
    let sp = SentencePiece::from_bytes(&bytes).unwrap();
    // "é" = C3 A9: the rule eats C3 ("X"), the lone A9 is invalid → U+FFFD (as normalizer.cc).
    assert_eq!(sp.normalize("café"), "▁cafX\u{FFFD}");
    let ids = sp.encode("café au lait");
    assert!(!ids.is_empty());
    assert!(ids
        .iter()
        .all(|&i| (0..sp.vocab_size() as i64).contains(&i)));
    // Unaffected text is unchanged.
    assert_eq!(sp.normalize("ca"), "▁ca");
}

/// The same model as a checkpoint's `tokenizer.model`: `lavit caption` with a question
/// holding "é" answers (exit 0) instead of panicking.
#[test]
fn sentencepiece_split_utf8_through_the_cli() {
    let (tmp, dir) = fixture_copy();
    let img = one_image(tmp.path());
    std::fs::write(
        dir.join("language_model/tokenizer.model"),
        sentencepiece_model(&split_utf8_charsmap()),
    )
    .unwrap();
    let (code, err) = lavit(&[
        os("caption"),
        os("--checkpoint"),
        dir.as_os_str(),
        img.as_os_str(),
        os("--prompt"),
        os("café ?"),
        os("--max-new-tokens"),
        os("2"),
    ]);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(code, 0, "{err}");
}

/// Regenerate the regression files of this module (run with `--ignored` after a change).
#[test]
#[ignore]
fn write_hostile_regression_files() {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/hostile");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(
        d.join("sp_split_utf8.model"),
        sentencepiece_model(&split_utf8_charsmap()),
    )
    .unwrap();
    // The bombs too, for measuring by hand (`/usr/bin/time -v lavit inspect FILE`).
    if let Ok(out) = std::env::var("LAVIT_HOSTILE_OUT") {
        let out = Path::new(&out);
        std::fs::create_dir_all(out).unwrap();
        let f4 = 1.0f32.to_le_bytes().to_vec();
        write_torch_zip(&out.join("memo_bomb.bin"), &memo_bomb(), &[]);
        write_torch_zip(
            &out.join("keys.bin"),
            &nested_key_bomb(),
            &[("0", f4.clone(), false)],
        );
        let mut k = Pkl::new();
        k.op(b"}")
            .str("w")
            .tensor("0", 1, &[1 << 20, 1 << 20], &[0, 0])
            .op(b"s");
        write_torch_zip(&out.join("stride0.bin"), &k.end(), &[("0", f4, false)]);
        let mut k = Pkl::new();
        k.op(b"}")
            .str("w")
            .tensor("0", 1 << 31, &[1 << 31], &[1])
            .op(b"s");
        write_torch_zip(
            &out.join("deflate8g.bin"),
            &k.end(),
            &[("0", vec![0u8; 1 << 30], true)],
        );
    }
}
