//! The LoRA linear layer.
//!
//! `y = x·Wᵀ + b + dropout(x)·Aᵀ·Bᵀ·s`, with `W` (out×in) frozen, `A` (r×in) and
//! `B` (out×r) trainable and `s = alpha/r` (or `alpha/√r` with rsLoRA).
//! Merging folds `s·B·A` into `W`; both are explicit calls returning `Result`.
//!
//! A [`Linear`] is a cheap handle (`Arc`) so that the model owns it for the
//! forward pass while the [`crate::AdapterSet`] keeps the same layer for
//! merging, saving and optimisation, without the model knowing about LoRA.

use crate::error::{CoreError, Result};
use crate::ops;
use candle_core::quantized::QTensor;
use candle_core::{Tensor, Var};
use std::sync::{Arc, RwLock};

thread_local! {
    static NO_GRAD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// While the returned guard lives, layers on this thread use their trainable
/// tensors detached: the forward pass records no graph, so intermediates
/// (attention probabilities, saved activations) are freed as soon as they
/// are used. For evaluation, prediction and generation; like PyTorch's
/// `torch.no_grad()`.
#[must_use = "the guard re-enables gradients when dropped"]
pub fn no_grad() -> NoGradGuard {
    NO_GRAD.with(|c| c.set(c.get() + 1));
    NoGradGuard(())
}

pub struct NoGradGuard(());

impl Drop for NoGradGuard {
    fn drop(&mut self) {
        NO_GRAD.with(|c| c.set(c.get().saturating_sub(1)));
    }
}

/// Whether gradients are recorded on this thread (no [`no_grad`] guard alive).
pub(crate) fn grad_enabled() -> bool {
    NO_GRAD.with(|c| c.get() == 0)
}

/// The tensor of a trainable parameter, detached under [`no_grad`].
fn param(v: &Var) -> Tensor {
    if grad_enabled() {
        v.as_tensor().clone()
    } else {
        v.as_tensor().detach()
    }
}

/// How `A` and `B` start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoraInit {
    /// PEFT's default: `A` Kaiming-uniform with a=√5 (i.e. U(-1/√in, 1/√in)), `B` zeros.
    #[default]
    KaimingUniform,
    /// `A` ~ N(0, 1/r), `B` zeros (PEFT's `init_lora_weights="gaussian"`).
    Gaussian,
    /// Both random (PEFT's `init_lora_weights=False`): for tests, the update is non-zero.
    Random,
}

/// Hyper-parameters of one adapter.
#[derive(Debug, Clone)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub use_rslora: bool,
    pub init: LoraInit,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.1,
            use_rslora: false,
            init: LoraInit::KaimingUniform,
        }
    }
}

impl LoraConfig {
    pub fn scaling(&self) -> f64 {
        scaling(self.alpha, self.r, self.use_rslora)
    }

    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(CoreError::InvalidConfig("rank r=0: the rank must be at least 1".into()));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(CoreError::InvalidConfig(format!(
                "alpha={} must be a positive number",
                self.alpha
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(CoreError::InvalidConfig(format!(
                "dropout={} must be in [0, 1)",
                self.dropout
            )));
        }
        Ok(())
    }
}

pub fn scaling(alpha: f64, r: usize, rslora: bool) -> f64 {
    if rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}

/// The trainable low-rank pair of one layer.
#[derive(Clone)]
pub struct LoraWeights {
    /// (r, in)
    pub a: Var,
    /// (out, r)
    pub b: Var,
    pub scaling: f64,
    pub dropout: f32,
}

enum Base {
    /// Frozen weight (out, in) and bias: gradients reach only the input.
    Frozen { weight: Tensor, bias: Option<Tensor> },
    /// Fully trainable (PEFT's `modules_to_save`, e.g. the classification head).
    Trainable { weight: Var, bias: Option<Var> },
    /// Frozen weight in a GGML block format (QLoRA). Merging keeps the
    /// quantized original and uses a dense `W + s·B·A` until unmerged, so
    /// unmerging restores the exact quantized weight.
    Quantized { weight: Arc<QTensor>, bias: Option<Tensor>, merged: Option<Tensor> },
}

/// A frozen weight as the builder hands it out: dense f32 or quantized.
#[derive(Clone, Debug)]
pub enum FrozenWeight {
    Dense(Tensor),
    Quantized(Arc<QTensor>),
}

impl FrozenWeight {
    /// (out, in) for a matrix.
    pub fn dims2(&self) -> Result<(usize, usize)> {
        Ok(match self {
            Self::Dense(t) => t.dims2()?,
            Self::Quantized(q) => q.shape().dims2()?,
        })
    }

