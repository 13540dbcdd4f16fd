//! Generation metrics: corpus BLEU and chrF equal to `sacrebleu`'s defaults,
//! and distinct-1/distinct-2 diversity. Checked against numbers dumped by
//! `tests/fixtures/sacrebleu/make_sacrebleu.py` (tests/sacrebleu_metrics.rs,
//! 1e-9 absolute on the 0-100 scale).
//!
//! What "sacrebleu's defaults" means here (sacrebleu 2.6.0):
//! - **BLEU** = `sacrebleu.metrics.BLEU().corpus_score(hyps, refs)`: each segment
//!   is right-stripped and tokenized with the `13a` tokenizer (mteval-v13a: drops
//!   `<skipped>`, joins `-\n`, turns newlines into spaces, unescapes `&quot;`
//!   `&amp;` `&lt;` `&gt;`, splits off punctuation, and periods/commas unless next
//!   to a digit, and a dash after a digit); case-sensitive; n-grams up to 4;
//!   clipped counts summed over the corpus, with multiple references clipping
//!   by the largest count in any one reference; the reference length of a segment
//!   is the reference length closest to the hypothesis length (ties: the shorter);
//!   brevity penalty `exp(1 - ref_len/sys_len)` when `sys_len < ref_len` (0 when
//!   `sys_len` is 0); smoothing `exp` (the NIST/mteval one: the k-th order with no
//!   match gets precision `100 / (2^k · total)`); no effective order. When no
//!   n-gram of any order matches the score is 0, and an order with no n-grams at
//!   all (every hypothesis shorter than n tokens) also makes it 0.
//! - **chrF** = `sacrebleu.metrics.CHRF().corpus_score(hyps, refs)`: character
//!   n-grams of orders 1..=6 over each segment with all whitespace removed, no word
//!   n-grams, beta 2, case-sensitive; per segment the reference with the best
//!   segment chrF is kept; hypothesis/reference/match counts are summed over the
//!   corpus; precision and recall are averaged over the orders where both the
//!   hypothesis and the reference counts are non-zero (sacrebleu's default
//!   "effective order", not eps smoothing), then combined as F-beta, times 100.
//!
//! "Whitespace" is Python's `str.isspace` everywhere (Unicode White_Space plus
//! U+001C..U+001F), because sacrebleu splits with `str.split()`. Characters are
//! Unicode scalar values (Python's code points); there is no normalization.
//!
//! References are given per hypothesis (`refs[i]` are the references of
//! `hyps[i]`, one or more); sacrebleu's layout is transposed ("reference
//! streams"), with `None` filling the gaps when the count varies.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

/// Highest word n-gram order of BLEU (sacrebleu's `MAX_NGRAM_ORDER`).
pub const BLEU_MAX_ORDER: usize = 4;
/// Highest character n-gram order of chrF (sacrebleu's `CHRF.CHAR_ORDER`).
pub const CHRF_CHAR_ORDER: usize = 6;
/// chrF's beta (sacrebleu's `CHRF.BETA`): recall weighs beta² = 4 times precision.
pub const CHRF_BETA: u32 = 2;

/// What can be wrong with the texts handed to the generation metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GenMetricsError {
    /// No hypotheses at all.
    #[error("no generated texts to score")]
    NoHypotheses,
    /// Hypotheses and references do not pair up.
    #[error("{hypotheses} generated texts but {references} references; give one reference (or list of references) per generated text")]
    LengthMismatch {
        hypotheses: usize,
        references: usize,
    },
    /// A hypothesis with an empty list of references.
    #[error("generated text {index} has no reference")]
    NoReference { index: usize },
}

/// Result alias of the generation metrics.
pub type GenResult<T> = std::result::Result<T, GenMetricsError>;

/// Corpus BLEU with the statistics sacrebleu's `BLEUScore` carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BleuScore {
    /// BLEU on sacrebleu's 0-100 scale.
    pub score: f64,
    /// Clipped matching n-grams per order 1..=4, summed over the corpus.
    pub counts: Vec<u64>,
    /// Hypothesis n-grams per order 1..=4, summed over the corpus.
    pub totals: Vec<u64>,
    /// Smoothed precision per order, in percent (all 0 when nothing matches).
    pub precisions: Vec<f64>,
    /// Brevity penalty.
    pub bp: f64,
    /// Hypothesis tokens, summed over the corpus.
    pub sys_len: u64,
    /// Closest reference tokens, summed over the corpus.
    pub ref_len: u64,
}

