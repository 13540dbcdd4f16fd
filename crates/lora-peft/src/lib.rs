//! Read and write LoRA adapters in Hugging Face PEFT's on-disk format, so
//! they move between this toolkit and Python in both directions.
//!
//! - [`config`]: `AdapterConfig`, the typed mirror of `adapter_config.json`,
//!   with `validate()`, per-module `rank_for`/`alpha_for`/`scaling_for`.
//! - [`fields`]: enums for the config's choice fields (task, init, targets).
//! - [`keys`]: the tensor key scheme (`base_model.model.<path>.lora_A.weight`).
//! - [`io`]: `save_adapter` / `load_adapter` (atomic writes, f32 safetensors).
//! - [`summary`]: `summarize` for `inspect`, `check_pair` for attaching.
//! - [`pyjson`]: JSON byte-identical to Python's `json.dumps(indent=2, sort_keys=True)`.
//!
//! This crate knows nothing about models: module paths are plain strings.

pub mod config;
pub mod error;
pub mod fields;
pub mod io;
pub mod keys;
pub mod pyjson;
pub mod summary;

pub use config::AdapterConfig;
pub use error::{PeftError, Result};
pub use fields::{Bias, InitLoraWeights, OneOrMany, PeftType, TargetModules, TaskType};
pub use io::{load_adapter, read_config, save_adapter, LoadedAdapter, CONFIG_NAME, WEIGHTS_NAME};
pub use keys::{
    classify_key, lora_key, parse_lora_key, parse_saved_module_key, saved_module_key, AdapterKey,
    LoraPart, KEY_PREFIX,
};
pub use summary::{check_pair, summarize, AdapterSummary, TargetSummary};
