//! Classification metrics equal to scikit-learn's `classification_report`,
//! `precision_recall_fscore_support(..., zero_division=0)` and
//! `confusion_matrix`, checked against numbers dumped by
//! `tests/fixtures/metrics/make_metrics.py` (tests/sklearn_metrics.rs, 1e-9).
//!
//! Conventions (scikit-learn's with `zero_division=0`): a class never
//! predicted has precision 0, a class with no true examples has recall 0, F1
//! is 0 when precision + recall is 0; the macro average is over every label,
//! including ones with no support; the weighted average weights by support.

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};

/// Precision, recall, F1 and support of one class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    pub label: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Number of true examples of this class.
    pub support: u64,
}

/// An average of per-class precision, recall and F1.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Avg {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

/// Everything about a classifier's predictions on one data set.
///
/// Serializes with the fields in this order: `accuracy`, `macro_f1`,
/// `weighted_f1`, `per_class`, `macro_avg`, `weighted_avg`, `confusion`,
/// `labels`, `n`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassificationReport {
    /// Share of correct predictions.
    pub accuracy: f64,
    /// `macro_avg.f1`, for convenience.
    pub macro_f1: f64,
    /// `weighted_avg.f1`, for convenience.
    pub weighted_f1: f64,
    /// One entry per label, by class id.
    pub per_class: Vec<ClassMetrics>,
    /// Unweighted mean over all labels.
    pub macro_avg: Avg,
    /// Mean over labels weighted by support.
    pub weighted_avg: Avg,
    /// `confusion[t][p]`: examples of true class `t` predicted as `p`.
    pub confusion: Vec<Vec<u64>>,
    /// Class names, by class id.
    pub labels: Vec<String>,
    /// Number of examples.
    pub n: usize,
}

/// `num / den`, or 0 when `den` is 0 (scikit-learn's `zero_division=0`).
fn ratio(num: u64, den: u64) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

impl ClassificationReport {
    /// Scores `y_pred` against `y_true` (class ids into `labels`).
    ///
    /// Errors if the lengths differ, there are no examples, or an id is not
    /// below `labels.len()`.
    pub fn new(labels: &[String], y_true: &[usize], y_pred: &[usize]) -> Result<Self> {
        if y_true.len() != y_pred.len() {
            return Err(DataError::LengthMismatch {
                y_true: y_true.len(),
                y_pred: y_pred.len(),
            });
        }
        if y_true.is_empty() {
            return Err(DataError::NoPredictions);
        }
        let k = labels.len();
        for (which, ys) in [("y_true", y_true), ("y_pred", y_pred)] {
            if let Some((index, &value)) = ys.iter().enumerate().find(|(_, &y)| y >= k) {
                return Err(DataError::ClassOutOfRange {
                    which,
                    index,
                    value,
                    n_labels: k,
                });
            }
        }

        let mut confusion = vec![vec![0u64; k]; k];
        for (&t, &p) in y_true.iter().zip(y_pred) {
            confusion[t][p] += 1;
        }
        let n = y_true.len();
        let correct: u64 = (0..k).map(|i| confusion[i][i]).sum();

        let per_class: Vec<ClassMetrics> = (0..k)
            .map(|c| {
                let tp = confusion[c][c];
                let support: u64 = confusion[c].iter().sum();
                let predicted: u64 = confusion.iter().map(|row| row[c]).sum();
                ClassMetrics {
                    label: labels[c].clone(),
                    precision: ratio(tp, predicted),
                    recall: ratio(tp, support),
                    // 2PR/(P+R) written with counts, as scikit-learn does.
                    f1: ratio(2 * tp, support + predicted),
                    support,
                }
            })
            .collect();

        let macro_avg = Avg {
            precision: per_class.iter().map(|m| m.precision).sum::<f64>() / k as f64,
            recall: per_class.iter().map(|m| m.recall).sum::<f64>() / k as f64,
            f1: per_class.iter().map(|m| m.f1).sum::<f64>() / k as f64,
        };
        let total: u64 = per_class.iter().map(|m| m.support).sum();
        let weighted = |f: fn(&ClassMetrics) -> f64| -> f64 {
            if total == 0 {
                return 0.0;
            }
            per_class.iter().map(|m| f(m) * m.support as f64).sum::<f64>() / total as f64
        };
        let weighted_avg = Avg {
            precision: weighted(|m| m.precision),
            recall: weighted(|m| m.recall),
            f1: weighted(|m| m.f1),
        };

        Ok(ClassificationReport {
            accuracy: ratio(correct, n as u64),
            macro_f1: macro_avg.f1,
            weighted_f1: weighted_avg.f1,
            per_class,
            macro_avg,
            weighted_avg,
            confusion,
            labels: labels.to_vec(),
            n,
        })
    }

