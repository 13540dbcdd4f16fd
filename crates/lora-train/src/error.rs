#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("loss became {value} at step {step}; training stopped, the last good checkpoint and best adapter are kept")]
    NonFinite { step: usize, value: f32 },
    #[error("{path}: {msg}")]
    Checkpoint { path: String, msg: String },
    #[error("{0}")]
    Task(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, TrainError>;
