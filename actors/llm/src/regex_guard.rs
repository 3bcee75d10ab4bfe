//! A static check that a `tokenizer.json` regex (Oniguruma, Ruby syntax, as the `tokenizers`
//! crate compiles it) cannot backtrack catastrophically, so a checkpoint whose pre-tokenizer
//! or normaliser pattern would let one request's text stall or panic the LLM stage is refused
//! at load, naming the file and the key.
//!
//! The check is conservative: it refuses the constructs behind exponential and high-degree
//! polynomial backtracking and accepts the patterns real tokenizers use (GPT-2's, cl100k /
//! o200k, LLaMA-3's, Qwen's: one level of repetition, at most two unbounded repetitions in a
//! row). Refused:
//! - backreferences (`\1`, `\k<name>`) and subexpression calls (`\g<name>`): no matcher
//!   runs them in linear time;
//! - a repetition that may iterate more than once over a body holding an unbounded
//!   repetition, or over a body that can match the empty string (`(a+)+`, `(\s*x){10}`,
//!   `(a?)*`), unless possessive (`*+`, `++`, `?+`) or atomic (`(?>…)`);
//! - a repetition that may iterate more than once over an alternation whose branches are
//!   not single characters (`(a|ab)*`);
//! - more than [`MAX_CHAINED`] unbounded repetitions along one path of a sequence
//!   (`\s*\s*\s*x`: O(n³) per search start).
//!
//! What the check lets through still runs under Oniguruma's retry limits, set at load
//! ([`crate::hf_tokenizer`]), and a matcher failure fails only that request.

/// Most unbounded repetitions along one path of a sequence.
pub const MAX_CHAINED: usize = 2;

/// What a parsed piece of a pattern can do.
#[derive(Clone, Copy, Debug, Default)]
struct Props {
    /// Holds an unbounded repetition that can backtrack (not possessive, not atomic).
    unbounded: bool,
    /// Can match the empty string.
    nullable: bool,
    /// Always matches exactly one character (a literal, a class, `.`).
    single: bool,
    /// Most unbounded repetitions along one path through it.
    chain: usize,
    /// Holds an alternation with a branch longer than one character (several ways to match
    /// the same text).
    alt: bool,
}

struct Parser<'a> {
    s: &'a [char],
    i: usize,
}

/// Why `pattern` is not accepted as linear-time, or `Ok`.
pub fn check_linear(pattern: &str) -> Result<(), String> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut p = Parser { s: &chars, i: 0 };
    let props = p.alternation(0)?;
    if p.i < chars.len() {
        return Err(format!("unbalanced `)` at character {}", p.i + 1));
    }
    if props.chain > MAX_CHAINED {
        return Err(format!(
            "{} unbounded repetitions in a row (at most {MAX_CHAINED}): polynomial backtracking",
            props.chain
        ));
    }
    Ok(())
}

