//! Typed errors of the LoRA core. Every message is one line naming the file,
//! key, module path or value that was wrong.

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("{source_name}: missing tensor '{key}'")]
    MissingTensor { source_name: String, key: String },
    #[error("{source_name}: tensor '{key}' has shape {got:?} but the config implies {expected:?}")]
    ShapeMismatch {
        source_name: String,
        key: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("{source_name}: cannot read tensor '{key}': {msg}")]
    BadTensor {
        source_name: String,
        key: String,
        msg: String,
    },
    /// A weights file that cannot be opened or parsed as a whole.
    #[error("{path}: {msg}")]
    BadFile { path: String, msg: String },
    #[error("LoRA rank {r} is invalid for {path} ({out_features}x{in_features}): it must be between 1 and {max}")]
    BadRank {
        path: String,
        r: usize,
        out_features: usize,
        in_features: usize,
        max: usize,
    },
    #[error("target module '{name}' matched no linear layer; linear layers here are named: {available}")]
    UnmatchedTarget { name: String, available: String },
    #[error("invalid target regex '{pattern}': {msg}")]
    BadRegex { pattern: String, msg: String },
    #[error("invalid LoRA setting: {0}")]
    InvalidConfig(String),
    #[error("{0}")]
    State(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, CoreError>;
