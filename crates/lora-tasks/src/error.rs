//! Task-level errors: one line naming what was wrong.

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Data(#[from] lora_data::DataError),
    #[error(transparent)]
    Peft(#[from] lora_peft::PeftError),
    #[error(transparent)]
    Model(#[from] lora_models::ModelError),
    #[error(transparent)]
    Core(#[from] lora_core::CoreError),
    #[error(transparent)]
    Train(#[from] lora_train::TrainError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, TaskError>;