impl Parser<'_> {
    fn peek(&self) -> Option<char> {
        self.s.get(self.i).copied()
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    /// `a|b|…` up to a `)` or the end.
    fn alternation(&mut self, depth: usize) -> Result<Props, String> {
        if depth > 64 {
            return Err("groups nested more than 64 deep".into());
        }
        let mut branches = vec![self.sequence(depth)?];
        while self.eat('|') {
            branches.push(self.sequence(depth)?);
        }
        Ok(if branches.len() == 1 {
            branches[0]
        } else {
            Props {
                unbounded: branches.iter().any(|b| b.unbounded),
                nullable: branches.iter().any(|b| b.nullable),
                // An alternation of single characters is a class; anything else may have
                // several ways to match the same text.
                single: branches.iter().all(|b| b.single),
                chain: branches.iter().map(|b| b.chain).max().unwrap_or(0),
                alt: branches.iter().any(|b| b.alt || !b.single),
            }
        })
    }

    /// A concatenation of quantified atoms.
    fn sequence(&mut self, depth: usize) -> Result<Props, String> {
        let mut seq = Props {
            nullable: true,
            ..Props::default()
        };
        let mut count = 0usize;
        while let Some(c) = self.peek() {
            if c == '|' || c == ')' {
                break;
            }
            let atom = self.atom(depth)?;
            let atom = match atom {
                Some(a) => self.quantified(a)?,
                None => continue, // an option setting or a comment: matches nothing
            };
            count += 1;
            seq.unbounded |= atom.unbounded;
            seq.alt |= atom.alt;
            seq.nullable &= atom.nullable;
            seq.chain += atom.chain;
            if seq.chain > MAX_CHAINED {
                return Err(format!(
                    "{} unbounded repetitions in a row (at most {MAX_CHAINED}): polynomial \
                     backtracking",
                    seq.chain
                ));
            }
            seq.single = count == 1 && atom.single;
        }
        if count != 1 {
            seq.single = false;
        }
        Ok(seq)
    }

    /// Quantifiers after an atom (several in a row nest: `a{2}*`).
    fn quantified(&mut self, mut body: Props) -> Result<Props, String> {
        while let Some((min, max)) = self.quantifier() {
            let possessive = self.eat('+');
            if !possessive {
                self.eat('?'); // lazy: the same backtracking as greedy
            }
            let repeats = max != Some(0) && max != Some(1);
            if repeats && !possessive {
                if body.unbounded {
                    return Err(
                        "a repetition over a repeated part (nested quantifiers, e.g. `(a+)+`): \
                         exponential backtracking"
                            .into(),
                    );
                }
                if body.nullable {
                    return Err("a repetition over a part that can match nothing (e.g. \
                                `(a?)*`): exponential backtracking"
                        .into());
                }
                if body.alt {
                    return Err("a repetition over an alternation of several-character \
                                branches (e.g. `(a|ab)*`): exponential backtracking"
                        .into());
                }
            }
            let unbounded = max.is_none() && !possessive;
            body = Props {
                unbounded: body.unbounded || unbounded,
                nullable: body.nullable || min == 0,
                single: body.single && min == 1 && max == Some(1),
                alt: body.alt,
                chain: if possessive {
                    0
                } else {
                    body.chain + usize::from(unbounded)
                },
            };
        }
        Ok(body)
    }

    /// `*`, `+`, `?`, `{n}`, `{n,}`, `{,m}`, `{n,m}` → (min, max); `None` if no quantifier
    /// (a `{` that is not an interval is a literal, as in Oniguruma).
    fn quantifier(&mut self) -> Option<(u32, Option<u32>)> {
        match self.peek()? {
            '*' => {
                self.i += 1;
                Some((0, None))
            }
            '+' => {
                self.i += 1;
                Some((1, None))
            }
            '?' => {
                self.i += 1;
                Some((0, Some(1)))
            }
            '{' => {
                let start = self.i;
                self.i += 1;
                let mut text = String::new();
                while let Some(c) = self.peek() {
                    self.i += 1;
                    if c == '}' {
                        if let Some(q) = parse_interval(&text) {
                            return Some(q);
                        }
                        break;
                    }
                    text.push(c);
                }
                self.i = start;
                None
            }
            _ => None,
        }
    }

    /// One atom; `None` for what matches nothing (an option setting, a comment).
    fn atom(&mut self, depth: usize) -> Result<Option<Props>, String> {
        let single = Props {
            single: true,
            ..Props::default()
        };
        let empty = Props {
            nullable: true,
            ..Props::default()
        };
        let Some(c) = self.peek() else {
            return Ok(None);
        };
        self.i += 1;
        match c {
            '\\' => self.escape(),
            '[' => {
                self.class()?;
                Ok(Some(single))
            }
            '(' => self.group(depth),
            '^' | '$' => Ok(Some(empty)),
            '*' | '+' | '?' => Err(format!(
                "a quantifier `{c}` with nothing to repeat at character {}",
                self.i
            )),
            _ => Ok(Some(single)),
        }
    }

    fn escape(&mut self) -> Result<Option<Props>, String> {
        let single = Props {
            single: true,
            ..Props::default()
        };
        let Some(c) = self.peek() else {
            return Err("a pattern ending in `\\`".into());
        };
        self.i += 1;
        match c {
            '1'..='9' => Err(format!("a backreference `\\{c}`: not linear-time")),
            'k' => Err("a named backreference `\\k<…>`: not linear-time".into()),
            'g' => Err("a subexpression call `\\g<…>`: not linear-time".into()),
            'A' | 'z' | 'Z' | 'b' | 'B' | 'G' => Ok(Some(Props {
                nullable: true,
                ..Props::default()
            })),
            'p' | 'P' | 'x' | 'u' if self.peek() == Some('{') => {
                self.skip_past('}')?;
                Ok(Some(single))
            }
            'x' => {
                for _ in 0..2 {
                    if self.peek().is_some_and(|d| d.is_ascii_hexdigit()) {
                        self.i += 1;
                    }
                }
                Ok(Some(single))
            }
            'u' => {
                for _ in 0..4 {
                    if self.peek().is_some_and(|d| d.is_ascii_hexdigit()) {
                        self.i += 1;
                    }
                }
                Ok(Some(single))
            }
            // \R (a line break, one or two characters) and \X (a grapheme cluster) match
            // variable lengths.
            'R' | 'X' => Ok(Some(Props::default())),
            _ => Ok(Some(single)),
        }
    }

    fn skip_past(&mut self, end: char) -> Result<(), String> {
        while let Some(c) = self.peek() {
            self.i += 1;
            if c == end {
                return Ok(());
            }
        }
        Err(format!("an unterminated `{{…{end}`"))
    }

    /// A bracket class (nested classes and `[:alpha:]` included), after its `[`.
    fn class(&mut self) -> Result<(), String> {
        let mut depth = 1usize;
        // A `]` right after `[` or `[^` is a literal.
        self.eat('^');
        self.eat(']');
        while let Some(c) = self.peek() {
            self.i += 1;
            match c {
                '\\' => self.i += 1,
                '[' => {
                    depth += 1;
                    self.eat('^');
                    self.eat(']');
                }
                ']' => {
                    depth -= 1;
                    if depth == 0 {
                        return Ok(());
                    }
                }
                _ => {}
            }
        }
        Err("an unterminated character class `[`".into())
    }

    /// A group, after its `(`.
    fn group(&mut self, depth: usize) -> Result<Option<Props>, String> {
        let mut atomic = false;
        let mut look = false;
        if self.eat('?') {
            match self.peek() {
                Some(':') => self.i += 1,
                Some('>') => {
                    self.i += 1;
                    atomic = true;
                }
                Some('=') | Some('!') => {
                    self.i += 1;
                    look = true;
                }
                Some('<') if matches!(self.s.get(self.i + 1), Some('=') | Some('!')) => {
                    self.i += 2;
                    look = true;
                }
                Some('<') => self.skip_past('>')?, // named group
                Some('\'') => {
                    self.i += 1;
                    self.skip_past('\'')?;
                }
                Some('#') => {
                    self.skip_past(')')?;
                    return Ok(None);
                }
                Some('~') => return Err("an absent operator `(?~…)`: not linear-time".into()),
                _ => {
                    // Options: `(?imx-imx)` (nothing to match) or `(?imx-imx:…)`.
                    while self
                        .peek()
                        .is_some_and(|c| c.is_ascii_alphabetic() || c == '-')
                    {
                        self.i += 1;
                    }
                    if self.eat(')') {
                        return Ok(None);
                    }
                    if !self.eat(':') {
                        return Err(format!("an unknown group syntax at character {}", self.i));
                    }
                }
            }
        }
        let inner = self.alternation(depth + 1)?;
        if !self.eat(')') {
            return Err("an unterminated group `(`".into());
        }
        Ok(Some(if look {
            // A look-around matches no characters; its own inside was checked.
            Props {
                nullable: true,
                ..Props::default()
            }
        } else if atomic {
            // No backtracking into an atomic group.
            Props {
                unbounded: false,
                chain: 0,
                alt: false,
                ..inner
            }
        } else {
            inner
        }))
    }
}

