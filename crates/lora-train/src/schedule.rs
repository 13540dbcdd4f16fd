//! Learning-rate schedules as in transformers' `get_*_schedule_with_warmup`.

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Linear,
    Cosine,
    Constant,
}

impl Schedule {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "linear" => Ok(Self::Linear),
            "cosine" => Ok(Self::Cosine),
            "constant" => Ok(Self::Constant),
            o => Err(format!("--schedule {o}: expected linear, cosine or constant")),
        }
    }

    /// The learning rate for optimizer step `step` (0-based) of `total`.
    pub fn lr(self, base: f64, step: usize, warmup: usize, total: usize) -> f64 {
        if step < warmup {
            return base * step as f64 / warmup.max(1) as f64;
        }
        let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
        match self {
            Self::Constant => base,
            Self::Linear => base * (1.0 - progress).max(0.0),
            Self::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let s = Schedule::Linear;
        assert_eq!(s.lr(1.0, 0, 10, 110), 0.0);
        assert!((s.lr(1.0, 5, 10, 110) - 0.5).abs() < 1e-12);
        assert!((s.lr(1.0, 10, 10, 110) - 1.0).abs() < 1e-12);
        assert!((s.lr(1.0, 60, 10, 110) - 0.5).abs() < 1e-12);
        assert!((Schedule::Cosine.lr(1.0, 60, 10, 110) - 0.5).abs() < 1e-12);
        assert_eq!(Schedule::Constant.lr(2.0, 100, 10, 110), 2.0);
    }
}
