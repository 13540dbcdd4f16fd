//! `LayerNorm(dropout(y) + residual)` as one op: the end of every BERT
//! sub-layer. Unfused it is three graph nodes (dropout, add, LayerNorm),
//! three parallel regions and three buffers each way; here one pass forward
//! and one backward, which returns the same gradient to the residual and its
//! masked copy to `y`. The dropout mask is the one [`crate::ops::dropout`]
//! would draw from the same seed, so [`add_dropout_layer_norm_reference`]
//! (the unfused ops) gives the same values; the tests check both gradients
//! against it.

use crate::ops::{copy_par, dropout, f32_slice, kept_masked_new, layer_norm, masked_new, next_dropout_seed, par_new, par_new_copy, rows_per_task, with_f32, KeptMask, SendPtr};
use crate::simd::{self, Mask};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

struct AddDropoutNorm {
    gamma: Tensor,
    beta: Tensor,
    eps: f32,
    mask: Option<Mask>,
    /// Keep the normalised input `z = dropout(y) + residual` for the backward pass.
    keep: bool,
    saved: std::sync::Mutex<Option<Vec<f32>>>,
    /// The forward's dropout keep bits (with `saved`), for the backward pass.
    kept: std::sync::Mutex<Option<KeptMask>>,
}

/// Elements per parallel chunk of the sum (a multiple of 64: whole words of keep bits).
const SUM_CHUNK: usize = 16384;

impl AddDropoutNorm {
    /// `z = dropout(y) + residual`, in parallel chunks of whole rows.
    fn sum(&self, y: &[f32], r: &[f32]) -> Vec<f32> {
        par_new_copy(r, SUM_CHUNK, |s, z| {
            let y = &y[s..s + z.len()];
            match &self.mask {
                Some(m) => m.apply(s as u64, y, z, true),
                None => {
                    for (a, b) in z.iter_mut().zip(y) {
                        *a += b;
                    }
                }
            }
        })
    }

    /// [`Self::sum`] that also records the dropout mask's keep bits.
    fn sum_recording(&self, m: &Mask, y: &[f32], r: &[f32]) -> (Vec<f32>, KeptMask) {
        let mut bits = vec![0u64; simd::bit_words(r.len())];
        let bp = SendPtr(bits.as_mut_ptr());
        let z = par_new_copy(r, SUM_CHUNK, |s, z| {
            // SAFETY: chunk s/SUM_CHUNK owns words s/64 .. s/64 + ⌈len/64⌉ of `bits`.
            let b = unsafe { std::slice::from_raw_parts_mut(bp.get().add(s / 64), simd::bit_words(z.len())) };
            m.apply_recording(s as u64, &y[s..s + z.len()], z, true, b);
        });
        (z, KeptMask { bits, scale: m.scale })
    }
}

impl CustomOp2 for AddDropoutNorm {
    fn name(&self) -> &'static str {
        "add-dropout-layer-norm"
    }

    fn cpu_fwd(&self, ys: &CpuStorage, yl: &Layout, rs: &CpuStorage, rl: &Layout) -> Result<(CpuStorage, Shape)> {
        if yl.dims() != rl.dims() {
            candle_core::bail!("add-dropout-layer-norm: input {:?} and residual {:?} differ", yl.dims(), rl.dims())
        }
        let y = f32_slice(ys, yl, "add-dropout-layer-norm")?;
        let r = f32_slice(rs, rl, "add-dropout-layer-norm")?;
        let h = yl.dims().last().copied().unwrap_or(1);
        let z = match &self.mask {
            Some(m) if self.keep && crate::ops::record_masks() => {
                let (z, kept) = self.sum_recording(m, y, r);
                *self.kept.lock().unwrap_or_else(|e| e.into_inner()) = Some(kept);
                z
            }
            _ => self.sum(y, r),
        };
        let chunk = h * rows_per_task(h);
        let dst = with_f32(&self.gamma, "add-dropout-layer-norm", |g| {
            with_f32(&self.beta, "add-dropout-layer-norm", |b| par_new(z.len(), chunk, |s, d| simd::layer_norm_rows(&z[s..s + d.len()], g, b, self.eps, d, h)))
        })??;
        if self.keep {
            *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(z);
        }
        Ok((CpuStorage::F32(dst), yl.shape().clone()))
    }

    fn bwd(&self, y: &Tensor, r: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let h = y.dims().last().copied().unwrap_or(1);
        let g = grad.contiguous()?;
        let z = match self.saved.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(z) => z,
            None => {
                let (y, r) = (y.contiguous()?, r.contiguous()?);
                with_f32(&y, "add-dropout-layer-norm-bwd", |yv| with_f32(&r, "add-dropout-layer-norm-bwd", |rv| self.sum(yv, rv)))??
            }
        };
        let chunk = h * rows_per_task(h);
        let dz = with_f32(&g, "add-dropout-layer-norm-bwd", |gv| {
            with_f32(&self.gamma, "add-dropout-layer-norm-bwd", |gamma| par_new(z.len(), chunk, |s, d| simd::layer_norm_bwd_rows(&z[s..s + d.len()], &gv[s..s + d.len()], gamma, self.eps, d, h)))
        })??;
        drop(z);
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner()).take().filter(|k| k.fits(dz.len()));
        let dy = if y.track_op() {
            Some(match (&self.mask, &kept) {
                (Some(_), Some(k)) => Tensor::from_vec(kept_masked_new(k, &dz), y.shape(), y.device())?,
                (Some(m), None) => Tensor::from_vec(masked_new(m, &dz), y.shape(), y.device())?,
                (None, _) => Tensor::from_vec(copy_par(&dz), y.shape(), y.device())?,
            })
        } else {
            None
        };
        let dr = if r.track_op() { Some(Tensor::from_vec(dz, r.shape(), r.device())?) } else { None };
        Ok((dy, dr))
    }
}

