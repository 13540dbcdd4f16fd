//! The fused LoRA linear layer: `y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ` as one op.
//!
//! Unfused, the branch is six graph nodes (dropout, two matmuls, a scaling,
//! a reshape and an add) and twice as many in the backward pass, each a
//! parallel region and a fresh allocation; on MiniLM's 384-wide layers
//! those cost more than the rank-8 products themselves. Here the branch
//! accumulates straight into the base layer's output buffer, the dropout
//! mask is recomputed from its seed instead of stored (the same 32-bit hash
//! as [`crate::ops::dropout`], so both paths draw identical masks), and only
//! the `M×r` intermediate `s·dropout(x)·Aᵀ` is kept for the backward pass.
//!
//! The backward pass returns `dx = g·W + dropout'(s·(g·B)·A)`,
//! `dA = s·(g·B)ᵀ·dropout(x)` and `dB = gᵀ·(s·dropout(x)·Aᵀ)`; the frozen
//! `W` and `b` get no gradient. [`lora_linear_reference`] builds the same
//! layer from candle primitives and the standalone ops; the tests check
//! values and all three gradients against it.

use crate::ops::{dropout, f32_slice, frozen_linear, input_grad, kept_apply_par, kept_masked_new, linear_rows_acc, lora_down, lora_down_dropped, masked_new, next_dropout_seed, rank_update_new, sgemm, sgemm_new, transpose_par, with_f32, KeptMask};
use crate::simd::Mask;
use crate::FrozenWeight;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

struct LoraLinear {
    /// (out, in); frozen. Dense is contiguous; a quantized weight is
    /// dequantized one matrix at a time inside each pass and dropped.
    weight: FrozenWeight,
    /// (out,), contiguous; frozen.
    bias: Option<Tensor>,
    scaling: f32,
    dropout: Option<Mask>,
    /// Keep `s·dropout(x)·Aᵀ` (M×r) for the backward pass.
    keep: bool,
    saved: std::sync::Mutex<Option<Vec<f32>>>,
    /// The forward's dropout mask as keep bits, for the backward pass.
    kept: std::sync::Mutex<Option<KeptMask>>,
    /// The layer's bf16 tile packs of a dense weight (bf16 matmul precision).
    packs: Option<std::sync::Arc<crate::amx::Packs>>,
}

struct Dims {
    m: usize,
    in_f: usize,
    out_f: usize,
    r: usize,
}

impl LoraLinear {
    fn dense_weight(&self) -> Result<Tensor> {
        match &self.weight {
            FrozenWeight::Dense(w) => Ok(w.clone()),
            FrozenWeight::Quantized(q) => crate::ops_decoder::dequantized(q),
        }
    }

    fn dims(&self, xl: &Layout, al: &Layout, bl: &Layout) -> Result<Dims> {
        let (out_f, in_f) = self.weight.dims2().map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let (r, a_in) = al.shape().dims2()?;
        let (b_out, b_r) = bl.shape().dims2()?;
        let k = *xl.dims().last().unwrap_or(&0);
        if k != in_f || a_in != in_f || b_out != out_f || b_r != r {
            candle_core::bail!(
                "lora-linear: input (…, {k}), lora_A ({r}, {a_in}), lora_B ({b_out}, {b_r}) do not fit a {out_f}x{in_f} layer"
            )
        }
        Ok(Dims { m: xl.shape().elem_count() / in_f.max(1), in_f, out_f, r })
    }

