//! The label vocabulary of a classifier, mapping labels to class ids, and a
//! seeded stratified train/validation split.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::fsutil::write_atomic;
use crate::table::Example;

/// The class names of a classifier; class id `i` is `names[i]`.
///
/// Serializes as a JSON list of names. Built from training data by
/// [`LabelSet::from_examples`], which sorts the names: numerically when every
/// label is an integer (`"2" < "10"`), otherwise by their bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub struct LabelSet {
    names: Vec<String>,
    #[serde(skip)]
    index: HashMap<String, usize>,
}

impl LabelSet {
    /// A label set with exactly these names, in this order. Errors if a name
    /// repeats or the list is empty.
    pub fn from_names(names: Vec<String>) -> Result<Self> {
        if names.is_empty() {
            return Err(DataError::NoLabels("the label list is empty".into()));
        }
        let mut index = HashMap::with_capacity(names.len());
        for (i, n) in names.iter().enumerate() {
            if index.insert(n.clone(), i).is_some() {
                return Err(DataError::DuplicateLabel(n.clone()));
            }
        }
        Ok(LabelSet { names, index })
    }

    /// The distinct labels of `examples`, sorted (see the type's docs).
    /// Unlabelled examples are ignored; errors if none has a label.
    pub fn from_examples(examples: &[Example]) -> Result<Self> {
        let mut names: Vec<String> = examples
            .iter()
            .filter_map(|e| e.label.clone())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        if names.is_empty() {
            return Err(DataError::NoLabels("no example has a label".into()));
        }
        let ints: Option<Vec<i128>> = names.iter().map(|n| n.parse().ok()).collect();
        if let Some(ints) = ints {
            let mut pairs: Vec<(i128, String)> = ints.into_iter().zip(names).collect();
            pairs.sort();
            names = pairs.into_iter().map(|(_, n)| n).collect();
        }
        Self::from_names(names)
    }

    /// The class id of `label`.
    pub fn index_of(&self, label: &str) -> Option<usize> {
        self.index.get(label).copied()
    }

    /// The name of class `i`.
    pub fn name(&self, i: usize) -> Option<&str> {
        self.names.get(i).map(String::as_str)
    }

