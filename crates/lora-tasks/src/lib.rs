//! Tasks built on the LoRA core, the models and the trainer.

pub mod causal;
pub mod classify;
pub mod error;
pub mod peft_glue;

pub use error::{Result, TaskError};