    /// `s·xd·Aᵀ` (M×r) for the dropped input `xd`.
    fn branch_in(&self, z: &Dims, xd: &[f32], a: &[f32]) -> Vec<f32> {
        lora_down(z.m, z.in_f, z.r, xd, a, self.scaling)
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, as_: &CpuStorage, al: &Layout, bs: &CpuStorage, bl: &Layout) -> Result<(CpuStorage, Shape)> {
        let z = self.dims(xl, al, bl)?;
        let x = f32_slice(xs, xl, "lora-linear")?;
        let a = f32_slice(as_, al, "lora-linear")?;
        let b = f32_slice(bs, bl, "lora-linear")?;
        // The branch's down-projection reads x through the dropout mask
        // tile by tile (no dropped copy of x); with a gradient to come the
        // mask's keep bits are kept for the backward pass.
        let h = match &self.dropout {
            Some(dm) if self.keep && crate::ops::record_masks() => {
                let mut bits = vec![0u64; crate::simd::bit_words(z.m * z.in_f)];
                let h = lora_down_dropped(z.m, z.in_f, z.r, x, a, self.scaling, Some(dm), Some(&mut bits));
                *self.kept.lock().unwrap_or_else(|e| e.into_inner()) = Some(KeptMask { bits, scale: dm.scale });
                h
            }
            drop => lora_down_dropped(z.m, z.in_f, z.r, x, a, self.scaling, drop.as_ref(), None),
        };
        // dst = b + h·Bᵀ, then dst += x·Wᵀ: the branch's output is written
        // where the bias broadcast would be, so it adds no pass over dst.
        let mut dst = match &self.bias {
            Some(bias) => with_f32(bias, "lora-linear", |bv| rank_update_new(z.m, z.out_f, z.r, &h, b, Some(bv)))?,
            None => rank_update_new(z.m, z.out_f, z.r, &h, b, None),
        };
        linear_rows_acc(x, &self.dense_weight()?, self.packs.as_deref(), &mut dst, "lora-linear")?;
        if self.keep {
            *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(h);
        }
        let mut out_dims = xl.dims().to_vec();
        *out_dims.last_mut().expect("rank >= 1") = z.out_f;
        Ok((CpuStorage::F32(dst), Shape::from(out_dims)))
    }

    fn bwd(&self, x: &Tensor, a: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let (x, a, b) = (x.contiguous()?, a.contiguous()?, b.contiguous()?);
        let z = self.dims(x.layout(), a.layout(), b.layout())?;
        let need_dx = x.track_op();
        let (mut dx, mut da, mut db) = (Vec::new(), Vec::new(), Vec::new());
        with_f32(&x, "lora-linear-bwd", |xv| {
            with_f32(&a, "lora-linear-bwd", |av| {
                with_f32(&b, "lora-linear-bwd", |bv| {
                    with_f32(&g, "lora-linear-bwd", |gv| {
                        with_f32(&self.dense_weight()?, "lora-linear-bwd", |w| {
                            // The forward's mask from its keep bits, or drawn again
                            // (a second backward pass over the same graph).
                            let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner()).take().filter(|k| k.fits(xv.len()));
                            let xd = match (&self.dropout, &kept) {
                                (Some(_), Some(k)) => Some(kept_masked_new(k, xv)),
                                (Some(dm), None) => Some(masked_new(dm, xv)),
                                (None, _) => None,
                            };
                            let xe = xd.as_deref().unwrap_or(xv);
                            let h = self.saved.lock().unwrap_or_else(|e| e.into_inner()).take();
                            let h = h.unwrap_or_else(|| self.branch_in(&z, xe, av));
                            // dB = gᵀ·h (out×r): lhs gᵀ element (o, i) at g[i*out + o].
                            db = sgemm_new(z.out_f, z.r, z.m, gv, 1, z.out_f, &h, z.r, 1, 1.0);
                            // gb = s·g·B (M×r) = s·g·(Bᵀ)ᵀ: the down-projection's shape.
                            let gb = lora_down(z.m, z.out_f, z.r, gv, &transpose_par(bv, z.out_f, z.r), self.scaling);
                            // dA = gbᵀ·dropout(x) (r×in).
                            da = sgemm_new(z.r, z.in_f, z.m, &gb, 1, z.r, xe, z.in_f, 1, 1.0);
                            drop(xd);
                            if need_dx {
                                // dx = g·W (M×in), W (out×in) row-major.
                                dx = input_grad(z.m, gv, w, z.out_f, z.in_f, self.packs.as_deref());
                                // + dropout'(gb·A), A (r×in) row-major.
                                match &self.dropout {
                                    Some(dm) => {
                                        let t = sgemm_new(z.m, z.in_f, z.r, &gb, z.r, 1, av, z.in_f, 1, 1.0);
                                        match &kept {
                                            Some(k) => kept_apply_par(k, &t, &mut dx, true),
                                            None => dm.apply_par(&t, &mut dx, true),
                                        }
                                    }
                                    None => sgemm(z.m, z.in_f, z.r, &mut dx, true, &gb, z.r, 1, av, z.in_f, 1),
                                }
                            }
                        })
                    })
                })
            })
        })?????;
        let dev = x.device();
        let dx = if need_dx { Some(Tensor::from_vec(dx, x.shape(), dev)?) } else { None };
        Ok((dx, Some(Tensor::from_vec(da, a.shape(), dev)?), Some(Tensor::from_vec(db, b.shape(), dev)?)))
    }
}