/// BLEU, chrF and diversity of a set of generated texts, ready for `--json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationReport {
    /// Number of generated texts.
    pub n: usize,
    /// Corpus BLEU (sacrebleu defaults).
    pub bleu: BleuScore,
    /// Corpus chrF (sacrebleu defaults: chrF2, character order 6), 0-100.
    pub chrf: f64,
    /// Distinct-1 of the generated texts, see [`distinct_n`].
    pub distinct_1: f64,
    /// Distinct-2 of the generated texts, see [`distinct_n`].
    pub distinct_2: f64,
}

impl GenerationReport {
    /// Scores `hypotheses[i]` against the single reference `references[i]`.
    pub fn new<H: AsRef<str>, R: AsRef<str>>(
        hypotheses: &[H],
        references: &[R],
    ) -> GenResult<Self> {
        let refs: Vec<[&str; 1]> = references.iter().map(|r| [r.as_ref()]).collect();
        Self::with_references(hypotheses, &refs)
    }

    /// Scores `hypotheses[i]` against the references `references[i]` (one or more).
    pub fn with_references<H, L, R>(hypotheses: &[H], references: &[L]) -> GenResult<Self>
    where
        H: AsRef<str>,
        L: AsRef<[R]>,
        R: AsRef<str>,
    {
        Ok(GenerationReport {
            n: hypotheses.len(),
            bleu: corpus_bleu_multi(hypotheses, references)?,
            chrf: corpus_chrf_multi(hypotheses, references)?,
            distinct_1: distinct_n(hypotheses, 1),
            distinct_2: distinct_n(hypotheses, 2),
        })
    }
}

/// Python's `str.isspace` for one character.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `s.split()`: the non-empty runs between whitespace.
fn py_split(s: &str) -> impl Iterator<Item = &str> {
    s.split(is_py_space).filter(|t| !t.is_empty())
}

