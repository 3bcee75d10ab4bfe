//! Integration tests: `lavit eval` — caption metrics against the COCO caption evaluation,
//! VQA accuracy, FID against scipy, and the command end to end on the tiny fixture.

use std::path::Path;
use std::process::Command;

use lavit::eval::{caption_metrics, fid, vqa, Embedding};
use serde_json::Value;
use tch::Tensor;

use crate::common::{fixture_dir, write_images};

/// `tests/data/eval-references.json`, written by `scripts/dev/eval_references.py` with the
/// real pycocoevalcap (PTBTokenizer in Java, Bleu, Cider) and scipy.
fn references() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/eval-references.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * b.abs().max(1e-12) + 1e-12
}

fn corpus(v: &Value) -> Vec<(String, Vec<String>)> {
    v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|it| {
            (
                it["hypothesis"].as_str().unwrap().to_string(),
                it["references"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn ptb_tokenisation_matches_the_coco_evaluation() {
    let r = references();
    let cases = r["ptb"].as_array().unwrap();
    assert!(cases.len() >= 5);
    for c in cases {
        let raw = c["raw"].as_str().unwrap();
        assert_eq!(
            caption_metrics::ptb_tokenize(raw),
            c["tokens"].as_str().unwrap(),
            "{raw}"
        );
    }
}

#[test]
fn bleu_and_cider_d_match_pycocoevalcap() {
    let r = references();
    let corpora = r["corpora"].as_object().unwrap();
    assert!(corpora.len() >= 4);
    for (name, c) in corpora {
        let items = corpus(c);
        let b = caption_metrics::corpus_bleu(&items, 4);
        for k in 0..4 {
            let want = c["bleu"][k].as_f64().unwrap();
            assert!(
                close(b.bleu[k], want, 1e-9),
                "{name}: BLEU-{} {} vs pycocoevalcap {want}",
                k + 1,
                b.bleu[k]
            );
        }
        let (cider, per) = caption_metrics::cider_d(&items);
        let want = c["cider_d"].as_f64().unwrap();
        assert!(
            close(cider, want, 1e-9),
            "{name}: CIDEr-D {cider} vs {want}"
        );
        for (i, (got, want)) in per
            .iter()
            .zip(c["cider_d_per_item"].as_array().unwrap())
            .enumerate()
        {
            let want = want.as_f64().unwrap();
            assert!(close(*got, want, 1e-9), "{name} item {i}: {got} vs {want}");
        }
    }
}

/// Values worked out by hand from the definitions.
#[test]
fn bleu_hand_checked() {
    let items =
        |h: &str, r: &[&str]| vec![(h.to_string(), r.iter().map(|s| s.to_string()).collect())];
    // every n-gram matches; c = 4 < r = 5: brevity penalty exp(1 − 5/4)
    let b = caption_metrics::corpus_bleu(&items("a b c d", &["a b c d e"]), 4);
    let bp = (1.0f64 - 5.0 / 4.0).exp();
    assert!(close(b.bleu[3], bp, 1e-9), "{:?}", b.bleu);
    assert_eq!((b.testlen, b.reflen), (4, 5));
    // the closest reference length is used (4 of 3, 4, 9 → 4): no penalty; clipped unigrams:
    // "the" ×3 in the hypothesis, at most 2 in one reference → p1 = 3/4 ("cat" + 2 × "the")
    let b = caption_metrics::corpus_bleu(
        &items(
            "the the the cat",
            &["the cat the", "a b c d", "x x x x x x x x x"],
        ),
        4,
    );
    assert_eq!(b.reflen, 4);
    assert!(close(b.bleu[0], 0.75, 1e-9), "{:?}", b.bleu);
    // no 4-gram in common: BLEU-4 is ~0, not NaN
    let b = caption_metrics::corpus_bleu(&items("a b", &["c d"]), 4);
    assert!(b.bleu[3] < 1e-6 && b.bleu[3].is_finite());
}

#[test]
fn cider_d_rewards_consensus_and_penalises_length() {
    let refs: Vec<String> = [
        "a dog runs on grass",
        "a dog running on the grass",
        "dog runs",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let other: Vec<String> = vec!["a red bus on a street".into(), "a bus in the city".into()];
    let score = |h: &str| {
        caption_metrics::cider_d(&[(h.into(), refs.clone()), ("a bus".into(), other.clone())]).1[0]
    };
    let good = score("a dog runs on grass");
    let bad = score("a bus in the city");
    let long = score("a dog runs on grass a dog runs on grass a dog runs on grass");
    assert!(good > bad && good > long, "{good} {bad} {long}");
    // clipping: repeating a matching word does not raise the score
    assert!(score("dog dog dog dog") <= score("dog"));
}

#[test]
fn vqa_accuracy_official_rules() {
    let h = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    // number words, articles, punctuation, case and contractions (when normalised)
    assert_eq!(vqa::normalize_answer("Two."), "2");
    assert_eq!(vqa::normalize_answer("The Dog!"), "dog");
    assert_eq!(vqa::normalize_answer("a T-shirt/top"), "t shirt top");
    assert_eq!(vqa::normalize_answer("dont know"), "don't know");
    assert_eq!(
        vqa::normalize_answer("whos at 3 oclock"),
        "who's at 3 o'clock"
    );
    assert_eq!(
        vqa::normalize_answer("1,000 dogs; 2.5 cats."),
        "1000 dogs 2.5 cats"
    );
    // every human said "2": the raw strings are compared, so "two" is wrong and "2" right
    assert_eq!(vqa::vqa_accuracy("two", &h(&["2"; 10])), 0.0);
    assert_eq!(vqa::vqa_accuracy(" 2\n", &h(&["2"; 10])), 1.0);
    // nine "2" and one "two": normalised, so all ten are "2"
    let mut humans = h(&["2"; 9]);
    humans.push("two".into());
    assert_eq!(vqa::vqa_accuracy("two", &humans), 1.0);
    // 2 of 10 humans said "dog": leaving out one of them leaves 1 match (1/3), else 2 (2/3):
    // (2 · 1/3 + 8 · 2/3) / 10 = 0.6
    let mut humans = h(&["dog", "dog"]);
    humans.extend(h(&["cat"; 8]));
    assert!(close(vqa::vqa_accuracy("The dog.", &humans), 0.6, 1e-12));
    // 3 of 10: (3 · 2/3 + 7 · 1) / 10 = 0.9
    let mut humans = h(&["dog"; 3]);
    humans.extend(h(&["cat"; 7]));
    assert!(close(vqa::vqa_accuracy("dog", &humans), 0.9, 1e-12));
    assert_eq!(vqa::vqa_accuracy("bird", &humans), 0.0);
    // a single human answer: the only leave-one-out subset is empty
    assert_eq!(vqa::vqa_accuracy("cat", &h(&["cat"])), 0.0);
    assert_eq!(vqa::vqa_accuracy("anything", &[]), 0.0);
}

/// Per-question and overall VQA accuracy equal, to 1e-12, what the official vqaEval.py
/// algorithm computes on the crafted questions of `tests/data/vqa-cases.json`
/// (`tests/data/vqa-references.json`, written by `scripts/dev/vqa_reference.py`).
#[test]
fn vqa_accuracy_matches_the_official_evaluation() {
    let read = |name: &str| -> Value {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .join(name);
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let cases = read("vqa-cases.json");
    let refs = read("vqa-references.json");
    let cases = cases["questions"].as_array().unwrap();
    let want = refs["questions"].as_array().unwrap();
    assert_eq!(cases.len(), want.len());
    assert!(cases.len() >= 30);
    let mut total = 0.0;
    for (c, w) in cases.iter().zip(want) {
        assert_eq!(c["id"], w["id"]);
        let answers: Vec<String> = c["answers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect();
        let got = vqa::vqa_accuracy(c["prediction"].as_str().unwrap(), &answers);
        let exp = w["accuracy"].as_f64().unwrap();
        assert!(
            (got - exp).abs() <= 1e-12,
            "question {} ({}): lavit {got}, official {exp}",
            c["id"],
            c["why"]
        );
        total += got;
    }
    let overall = total / cases.len() as f64;
    let exp = refs["overall"].as_f64().unwrap();
    assert!((overall - exp).abs() <= 1e-12, "overall {overall} vs {exp}");
}

#[test]
fn fid_matches_scipy() {
    let r = references();
    let to_t = |v: &Value| {
        let rows: Vec<Vec<f64>> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|row| {
                row.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect()
            })
            .collect();
        let (n, d) = (rows.len() as i64, rows[0].len() as i64);
        Tensor::from_slice(&rows.concat()).view([n, d])
    };
    for c in r["fid"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let got = fid::fid(&to_t(&c["a"]), &to_t(&c["b"])).unwrap();
        let want = c["fid"].as_f64().unwrap();
        assert!(
            (got - want).abs() <= 1e-7 * want.abs().max(1.0),
            "{name}: FID {got} vs scipy {want}"
        );
    }
    // bad input is an error, not a panic
    let e = fid::fid(
        &Tensor::zeros([1, 3], tch::kind::FLOAT_CPU),
        &Tensor::zeros([4, 3], tch::kind::FLOAT_CPU),
    );
    assert!(e.unwrap_err().to_string().contains("at least 2"));
    let e = fid::fid(
        &Tensor::rand([5, 3], tch::kind::FLOAT_CPU),
        &Tensor::rand([5, 4], tch::kind::FLOAT_CPU),
    );
    assert!(e.unwrap_err().to_string().contains("width"));
}

#[test]
fn eval_inputs_are_checked_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.jsonl");
    std::fs::write(
        &p,
        "{\"image\": \"a.png\", \"captions\": [\"x\"]}\n{\"image\": 3}\n",
    )
    .unwrap();
    let e = lavit::eval::read_jsonl::<lavit::eval::CaptionItem>(&p).unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains("c.jsonl line 2"), "{msg}");
    let e = lavit::eval::load_image(dir.path(), Path::new("missing.png"), "c.jsonl line 1")
        .unwrap_err();
    assert!(format!("{e:#}").contains("missing.png"));
    let err = Embedding::parse("judge", &[dir.path()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("judge.safetensors"), "{err}");
    assert!(Embedding::parse("pixels:1", &[]).is_err());
    assert!(Embedding::parse("clip", &[]).is_err());
    assert_eq!(
        Embedding::parse("pixels:8", &[]).unwrap(),
        Embedding::Pixels { side: 8 }
    );
}

/// `lavit eval` end to end on the tiny fixture (random weights): captions, VQA and
/// text→image through the pipeline; FID over a freshly initialised judge's features found in
/// the data folder; every number finite and the result files written.
#[test]
fn lavit_eval_runs_end_to_end_on_the_fixture() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_images(&data.join("images"), 4);
    let line = |v: Value| format!("{v}\n");
    let mut captions = String::new();
    for i in 0..3 {
        captions += &line(serde_json::json!({
            "image": format!("images/img{i:02}.png"),
            "captions": ["a coloured disc and a bar.", "A disc on a tinted background"]}));
    }
    std::fs::write(data.join("captions.jsonl"), captions).unwrap();
    std::fs::write(
        data.join("vqa.jsonl"),
        line(serde_json::json!({"image": "images/img03.png", "question": "what is it?", "answers": vec!["disc"; 10]})),
    )
    .unwrap();
    std::fs::write(
        data.join("prompts.jsonl"),
        line(serde_json::json!({"prompt": "a disc", "label": 1}))
            + &line(serde_json::json!({"prompt": "a bar", "label": 2})),
    )
    .unwrap();
    let judge = lavit::demo::judge::Judge::new(&Default::default(), 0);
    judge.save(&data.join("judge.safetensors")).unwrap();
    let out = dir.path().join("out");
    let res = Command::new(env!("CARGO_BIN_EXE_lavit"))
        .args(["eval", "--checkpoint"])
        .arg(fixture_dir())
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .args([
            "--images-per-prompt",
            "2",
            "--steps",
            "2",
            "--max-new-tokens",
            "6",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{stderr}");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    assert_eq!(report["captions"]["images"], 3, "{report}");
    for k in 0..4 {
        let b = report["captions"]["bleu"][k].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&b), "{report}");
    }
    assert!(report["captions"]["cider_d"].as_f64().unwrap() >= 0.0);
    assert_eq!(report["vqa"]["questions"], 1);
    let t2i = &report["text_to_image"];
    assert_eq!(
        (t2i["prompts"].as_u64(), t2i["generated"].as_u64()),
        (Some(2), Some(4))
    );
    assert_eq!(t2i["real"], 4);
    let fid = t2i["fid"].as_f64().unwrap();
    assert!(fid.is_finite() && fid >= 0.0, "{report}");
    assert!(t2i["embedding"].as_str().unwrap().contains("judge"));
    assert!((0.0..=1.0).contains(&t2i["label_accuracy"].as_f64().unwrap()));
    let preds = std::fs::read_to_string(out.join("predictions.jsonl")).unwrap();
    assert_eq!(preds.lines().count(), 4);
    for f in ["index.html", "generated.png"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    // a bad data line is reported with its file and line, and the command fails
    std::fs::write(
        data.join("vqa.jsonl"),
        "{\"image\": \"images/img00.png\"}\n",
    )
    .unwrap();
    let res = Command::new(env!("CARGO_BIN_EXE_lavit"))
        .args(["eval", "--tasks", "vqa", "--checkpoint"])
        .arg(fixture_dir())
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success());
    assert!(stderr.contains("vqa.jsonl line 1"), "{stderr}");
}
