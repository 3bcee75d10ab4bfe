//! VQA accuracy as the official VQA evaluation (`vqaEval.py`, Antol et al. 2015) computes it:
//! answers normalised (punctuation, lower case, number words → digits, articles dropped,
//! common contractions restored), then acc = the mean over the ten leave-one-out subsets of the
//! human answers of min(1, #matching answers / 3) — min(#humans that said it / 3, 1) averaged.

/// Punctuation the official evaluation strips or turns into spaces.
const PUNCT: [char; 21] = [
    ';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',',
    '?', '!',
];

const NUMBER_WORDS: [(&str, &str); 12] = [
    ("none", "0"),
    ("zero", "0"),
    ("one", "1"),
    ("two", "2"),
    ("three", "3"),
    ("four", "4"),
    ("five", "5"),
    ("six", "6"),
    ("seven", "7"),
    ("eight", "8"),
    ("nine", "9"),
    ("ten", "10"),
];

const ARTICLES: [&str; 3] = ["a", "an", "the"];

/// A few of the official contraction fixes (answers typed without the apostrophe).
const CONTRACTIONS: [(&str, &str); 16] = [
    ("arent", "aren't"),
    ("cant", "can't"),
    ("couldnt", "couldn't"),
    ("didnt", "didn't"),
    ("doesnt", "doesn't"),
    ("dont", "don't"),
    ("hasnt", "hasn't"),
    ("havent", "haven't"),
    ("isnt", "isn't"),
    ("shouldnt", "shouldn't"),
    ("thats", "that's"),
    ("theres", "there's"),
    ("wasnt", "wasn't"),
    ("werent", "weren't"),
    ("whats", "what's"),
    ("wont", "won't"),
];

/// `processPunctuation`: each punctuation mark is removed when it touches a space (or the text
/// has a digit,digit comma), else replaced by a space; then periods not followed by a digit
/// are removed.
fn process_punctuation(text: &str) -> String {
    let digit_comma = text
        .as_bytes()
        .windows(3)
        .any(|w| w[0].is_ascii_digit() && w[1] == b',' && w[2].is_ascii_digit());
    let mut out = text.to_string();
    for p in PUNCT {
        let spaced = text.contains(&format!("{p} ")) || text.contains(&format!(" {p}"));
        out = out.replace(p, if spaced || digit_comma { "" } else { " " });
    }
    let chars: Vec<char> = out.chars().collect();
    chars
        .iter()
        .enumerate()
        .filter(|(i, &c)| c != '.' || chars.get(i + 1).is_some_and(|n| n.is_ascii_digit()))
        .map(|(_, &c)| c)
        .collect()
}

/// `processDigitArticle`: lower case, number words → digits, articles dropped, contractions.
fn process_digit_article(text: &str) -> String {
    text.to_lowercase()
        .split_whitespace()
        .map(|w| {
            NUMBER_WORDS
                .iter()
                .find(|(k, _)| *k == w)
                .map_or(w, |(_, v)| *v)
        })
        .filter(|w| !ARTICLES.contains(w))
        .map(|w| {
            CONTRACTIONS
                .iter()
                .find(|(k, _)| *k == w)
                .map_or(w.to_string(), |(_, v)| v.to_string())
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// An answer as the evaluation compares it.
pub fn normalize_answer(answer: &str) -> String {
    let a = answer.replace(['\n', '\t'], " ");
    process_digit_article(&process_punctuation(a.trim()))
}

/// Accuracy of one predicted answer against the human answers (ten in the VQA data sets): the
/// mean over the leave-one-out subsets of min(1, matches / 3). With a single answer (data sets
/// such as GQA) it is exact match, 0 or 1; with none, 0.
pub fn vqa_accuracy(predicted: &str, humans: &[String]) -> f64 {
    let pred = normalize_answer(predicted);
    let gts: Vec<String> = humans.iter().map(|h| normalize_answer(h)).collect();
    match gts.len() {
        0 => 0.0,
        1 => f64::from(gts[0] == pred),
        n => {
            let total: f64 = (0..n)
                .map(|i| {
                    let matches = gts
                        .iter()
                        .enumerate()
                        .filter(|(j, g)| *j != i && **g == pred)
                        .count();
                    (matches as f64 / 3.0).min(1.0)
                })
                .sum();
            total / n as f64
        }
    }
}