    /// A plain-text report laid out like scikit-learn's
    /// `classification_report` (4 digits), followed by the confusion matrix
    /// with label headers (rows: true class, columns: predicted class).
    pub fn render_table(&self) -> String {
        let width = self
            .labels
            .iter()
            .map(|l| l.chars().count())
            .chain(["weighted avg".len()])
            .max()
            .unwrap_or(0);
        let mut s = format!(
            "{:>width$}  {:>9} {:>9} {:>9} {:>9}\n\n",
            "", "precision", "recall", "f1-score", "support"
        );
        for m in &self.per_class {
            s += &format!(
                "{:>width$}  {:>9.4} {:>9.4} {:>9.4} {:>9}\n",
                m.label, m.precision, m.recall, m.f1, m.support
            );
        }
        s += "\n";
        s += &format!(
            "{:>width$}  {:>9} {:>9} {:>9.4} {:>9}\n",
            "accuracy", "", "", self.accuracy, self.n
        );
        for (name, a) in [("macro avg", &self.macro_avg), ("weighted avg", &self.weighted_avg)] {
            s += &format!(
                "{:>width$}  {:>9.4} {:>9.4} {:>9.4} {:>9}\n",
                name, a.precision, a.recall, a.f1, self.n
            );
        }
        s += "\nconfusion matrix (rows: true, columns: predicted)\n";
        s += &render_confusion(&self.labels, &self.confusion);
        s
    }
}

/// The confusion matrix as an aligned text table with label headers.
fn render_confusion(labels: &[String], confusion: &[Vec<u64>]) -> String {
    let corner = "true \\ pred";
    let row_head = labels
        .iter()
        .map(|l| l.chars().count())
        .chain([corner.len()])
        .max()
        .unwrap_or(0);
    let widths: Vec<usize> = labels
        .iter()
        .enumerate()
        .map(|(j, l)| {
            let count = confusion.iter().map(|r| r[j].to_string().len()).max().unwrap_or(1);
            l.chars().count().max(count)
        })
        .collect();
    let mut s = format!("{corner:<row_head$}");
    for (l, &w) in labels.iter().zip(&widths) {
        s += &format!("  {l:>w$}");
    }
    s += "\n";
    for (l, row) in labels.iter().zip(confusion) {
        s += &format!("{l:<row_head$}");
        for (v, &w) in row.iter().zip(&widths) {
            s += &format!("  {v:>w$}");
        }
        s += "\n";
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn zero_division_and_absent_classes() {
        // class 2 never predicted, class 3 neither true nor predicted
        let labels = names(&["a", "b", "c", "d"]);
        let r = ClassificationReport::new(&labels, &[0, 0, 1, 2], &[0, 1, 1, 0]).unwrap();
        assert_eq!(r.accuracy, 0.5);
        assert_eq!(r.confusion, vec![vec![1, 1, 0, 0], vec![0, 1, 0, 0], vec![1, 0, 0, 0], vec![0; 4]]);
        let c = &r.per_class;
        assert_eq!((c[0].precision, c[0].recall, c[0].support), (0.5, 0.5, 2));
        assert_eq!((c[1].precision, c[1].recall, c[1].f1), (0.5, 1.0, 2.0 / 3.0));
        assert_eq!((c[2].precision, c[2].recall, c[2].f1, c[2].support), (0.0, 0.0, 0.0, 1));
        assert_eq!((c[3].precision, c[3].recall, c[3].f1, c[3].support), (0.0, 0.0, 0.0, 0));
        assert!((r.macro_avg.f1 - (0.5 + 2.0 / 3.0) / 4.0).abs() < 1e-15);
        assert!((r.weighted_avg.f1 - (0.5 * 2.0 + 2.0 / 3.0) / 4.0).abs() < 1e-15);
        assert_eq!(r.macro_f1, r.macro_avg.f1);
    }

    #[test]
    fn bad_input_is_an_error() {
        let labels = names(&["a", "b"]);
        let e = ClassificationReport::new(&labels, &[0, 1], &[0]).unwrap_err();
        assert_eq!(e.to_string(), "y_true has 2 items but y_pred has 1");
        let e = ClassificationReport::new(&labels, &[0, 1], &[0, 2]).unwrap_err();
        assert_eq!(e.to_string(), "y_pred[1] = 2 is not a class id (there are 2 labels)");
        assert!(ClassificationReport::new(&labels, &[], &[]).is_err());
        assert!(ClassificationReport::new(&[], &[0], &[0]).is_err());
    }

    #[test]
    fn json_field_names() {
        let labels = names(&["neg", "pos"]);
        let r = ClassificationReport::new(&labels, &[0, 1, 1], &[0, 1, 0]).unwrap();
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        for key in [
            "accuracy", "macro_f1", "weighted_f1", "per_class", "macro_avg", "weighted_avg",
            "confusion", "labels", "n",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.starts_with("{\"accuracy\":"), "{text}");
        assert!(text.contains("\"per_class\":[{\"label\":\"neg\",\"precision\":"), "{text}");
        let back: ClassificationReport = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn table_layout() {
        let labels = names(&["negative", "positive"]);
        let r = ClassificationReport::new(&labels, &[0, 0, 0, 1, 1], &[0, 0, 1, 1, 1]).unwrap();
        let t = r.render_table();
        let expected = [
            "              precision    recall  f1-score   support",
            "",
            "    negative     1.0000    0.6667    0.8000         3",
            "    positive     0.6667    1.0000    0.8000         2",
            "",
            "    accuracy                         0.8000         5",
            "   macro avg     0.8333    0.8333    0.8000         5",
            "weighted avg     0.8667    0.8000    0.8000         5",
            "",
            "confusion matrix (rows: true, columns: predicted)",
            "true \\ pred  negative  positive",
            "negative            2         1",
            "positive            0         2",
            "",
        ]
        .join("\n");
        assert_eq!(t, expected, "\n{t}");
    }
}
