//! Errors of the PEFT reader/writer. Every message is one line and names the
//! file, tensor key or config field (and its value) that was wrong.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    /// A config field whose value this toolkit cannot honour (DoRA, bias, ...).
    #[error("adapter_config.json: {field}={value} is not supported ({reason})")]
    Unsupported {
        field: String,
        value: String,
        reason: String,
    },

    /// A config field whose value is out of range or malformed.
    #[error("adapter_config.json: {field}={value} is invalid ({reason})")]
    InvalidConfig {
        field: String,
        value: String,
        reason: String,
    },

    /// `adapter_config.json` is not valid JSON or does not fit the schema
    /// (`msg` is serde's message with line and column).
    #[error("{}: {msg}", path.display())]
    Json { path: PathBuf, msg: String },

    #[error("{}: {what} not found", path.display())]
    NotFound { path: PathBuf, what: &'static str },

    #[error("{}: {msg}", path.display())]
    Io { path: PathBuf, msg: String },

    /// The weights file is truncated, corrupt or holds something we cannot read.
    #[error("{}: {msg}", path.display())]
    Safetensors { path: PathBuf, msg: String },

    /// One tensor (by checkpoint key) is wrong: dtype, shape, unexpected key.
    #[error("{key}: {msg}")]
    Tensor { key: String, msg: String },

    /// Bad arguments to `save_adapter` (duplicate names, bad file names).
    #[error("save_adapter: {0}")]
    Save(String),

    #[error("candle: {0}")]
    Candle(String),
}

impl From<candle_core::Error> for PeftError {
    fn from(e: candle_core::Error) -> Self {
        PeftError::Candle(first_line(&e.to_string()))
    }
}

pub type Result<T> = std::result::Result<T, PeftError>;

/// The first line of a possibly multi-line message (candle errors can carry a
/// backtrace), trimmed.
pub(crate) fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").trim().to_string()
}
