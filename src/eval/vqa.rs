//! VQA accuracy exactly as the official VQA evaluation computes it (GT-Vision-Lab/VQA,
//! `PythonEvaluationTools/vqaEvaluation/vqaEval.py`, `VQAEval.evaluate`; Antol et al. 2015).
//!
//! Per question:
//! 1. the prediction and every human answer get `replace('\n', ' ')`, `replace('\t', ' ')`,
//!    `strip()` ([`clean_answer`]);
//! 2. only when the human answers hold more than one distinct string (after step 1) are the
//!    prediction and the answers put through `processPunctuation` and `processDigitArticle`
//!    ([`normalize_answer`]); when every human gave the same string, the comparison is on the
//!    cleaned raw strings (case and punctuation included: "two" does not match ten "2");
//! 3. accuracy = the mean over the leave-one-out subsets of the human answers of
//!    min(1, #answers in the subset equal to the prediction / 3). With one human answer the
//!    only subset is empty, so the accuracy is 0 whatever the prediction (as the official
//!    code computes it); with none the official code divides by zero, here it is 0.
//!
//! The official annotations give every answer an `answer_id`, so "leave one out" leaves out
//! exactly one answer even when several humans typed the same string.
//!
//! Character classes follow the official code run under Python 3: `\d` is a Unicode decimal
//! digit (regex `\d`), `split()` / `strip()` use Python's whitespace (Unicode White_Space plus
//! the separators U+001C..U+001F), `lower()` is the full Unicode lower-case mapping.
//! `scripts/dev/vqa_reference.py` runs the official algorithm on a case file;
//! `tests/eval.rs` compares these functions with its output.

use std::collections::HashSet;
use std::sync::LazyLock;

/// Punctuation `processPunctuation` removes or turns into spaces (the official `punct` list,
/// in its order).
const PUNCT: [char; 21] = [
    ';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',',
    '?', '!',
];

