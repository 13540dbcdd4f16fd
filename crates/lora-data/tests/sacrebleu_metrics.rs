//! Generation metrics against sacrebleu 2.6.0. The reference numbers are in
//! tests/fixtures/sacrebleu/sacrebleu_cases.json, made by make_sacrebleu.py next
//! to it with `BLEU().corpus_score` and `CHRF().corpus_score` (defaults: 13a,
//! 4-gram, exp smoothing; chrF2 with character order 6). Integer statistics
//! (n-gram counts, lengths) and the 13a tokenization must be equal; scores,
//! precisions, brevity penalty and distinct-n within 1e-9 absolute (scores on
//! the 0-100 scale).

use std::path::PathBuf;

use lora_data::gen_metrics::{
    corpus_bleu, corpus_bleu_multi, corpus_chrf, corpus_chrf_multi, distinct_n, tokenize_13a,
};
use lora_data::GenerationReport;
use serde::Deserialize;

const TOL: f64 = 1e-9;

#[derive(Deserialize)]
struct RefBleu {
    score: f64,
    counts: Vec<u64>,
    totals: Vec<u64>,
    precisions: Vec<f64>,
    bp: f64,
    sys_len: u64,
    ref_len: u64,
}

#[derive(Deserialize)]
struct RefChrf {
    score: f64,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    hypotheses: Vec<String>,
    references: Vec<Vec<String>>,
    tokenized_13a: Vec<String>,
    bleu: RefBleu,
    chrf: RefChrf,
    distinct_1: f64,
    distinct_2: f64,
}

#[derive(Deserialize)]
struct Fixture {
    sacrebleu_version: String,
    cases: Vec<Case>,
}

fn fixture() -> Fixture {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/sacrebleu/sacrebleu_cases.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn close(case: &str, what: &str, got: f64, want: f64) {
    assert!(
        (got - want).abs() <= TOL,
        "{case}: {what} = {got}, sacrebleu says {want} (diff {:e})",
        (got - want).abs()
    );
}

#[test]
fn fixture_covers_the_edge_cases() {
    let f = fixture();
    assert_eq!(f.sacrebleu_version, "2.6.0");
    let names: Vec<&str> = f.cases.iter().map(|c| c.name.as_str()).collect();
    for want in [
        "empty_hypothesis_in_corpus",
        "only_empty_hypothesis",
        "punctuation",
        "unicode",
        "no_matching_4grams",
        "hypothesis_longer",
        "multiple_references",
    ] {
        assert!(names.contains(&want), "fixture lacks case {want}");
    }
}

#[test]
fn tokenizer_13a_equals_sacrebleu() {
    for case in fixture().cases {
        for (hyp, want) in case.hypotheses.iter().zip(&case.tokenized_13a) {
            assert_eq!(&tokenize_13a(hyp), want, "{}: 13a of {hyp:?}", case.name);
        }
    }
}

#[test]
fn bleu_equals_sacrebleu() {
    for case in fixture().cases {
        let got = corpus_bleu_multi(&case.hypotheses, &case.references)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let want = &case.bleu;
        let name = case.name.as_str();
        assert_eq!(got.counts, want.counts, "{name}: counts");
        assert_eq!(got.totals, want.totals, "{name}: totals");
        assert_eq!(got.sys_len, want.sys_len, "{name}: sys_len");
        assert_eq!(got.ref_len, want.ref_len, "{name}: ref_len");
        close(name, "bp", got.bp, want.bp);
        assert_eq!(
            got.precisions.len(),
            want.precisions.len(),
            "{name}: orders"
        );
        for (n, (g, w)) in got.precisions.iter().zip(&want.precisions).enumerate() {
            close(name, &format!("precision[{}]", n + 1), *g, *w);
        }
        close(name, "BLEU", got.score, want.score);

        // the single-reference entry point agrees where there is one reference each
        if case.references.iter().all(|r| r.len() == 1) {
            let refs: Vec<&str> = case.references.iter().map(|r| r[0].as_str()).collect();
            let single =
                corpus_bleu(&case.hypotheses, &refs).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(single, got, "{name}: single-reference BLEU");
        }
    }
}

#[test]
fn chrf_equals_sacrebleu() {
    for case in fixture().cases {
        let got = corpus_chrf_multi(&case.hypotheses, &case.references)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        close(&case.name, "chrF", got, case.chrf.score);
        if case.references.iter().all(|r| r.len() == 1) {
            let refs: Vec<&str> = case.references.iter().map(|r| r[0].as_str()).collect();
            let single = corpus_chrf(&case.hypotheses, &refs)
                .unwrap_or_else(|e| panic!("{}: {e}", case.name));
            assert_eq!(single, got, "{}: single-reference chrF", case.name);
        }
    }
}

#[test]
fn distinct_n_equals_the_python_definition() {
    for case in fixture().cases {
        close(
            &case.name,
            "distinct-1",
            distinct_n(&case.hypotheses, 1),
            case.distinct_1,
        );
        close(
            &case.name,
            "distinct-2",
            distinct_n(&case.hypotheses, 2),
            case.distinct_2,
        );
    }
}

#[test]
fn report_serializes_and_round_trips() {
    let case = fixture()
        .cases
        .into_iter()
        .find(|c| c.name == "multiple_references")
        .expect("fixture has multiple_references");
    let report =
        GenerationReport::with_references(&case.hypotheses, &case.references).expect("report");
    assert_eq!(report.n, case.hypotheses.len());
    close(
        &case.name,
        "report BLEU",
        report.bleu.score,
        case.bleu.score,
    );
    close(&case.name, "report chrF", report.chrf, case.chrf.score);
    let json = serde_json::to_string(&report).expect("serialize");
    for key in [
        "\"bleu\"",
        "\"chrf\"",
        "\"distinct_1\"",
        "\"distinct_2\"",
        "\"precisions\"",
    ] {
        assert!(json.contains(key), "{key} missing in {json}");
    }
    let back: GenerationReport = serde_json::from_str(&json).expect("deserialize");
    // serde_json (without its float_roundtrip feature) may parse a float 1 ulp
    // off, so floats round-trip within the tolerance and integers exactly.
    assert_eq!(back.n, report.n);
    assert_eq!(back.bleu.counts, report.bleu.counts);
    assert_eq!(back.bleu.totals, report.bleu.totals);
    assert_eq!(
        (back.bleu.sys_len, back.bleu.ref_len),
        (report.bleu.sys_len, report.bleu.ref_len)
    );
    close("round trip", "BLEU", back.bleu.score, report.bleu.score);
    for (b, r) in back.bleu.precisions.iter().zip(&report.bleu.precisions) {
        close("round trip", "precision", *b, *r);
    }
    close("round trip", "bp", back.bleu.bp, report.bleu.bp);
    close("round trip", "chrF", back.chrf, report.chrf);
    close(
        "round trip",
        "distinct-1",
        back.distinct_1,
        report.distinct_1,
    );
    close(
        "round trip",
        "distinct-2",
        back.distinct_2,
        report.distinct_2,
    );
}