    /// The weight as f32 (dequantized when quantized).
    pub fn dense(&self) -> Result<Tensor> {
        Ok(match self {
            Self::Dense(t) => t.clone(),
            Self::Quantized(q) => q.dequantize(&q.device())?,
        })
    }

    /// Rows of an embedding matrix (vocab, hidden) for token ids of any shape.
    pub fn embedding(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Quantized(q) => q.embedding(ids),
            Self::Dense(w) => {
                let mut dims = ids.dims().to_vec();
                dims.push(w.dim(1)?);
                w.index_select(&ids.flatten_all()?, 0)?.reshape(dims)
            }
        }
    }

    /// Bytes held in memory.
    pub fn storage_bytes(&self) -> usize {
        match self {
            Self::Dense(t) => t.elem_count() * 4,
            Self::Quantized(q) => q.storage_size_in_bytes(),
        }
    }

    pub fn elem_count(&self) -> usize {
        match self {
            Self::Dense(t) => t.elem_count(),
            Self::Quantized(q) => q.shape().elem_count(),
        }
    }
}

struct Inner {
    path: String,
    base: Base,
    lora: Option<LoraWeights>,
    merged: bool,
    /// bf16 tile packs of the dense frozen weight, made on first use at bf16
    /// matmul precision; replaced whenever the weight changes (merge/unmerge).
    packs: Arc<crate::amx::Packs>,
}

/// A linear layer as model code sees it: frozen, trainable, or frozen + LoRA.
#[derive(Clone)]
pub struct Linear {
    inner: Arc<RwLock<Inner>>,
}

impl std::fmt::Debug for Linear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Linear({})", self.path())
    }
}

impl Linear {
    pub fn frozen(path: impl Into<String>, weight: Tensor, bias: Option<Tensor>) -> Self {
        Self::from_inner(path.into(), Base::Frozen { weight, bias }, None)
    }

    /// A frozen layer over a dense or quantized weight, optionally with LoRA.
    pub fn from_frozen(
        path: impl Into<String>,
        weight: FrozenWeight,
        bias: Option<Tensor>,
        lora: Option<LoraWeights>,
    ) -> Result<Self> {
        let path = path.into();
        match (weight, lora) {
            (FrozenWeight::Dense(w), Some(l)) => Self::with_lora(path, w, bias, l),
            (FrozenWeight::Dense(w), None) => Ok(Self::frozen(path, w, bias)),
            (FrozenWeight::Quantized(q), lora) => {
                let (out_f, in_f) = q.shape().dims2()?;
                if let Some(l) = &lora {
                    check_fit(&path, l, out_f, in_f)?;
                }
                Ok(Self::from_inner(path, Base::Quantized { weight: q, bias, merged: None }, lora))
            }
        }
    }

    pub fn trainable(path: impl Into<String>, weight: Var, bias: Option<Var>) -> Self {
        Self::from_inner(path.into(), Base::Trainable { weight, bias }, None)
    }

    pub fn with_lora(
        path: impl Into<String>,
        weight: Tensor,
        bias: Option<Tensor>,
        lora: LoraWeights,
    ) -> Result<Self> {
        let path = path.into();
        let (out_f, in_f) = weight.dims2()?;
        check_fit(&path, &lora, out_f, in_f)?;
        Ok(Self::from_inner(path, Base::Frozen { weight, bias }, Some(lora)))
    }

