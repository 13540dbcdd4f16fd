//! Errors of model loading: one line, naming the file and what was wrong.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {msg}")]
    Config { path: String, msg: String },
    #[error("{path}: {msg}")]
    Io { path: String, msg: String },
    #[error("{path}: cannot load tokenizer: {msg}")]
    Tokenizer { path: String, msg: String },
    #[error(transparent)]
    Core(#[from] lora_core::CoreError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    pub fn io(path: &Path, e: std::io::Error) -> Self {
        let msg = match e.kind() {
            std::io::ErrorKind::NotFound => "file not found".to_string(),
            std::io::ErrorKind::InvalidData => "not valid UTF-8 text".to_string(),
            _ => e.to_string(),
        };
        Self::Io {
            path: path.display().to_string(),
            msg,
        }
    }
}

pub type Result<T> = std::result::Result<T, ModelError>;
