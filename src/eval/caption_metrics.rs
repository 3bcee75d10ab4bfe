//! Caption metrics as the COCO caption evaluation computes them (`pycocoevalcap`:
//! `tokenizer/ptbtokenizer.py`, `bleu/bleu_scorer.py`, `cider/cider_scorer.py`): the PTB
//! tokenisation, corpus BLEU-1..4 with the "closest" reference length and CIDEr-D.
//!
//! Both scorers take captions already tokenised (words joined by single spaces); [`ptb_tokenize`]
//! produces them from raw text as the Stanford PTBTokenizer (`-lowerCase`) followed by the
//! evaluation's punctuation filter does for ordinary English captions.

use std::collections::HashMap;

/// An n-gram of words.
type Ngram = Vec<String>;

/// Tokens the COCO evaluation drops after PTB tokenisation (`PUNCTUATIONS`; its `-LRB-` …
/// entries are upper-case and never match the lower-cased output, so `-lrb-` stays).
const DROPPED: [&str; 17] = [
    "''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
    "...", ";",
];

/// Words whose final period belongs to them (PTB abbreviations).
const ABBREVIATIONS: [&str; 14] = [
    "mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "inc", "co", "ltd", "prof", "mt",
];

/// Raw caption → the space-joined, lower-case tokens the COCO scorers compare: the Stanford
/// PTB tokenisation (clitics `'s n't 're 've 'll 'd 'm` split off, punctuation separated,
/// brackets as `-lrb-` `-rrb-` `-lsb-` `-rsb-` `-lcb-` `-rcb-`, quotes as ``` `` ``` / `''`),
/// then the evaluation's punctuation filter.
pub fn ptb_tokenize(text: &str) -> String {
    let lower = text.to_lowercase();
    let mut out: Vec<String> = Vec::new();
    for chunk in lower.split_whitespace() {
        split_chunk(chunk, &mut out);
    }
    out.retain(|t| !DROPPED.contains(&t.as_str()));
    out.join(" ")
}

/// One whitespace-separated chunk → PTB tokens (appended to `out`).
fn split_chunk(chunk: &str, out: &mut Vec<String>) {
    let mut s = chunk;
    // leading punctuation
    let mut head = Vec::new();
    loop {
        if let Some(r) = s.strip_prefix("``") {
            head.push("``".to_string());
            s = r;
            continue;
        }
        let Some(c) = s.chars().next() else { break };
        let tok = match c {
            '"' => "``",
            '(' => "-lrb-",
            '[' => "-lsb-",
            '{' => "-lcb-",
            '$' | '#' | '`' | '\'' if s.len() > 1 => "",
            _ => break,
        };
        let tok = if tok.is_empty() {
            c.to_string()
        } else {
            tok.to_string()
        };
        head.push(tok);
        s = &s[c.len_utf8()..];
    }
    // trailing punctuation, collected in reverse
    let mut tail = Vec::new();
    loop {
        if s.is_empty() {
            break;
        }
        if let Some(r) = s.strip_suffix("...") {
            tail.push("...".to_string());
            s = r;
            continue;
        }
        if let Some(r) = s.strip_suffix("--") {
            tail.push("--".to_string());
            s = r;
            continue;
        }
        let Some(c) = s.chars().next_back() else {
            break;
        };
        let tok = match c {
            '"' => "''".to_string(),
            ')' => "-rrb-".to_string(),
            ']' => "-rsb-".to_string(),
            '}' => "-rcb-".to_string(),
            ',' | ';' | ':' | '!' | '?' | '%' => c.to_string(),
            '.' => {
                let word = &s[..s.len() - 1];
                // "u.s." and "mr." keep their period; "dog." does not
                if word.contains('.') || ABBREVIATIONS.contains(&word) {
                    break;
                }
                ".".to_string()
            }
            '\'' if s.len() > 1 && !s.ends_with("''") => "'".to_string(),
            _ => break,
        };
        tail.push(tok);
        s = &s[..s.len() - c.len_utf8()];
    }
    out.extend(head);
    if !s.is_empty() {
        split_clitics(s, out);
    }
    out.extend(tail.into_iter().rev());
}

