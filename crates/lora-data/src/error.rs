//! Typed errors of the data crate. Every message is one line naming the file,
//! line, column or value that was wrong.

use std::path::PathBuf;

/// Joins names for an error message: `a, b, c` (or `(none)`).
fn list(names: &[String]) -> String {
    if names.is_empty() {
        "(none)".to_string()
    } else {
        names.join(", ")
    }
}

/// Everything that can go wrong reading data, computing metrics, plotting or
/// logging.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The input file does not exist.
    #[error("{}: file not found", path.display())]
    NotFound { path: PathBuf },

    /// Any other I/O failure while reading or writing `path`.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The file extension does not tell the format and none was given.
    #[error("{}: cannot tell the format from the extension '{ext}' (known: .csv, .tsv, .txt, .jsonl, .json); rename the file to one of these", path.display())]
    UnknownFormat { path: PathBuf, ext: String },

    /// A format name (e.g. from the command line) that is not known.
    #[error("unknown data format '{0}' (known: csv, tsv, jsonl)")]
    BadFormatName(String),

    /// The file has bytes that are not UTF-8.
    #[error("{}: line {line}, byte {column}: not valid UTF-8 (save the file as UTF-8)", path.display())]
    NotUtf8 {
        path: PathBuf,
        line: usize,
        column: usize,
    },

    /// The file is empty or holds only whitespace.
    #[error("{}: file is empty", path.display())]
    EmptyFile { path: PathBuf },

    /// The file has a header (or only blank lines) but no data rows.
    #[error("{}: no data rows", path.display())]
    NoRows { path: PathBuf },

    /// A requested column is not in the header (or JSON object).
    #[error("{}: line {line}: no column '{column}'; available columns: {}", path.display(), list(available))]
    MissingColumn {
        path: PathBuf,
        line: usize,
        column: String,
        available: Vec<String>,
    },

    /// A requested column appears more than once in the header.
    #[error("{}: line {line}: column '{column}' appears more than once in the header", path.display())]
    DuplicateColumn {
        path: PathBuf,
        line: usize,
        column: String,
    },

    /// A row has a different number of fields than the header.
    #[error("{}: line {line}: row has {found} fields but the header has {expected}", path.display())]
    RaggedRow {
        path: PathBuf,
        line: usize,
        expected: usize,
        found: usize,
    },

    /// A label column is required but this row's label is empty or null.
    #[error("{}: line {line}: empty label in column '{column}'", path.display())]
    MissingLabel {
        path: PathBuf,
        line: usize,
        column: String,
    },

    /// A CSV/TSV syntax error reported by the parser.
    #[error("{}: line {line}: {message}", path.display())]
    Csv {
        path: PathBuf,
        line: usize,
        message: String,
    },

    /// A JSON line that does not parse (the message has the column).
    #[error("{}: line {line}: malformed JSON: {message}", path.display())]
    Json {
        path: PathBuf,
        line: usize,
        message: String,
    },

    /// A `.json` file holding one JSON array rather than JSON Lines.
    #[error("{}: is a JSON array; expected JSON Lines, one object per line (convert with: jq -c '.[]')", path.display())]
    JsonArray { path: PathBuf },

    /// A JSON line that is valid JSON but not an object.
    #[error("{}: line {line}: expected a JSON object, found {found}", path.display())]
    JsonNotObject {
        path: PathBuf,
        line: usize,
        found: &'static str,
    },

    /// A JSON field whose value is not a string, number or bool.
    #[error("{}: line {line}: field '{field}' is {found}; expected a string or number", path.display())]
    FieldType {
        path: PathBuf,
        line: usize,
        field: String,
        found: &'static str,
    },

    /// A label seen at prediction/validation time that training never saw.
    #[error("{}: line {line}: label '{label}' is not among the training labels: {}", path.display(), list(known))]
    UnknownLabel {
        path: PathBuf,
        line: usize,
        label: String,
        known: Vec<String>,
    },

    /// An example with no label where one is required.
    #[error("{}: line {line}: example has no label", path.display())]
    Unlabelled { path: PathBuf, line: usize },

    /// A label set with no labels.
    #[error("no labels: {0}")]
    NoLabels(String),

    /// A label set naming the same label twice.
    #[error("label '{0}' appears twice in the label set")]
    DuplicateLabel(String),

    /// A saved label set that is not a JSON list of strings.
    #[error("{}: not a label set (expected a JSON list of label names): {message}", path.display())]
    BadLabelFile { path: PathBuf, message: String },

    /// A validation fraction outside [0, 1].
    #[error("validation fraction {0} must be between 0 and 1")]
    BadFraction(f64),

    /// `y_true` and `y_pred` differ in length.
    #[error("y_true has {y_true} items but y_pred has {y_pred}")]
    LengthMismatch { y_true: usize, y_pred: usize },

    /// No predictions to score.
    #[error("no predictions to score")]
    NoPredictions,

    /// A class id outside the label list.
    #[error("{which}[{index}] = {value} is not a class id (there are {n_labels} labels)")]
    ClassOutOfRange {
        which: &'static str,
        index: usize,
        value: usize,
        n_labels: usize,
    },

    /// A confusion matrix whose shape does not match the labels.
    #[error("confusion matrix is malformed: {0}")]
    BadConfusion(String),

    /// Plotting failed (plotters' message).
    #[error("{}: cannot draw plot: {message}", path.display())]
    Plot { path: PathBuf, message: String },

    /// A malformed line in a metrics log.
    #[error("{}: line {line}: {message}", path.display())]
    LogLine {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

impl DataError {
    /// Wraps an I/O error, turning "not found" into [`DataError::NotFound`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            DataError::NotFound { path }
        } else {
            DataError::Io { path, source }
        }
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, DataError>;
