//! Model architectures, one file each, built through `lora_core::ModelBuilder`.

pub mod bert;
pub mod error;
pub mod hf;

pub use bert::{BertClassifier, BertConfig, BertInput, BertModel, Head};
pub use error::{ModelError, Result};
pub use hf::{load_tokenizer, HfFolder};