/// `can't` → `ca n't`, `dog's` → `dog 's`, `they're` → `they 're`, … (the word is lower-case).
fn split_clitics(word: &str, out: &mut Vec<String>) {
    let special = [("can't", "ca"), ("won't", "wo"), ("cannot", "can")];
    for (w, stem) in special {
        if word == w {
            out.push(stem.into());
            out.push(if w == "cannot" { "not" } else { "n't" }.into());
            return;
        }
    }
    if let Some(stem) = word.strip_suffix("n't") {
        if !stem.is_empty() {
            out.push(stem.into());
            out.push("n't".into());
            return;
        }
    }
    for clitic in ["'s", "'re", "'ve", "'ll", "'d", "'m"] {
        if let Some(stem) = word.strip_suffix(clitic) {
            if !stem.is_empty() {
                out.push(stem.into());
                out.push(clitic.into());
                return;
            }
        }
    }
    out.push(word.into());
}

/// n-gram counts (orders 1..=n) of a tokenised sentence (`precook`).
fn ngram_counts(sentence: &str, n: usize) -> (usize, HashMap<Ngram, usize>) {
    let words: Vec<String> = sentence.split_whitespace().map(String::from).collect();
    let mut counts = HashMap::new();
    for k in 1..=n {
        for w in words.windows(k) {
            *counts.entry(w.to_vec()).or_insert(0) += 1;
        }
    }
    (words.len(), counts)
}

/// Corpus BLEU as `pycocoevalcap.bleu.Bleu` reports it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BleuScore {
    /// Corpus BLEU-1 … BLEU-n (geometric mean of the clipped precisions up to each order,
    /// times the brevity penalty).
    pub bleu: Vec<f64>,
    /// Total hypothesis length and total "closest" reference length.
    pub testlen: usize,
    pub reflen: usize,
}

/// Corpus BLEU-1..`n` of hypotheses against their references (both tokenised; one
/// hypothesis and at least one reference per item), as `BleuScorer.compute_score(option=
/// "closest")`: clipped n-gram matches and candidate n-grams are summed over the corpus;
/// each item's reference length is the one closest to its hypothesis (the shorter on a tie);
/// brevity penalty exp(1 − r/c) when c < r. The `tiny`/`small` guards of the reference
/// (1e-15, 1e-9) are kept so empty counts give the same numbers.
pub fn corpus_bleu(items: &[(String, Vec<String>)], n: usize) -> BleuScore {
    const SMALL: f64 = 1e-9;
    const TINY: f64 = 1e-15;
    let mut correct = vec![0usize; n];
    let mut guess = vec![0usize; n];
    let (mut testlen, mut reflen) = (0usize, 0usize);
    for (hyp, refs) in items {
        let mut max_counts: HashMap<Ngram, usize> = HashMap::new();
        let mut lens = Vec::with_capacity(refs.len());
        for r in refs {
            let (len, counts) = ngram_counts(r, n);
            lens.push(len);
            for (g, c) in counts {
                let e = max_counts.entry(g).or_insert(0);
                *e = (*e).max(c);
            }
        }
        let (len, counts) = ngram_counts(hyp, n);
        // min over (|l − c|, l): the closest reference length, the shorter on a tie
        let closest = lens
            .iter()
            .copied()
            .min_by_key(|&l| (l.abs_diff(len), l))
            .unwrap_or(0);
        testlen += len;
        reflen += closest;
        for k in 1..=n {
            guess[k - 1] += (len + 1).saturating_sub(k);
        }
        for (g, c) in counts {
            correct[g.len() - 1] += c.min(max_counts.get(&g).copied().unwrap_or(0));
        }
    }
    let mut bleu = Vec::with_capacity(n);
    let mut prod = 1.0f64;
    for k in 0..n {
        prod *= (correct[k] as f64 + TINY) / (guess[k] as f64 + SMALL);
        bleu.push(prod.powf(1.0 / (k + 1) as f64));
    }
    let ratio = (testlen as f64 + TINY) / (reflen as f64 + SMALL);
    if ratio < 1.0 {
        for b in &mut bleu {
            *b *= (1.0 - 1.0 / ratio).exp();
        }
    }
    BleuScore {
        bleu,
        testlen,
        reflen,
    }
}

