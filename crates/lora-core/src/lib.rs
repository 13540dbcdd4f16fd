//! LoRA core: the LoRA linear layer, custom ops with explicit backward passes,
//! the typed target spec, and the builder that attaches adapters to a model
//! from outside.

pub mod amx;
pub mod attention;
pub mod builder;
pub mod device;
pub mod error;
pub mod lora;
pub mod lora_op;
pub mod ops;
pub mod ops_decoder;
pub mod parallel;
pub mod qgemv;
pub mod residual_norm;
pub mod simd;
mod small_mm;
pub mod target;
pub mod weights;

pub use builder::{init_pair, AdapterPlan, AdapterSet, ModelBuilder, NamedVar, Preloaded, WeightInitFn, WeightInitHook};
pub use error::{CoreError, Result};
pub use lora::{no_grad, NoGradGuard, scaling, FrozenWeight, Linear, LoraConfig, LoraInit, LoraWeights};
pub use target::{TargetModules, TargetSpec};
pub use weights::{MemorySource, SafetensorsSource, WeightSource};
