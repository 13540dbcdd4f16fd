//! Model architectures, one file each, built through `lora_core::ModelBuilder`.

pub mod bert;
pub mod error;
pub mod gguf;
pub mod gguf_write;
pub mod hf;
pub mod llama;

pub use bert::{BertClassifier, BertConfig, BertInput, BertModel, Head};
pub use error::{ModelError, Result};
pub use gguf::{GgufFile, GgufSource};
pub use hf::{load_tokenizer, HfFolder};
pub use llama::{DecoderFiles, DecoderFormat, KvCache, Llama, LlamaConfig};