/// Whether [`lora_linear`] falls back to [`lora_linear_reference`]
/// (`LORA_REFERENCE_LINEAR=1`, for A/B runs).
pub(crate) fn reference_requested() -> bool {
    static FLAG: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FLAG.get_or_init(|| std::env::var("LORA_REFERENCE_LINEAR").is_ok_and(|v| v == "1"))
}

/// `x·Wᵀ + b + s·dropout(x)·Aᵀ·Bᵀ` over the last dim of `x`, with `W`, `b`
/// frozen and `A` (r×in), `B` (out×r) trainable. `p` is the LoRA dropout,
/// applied only when `train`.
pub fn lora_linear(x: &Tensor, weight: &FrozenWeight, bias: Option<&Tensor>, a: &Tensor, b: &Tensor, scaling: f64, p: f32, train: bool) -> Result<Tensor> {
    lora_linear_packed(x, weight, bias, a, b, scaling, p, train, None)
}

/// [`lora_linear`] with the layer's cache of bf16 tile packs of a dense
/// `weight` (used at bf16 matmul precision; dropped by the layer when the
/// weight changes).
#[allow(clippy::too_many_arguments)]
pub fn lora_linear_packed(x: &Tensor, weight: &FrozenWeight, bias: Option<&Tensor>, a: &Tensor, b: &Tensor, scaling: f64, p: f32, train: bool, packs: Option<&std::sync::Arc<crate::amx::Packs>>) -> Result<Tensor> {
    if !(0.0..1.0).contains(&p) {
        candle_core::bail!("dropout probability must be in [0, 1), got {p}")
    }
    let dense_cpu = match weight {
        FrozenWeight::Dense(w) => w.device().is_cpu() && w.dtype() == DType::F32,
        FrozenWeight::Quantized(q) => q.device().is_cpu(),
    };
    let cpu = dense_cpu && [x, a, b].iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32);
    if !cpu || reference_requested() {
        return lora_linear_reference(x, weight, bias, a, b, scaling, p, train);
    }
    let dropout = (train && p > 0.0).then(|| Mask::new(next_dropout_seed(), p));
    let keep = a.track_op() || b.track_op() || x.track_op();
    let packs = match weight {
        FrozenWeight::Dense(_) => packs,
        FrozenWeight::Quantized(_) => None,
    };
    let weight = match weight {
        FrozenWeight::Dense(w) => FrozenWeight::Dense(w.detach().contiguous()?),
        q => q.clone(),
    };
    let op = LoraLinear {
        weight,
        bias: bias.map(|t| t.detach().contiguous()).transpose()?,
        scaling: scaling as f32,
        dropout,
        keep,
        saved: Default::default(),
        kept: Default::default(),
        packs: packs.cloned(),
    };
    x.contiguous()?.apply_op3(&a.contiguous()?, &b.contiguous()?, op)
}