/// Whether [`add_dropout_layer_norm`] falls back to the unfused ops
/// (`LORA_REFERENCE_NORM=1`, for A/B runs).
fn reference_requested() -> bool {
    static FLAG: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FLAG.get_or_init(|| std::env::var("LORA_REFERENCE_NORM").is_ok_and(|v| v == "1"))
}

/// `LayerNorm(dropout(y) + residual)` over the last dim with frozen `gamma`,
/// `beta`; dropout `p` applies only when `train`.
pub fn add_dropout_layer_norm(y: &Tensor, residual: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64, p: f32, train: bool) -> Result<Tensor> {
    if !(0.0..1.0).contains(&p) {
        candle_core::bail!("dropout probability must be in [0, 1), got {p}")
    }
    let cpu = [y, residual].iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32);
    if !cpu || reference_requested() {
        return add_dropout_layer_norm_reference(y, residual, gamma, beta, eps, p, train);
    }
    let op = AddDropoutNorm {
        gamma: gamma.detach().contiguous()?,
        beta: beta.detach().contiguous()?,
        eps: eps as f32,
        mask: (train && p > 0.0).then(|| Mask::new(next_dropout_seed(), p)),
        keep: y.track_op() || residual.track_op(),
        saved: Default::default(),
        kept: Default::default(),
    };
    y.contiguous()?.apply_op2(&residual.contiguous()?, op)
}

/// The same from the standalone dropout and LayerNorm ops and candle's add.
pub fn add_dropout_layer_norm_reference(y: &Tensor, residual: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64, p: f32, train: bool) -> Result<Tensor> {
    let y = if train && p > 0.0 { dropout(y, p)? } else { y.clone() };
    layer_norm(&(y + residual)?, gamma, beta, eps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::set_dropout_seed;
    use crate::ops::tests::{max_abs, randn, DROPOUT_LOCK};
    use candle_core::Var;

    /// One chunk of rows, and several (the last one short): 3·70·200 = 42000
    /// elements in tasks of 81 rows.
    #[test]
    fn fused_matches_reference_values_and_gradients() {
        let _lock = DROPOUT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        check_at(3, 5, 40);
        check_at(3, 70, 200);
    }

    fn check_at(b: usize, t: usize, h: usize) {
        let y = Var::from_tensor(&randn(&[b, t, h], 1)).unwrap();
        let r = Var::from_tensor(&randn(&[b, t, h], 2)).unwrap();
        let gamma = randn(&[h], 3);
        let beta = randn(&[h], 4);
        let wts = randn(&[b, t, h], 5);
        type F = fn(&Tensor, &Tensor, &Tensor, &Tensor, f64, f32, bool) -> Result<Tensor>;
        let run = |f: F, p: f32| {
            set_dropout_seed(21);
            let out = f(y.as_tensor(), r.as_tensor(), &gamma, &beta, 1e-12, p, true).unwrap();
            let g = (out.clone() * &wts).unwrap().sum_all().unwrap().backward().unwrap();
            (out, g.get(y.as_tensor()).unwrap().clone(), g.get(r.as_tensor()).unwrap().clone())
        };
        for p in [0.0f32, 0.25] {
            let (o1, dy1, dr1) = run(add_dropout_layer_norm, p);
            let (o2, dy2, dr2) = run(add_dropout_layer_norm_reference, p);
            assert!(max_abs(&o1, &o2) < 1e-5, "p={p}: values differ by {}", max_abs(&o1, &o2));
            assert!(max_abs(&dy1, &dy2) < 1e-4, "p={p}: dy differs by {}", max_abs(&dy1, &dy2));
            assert!(max_abs(&dr1, &dr2) < 1e-4, "p={p}: dresidual differs by {}", max_abs(&dr1, &dr2));
        }
        // A frozen residual gets no gradient; y still does.
        let rc = randn(&[b, t, h], 2);
        set_dropout_seed(21);
        let out = add_dropout_layer_norm(y.as_tensor(), &rc, &gamma, &beta, 1e-12, 0.25, true).unwrap();
        let g = out.sum_all().unwrap().backward().unwrap();
        assert!(g.get(&rc).is_none() && g.get(y.as_tensor()).is_some());
        // Evaluation: no dropout.
        let e1 = add_dropout_layer_norm(y.as_tensor(), &rc, &gamma, &beta, 1e-12, 0.25, false).unwrap();
        let e2 = layer_norm(&(y.as_tensor() + &rc).unwrap(), &gamma, &beta, 1e-12).unwrap();
        assert!(max_abs(&e1, &e2) < 1e-6);
    }
}