/// Checks the pairing of hypotheses and references and returns the references
/// as string slices, one list per hypothesis.
fn pair_up<'a, H, L, R>(hypotheses: &[H], references: &'a [L]) -> GenResult<Vec<Vec<&'a str>>>
where
    H: AsRef<str>,
    L: AsRef<[R]>,
    R: AsRef<str> + 'a,
{
    if hypotheses.is_empty() {
        return Err(GenMetricsError::NoHypotheses);
    }
    if hypotheses.len() != references.len() {
        return Err(GenMetricsError::LengthMismatch {
            hypotheses: hypotheses.len(),
            references: references.len(),
        });
    }
    references
        .iter()
        .enumerate()
        .map(|(index, refs)| {
            let refs: Vec<&str> = refs.as_ref().iter().map(|r| r.as_ref()).collect();
            if refs.is_empty() {
                Err(GenMetricsError::NoReference { index })
            } else {
                Ok(refs)
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------
// BLEU

/// sacrebleu's BLEU preprocessing of one segment: `rstrip()`, then the `13a`
/// tokenizer (`Tokenizer13a` and the regular expressions of `TokenizerRegexp`).
/// Returns the tokens joined by single spaces.
pub fn tokenize_13a(line: &str) -> String {
    let line = line.trim_end_matches(is_py_space);
    let mut line = line
        .replace("<skipped>", "")
        .replace("-\n", "")
        .replace('\n', " ");
    if line.contains('&') {
        line = line
            .replace("&quot;", "\"")
            .replace("&amp;", "&")
            .replace("&lt;", "<")
            .replace("&gt;", ">");
    }
    let chars: Vec<char> = format!(" {line} ").chars().collect();

    // r'([\{-\~\[-\` -\&\(-\+\:-\@\/])' -> r' \1 ': ASCII punctuation and symbols
    // except ' , - . (and space itself, which is harmless).
    let mut s = Vec::with_capacity(chars.len() * 2);
    for c in chars {
        if matches!(c, '{'..='~' | '['..='`' | ' '..='&' | '('..='+' | ':'..='@' | '/') {
            s.extend([' ', c, ' ']);
        } else {
            s.push(c);
        }
    }
    let digit = |c: char| c.is_ascii_digit();
    let period_comma = |c: char| c == '.' || c == ',';
    // r'([^0-9])([\.,])' -> r'\1 \2 '
    let s = sub_pairs(&s, |a, b| !digit(a) && period_comma(b), false);
    // r'([\.,])([^0-9])' -> r' \1 \2'
    let s = sub_pairs(&s, |a, b| period_comma(a) && !digit(b), true);
    // r'([0-9])(-)' -> r'\1 \2 '
    let s = sub_pairs(&s, |a, b| digit(a) && b == '-', false);

    let s: String = s.into_iter().collect();
    py_split(&s).collect::<Vec<_>>().join(" ")
}

/// `re.sub` of a two-character pattern `(a)(b)` over `s`, scanning left to right
/// without overlaps like Python's regex engine; the replacement is `a b ` or,
/// with `lead_space`, ` a b`.
fn sub_pairs(s: &[char], matches: impl Fn(char, char) -> bool, lead_space: bool) -> Vec<char> {
    let mut out = Vec::with_capacity(s.len() + s.len() / 2);
    let mut i = 0;
    while i < s.len() {
        if i + 1 < s.len() && matches(s[i], s[i + 1]) {
            if lead_space {
                out.extend([' ', s[i], ' ', s[i + 1]]);
            } else {
                out.extend([s[i], ' ', s[i + 1], ' ']);
            }
            i += 2;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    out
}

/// Counts of all word n-grams of orders 1..=`BLEU_MAX_ORDER` (the slice length
/// is the order).
fn word_ngrams<'t>(tokens: &'t [&'t str]) -> HashMap<&'t [&'t str], u64> {
    let mut counts = HashMap::new();
    for n in 1..=BLEU_MAX_ORDER {
        for gram in tokens.windows(n) {
            *counts.entry(gram).or_insert(0) += 1;
        }
    }
    counts
}

/// Sufficient statistics of one segment: `[sys_len, ref_len, correct.., total..]`.
#[derive(Default)]
struct BleuStats {
    sys_len: u64,
    ref_len: u64,
    correct: [u64; BLEU_MAX_ORDER],
    total: [u64; BLEU_MAX_ORDER],
}

impl BleuStats {
    fn add(&mut self, other: &BleuStats) {
        self.sys_len += other.sys_len;
        self.ref_len += other.ref_len;
        for n in 0..BLEU_MAX_ORDER {
            self.correct[n] += other.correct[n];
            self.total[n] += other.total[n];
        }
    }
}

/// sacrebleu's `_get_closest_ref_len`: the reference length closest to the
/// hypothesis length, the shorter one on a tie.
fn closest_ref_len(hyp_len: usize, ref_lens: &[usize]) -> usize {
    let mut best: Option<(usize, usize)> = None; // (diff, len)
    for &len in ref_lens {
        let diff = hyp_len.abs_diff(len);
        best = match best {
            Some((d, l)) if diff > d || (diff == d && len >= l) => Some((d, l)),
            _ => Some((diff, len)),
        };
    }
    best.map_or(0, |(_, len)| len)
}

fn bleu_segment(hyp: &str, refs: &[&str]) -> BleuStats {
    let ref_toks: Vec<String> = refs.iter().map(|r| tokenize_13a(r)).collect();
    let ref_tokens: Vec<Vec<&str>> = ref_toks.iter().map(|r| py_split(r).collect()).collect();
    let mut ref_counts: HashMap<&[&str], u64> = HashMap::new();
    for tokens in &ref_tokens {
        for (gram, count) in word_ngrams(tokens) {
            let slot = ref_counts.entry(gram).or_insert(0);
            *slot = (*slot).max(count);
        }
    }
    let ref_lens: Vec<usize> = ref_tokens.iter().map(Vec::len).collect();

    let hyp_tok = tokenize_13a(hyp);
    let hyp_tokens: Vec<&str> = py_split(&hyp_tok).collect();
    let mut stats = BleuStats {
        sys_len: hyp_tokens.len() as u64,
        ref_len: closest_ref_len(hyp_tokens.len(), &ref_lens) as u64,
        ..BleuStats::default()
    };
    for (gram, count) in word_ngrams(&hyp_tokens) {
        let n = gram.len() - 1;
        stats.total[n] += count;
        if let Some(&r) = ref_counts.get(gram) {
            stats.correct[n] += count.min(r);
        }
    }
    stats
}

/// sacrebleu's `my_log`: `ln`, with `ln(0)` floored to -9999999999.
fn my_log(x: f64) -> f64 {
    if x == 0.0 {
        -9_999_999_999.0
    } else {
        x.ln()
    }
}

/// sacrebleu's `BLEU.compute_bleu` with `smooth_method='exp'`, no effective order.
fn compute_bleu(s: &BleuStats) -> BleuScore {
    let bp = if s.sys_len < s.ref_len {
        if s.sys_len > 0 {
            (1.0 - s.ref_len as f64 / s.sys_len as f64).exp()
        } else {
            0.0
        }
    } else {
        1.0
    };
    let mut precisions = vec![0.0; BLEU_MAX_ORDER];
    let mut score = 0.0;
    if s.correct.iter().any(|&c| c > 0) {
        let mut smooth_mteval = 1.0;
        for ((p, &correct), &total) in precisions.iter_mut().zip(&s.correct).zip(&s.total) {
            if total == 0 {
                break;
            }
            *p = if correct == 0 {
                smooth_mteval *= 2.0;
                100.0 / (smooth_mteval * total as f64)
            } else {
                100.0 * correct as f64 / total as f64
            };
        }
        let log_sum = precisions.iter().fold(0.0, |acc, &p| acc + my_log(p));
        score = bp * (log_sum / BLEU_MAX_ORDER as f64).exp();
    }
    BleuScore {
        score,
        counts: s.correct.to_vec(),
        totals: s.total.to_vec(),
        precisions,
        bp,
        sys_len: s.sys_len,
        ref_len: s.ref_len,
    }
}

/// Corpus BLEU of `hypotheses[i]` against the single reference `references[i]`,
/// equal to `sacrebleu.metrics.BLEU().corpus_score(hypotheses, [references])`.
pub fn corpus_bleu<H: AsRef<str>, R: AsRef<str>>(
    hypotheses: &[H],
    references: &[R],
) -> GenResult<BleuScore> {
    let refs: Vec<[&str; 1]> = references.iter().map(|r| [r.as_ref()]).collect();
    corpus_bleu_multi(hypotheses, &refs)
}

/// Corpus BLEU of `hypotheses[i]` against the references `references[i]` (one
/// or more each), equal to sacrebleu's defaults (see the module docs).
pub fn corpus_bleu_multi<H, L, R>(hypotheses: &[H], references: &[L]) -> GenResult<BleuScore>
where
    H: AsRef<str>,
    L: AsRef<[R]>,
    R: AsRef<str>,
{
    let refs = pair_up(hypotheses, references)?;
    let mut total = BleuStats::default();
    for (hyp, refs) in hypotheses.iter().zip(&refs) {
        total.add(&bleu_segment(hyp.as_ref(), refs));
    }
    Ok(compute_bleu(&total))
}

// ---------------------------------------------------------------------------
// chrF

/// `[hypothesis n-grams, reference n-grams, matches]` per character order.
type ChrfStats = [[u64; 3]; CHRF_CHAR_ORDER];

/// Counts of the character n-grams of each order 1..=6 (index = order - 1).
fn char_ngrams(chars: &[char]) -> Vec<HashMap<&[char], u64>> {
    (1..=CHRF_CHAR_ORDER)
        .map(|n| {
            let mut counts = HashMap::new();
            for gram in chars.windows(n) {
                *counts.entry(gram).or_insert(0) += 1;
            }
            counts
        })
        .collect()
}

/// sacrebleu's `CHRF._compute_f_score` without eps smoothing.
fn chrf_f_score(stats: &ChrfStats) -> f64 {
    let factor = f64::from(CHRF_BETA * CHRF_BETA);
    let (mut avg_prec, mut avg_rec) = (0.0, 0.0);
    let mut effective_order = 0u32;
    for &[n_hyp, n_ref, n_match] in stats {
        if n_hyp > 0 && n_ref > 0 {
            avg_prec += n_match as f64 / n_hyp as f64;
            avg_rec += n_match as f64 / n_ref as f64;
            effective_order += 1;
        }
    }
    if effective_order == 0 {
        return 0.0;
    }
    avg_prec /= f64::from(effective_order);
    avg_rec /= f64::from(effective_order);
    if avg_prec + avg_rec == 0.0 {
        return 0.0;
    }
    let mut score = (1.0 + factor) * avg_prec * avg_rec;
    score /= factor * avg_prec + avg_rec;
    100.0 * score
}

fn chrf_segment(hyp: &str, refs: &[&str]) -> ChrfStats {
    let hyp_chars: Vec<char> = hyp.chars().filter(|&c| !is_py_space(c)).collect();
    let hyp_grams = char_ngrams(&hyp_chars);
    let mut best = (-1.0, [[0u64; 3]; CHRF_CHAR_ORDER]);
    for r in refs {
        let ref_chars: Vec<char> = r.chars().filter(|&c| !is_py_space(c)).collect();
        let ref_grams = char_ngrams(&ref_chars);
        let mut stats = [[0u64; 3]; CHRF_CHAR_ORDER];
        for (k, (h, rg)) in hyp_grams.iter().zip(&ref_grams).enumerate() {
            let mut matches = 0;
            for (gram, &count) in h {
                if let Some(&rc) = rg.get(gram) {
                    matches += count.min(rc);
                }
            }
            let hyp_count: u64 = h.values().sum();
            // sacrebleu: "don't count hits if no reference exists for that n-gram"
            stats[k] = [
                if rg.is_empty() { 0 } else { hyp_count },
                rg.values().sum(),
                matches,
            ];
        }
        let f = chrf_f_score(&stats);
        if f > best.0 {
            best = (f, stats);
        }
    }
    best.1
}

/// Corpus chrF of `hypotheses[i]` against the single reference `references[i]`,
/// equal to `sacrebleu.metrics.CHRF().corpus_score(hypotheses, [references]).score`.
pub fn corpus_chrf<H: AsRef<str>, R: AsRef<str>>(
    hypotheses: &[H],
    references: &[R],
) -> GenResult<f64> {
    let refs: Vec<[&str; 1]> = references.iter().map(|r| [r.as_ref()]).collect();
    corpus_chrf_multi(hypotheses, &refs)
}

/// Corpus chrF of `hypotheses[i]` against the references `references[i]` (one
/// or more each), equal to sacrebleu's defaults (see the module docs).
pub fn corpus_chrf_multi<H, L, R>(hypotheses: &[H], references: &[L]) -> GenResult<f64>
where
    H: AsRef<str>,
    L: AsRef<[R]>,
    R: AsRef<str>,
{
    let refs = pair_up(hypotheses, references)?;
    let mut total = [[0u64; 3]; CHRF_CHAR_ORDER];
    for (hyp, refs) in hypotheses.iter().zip(&refs) {
        let seg = chrf_segment(hyp.as_ref(), refs);
        for (t, s) in total.iter_mut().zip(&seg) {
            for j in 0..3 {
                t[j] += s[j];
            }
        }
    }
    Ok(chrf_f_score(&total))
}

// ---------------------------------------------------------------------------
// diversity

/// Distinct-n: the number of unique word n-grams divided by the number of word
/// n-grams, over all `texts` together. Words are whitespace-separated tokens
/// (Python's `str.split()`; no lowercasing, punctuation stays attached); n-grams
/// do not cross from one text into the next. 0 when there are no n-grams (for
/// example every text shorter than `n` words, or `n` = 0).
pub fn distinct_n<T: AsRef<str>>(texts: &[T], n: usize) -> f64 {
    if n == 0 {
        return 0.0;
    }
    let tokens: Vec<Vec<&str>> = texts
        .iter()
        .map(|t| py_split(t.as_ref()).collect())
        .collect();
    let mut unique: HashSet<&[&str]> = HashSet::new();
    let mut total = 0u64;
    for toks in &tokens {
        for gram in toks.windows(n) {
            unique.insert(gram);
            total += 1;
        }
    }
    if total == 0 {
        0.0
    } else {
        unique.len() as f64 / total as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_13a_basics() {
        assert_eq!(tokenize_13a("Hello, world!"), "Hello , world !");
        assert_eq!(
            tokenize_13a("It costs 3.14, not 3,14."),
            "It costs 3.14 , not 3,14 ."
        );
        assert_eq!(tokenize_13a("pages 5-7"), "pages 5 - 7");
        assert_eq!(tokenize_13a("a &amp; b"), "a & b");
        assert_eq!(tokenize_13a("  \n"), "");
    }

    #[test]
    fn python_whitespace() {
        assert_eq!(
            py_split("a\u{1f}b\u{a0}c\u{3000}d").collect::<Vec<_>>(),
            ["a", "b", "c", "d"]
        );
    }

    #[test]
    fn closest_reference_ties_to_shorter() {
        assert_eq!(closest_ref_len(5, &[7, 3]), 3);
        assert_eq!(closest_ref_len(5, &[3, 7]), 3);
        assert_eq!(closest_ref_len(5, &[6, 9]), 6);
    }

    #[test]
    fn bad_input_is_an_error() {
        let none: [&str; 0] = [];
        assert_eq!(
            corpus_bleu(&none, &none),
            Err(GenMetricsError::NoHypotheses)
        );
        assert_eq!(
            corpus_chrf(&["a", "b"], &["a"]),
            Err(GenMetricsError::LengthMismatch {
                hypotheses: 2,
                references: 1
            })
        );
        let refs: [Vec<&str>; 2] = [vec!["x"], vec![]];
        assert_eq!(
            corpus_bleu_multi(&["a", "b"], &refs),
            Err(GenMetricsError::NoReference { index: 1 })
        );
    }

    #[test]
    fn distinct_counts() {
        assert_eq!(distinct_n(&["a a b", "a b"], 1), 2.0 / 5.0);
        assert_eq!(distinct_n(&["a a b", "a b"], 2), 2.0 / 3.0);
        assert_eq!(distinct_n(&["a", ""], 2), 0.0);
    }
}
