//! Tasks built on the LoRA core, the models and the trainer.

pub mod classify;
pub mod error;

pub use error::{Result, TaskError};