    fn from_inner(path: String, base: Base, lora: Option<LoraWeights>) -> Self {
        Self {
            inner: Arc::new(RwLock::new(Inner {
                path,
                base,
                lora,
                merged: false,
                packs: crate::amx::Packs::new(),
            })),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn path(&self) -> String {
        self.read().path.clone()
    }

    pub fn has_lora(&self) -> bool {
        self.read().lora.is_some()
    }

    pub fn lora(&self) -> Option<LoraWeights> {
        self.read().lora.clone()
    }

    pub fn is_merged(&self) -> bool {
        self.read().merged
    }

    /// (out_features, in_features)
    pub fn dims(&self) -> Result<(usize, usize)> {
        match &self.read().base {
            Base::Quantized { weight, .. } => Ok(weight.shape().dims2()?),
            Base::Frozen { weight, .. } => Ok(weight.dims2()?),
            Base::Trainable { weight, .. } => Ok(weight.as_tensor().dims2()?),
        }
    }

    /// The current base weight as f32 (merged weight when merged; a quantized
    /// weight is dequantized).
    pub fn weight(&self) -> Result<Tensor> {
        Ok(match &self.read().base {
            Base::Frozen { weight, .. } => weight.clone(),
            Base::Trainable { weight, .. } => weight.as_tensor().clone(),
            Base::Quantized { merged: Some(w), .. } => w.clone(),
            Base::Quantized { weight, .. } => weight.dequantize(&weight.device())?,
        })
    }

    /// The frozen base weight as stored (quantized stays quantized; the
    /// merged dense weight when merged).
    pub fn frozen_weight(&self) -> Option<FrozenWeight> {
        match &self.read().base {
            Base::Frozen { weight, .. } => Some(FrozenWeight::Dense(weight.clone())),
            Base::Quantized { merged: Some(w), .. } => Some(FrozenWeight::Dense(w.clone())),
            Base::Quantized { weight, .. } => Some(FrozenWeight::Quantized(weight.clone())),
            Base::Trainable { .. } => None,
        }
    }

    pub fn bias(&self) -> Option<Tensor> {
        match &self.read().base {
            Base::Frozen { bias, .. } | Base::Quantized { bias, .. } => bias.clone(),
            Base::Trainable { bias, .. } => bias.as_ref().map(|b| b.as_tensor().clone()),
        }
    }

    /// The trainable base parameters (`modules_to_save`), if this is such a layer.
    pub fn trainable_params(&self) -> Option<(Var, Option<Var>)> {
        match &self.read().base {
            Base::Trainable { weight, bias } => Some((weight.clone(), bias.clone())),
            Base::Frozen { .. } | Base::Quantized { .. } => None,
        }
    }

    /// `x (…, in) -> (…, out)`. `train` enables LoRA dropout.
    pub fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let inner = self.read();
        match &inner.base {
            Base::Trainable { weight, bias } => ops::linear_reference(x, &param(weight), bias.as_ref().map(param).as_ref()),
            // Unmerged adapter over a dense weight, or over a quantized one at
            // training/prefill sizes (single-row decoding keeps the quantized
            // dot-product kernel): the fused op (lora_op.rs).
            Base::Frozen { weight, bias } if inner.lora.is_some() && !inner.merged => {
                let l = inner.lora.as_ref().expect("checked");
                let w = FrozenWeight::Dense(weight.clone());
                crate::lora_op::lora_linear_packed(x, &w, bias.as_ref(), &param(&l.a), &param(&l.b), l.scaling, l.dropout, train, Some(&inner.packs))
            }
            Base::Quantized { weight, bias, merged: None }
                if inner.lora.is_some() && x.elem_count() / x.dim(candle_core::D::Minus1)?.max(1) >= crate::ops_decoder::DEQUANT_GEMM_MIN_ROWS =>
            {
                let l = inner.lora.as_ref().expect("checked");
                let w = FrozenWeight::Quantized(weight.clone());
                crate::lora_op::lora_linear(x, &w, bias.as_ref(), &param(&l.a), &param(&l.b), l.scaling, l.dropout, train)
            }
            Base::Frozen { .. } | Base::Quantized { .. } => {
                let y = match &inner.base {
                    Base::Frozen { weight, bias } | Base::Quantized { merged: Some(weight), bias, .. } => {
                        ops::frozen_linear_packed(x, weight, bias.as_ref(), Some(&inner.packs))?
                    }
                    Base::Quantized { weight, bias, merged: None } => {
                        let y = crate::ops_decoder::frozen_qlinear(x, weight)?;
                        match bias {
                            Some(b) => y.broadcast_add(b)?,
                            None => y,
                        }
                    }
                    Base::Trainable { .. } => unreachable!("matched above"),
                };
                match (&inner.lora, inner.merged) {
                    (Some(l), false) => {
                        let h = if train && l.dropout > 0.0 {
                            ops::dropout(x, l.dropout)?
                        } else {
                            x.clone()
                        };
                        y + lora_branch(&h, l)?
                    }
                    (Some(_), true) if train => candle_core::bail!(
                        "{}: cannot train while the adapter is merged; unmerge first",
                        inner.path
                    ),
                    _ => Ok(y),
                }
            }
        }
    }

    /// `gelu_erf(forward(x))`: one fused pass on the bf16 tiles for a frozen
    /// dense layer without an active adapter, else the two steps.
    pub fn forward_gelu(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        {
            let inner = self.read();
            let active_lora = inner.lora.is_some() && !inner.merged;
            match &inner.base {
                Base::Frozen { weight, bias } | Base::Quantized { merged: Some(weight), bias, .. } if !active_lora => {
                    return ops::frozen_linear_gelu(x, weight, bias.as_ref(), Some(&inner.packs));
                }
                _ => {}
            }
        }
        ops::gelu_erf(&self.forward(x, train)?)
    }

    /// `s·B·A` (out, in), or `None` without an adapter.
    pub fn delta_weight(&self) -> Result<Option<Tensor>> {
        match &self.read().lora {
            None => Ok(None),
            Some(l) => Ok(Some(delta(l)?)),
        }
    }

    /// Folds the update into `W`. Errors if already merged or without adapter.
    pub fn merge(&self) -> Result<()> {
        let mut inner = self.write();
        if inner.merged {
            return Err(CoreError::State(format!("{}: adapter already merged", inner.path)));
        }
        let d = match &inner.lora {
            None => return Err(CoreError::State(format!("{}: no adapter to merge", inner.path))),
            Some(l) => delta(l)?,
        };
        match &mut inner.base {
            Base::Frozen { weight, .. } => *weight = (&*weight + d)?,
            Base::Quantized { weight, merged, .. } => {
                *merged = Some((weight.dequantize(&weight.device())? + d)?)
            }
            Base::Trainable { .. } => {}
        }
        inner.packs = crate::amx::Packs::new();
        inner.merged = true;
        Ok(())
    }

    /// Subtracts the update from `W` again.
    pub fn unmerge(&self) -> Result<()> {
        let mut inner = self.write();
        if !inner.merged {
            return Err(CoreError::State(format!("{}: adapter is not merged", inner.path)));
        }
        let d = match &inner.lora {
            None => return Err(CoreError::State(format!("{}: no adapter to unmerge", inner.path))),
            Some(l) => delta(l)?,
        };
        match &mut inner.base {
            Base::Frozen { weight, .. } => *weight = (&*weight - d)?,
            Base::Quantized { merged, .. } => *merged = None,
            Base::Trainable { .. } => {}
        }
        inner.packs = crate::amx::Packs::new();
        inner.merged = false;
        Ok(())
    }
}

fn check_fit(path: &str, lora: &LoraWeights, out_f: usize, in_f: usize) -> Result<()> {
    let (r, a_in) = lora.a.as_tensor().dims2()?;
    let (b_out, b_r) = lora.b.as_tensor().dims2()?;
    if a_in != in_f || b_out != out_f || b_r != r {
        return Err(CoreError::State(format!(
            "{path}: lora_A {:?} / lora_B {:?} do not fit a {out_f}x{in_f} layer",
            lora.a.as_tensor().dims(),
            lora.b.as_tensor().dims()
        )));
    }
    Ok(())
}

fn delta(l: &LoraWeights) -> candle_core::Result<Tensor> {
    (l.b.as_tensor().matmul(l.a.as_tensor())? * l.scaling)?.detach().contiguous()
}

/// `(x·Aᵀ·s)·Bᵀ` over the last dim of `x`; the scaling is applied on the
/// r-wide intermediate, the cheapest place.
fn lora_branch(x: &Tensor, l: &LoraWeights) -> candle_core::Result<Tensor> {
    let dims = x.dims().to_vec();
    let in_f = *dims.last().unwrap_or(&0);
    let x2 = x.reshape(((), in_f))?;
    let h = (x2.matmul(&param(&l.a).t()?)? * l.scaling)?;
    let y = h.matmul(&param(&l.b).t()?)?;
    let mut out = dims;
    *out.last_mut().expect("rank >= 1") = y.dim(1)?;
    y.reshape(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn rand(shape: &[usize]) -> Tensor {
        Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()
    }

    fn layer(r: usize) -> Linear {
        let w = rand(&[6, 5]);
        let b = rand(&[6]);
        let lora = LoraWeights {
            a: Var::from_tensor(&rand(&[r, 5])).unwrap(),
            b: Var::from_tensor(&rand(&[6, r])).unwrap(),
            scaling: 2.0,
            dropout: 0.0,
        };
        Linear::with_lora("m", w, Some(b), lora).unwrap()
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    /// At f32 the forward reads the layer's transposed weight copy: values
    /// equal the plain matmul (1e-5 of the largest entry), the copy is made
    /// once, merge drops it with the old weight, and the merged layer uses a
    /// fresh copy of the new one.
    #[test]
    fn f32_forward_on_the_weight_panels_matches_matmul() {
        let (m, out_f, in_f, r) = (70, 96, 80, 4);
        let w = rand(&[out_f, in_f]);
        let bias = rand(&[out_f]);
        let lora = LoraWeights {
            a: Var::from_tensor(&rand(&[r, in_f])).unwrap(),
            b: Var::from_tensor(&rand(&[out_f, r])).unwrap(),
            scaling: 2.0,
            dropout: 0.0,
        };
        let l = Linear::with_lora("m", w.clone(), Some(bias.clone()), lora.clone()).unwrap();
        let x = rand(&[2, m / 2, in_f]);
        let delta = (lora.b.as_tensor().matmul(lora.a.as_tensor()).unwrap() * 2.0).unwrap();
        let want = |w: &Tensor| x.broadcast_matmul(&w.t().unwrap()).unwrap().broadcast_add(&bias).unwrap();
        let scale = |t: &Tensor| t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let y = l.forward(&x, false).unwrap();
        let full = (&w + &delta).unwrap();
        assert!(max_abs(&y, &want(&full)) < 1e-5 * scale(&y), "unmerged layer vs x·(W+ΔW)ᵀ+b");
        assert_eq!(l.read().packs.f32_bytes(), out_f * in_f * 4, "one panel copy of W");
        l.forward(&x, false).unwrap();
        assert_eq!(l.read().packs.f32_bytes(), out_f * in_f * 4, "made once");
        l.merge().unwrap();
        assert_eq!(l.read().packs.f32_bytes(), 0, "merge drops the copy of the old weight");
        let ym = l.forward(&x, false).unwrap();
        assert!(max_abs(&ym, &want(&full)) < 1e-5 * scale(&ym), "merged layer reads a copy of the merged weight");
        // A frozen layer without adapter (FrozenLinear) takes the same path.
        let f = Linear::frozen("f", w.clone(), None);
        let yf = f.forward(&x, false).unwrap();
        let wantf = x.broadcast_matmul(&w.t().unwrap()).unwrap();
        assert!(max_abs(&yf, &wantf) < 1e-5 * scale(&yf));
        assert_eq!(f.read().packs.f32_bytes(), out_f * in_f * 4);
    }

    /// The layer at bf16 matmul precision against itself at f32: values and
    /// every gradient within the bf16 bound, packs made once and dropped on
    /// merge, frozen weight untouched.
    #[test]
    fn bf16_precision_matches_f32_within_bound() {
        use crate::amx::{available, with_matmul_precision, MatmulPrecision};
        if !available() {
            eprintln!("skipped: no AMX-BF16 here");
            return;
        }
        let (m, out_f, in_f, r) = (70, 96, 80, 4);
        let w = rand(&[out_f, in_f]);
        let w_before = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let lora = LoraWeights {
            a: Var::from_tensor(&rand(&[r, in_f])).unwrap(),
            b: Var::from_tensor(&rand(&[out_f, r])).unwrap(),
            scaling: 2.0,
            dropout: 0.0,
        };
        let l = Linear::with_lora("m", w, Some(rand(&[out_f])), lora.clone()).unwrap();
        let x = Var::from_tensor(&rand(&[2, m / 2, in_f])).unwrap();
        let g = rand(&[2, m / 2, out_f]);
        let run = |p| {
            with_matmul_precision(p, || {
                let y = l.forward(x.as_tensor(), true).unwrap();
                let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
                let get = |t: &Tensor| grads.get(t).expect("gradient reaches it").clone();
                (y, get(x.as_tensor()), get(lora.a.as_tensor()), get(lora.b.as_tensor()))
            })
            .unwrap()
        };
        let (y32, dx32, da32, db32) = run(MatmulPrecision::F32);
        assert_eq!(l.read().packs.bytes(), 0, "f32 makes no packs");
        let (y16, dx16, da16, db16) = run(MatmulPrecision::Bf16);
        let packed = l.read().packs.bytes();
        let pad = |v: usize, to: usize| v.div_ceil(to) * to;
        let want = 2 * (pad(in_f, 32) * pad(out_f, 16) + pad(out_f, 32) * pad(in_f, 16));
        assert_eq!(packed, want, "forward and backward packs, bf16, K padded to 32 and N to 16");
        // Relative to the largest entry: the bf16 bound 2^-7·Σ|x·w| is a few
        // percent of it for these Gaussian sizes; typical errors are ~0.3%.
        let rel = |a: &Tensor, b: &Tensor| max_abs(a, b) / b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        for (name, a, b) in [("y", &y16, &y32), ("dx", &dx16, &dx32), ("dA", &da16, &da32), ("dB", &db16, &db32)] {
            let e = rel(a, b);
            assert!(e < 2e-2, "{name}: bf16 vs f32 relative error {e}");
            // dA and dB do not pass through W in a single layer (the output
            // gradient is given), so only y and dx show the bf16 path.
            assert!(e > 0.0 || name == "dA" || name == "dB", "{name}: bf16 path not taken (identical to f32)");
        }
        // A second pass reuses the packs.
        run(MatmulPrecision::Bf16);
        assert_eq!(l.read().packs.bytes(), packed);
        l.merge().unwrap();
        assert_eq!(l.read().packs.bytes(), 0, "merge drops the packs of the old weight");
        let ym = with_matmul_precision(MatmulPrecision::Bf16, || l.forward(x.as_tensor(), false).unwrap()).unwrap();
        assert!(rel(&ym, &y32) < 2e-2);
        l.unmerge().unwrap();
        let w_after = l.weight().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let drift = w_before.iter().zip(&w_after).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(drift < 1e-5, "frozen weight moved by {drift} (merge round trip only)");
    }

    /// The fused bf16 linear+GELU equals the two-step bf16 path exactly
    /// (values and input gradient), and the f32 path within the bf16 bound.
    /// The f32 fused linear+GELU (bias and GELU in place on the GEMM's
    /// output, gelu' kept for the backward) against the two ops: the same
    /// values and input gradient up to the order the bias is summed in
    /// (1e-6 relative), a second backward pass over the same graph
    /// (recomputed from the input) too, and the no-grad path bit for bit.
    #[test]
    fn fused_gelu_f32_equals_two_steps() {
        for bias in [Some(rand(&[72])), None] {
            fused_gelu_f32_case(Linear::frozen("i", rand(&[72, 40]), bias));
        }
    }

    fn fused_gelu_f32_case(l: Linear) {
        let x = Var::from_tensor(&rand(&[3, 11, 40])).unwrap();
        let g = rand(&[3, 11, 72]);
        let run = |fused: bool| {
            let y = if fused { l.forward_gelu(x.as_tensor(), true) } else { ops::gelu_erf(&l.forward(x.as_tensor(), true).unwrap()) }.unwrap();
            let loss = (&y * &g).unwrap().sum_all().unwrap();
            let dx = loss.backward().unwrap().get(x.as_tensor()).unwrap().clone();
            let dx2 = loss.backward().unwrap().get(x.as_tensor()).unwrap().clone();
            (y, dx, dx2)
        };
        let (y_f, dx_f, dx2_f) = run(true);
        let (y_2, dx_2, _) = run(false);
        let scale = |t: &Tensor| t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(max_abs(&y_f, &y_2) <= 1e-6 * scale(&y_2), "values differ by {}", max_abs(&y_f, &y_2));
        assert!(max_abs(&dx_f, &dx_2) <= 1e-6 * scale(&dx_2), "gradients differ by {}", max_abs(&dx_f, &dx_2));
        assert!(max_abs(&dx2_f, &dx_2) <= 1e-6 * scale(&dx_2));
        assert!(dx_f.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
        let _ng = crate::no_grad();
        let y_ng = l.forward_gelu(&x.as_tensor().detach(), false).unwrap();
        assert_eq!(max_abs(&y_ng, &y_f), 0.0);
    }

    #[test]
    fn fused_gelu_equals_two_steps() {
        use crate::amx::{available, with_matmul_precision, MatmulPrecision};
        if !available() {
            eprintln!("skipped: no AMX-BF16 here");
            return;
        }
        let l = Linear::frozen("i", rand(&[72, 40]), Some(rand(&[72])));
        let x = Var::from_tensor(&rand(&[3, 11, 40])).unwrap();
        let g = rand(&[3, 11, 72]);
        let run = |p, fused: bool| {
            with_matmul_precision(p, || {
                let y = if fused { l.forward_gelu(x.as_tensor(), true) } else { ops::gelu_erf(&l.forward(x.as_tensor(), true).unwrap()) }.unwrap();
                let dx = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap().get(x.as_tensor()).unwrap().clone();
                (y, dx)
            })
            .unwrap()
        };
        let (y_f, dx_f) = run(MatmulPrecision::Bf16, true);
        let (y_2, dx_2) = run(MatmulPrecision::Bf16, false);
        assert_eq!(max_abs(&y_f, &y_2), 0.0);
        assert_eq!(max_abs(&dx_f, &dx_2), 0.0);
        let (y32, dx32) = run(MatmulPrecision::F32, true);
        let scale = |t: &Tensor| t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(max_abs(&y_f, &y32) / scale(&y32) < 2e-2);
        assert!(max_abs(&dx_f, &dx32) / scale(&dx32) < 2e-2);
        assert!(max_abs(&y_f, &y32) > 0.0, "bf16 path not taken");
        // Without a gradient-tracking input nothing is kept, values equal.
        let _ng = crate::no_grad();
        let y_ng = with_matmul_precision(MatmulPrecision::Bf16, || l.forward_gelu(&x.as_tensor().detach(), false).unwrap()).unwrap();
        assert_eq!(max_abs(&y_ng, &y_f), 0.0);
    }

    #[test]
    fn forward_matches_formula_and_merge_roundtrips() {
        let l = layer(3);
        let x = rand(&[2, 4, 5]);
        let y = l.forward(&x, false).unwrap();
        let lw = l.lora().unwrap();
        let w_eff = (l.weight().unwrap() + (lw.b.as_tensor().matmul(lw.a.as_tensor()).unwrap() * 2.0).unwrap()).unwrap();
        let expect = ops::linear_reference(&x, &w_eff, l.bias().as_ref()).unwrap();
        assert!(max_abs(&y, &expect) < 1e-4);

        let w0 = l.weight().unwrap();
        l.merge().unwrap();
        assert!(l.merge().is_err());
        let ym = l.forward(&x, false).unwrap();
        assert!(max_abs(&y, &ym) < 1e-4);
        assert!(l.forward(&x, true).is_err(), "training while merged must fail");
        l.unmerge().unwrap();
        assert!(l.unmerge().is_err());
        assert!(max_abs(&w0, &l.weight().unwrap()) < 1e-6);
    }

    #[test]
    fn gradients_reach_a_and_b_only() {
        let l = layer(2);
        let x = rand(&[3, 5]);
        let y = l.forward(&x, true).unwrap();
        let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let lw = l.lora().unwrap();
        for v in [&lw.a, &lw.b] {
            let gv = g.get(v.as_tensor()).expect("gradient missing");
            let n: f32 = gv.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
            assert!(n > 0.0);
        }
        assert!(g.get(&l.weight().unwrap()).is_none());
    }

    #[test]
    fn no_grad_records_no_graph() {
        let l = layer(2);
        let x = rand(&[3, 5]);
        let y = l.forward(&x, false).unwrap();
        assert!(y.track_op());
        let y2 = {
            let _g = no_grad();
            l.forward(&x, false).unwrap()
        };
        assert!(!y2.track_op());
        assert!(max_abs(&y, &y2) < 1e-6);
        assert!(l.forward(&x, false).unwrap().track_op(), "the guard re-enables gradients");
    }

    #[test]
    fn config_validation() {
        let mut c = LoraConfig { r: 0, ..Default::default() };
        assert!(c.validate().is_err());
        c.r = 4;
        c.dropout = 1.0;
        assert!(c.validate().is_err());
        assert!((scaling(16.0, 4, true) - 8.0).abs() < 1e-12);
        assert!((scaling(16.0, 4, false) - 4.0).abs() < 1e-12);
    }
}