/// Orders of n-grams CIDEr-D uses.
const CIDER_N: usize = 4;

/// n-gram counts → (tf-idf per order, norm per order, length in bigrams) (`counts2vec`).
#[allow(clippy::type_complexity)]
fn tf_idf<'a>(
    counts: &'a HashMap<Ngram, usize>,
    df: &HashMap<&Ngram, f64>,
    ref_len: f64,
) -> (Vec<HashMap<&'a Ngram, f64>>, [f64; CIDER_N], usize) {
    let mut vec: Vec<HashMap<&Ngram, f64>> = vec![HashMap::new(); CIDER_N];
    let mut norm = [0.0f64; CIDER_N];
    let mut length = 0usize;
    for (g, &tf) in counts {
        let d = df.get(g).copied().unwrap_or(0.0).max(1.0).ln();
        let k = g.len() - 1;
        let v = tf as f64 * (ref_len - d);
        vec[k].insert(g, v);
        norm[k] += v * v;
        // the reference code counts the hypothesis length in bigrams (`if n == 1`)
        if k == 1 {
            length += tf;
        }
    }
    (vec, norm.map(f64::sqrt), length)
}

/// CIDEr-D as `pycocoevalcap.cider.Cider` computes it (n = 4, σ = 6): per item, the mean over
/// references and over n-gram orders 1..4 of the clipped tf-idf cosine
/// Σ_g min(h_g, r_g)·r_g / (‖h‖‖r‖) times the Gaussian length penalty exp(−δ²/2σ²), × 10;
/// the corpus score is the mean over items. The document frequency of an n-gram is the number
/// of items whose references contain it and idf = log(#items) − log(max(1, df)); the length
/// δ counts bigrams, as the reference code does. Returns (corpus score, per-item scores).
pub fn cider_d(items: &[(String, Vec<String>)]) -> (f64, Vec<f64>) {
    const N: usize = CIDER_N;
    const SIGMA: f64 = 6.0;
    if items.is_empty() {
        return (0.0, Vec::new());
    }
    let refs: Vec<Vec<HashMap<Ngram, usize>>> = items
        .iter()
        .map(|(_, rs)| rs.iter().map(|r| ngram_counts(r, N).1).collect())
        .collect();
    let mut df: HashMap<&Ngram, f64> = HashMap::new();
    for item in &refs {
        let mut seen: Vec<&Ngram> = item.iter().flat_map(|c| c.keys()).collect();
        seen.sort();
        seen.dedup();
        for g in seen {
            *df.entry(g).or_insert(0.0) += 1.0;
        }
    }
    let ref_len = (items.len() as f64).ln();
    let mut scores = Vec::with_capacity(items.len());
    for ((hyp, _), item_refs) in items.iter().zip(&refs) {
        let hyp_counts = ngram_counts(hyp, N).1;
        let (hv, hn, hl) = tf_idf(&hyp_counts, &df, ref_len);
        let mut total = [0.0f64; N];
        for r in item_refs {
            let (rv, rn, rl) = tf_idf(r, &df, ref_len);
            let delta = hl as f64 - rl as f64;
            let penalty = (-(delta * delta) / (2.0 * SIGMA * SIGMA)).exp();
            for k in 0..N {
                let mut val = 0.0;
                for (g, &h) in &hv[k] {
                    let r = rv[k].get(g).copied().unwrap_or(0.0);
                    val += h.min(r) * r;
                }
                if hn[k] != 0.0 && rn[k] != 0.0 {
                    val /= hn[k] * rn[k];
                }
                total[k] += val * penalty;
            }
        }
        let mean = total.iter().sum::<f64>() / N as f64;
        scores.push(mean / item_refs.len().max(1) as f64 * 10.0);
    }
    let corpus = scores.iter().sum::<f64>() / scores.len() as f64;
    (corpus, scores)
}