/// The same layer from the frozen-linear op, the dropout op and candle matmuls.
pub fn lora_linear_reference(x: &Tensor, weight: &FrozenWeight, bias: Option<&Tensor>, a: &Tensor, b: &Tensor, scaling: f64, p: f32, train: bool) -> Result<Tensor> {
    let y = match weight {
        FrozenWeight::Dense(w) => frozen_linear(x, w, bias)?,
        FrozenWeight::Quantized(q) => {
            let y = crate::ops_decoder::frozen_qlinear(x, q)?;
            match bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            }
        }
    };
    let h = if train && p > 0.0 { dropout(x, p)? } else { x.clone() };
    let dims = h.dims().to_vec();
    let in_f = *dims.last().unwrap_or(&0);
    let h2 = h.reshape(((), in_f))?;
    let u = (h2.matmul(&a.t()?)? * scaling)?.matmul(&b.t()?)?;
    let mut out = dims;
    *out.last_mut().expect("rank >= 1") = u.dim(1)?;
    y + u.reshape(out)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::set_dropout_seed;
    use crate::ops::tests::{max_abs, randn, DROPOUT_LOCK};
    use candle_core::Var;

    type Grads = [Tensor; 3];

    fn run(
        f: impl Fn(&Tensor, &FrozenWeight, Option<&Tensor>, &Tensor, &Tensor, f64, f32, bool) -> Result<Tensor>,
        x: &Var,
        w: &FrozenWeight,
        bias: Option<&Tensor>,
        a: &Var,
        b: &Var,
        p: f32,
        seed: u64,
    ) -> (Tensor, Grads) {
        set_dropout_seed(seed);
        let y = f(x.as_tensor(), w, bias, a.as_tensor(), b.as_tensor(), 2.0, p, true).unwrap();
        // A loss that weights every output differently.
        let wts = Tensor::arange(0f32, y.elem_count() as f32, &candle_core::Device::Cpu).unwrap().reshape(y.shape()).unwrap();
        let wts = (wts * 0.01).unwrap().sin().unwrap();
        let g = (y.clone() * wts).unwrap().sum_all().unwrap().backward().unwrap();
        let grads = [x, a, b].map(|v| g.get(v.as_tensor()).expect("gradient missing").clone());
        (y, grads)
    }

    #[test]
    fn fused_matches_reference_values_and_gradients() {
        let _lock = DROPOUT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        // One parallel chunk, then several with a short last one (the bias +
        // rank-update pass works in tasks of 16384/out rows; 3·150 = 450 rows
        // of 100 outputs are 3 tasks of 163 rows).
        check_at(3, 7, 24, 20, 4);
        check_at(3, 150, 40, 100, 8);
        // Rank above 16: the GEMM path, on a materialised dropped input.
        check_at(2, 9, 30, 12, 20);
    }

    fn check_at(bt: usize, t: usize, inf: usize, outf: usize, r: usize) {
        let x = Var::from_tensor(&randn(&[bt, t, inf], 1)).unwrap();
        let w = FrozenWeight::Dense(randn(&[outf, inf], 2));
        let bias = randn(&[outf], 3);
        let a = Var::from_tensor(&randn(&[r, inf], 4)).unwrap();
        let b = Var::from_tensor(&randn(&[outf, r], 5)).unwrap();
        for (p, with_bias) in [(0.0, true), (0.3, true), (0.3, false)] {
            let bias = with_bias.then_some(&bias);
            let (y1, g1) = run(lora_linear, &x, &w, bias, &a, &b, p, 11);
            let (y2, g2) = run(lora_linear_reference, &x, &w, bias, &a, &b, p, 11);
            // 1e-4 of the largest entry (at least 1e-4): sums over up to 450
            // rows reach ~10² here, where f32 reordering alone moves ~1e-5·|sum|.
            let tol = |t: &Tensor| 1e-4 * t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1.0);
            assert!(max_abs(&y1, &y2) < tol(&y2), "p={p}: values differ by {}", max_abs(&y1, &y2));
            for (name, (u, v)) in ["dx", "dA", "dB"].iter().zip(g1.iter().zip(g2.iter())) {
                let d = max_abs(u, v);
                assert!(d < tol(v), "p={p} bias={with_bias}: {name} differs by {d} (largest entry {})", tol(v) * 1e4);
                let n: f32 = u.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
                assert!(n > 0.0, "{name} is zero");
            }
        }
        // Dropout really drops: another seed gives other values.
        let (y1, _) = run(lora_linear, &x, &w, None, &a, &b, 0.5, 11);
        let (y2, _) = run(lora_linear, &x, &w, None, &a, &b, 0.5, 12);
        assert!(max_abs(&y1, &y2) > 1e-3);
    }

    #[test]
    fn recompute_path_and_frozen_input() {
        let _lock = DROPOUT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        // x a plain tensor: no dx, the saved intermediate still serves dA/dB.
        let x = randn(&[5, 12], 6);
        let w = FrozenWeight::Dense(randn(&[8, 12], 7));
        let a = Var::from_tensor(&randn(&[3, 12], 8)).unwrap();
        let b = Var::from_tensor(&randn(&[8, 3], 9)).unwrap();
        set_dropout_seed(3);
        let y = lora_linear(&x, &w, None, a.as_tensor(), b.as_tensor(), 0.5, 0.2, true).unwrap();
        let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        set_dropout_seed(3);
        let y2 = lora_linear_reference(&x, &w, None, a.as_tensor(), b.as_tensor(), 0.5, 0.2, true).unwrap();
        let g2 = y2.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&a, &b] {
            let d = max_abs(g.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
            assert!(d < 1e-3, "gradient differs by {d}");
        }
        assert!(g.get(&x).is_none());
        // A second backward over the same graph recomputes the intermediate.
        let g3 = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&a, &b] {
            assert!(max_abs(g.get(v.as_tensor()).unwrap(), g3.get(v.as_tensor()).unwrap()) < 1e-5);
        }
    }
}
