//! Errors of the low-rank toolkit. Every message is one line and names the
//! module (weight path), shape or value that was wrong.

/// What went wrong in a decomposition, extraction, combination or compression.
#[derive(Debug, thiserror::Error)]
pub enum LowRankError {
    /// A rank of 0 or above `min(rows, cols)`.
    #[error("{module}: rank {r} is out of range for a {rows}x{cols} matrix (must be 1..={max})")]
    BadRank { module: String, r: usize, rows: usize, cols: usize, max: usize },

    /// A rank of 0 given before any matrix is seen.
    #[error("rank 0 is out of range (must be at least 1)")]
    ZeroRank,

    /// An energy threshold outside (0, 1].
    #[error("energy {0} is out of range (must be in (0, 1])")]
    BadEnergy(f64),

    /// A density outside (0, 1].
    #[error("density {0} is out of range (must be in (0, 1])")]
    BadDensity(f64),

    /// A combination weight that is not a finite number.
    #[error("adapter {adapter}: weight {weight} is not a finite number")]
    BadWeight { adapter: String, weight: f64 },

    /// Base and tuned models hold the same tensor with different shapes.
    #[error("{module}: base has shape {base:?} but tuned has shape {tuned:?}")]
    ShapeMismatch { module: String, base: Vec<usize>, tuned: Vec<usize> },

    /// A tensor present on one side only.
    #[error("{module}: present in {present} but missing from {missing}")]
    Missing { module: String, present: String, missing: String },

    /// Two adapters differ where the chosen method needs them equal.
    #[error("method {method} needs adapters with the same {what}: {detail}")]
    Incompatible { method: String, what: &'static str, detail: String },

    /// A matrix that is not 2-D, or factors that do not fit each other.
    #[error("{module}: {msg}")]
    Shape { module: String, msg: String },

    /// The decomposition itself failed (non-convergence, NaN/inf in the input).
    #[error("{module}: {msg}")]
    Linalg { module: String, msg: String },

    /// Anything else the caller passed in that cannot be used.
    #[error("{0}")]
    Input(String),

    #[error(transparent)]
    Peft(#[from] lora_peft::PeftError),

    #[error(transparent)]
    Core(#[from] lora_core::CoreError),

    #[error("candle: {0}")]
    Candle(String),

    #[error("{path}: {msg}")]
    Io { path: String, msg: String },
}

impl From<candle_core::Error> for LowRankError {
    fn from(e: candle_core::Error) -> Self {
        LowRankError::Candle(e.to_string().lines().next().unwrap_or("").to_string())
    }
}

/// Result with [`LowRankError`].
pub type Result<T> = std::result::Result<T, LowRankError>;

/// Checks `1 <= r <= min(rows, cols)`.
pub fn check_rank(module: &str, r: usize, rows: usize, cols: usize) -> Result<()> {
    let max = rows.min(cols);
    if r == 0 || r > max {
        return Err(LowRankError::BadRank { module: module.to_string(), r, rows, cols, max });
    }
    Ok(())
}

/// Checks `0 < energy <= 1`.
pub fn check_energy(e: f64) -> Result<()> {
    if e.is_finite() && e > 0.0 && e <= 1.0 {
        Ok(())
    } else {
        Err(LowRankError::BadEnergy(e))
    }
}