    /// All names, by class id.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The number of classes.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether there are no classes (never true for a built set).
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Saves as a pretty JSON list of names, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut json = serde_json::to_string_pretty(&self.names)
            .map_err(|e| DataError::BadLabelFile { path: path.to_path_buf(), message: e.to_string() })?;
        json.push('\n');
        write_atomic(path, json.as_bytes()).map_err(|e| DataError::io(path, e))
    }

    /// Loads a label set saved by [`LabelSet::save`] (keeps the saved order).
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
        let names: Vec<String> = serde_json::from_str(&text).map_err(|e| DataError::BadLabelFile {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::from_names(names).map_err(|e| DataError::BadLabelFile {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }
}

impl TryFrom<Vec<String>> for LabelSet {
    type Error = DataError;
    fn try_from(names: Vec<String>) -> Result<Self> {
        Self::from_names(names)
    }
}

impl From<LabelSet> for Vec<String> {
    fn from(set: LabelSet) -> Vec<String> {
        set.names
    }
}

/// The class id of every example. `source` is the file the examples came
/// from, for error messages. Errors on an unlabelled example, or on a label
/// not in `labels` (naming the label, file and line, and listing the known
/// labels).
pub fn label_ids(examples: &[Example], labels: &LabelSet, source: &Path) -> Result<Vec<usize>> {
    examples
        .iter()
        .map(|e| {
            let label = e.label.as_deref().ok_or_else(|| DataError::Unlabelled {
                path: source.to_path_buf(),
                line: e.line,
            })?;
            labels.index_of(label).ok_or_else(|| DataError::UnknownLabel {
                path: source.to_path_buf(),
                line: e.line,
                label: label.to_string(),
                known: labels.names().to_vec(),
            })
        })
        .collect()
}

/// Splits `examples` into (train, valid), stratified by label, reproducibly
/// for a given `seed`.
///
/// About `valid_fraction` of each label's examples go to validation: the
/// total is `round(n * valid_fraction)`, shared among labels by largest
/// remainder, never taking a label's last training example unless the fraction
/// is 1. Which examples go is drawn by shuffling each label's examples with a
/// `StdRng` seeded with `seed` (labels visited in sorted order, unlabelled
/// examples as one more group). Both parts keep the input order. The split is
/// fixed for a given seed and `rand` version (the lock file pins it).
pub fn split_train_valid(
    examples: Vec<Example>,
    valid_fraction: f64,
    seed: u64,
) -> Result<(Vec<Example>, Vec<Example>)> {
    if !(0.0..=1.0).contains(&valid_fraction) {
        return Err(DataError::BadFraction(valid_fraction));
    }
    // Group indices by label; BTreeMap keeps the visiting order fixed.
    let mut groups: BTreeMap<Option<&str>, Vec<usize>> = BTreeMap::new();
    for (i, e) in examples.iter().enumerate() {
        groups.entry(e.label.as_deref()).or_default().push(i);
    }
    let groups: Vec<Vec<usize>> = groups.into_values().collect();

    // Largest-remainder allocation of round(n * fraction) validation slots.
    let n = examples.len();
    let total = ((n as f64) * valid_fraction).round() as usize;
    let quotas: Vec<f64> = groups.iter().map(|g| g.len() as f64 * valid_fraction).collect();
    let mut take: Vec<usize> = quotas.iter().map(|q| q.floor() as usize).collect();
    let mut order: Vec<usize> = (0..groups.len()).collect();
    // Stable sort: ties go to the earlier group.
    order.sort_by(|&a, &b| {
        let ra = quotas[a] - quotas[a].floor();
        let rb = quotas[b] - quotas[b].floor();
        rb.total_cmp(&ra)
    });
    let mut left = total.saturating_sub(take.iter().sum());
    for &g in &order {
        if left == 0 {
            break;
        }
        let keeps_one = valid_fraction >= 1.0 || take[g] + 1 < groups[g].len();
        if take[g] < groups[g].len() && keeps_one {
            take[g] += 1;
            left -= 1;
        }
    }

    let mut rng = StdRng::seed_from_u64(seed);
    let mut is_valid = vec![false; n];
    for (g, mut idx) in groups.into_iter().enumerate() {
        idx.shuffle(&mut rng);
        for &i in &idx[..take[g]] {
            is_valid[i] = true;
        }
    }
    let mut train = Vec::with_capacity(n - take.iter().sum::<usize>());
    let mut valid = Vec::with_capacity(take.iter().sum());
    for (e, v) in examples.into_iter().zip(is_valid) {
        if v {
            valid.push(e);
        } else {
            train.push(e);
        }
    }
    Ok((train, valid))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(labels: &[&str]) -> Vec<Example> {
        labels
            .iter()
            .enumerate()
            .map(|(i, l)| Example { text: format!("t{i}"), label: Some(l.to_string()), line: i + 2 })
            .collect()
    }

    #[test]
    fn sorting_numeric_and_lexicographic() {
        let s = LabelSet::from_examples(&ex(&["10", "2", "-1", "2"])).unwrap();
        assert_eq!(s.names(), ["-1", "2", "10"]);
        let s = LabelSet::from_examples(&ex(&["pos", "neg", "Neutral", "10"])).unwrap();
        assert_eq!(s.names(), ["10", "Neutral", "neg", "pos"]);
        assert_eq!(s.index_of("neg"), Some(2));
        assert_eq!(s.index_of("nope"), None);
        assert_eq!(s.name(3), Some("pos"));
        assert_eq!(s.name(4), None);
        assert_eq!(s.len(), 4);
        assert!(LabelSet::from_examples(&[Example::new("x", None)]).is_err());
    }

    #[test]
    fn serde_and_save_load() {
        let s = LabelSet::from_examples(&ex(&["b", "a"])).unwrap();
        assert_eq!(serde_json::to_string(&s).unwrap(), r#"["a","b"]"#);
        let back: LabelSet = serde_json::from_str(r#"["z","a"]"#).unwrap();
        assert_eq!(back.index_of("a"), Some(1), "saved order is kept");
        assert!(serde_json::from_str::<LabelSet>(r#"["a","a"]"#).is_err());

        let dir = std::env::temp_dir().join(format!("lora-data-labels-{}", std::process::id()));
        let path = dir.join("labels.json");
        s.save(&path).unwrap();
        assert_eq!(LabelSet::load(&path).unwrap(), s);
        std::fs::write(&path, "{\"a\": 1}").unwrap();
        let e = LabelSet::load(&path).unwrap_err().to_string();
        assert!(e.contains("labels.json") && e.contains("not a label set"), "{e}");
        std::fs::write(&path, "[]").unwrap();
        assert!(LabelSet::load(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ids_and_unknown_label() {
        let train = ex(&["pos", "neg"]);
        let s = LabelSet::from_examples(&train).unwrap();
        assert_eq!(label_ids(&train, &s, Path::new("train.csv")).unwrap(), [1, 0]);
        let valid = ex(&["neg", "neutral"]);
        let e = label_ids(&valid, &s, Path::new("data/valid.csv")).unwrap_err().to_string();
        assert_eq!(
            e,
            "data/valid.csv: line 3: label 'neutral' is not among the training labels: neg, pos"
        );
        let e = label_ids(&[Example::new("x", None)], &s, Path::new("v.csv")).unwrap_err();
        assert!(e.to_string().contains("no label"));
    }

    #[test]
    fn split_is_stratified_and_deterministic() {
        let mut labels = vec!["a"; 60];
        labels.extend(vec!["b"; 30]);
        labels.extend(vec!["c"; 10]);
        let data = ex(&labels);
        let (tr, va) = split_train_valid(data.clone(), 0.2, 42).unwrap();
        assert_eq!((tr.len(), va.len()), (80, 20));
        let count = |v: &[Example], l: &str| v.iter().filter(|e| e.label.as_deref() == Some(l)).count();
        assert_eq!((count(&va, "a"), count(&va, "b"), count(&va, "c")), (12, 6, 2));
        // Input order kept, nothing lost or duplicated.
        assert!(tr.windows(2).all(|w| w[0].line < w[1].line));
        let mut all: Vec<_> = tr.iter().chain(&va).map(|e| e.line).collect();
        all.sort();
        assert_eq!(all, (2..102).collect::<Vec<_>>());
        // Same seed, same split; another seed, another split.
        let (tr2, va2) = split_train_valid(data.clone(), 0.2, 42).unwrap();
        assert_eq!((tr, va.clone()), (tr2, va2));
        let (_, va3) = split_train_valid(data, 0.2, 43).unwrap();
        assert_ne!(va, va3);
    }

    #[test]
    fn split_golden() {
        // Pins the split for a fixed seed: fails if rand's StdRng or shuffle change.
        let data = ex(&["x", "y", "x", "y", "x", "y", "x", "y", "x", "y"]);
        let (_, va) = split_train_valid(data, 0.4, 7).unwrap();
        let lines: Vec<usize> = va.iter().map(|e| e.line).collect();
        assert_eq!(lines, GOLDEN_SPLIT);
    }
    const GOLDEN_SPLIT: [usize; 4] = [4, 8, 9, 11];

    #[test]
    fn split_edge_cases() {
        let data = ex(&["a", "a", "b"]);
        let (tr, va) = split_train_valid(data.clone(), 0.0, 1).unwrap();
        assert_eq!((tr.len(), va.len()), (3, 0));
        let (tr, va) = split_train_valid(data.clone(), 1.0, 1).unwrap();
        assert_eq!((tr.len(), va.len()), (0, 3));
        // 0.5 of 3 = 2 (rounded): 'b' has one example and keeps it for training.
        let (tr, va) = split_train_valid(data.clone(), 0.5, 1).unwrap();
        assert_eq!((tr.len(), va.len()), (2, 1));
        assert_eq!(va[0].label.as_deref(), Some("a"));
        assert!(split_train_valid(data.clone(), 1.5, 1).is_err());
        assert!(split_train_valid(data, f64::NAN, 1).is_err());
        let (tr, va) = split_train_valid(Vec::new(), 0.1, 1).unwrap();
        assert!(tr.is_empty() && va.is_empty());
    }
}
