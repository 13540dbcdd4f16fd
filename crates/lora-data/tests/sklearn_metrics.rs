//! `ClassificationReport` against scikit-learn. The reference numbers are in
//! tests/fixtures/metrics/sklearn_cases.json, made by make_metrics.py next to
//! it with `precision_recall_fscore_support(labels=range(n), zero_division=0)`
//! (average=None, "macro", "weighted"), `accuracy_score` and
//! `confusion_matrix(labels=range(n))`. Tolerance: 1e-9 absolute.

use std::path::PathBuf;

use lora_data::{Avg, ClassificationReport};
use serde::Deserialize;

const TOL: f64 = 1e-9;

#[derive(Deserialize)]
struct RefClass {
    label: String,
    precision: f64,
    recall: f64,
    f1: f64,
    support: u64,
}

#[derive(Deserialize)]
struct RefAvg {
    precision: f64,
    recall: f64,
    f1: f64,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    labels: Vec<String>,
    y_true: Vec<usize>,
    y_pred: Vec<usize>,
    accuracy: f64,
    per_class: Vec<RefClass>,
    #[serde(rename = "macro")]
    macro_avg: RefAvg,
    weighted: RefAvg,
    confusion: Vec<Vec<u64>>,
}

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/metrics/sklearn_cases.json")
}

fn close(case: &str, what: &str, got: f64, want: f64) {
    assert!(
        (got - want).abs() <= TOL,
        "{case}: {what}: got {got}, scikit-learn says {want}"
    );
}

fn check_avg(case: &str, what: &str, got: &Avg, want: &RefAvg) {
    close(case, &format!("{what} precision"), got.precision, want.precision);
    close(case, &format!("{what} recall"), got.recall, want.recall);
    close(case, &format!("{what} f1"), got.f1, want.f1);
}

#[test]
fn matches_scikit_learn() {
    let path = fixture();
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run tests/fixtures/metrics/make_metrics.py)", path.display()));
    let cases: Vec<Case> = serde_json::from_str(&text).expect("fixture parses");
    assert!(!cases.is_empty(), "fixture has no cases");
    for c in &cases {
        let name = c.name.as_str();
        let r = ClassificationReport::new(&c.labels, &c.y_true, &c.y_pred)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(r.n, c.y_true.len(), "{name}: n");
        assert_eq!(r.labels, c.labels, "{name}: labels");
        close(name, "accuracy", r.accuracy, c.accuracy);
        assert_eq!(r.per_class.len(), c.per_class.len(), "{name}: class count");
        for (got, want) in r.per_class.iter().zip(&c.per_class) {
            let what = |m: &str| format!("class '{}' {m}", want.label);
            assert_eq!(got.label, want.label, "{name}: label order");
            close(name, &what("precision"), got.precision, want.precision);
            close(name, &what("recall"), got.recall, want.recall);
            close(name, &what("f1"), got.f1, want.f1);
            assert_eq!(got.support, want.support, "{name}: {}", what("support"));
        }
        check_avg(name, "macro", &r.macro_avg, &c.macro_avg);
        check_avg(name, "weighted", &r.weighted_avg, &c.weighted);
        close(name, "macro_f1", r.macro_f1, c.macro_avg.f1);
        close(name, "weighted_f1", r.weighted_f1, c.weighted.f1);
        assert_eq!(r.confusion, c.confusion, "{name}: confusion matrix");
    }
}
