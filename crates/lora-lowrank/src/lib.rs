//! Low-rank decomposition toolkit around LoRA.
//!
//! - [`svd`]: exact and randomized truncated SVD of f32 matrices (faer).
//! - [`init`]: PiSSA and OLoRA adapter initialisation from a weight, and
//!   PEFT's conversion of such adapters to plain LoRA.
//! - [`extract`]: `ΔW = W_tuned − W_base` per module, best rank-r factors.
//! - [`combine`]: PEFT's `add_weighted_adapter` (linear, cat, svd, ties).
//! - [`analyze`]: spectra, effective rank, subspace similarity of adapters.
//! - [`compress`]: replace weight matrices by rank-r factor pairs.
//! - [`source`]: model folders under canonical module paths.

pub mod analyze;
pub mod combine;
pub mod compress;
pub mod error;
pub mod extract;
pub mod init;
pub mod source;
pub mod svd;

pub use combine::{combine, CombineMethod, MajoritySign, Weighted};
pub use error::{LowRankError, Result};
pub use extract::{extract, RankRule};
pub use init::{convert_to_plain_lora, init_from_weight, WeightInit};
pub use source::ModelWeights;
pub use svd::{RsvdParams, SvdSolver, TruncatedSvd};