fn parse_interval(text: &str) -> Option<(u32, Option<u32>)> {
    let num = |t: &str| -> Option<Option<u32>> {
        if t.is_empty() {
            Some(None)
        } else if t.chars().all(|c| c.is_ascii_digit()) {
            t.parse().ok().map(Some)
        } else {
            None
        }
    };
    match text.split_once(',') {
        None => {
            let n = num(text)??;
            Some((n, Some(n)))
        }
        Some((a, b)) => {
            let (a, b) = (num(a)?, num(b)?);
            if a.is_none() && b.is_none() {
                return None;
            }
            Some((a.unwrap_or(0), b))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pre-tokenizer patterns of real tokenizers pass.
    #[test]
    fn real_tokenizer_patterns_pass() {
        let ok = [
            // GPT-2 / RoBERTa byte-level BPE
            r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
            // cl100k_base / LLaMA-3
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
            // o200k_base
            r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
            // Qwen2
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
            // Metaspace-style and digit splitting, BERT punctuation
            r"\p{N}",
            r"[\p{P}\$\+<=>\^`\|~]",
            r" ?[[:alpha:]]+|[^[:alpha:]\s]+",
            r"(?>a+)+b",
            r"a*+b*+c*+d",
            r"x{2,}y",
            r"{not an interval}",
        ];
        for p in ok {
            assert_eq!(check_linear(p), Ok(()), "{p}");
        }
    }

    #[test]
    fn backtracking_patterns_are_refused_with_the_reason() {
        let bad = [
            (r"(a+)+$", "nested quantifiers"),
            (r"(\s*\w)+!", "nested quantifiers"),
            (r"(?:x+){3}y", "nested quantifiers"),
            (r"(a|aa)+$", "alternation"),
            (r"(?:ab|a)*c", "alternation"),
            (r"(a?)*b", "match nothing"),
            (r"(\w)\1", "backreference"),
            (r"(?<x>a)\k<x>", "backreference"),
            (r"(?<x>a|\g<x>)", "subexpression call"),
            (r"\s*\s*\s*x", "in a row"),
            (r"a+(?:b|c)*d+e", "in a row"),
            (r"(?~abc)", "absent"),
            (r"(ab", "unterminated"),
            (r"[ab", "unterminated"),
        ];
        for (p, why) in bad {
            let e = check_linear(p).unwrap_err();
            assert!(e.contains(why), "{p}: {e}");
        }
    }
}