/// The official `manualMap`: number words → digits.
const MANUAL_MAP: [(&str, &str); 12] = [
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

/// The official `articles`.
const ARTICLES: [&str; 3] = ["a", "an", "the"];

/// The official `contractions` table, every entry as it stands there (the capitalised keys
/// never match after `lower()`, and "somebody'd" maps to "somebodyd"; both as in the
/// official code).
const CONTRACTIONS: [(&str, &str); 120] = [
    ("aint", "ain't"),
    ("arent", "aren't"),
    ("cant", "can't"),
    ("couldve", "could've"),
    ("couldnt", "couldn't"),
    ("couldn'tve", "couldn't've"),
    ("couldnt've", "couldn't've"),
    ("didnt", "didn't"),
    ("doesnt", "doesn't"),
    ("dont", "don't"),
    ("hadnt", "hadn't"),
    ("hadnt've", "hadn't've"),
    ("hadn'tve", "hadn't've"),
    ("hasnt", "hasn't"),
    ("havent", "haven't"),
    ("hed", "he'd"),
    ("hed've", "he'd've"),
    ("he'dve", "he'd've"),
    ("hes", "he's"),
    ("howd", "how'd"),
    ("howll", "how'll"),
    ("hows", "how's"),
    ("Id've", "I'd've"),
    ("I'dve", "I'd've"),
    ("Im", "I'm"),
    ("Ive", "I've"),
    ("isnt", "isn't"),
    ("itd", "it'd"),
    ("itd've", "it'd've"),
    ("it'dve", "it'd've"),
    ("itll", "it'll"),
    ("let's", "let's"),
    ("maam", "ma'am"),
    ("mightnt", "mightn't"),
    ("mightnt've", "mightn't've"),
    ("mightn'tve", "mightn't've"),
    ("mightve", "might've"),
    ("mustnt", "mustn't"),
    ("mustve", "must've"),
    ("neednt", "needn't"),
    ("notve", "not've"),
    ("oclock", "o'clock"),
    ("oughtnt", "oughtn't"),
    ("ow's'at", "'ow's'at"),
    ("'ows'at", "'ow's'at"),
    ("'ow'sat", "'ow's'at"),
    ("shant", "shan't"),
    ("shed've", "she'd've"),
    ("she'dve", "she'd've"),
    ("she's", "she's"),
    ("shouldve", "should've"),
    ("shouldnt", "shouldn't"),
    ("shouldnt've", "shouldn't've"),
    ("shouldn'tve", "shouldn't've"),
    ("somebody'd", "somebodyd"),
    ("somebodyd've", "somebody'd've"),
    ("somebody'dve", "somebody'd've"),
    ("somebodyll", "somebody'll"),
    ("somebodys", "somebody's"),
    ("someoned", "someone'd"),
    ("someoned've", "someone'd've"),
    ("someone'dve", "someone'd've"),
    ("someonell", "someone'll"),
    ("someones", "someone's"),
    ("somethingd", "something'd"),
    ("somethingd've", "something'd've"),
    ("something'dve", "something'd've"),
    ("somethingll", "something'll"),
    ("thats", "that's"),
    ("thered", "there'd"),
    ("thered've", "there'd've"),
    ("there'dve", "there'd've"),
    ("therere", "there're"),
    ("theres", "there's"),
    ("theyd", "they'd"),
    ("theyd've", "they'd've"),
    ("they'dve", "they'd've"),
    ("theyll", "they'll"),
    ("theyre", "they're"),
    ("theyve", "they've"),
    ("twas", "'twas"),
    ("wasnt", "wasn't"),
    ("wed've", "we'd've"),
    ("we'dve", "we'd've"),
    ("weve", "we've"),
    ("werent", "weren't"),
    ("whatll", "what'll"),
    ("whatre", "what're"),
    ("whats", "what's"),
    ("whatve", "what've"),
    ("whens", "when's"),
    ("whered", "where'd"),
    ("wheres", "where's"),
    ("whereve", "where've"),
    ("whod", "who'd"),
    ("whod've", "who'd've"),
    ("who'dve", "who'd've"),
    ("wholl", "who'll"),
    ("whos", "who's"),
    ("whove", "who've"),
    ("whyll", "why'll"),
    ("whyre", "why're"),
    ("whys", "why's"),
    ("wont", "won't"),
    ("wouldve", "would've"),
    ("wouldnt", "wouldn't"),
    ("wouldnt've", "wouldn't've"),
    ("wouldn'tve", "wouldn't've"),
    ("yall", "y'all"),
    ("yall'll", "y'all'll"),
    ("y'allll", "y'all'll"),
    ("yall'd've", "y'all'd've"),
    ("y'alld've", "y'all'd've"),
    ("y'all'dve", "y'all'd've"),
    ("youd", "you'd"),
    ("youd've", "you'd've"),
    ("you'dve", "you'd've"),
    ("youll", "you'll"),
    ("youre", "you're"),
    ("youve", "you've"),
];

/// The official `periodStrip.sub("", text, re.UNICODE)` passes `re.UNICODE` (= 32) as `sub`'s
/// `count` argument, so at most 32 periods are removed.
const PERIOD_STRIP_COUNT: usize = 32;

/// One Unicode decimal digit (Python 3's `\d` on `str`), or `None` if the regex could not be
/// built (never: the pattern is a constant).
static DIGIT: LazyLock<Option<regex::Regex>> = LazyLock::new(|| regex::Regex::new(r"^\d$").ok());
/// The official `commaStrip`, `(\d)(\,)(\d)`.
static COMMA_STRIP: LazyLock<Option<regex::Regex>> =
    LazyLock::new(|| regex::Regex::new(r"\d,\d").ok());

/// `\d` for one character.
fn is_digit(c: char) -> bool {
    match DIGIT.as_ref() {
        Some(re) => re.is_match(c.encode_utf8(&mut [0; 4])),
        None => c.is_ascii_digit(),
    }
}

/// Python's `str.isspace()`: Unicode White_Space plus the information separators
/// U+001C..U+001F (bidirectional class B or S).
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Step 1 of every answer: `replace('\n', ' ')`, `replace('\t', ' ')`, `strip()`.
pub fn clean_answer(answer: &str) -> String {
    answer
        .replace(['\n', '\t'], " ")
        .trim_matches(is_py_space)
        .to_string()
}

/// `processPunctuation`: each mark of [`PUNCT`] is deleted when the input has it next to a
/// space (either side) or has a digit-comma-digit anywhere, else replaced by a space (the
/// tests look at the input, the replacements act on the running output); then periods not
/// followed by a digit are deleted, the first [`PERIOD_STRIP_COUNT`] of them.
pub fn process_punctuation(in_text: &str) -> String {
    let comma_digit = match COMMA_STRIP.as_ref() {
        Some(re) => re.is_match(in_text),
        None => in_text
            .as_bytes()
            .windows(3)
            .any(|w| w[0].is_ascii_digit() && w[1] == b',' && w[2].is_ascii_digit()),
    };
    let mut out = in_text.to_string();
    for p in PUNCT {
        let spaced = in_text.contains(&format!("{p} ")) || in_text.contains(&format!(" {p}"));
        out = out.replace(p, if spaced || comma_digit { "" } else { " " });
    }
    // `(?!<=\d)(\.)(?!\d)`: the first group is a lookahead for the literal "<=" and a digit,
    // never true at a period, so the pattern is "a period not followed by a digit".
    let chars: Vec<char> = out.chars().collect();
    let mut removed = 0;
    let mut kept = String::with_capacity(out.len());
    for (i, &c) in chars.iter().enumerate() {
        let strip = c == '.'
            && removed < PERIOD_STRIP_COUNT
            && !chars.get(i + 1).is_some_and(|&n| is_digit(n));
        if strip {
            removed += 1;
        } else {
            kept.push(c);
        }
    }
    kept
}

/// `processDigitArticle`: lower case, split on whitespace, number words → digits
/// ([`MANUAL_MAP`]), articles dropped, then contractions restored ([`CONTRACTIONS`]), joined
/// by single spaces.
pub fn process_digit_article(in_text: &str) -> String {
    let lower = in_text.to_lowercase();
    lower
        .split(is_py_space)
        .filter(|w| !w.is_empty())
        .map(|w| {
            MANUAL_MAP
                .iter()
                .find(|(k, _)| *k == w)
                .map_or(w, |(_, v)| *v)
        })
        .filter(|w| !ARTICLES.contains(w))
        .map(|w| {
            CONTRACTIONS
                .iter()
                .find(|(k, _)| *k == w)
                .map_or(w, |(_, v)| *v)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// An answer as the evaluation compares it when the humans disagree: [`clean_answer`], then
/// [`process_punctuation`], then [`process_digit_article`].
pub fn normalize_answer(answer: &str) -> String {
    process_digit_article(&process_punctuation(&clean_answer(answer)))
}

/// Accuracy of one predicted answer against the human answers (ten in the VQA data sets), in
/// [0, 1], as `VQAEval.evaluate` computes it (see the module doc): answers normalised only
/// when the humans disagree, then the mean over the leave-one-out subsets of
/// min(1, matches / 3).
pub fn vqa_accuracy(predicted: &str, humans: &[String]) -> f64 {
    if humans.is_empty() {
        return 0.0;
    }
    let mut gts: Vec<String> = humans.iter().map(|h| clean_answer(h)).collect();
    let mut res = clean_answer(predicted);
    if gts.iter().collect::<HashSet<_>>().len() > 1 {
        gts = gts
            .iter()
            .map(|g| process_digit_article(&process_punctuation(g)))
            .collect();
        res = process_digit_article(&process_punctuation(&res));
    }
    let n = gts.len();
    let mut total = 0.0;
    for i in 0..n {
        let matches = gts
            .iter()
            .enumerate()
            .filter(|(j, g)| *j != i && **g == res)
            .count();
        total += (matches as f64 / 3.0).min(1.0);
    }
    total / n as f64
}
