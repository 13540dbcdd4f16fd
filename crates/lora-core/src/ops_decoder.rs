//! Custom CPU ops of LLaMA-family decoders, each with an explicit backward pass
//! (candle's fused `rms_norm` and `rope` have none: they would silently cut the
//! graph): RMSNorm, rotary embeddings, the causal attention softmax, SwiGLU,
//! token cross-entropy with ignored positions, and the frozen *quantized* linear
//! layer of QLoRA, whose backward returns only `dx` through the 4-bit weight
//! without keeping a full-precision copy of it.
//!
//! Every op has a reference path built from candle primitives (`*_reference`),
//! which the tests use to check values and gradients.

use crate::ops::{f32_slice, fast_exp, sgemm_new, with_f32};
use crate::simd;
use candle_core::quantized::QTensor;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;
use std::sync::Arc;

// ---------------------------------------------------------------------------
// RMSNorm: y = x / sqrt(mean(x²) + eps) · γ, γ frozen.
// ---------------------------------------------------------------------------

struct RmsNorm {
    /// (h,), contiguous.
    gamma: Tensor,
    eps: f32,
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "rms-norm")?;
        let h = l.dims().last().copied().unwrap_or(1);
        let mut dst = vec![0f32; x.len()];
        with_f32(&self.gamma, "rms-norm", |g| {
            let chunk = h * crate::ops::rows_per_task(h);
            dst.par_chunks_mut(chunk).zip(x.par_chunks(chunk)).for_each(|(d, x)| simd::rms_norm_rows(x, g, self.eps, d, h))
        })?;
        Ok((CpuStorage::F32(dst), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let h = arg.dims().last().copied().unwrap_or(1);
        let x = arg.contiguous()?;
        let gr = grad.contiguous()?;
        let mut dx = vec![0f32; x.elem_count()];
        with_f32(&x, "rms-norm-bwd", |x| {
            with_f32(&gr, "rms-norm-bwd", |gr| {
                with_f32(&self.gamma, "rms-norm-bwd", |gamma| {
                    // dy' = g·γ; dx = r·(dy' − x̂·mean(dy'·x̂)), x̂ = x·r
                    let chunk = h * crate::ops::rows_per_task(h);
                    dx.par_chunks_mut(chunk)
                        .zip(x.par_chunks(chunk).zip(gr.par_chunks(chunk)))
                        .for_each(|(d, (x, g))| simd::rms_norm_bwd_rows(x, g, gamma, self.eps, d, h))
                })
            })
        })???;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// RMSNorm over the last dim with a frozen scale `gamma` (h,).
pub fn rms_norm(x: &Tensor, gamma: &Tensor, eps: f64) -> Result<Tensor> {
    if x.dtype() != DType::F32 || !x.device().is_cpu() {
        return rms_norm_reference(x, gamma, eps);
    }
    let op = RmsNorm { gamma: gamma.detach().contiguous()?, eps: eps as f32 };
    x.contiguous()?.apply_op1(op)
}

pub fn rms_norm_reference(x: &Tensor, gamma: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(&gamma.detach())
}

// ---------------------------------------------------------------------------
// Rotary embeddings (Hugging Face's rotate-half layout) on (B, T, H, D).
// ---------------------------------------------------------------------------

struct Rope {
    /// (T, D/2) for the positions of the T tokens, contiguous.
    cos: Tensor,
    sin: Tensor,
}

fn rope_apply(x: &[f32], dst: &mut [f32], cos: &[f32], sin: &[f32], t: usize, h: usize, d: usize, inverse: bool) {
    let half = d / 2;
    let sign = if inverse { -1.0f32 } else { 1.0 };
    dst.par_chunks_mut(h * d).zip(x.par_chunks(h * d)).enumerate().for_each(|(row, (dr, xr))| {
        let pos = row % t;
        let c = &cos[pos * half..(pos + 1) * half];
        let s = &sin[pos * half..(pos + 1) * half];
        for head in 0..h {
            let xo = &xr[head * d..(head + 1) * d];
            let o = &mut dr[head * d..(head + 1) * d];
            for i in 0..half {
                let (x1, x2) = (xo[i], xo[i + half]);
                let si = sign * s[i];
                o[i] = x1 * c[i] - x2 * si;
                o[i + half] = x2 * c[i] + x1 * si;
            }
        }
    });
}

impl Rope {
    fn run(&self, x: &[f32], dims: &[usize], inverse: bool) -> Result<Vec<f32>> {
        let (t, h, d) = (dims[1], dims[2], dims[3]);
        let mut dst = vec![0f32; x.len()];
        with_f32(&self.cos, "rope", |c| {
            with_f32(&self.sin, "rope", |s| rope_apply(x, &mut dst, c, s, t, h, d, inverse))
        })??;
        Ok(dst)
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "rope")?;
        let dims = l.dims();
        Ok((CpuStorage::F32(self.run(x, dims, false)?), l.shape().clone()))
    }

    /// The rotation is orthogonal: its transpose is the rotation by −θ.
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = grad.contiguous()?;
        let dx = with_f32(&g, "rope-bwd", |g| self.run(g, arg.dims(), true))??;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// Rotary embedding of `x` (B, T, H, D) with `cos`/`sin` (T, D/2) for the T
/// positions: `x1·cos − x2·sin ‖ x2·cos + x1·sin` on the two halves of D.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_b, t, _h, d) = x.dims4()?;
    if cos.dims() != [t, d / 2] || sin.dims() != [t, d / 2] || d % 2 != 0 {
        candle_core::bail!("rope: x {:?} needs cos/sin of shape [{t}, {}], got {:?}", x.dims(), d / 2, cos.dims())
    }
    if x.dtype() != DType::F32 || !x.device().is_cpu() {
        return rope_reference(x, cos, sin);
    }
    let op = Rope { cos: cos.detach().contiguous()?, sin: sin.detach().contiguous()? };
    x.contiguous()?.apply_op1(op)
}

pub fn rope_reference(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_b, t, _h, d) = x.dims4()?;
    let half = d / 2;
    let c = cos.reshape((1, t, 1, half))?;
    let s = sin.reshape((1, t, 1, half))?;
    let x1 = x.narrow(3, 0, half)?;
    let x2 = x.narrow(3, half, half)?;
    let o1 = (x1.broadcast_mul(&c)? - x2.broadcast_mul(&s)?)?;
    let o2 = (x2.broadcast_mul(&c)? + x1.broadcast_mul(&s)?)?;
    Tensor::cat(&[o1, o2], 3)
}

// ---------------------------------------------------------------------------
// Causal softmax for attention scores (B, H, Tq, Tk).
// ---------------------------------------------------------------------------

struct CausalSoftmax {
    /// Position of the first query among the keys (the KV-cache length).
    offset: usize,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "causal-softmax")?;
        let dims = l.dims();
        let (tq, tk) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        if self.offset + tq > tk {
            candle_core::bail!("causal-softmax: {tq} queries at offset {} need {} keys, got {tk}", self.offset, self.offset + tq)
        }
        let mut dst = vec![0f32; x.len()];
        dst.par_chunks_mut(tk).zip(x.par_chunks(tk)).enumerate().for_each(|(r, (d, row))| {
            let n = self.offset + r % tq + 1; // keys this query may see
            d[..n].copy_from_slice(&row[..n]);
            simd::softmax_inplace(&mut d[..n]);
        });
        Ok((CpuStorage::F32(dst), l.shape().clone()))
    }

    /// Masked entries are exactly 0 in the output, so the softmax backward
    /// gives them zero gradient too.
    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        crate::ops::Softmax.bwd(arg, res, grad)
    }
}

/// Softmax over the last dim of attention scores (…, Tq, Tk) where query `i`
/// sees keys `0..=offset+i` (masked entries are exactly 0).
pub fn causal_softmax(scores: &Tensor, offset: usize) -> Result<Tensor> {
    if scores.dtype() != DType::F32 || !scores.device().is_cpu() {
        // The same check as the CPU kernel's, so both paths reject a query
        // that would see no key (the reference would give a row of NaN).
        let (tq, tk) = match scores.dims() {
            [.., tq, tk] => (*tq, *tk),
            d => candle_core::bail!("causal-softmax: scores need at least 2 dims, got {d:?}"),
        };
        if offset + tq > tk {
            candle_core::bail!("causal-softmax: {tq} queries at offset {offset} need {} keys, got {tk}", offset + tq)
        }
        return causal_softmax_reference(scores, offset);
    }
    scores.contiguous()?.apply_op1(CausalSoftmax { offset })
}

pub fn causal_softmax_reference(scores: &Tensor, offset: usize) -> Result<Tensor> {
    let dims = scores.dims();
    let (tq, tk) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    let mask: Vec<f32> = (0..tq)
        .flat_map(|i| (0..tk).map(move |j| if j <= offset + i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    let mask = Tensor::from_vec(mask, (tq, tk), scores.device())?;
    crate::ops::softmax_reference(&scores.broadcast_add(&mask)?)
}

// ---------------------------------------------------------------------------
// SwiGLU: silu(g) · u.
// ---------------------------------------------------------------------------

struct SiluMul;


impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = f32_slice(s1, l1, "silu-mul")?;
        let u = f32_slice(s2, l2, "silu-mul")?;
        if l1.dims() != l2.dims() {
            candle_core::bail!("silu-mul: shapes {:?} and {:?} differ", l1.dims(), l2.dims())
        }
        let mut dst = vec![0f32; g.len()];
        dst.par_chunks_mut(4096).zip(g.par_chunks(4096).zip(u.par_chunks(4096))).for_each(|(d, (g, u))| simd::silu_mul_fwd(g, u, d));
        Ok((CpuStorage::F32(dst), l1.shape().clone()))
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (g, u, gr) = (a.contiguous()?, b.contiguous()?, grad.contiguous()?);
        let n = g.elem_count();
        let mut dg = vec![0f32; n];
        let mut du = vec![0f32; n];
        with_f32(&g, "silu-mul-bwd", |g| {
            with_f32(&u, "silu-mul-bwd", |u| {
                with_f32(&gr, "silu-mul-bwd", |gr| {
                    dg.par_chunks_mut(4096)
                        .zip(du.par_chunks_mut(4096))
                        .enumerate()
                        .for_each(|(c, (dgc, duc))| {
                            let o = c * 4096;
                            let e = o + dgc.len();
                            simd::silu_mul_bwd(&g[o..e], &u[o..e], &gr[o..e], dgc, duc)
                        })
                })
            })
        })???;
        Ok((
            Some(Tensor::from_vec(dg, a.shape(), a.device())?),
            Some(Tensor::from_vec(du, b.shape(), b.device())?),
        ))
    }
}

/// `silu(gate) · up`, elementwise (the SwiGLU of LLaMA's MLP).
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.dtype() != DType::F32 || !gate.device().is_cpu() {
        return silu_mul_reference(gate, up);
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul)
}

pub fn silu_mul_reference(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    candle_nn::ops::silu(gate)? * up
}

// ---------------------------------------------------------------------------
// Cross-entropy over tokens, ignoring targets < 0 (PyTorch's ignore_index=-100).
// ---------------------------------------------------------------------------

struct TokenCrossEntropy {
    targets: Arc<Vec<i64>>,
    n_valid: usize,
}

impl CustomOp1 for TokenCrossEntropy {
    fn name(&self) -> &'static str {
        "token-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "token-cross-entropy")?;
        let v = l.dims().last().copied().unwrap_or(1);
        let total: f64 = x
            .par_chunks(v)
            .zip(self.targets.par_iter())
            .filter(|(_, &t)| t >= 0)
            .map(|(row, &t)| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = row.iter().map(|&z| fast_exp(z - max)).sum();
                (max + sum.ln() - row[t as usize]) as f64
            })
            .sum();
        Ok((CpuStorage::F32(vec![(total / self.n_valid.max(1) as f64) as f32]), Shape::from(())))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let v = arg.dims().last().copied().unwrap_or(1);
        let scale = grad.to_dtype(DType::F32)?.to_scalar::<f32>()? / self.n_valid.max(1) as f32;
        let x = arg.contiguous()?;
        let mut dx = vec![0f32; x.elem_count()];
        with_f32(&x, "token-cross-entropy-bwd", |x| {
            dx.par_chunks_mut(v).zip(x.par_chunks(v).zip(self.targets.par_iter())).for_each(|(d, (row, &t))| {
                if t < 0 {
                    return;
                }
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                for i in 0..v {
                    d[i] = fast_exp(row[i] - max);
                }
                let inv = scale / d.iter().sum::<f32>();
                d.iter_mut().for_each(|z| *z *= inv);
                d[t as usize] -= scale;
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// Mean cross-entropy of `logits` (N, V) against `targets` (N entries; a
/// negative target is ignored, as PyTorch's `ignore_index=-100`). Returns the
/// scalar loss and the number of counted tokens. Errors when a target is ≥ V.
pub fn token_cross_entropy(logits: &Tensor, targets: &[i64]) -> Result<(Tensor, usize)> {
    let (n, v) = logits.dims2()?;
    if targets.len() != n {
        candle_core::bail!("cross-entropy: {n} rows of logits but {} targets", targets.len())
    }
    if let Some(t) = targets.iter().find(|&&t| t >= v as i64) {
        candle_core::bail!("cross-entropy: target id {t} is outside the vocabulary of {v}")
    }
    let n_valid = targets.iter().filter(|&&t| t >= 0).count();
    if logits.dtype() != DType::F32 || !logits.device().is_cpu() {
        return Ok((token_cross_entropy_reference(logits, targets)?, n_valid));
    }
    let op = TokenCrossEntropy { targets: Arc::new(targets.to_vec()), n_valid };
    Ok((logits.contiguous()?.apply_op1(op)?, n_valid))
}

pub fn token_cross_entropy_reference(logits: &Tensor, targets: &[i64]) -> Result<Tensor> {
    let keep: Vec<u32> = (0..targets.len() as u32).filter(|&i| targets[i as usize] >= 0).collect();
    let t: Vec<u32> = keep.iter().map(|&i| targets[i as usize] as u32).collect();
    let idx = Tensor::new(keep.as_slice(), logits.device())?;
    let rows = logits.index_select(&idx, 0)?;
    candle_nn::loss::cross_entropy(&rows, &Tensor::new(t.as_slice(), logits.device())?)
}

// ---------------------------------------------------------------------------
// Frozen quantized linear (QLoRA's base layer): y = x·Wᵀ with W in a GGML
// block format; backward gives dx = g·W only.
// ---------------------------------------------------------------------------

/// Rows of `x` from which the forward dequantizes `W` to f32 once and runs an
/// f32 GEMM instead of the quantized dot products (which re-quantize the
/// activations to 8 bits): exact to f32 rounding, and faster for large batches.
pub const DEQUANT_GEMM_MIN_ROWS: usize = 16;

struct FrozenQLinear {
    weight: Arc<QTensor>,
}

pub(crate) fn dequantized(w: &QTensor) -> Result<Tensor> {
    match crate::qgemv::dequantize(w)? {
        Some(v) => Tensor::from_vec(v, w.shape(), &candle_core::Device::Cpu),
        None => w.dequantize(&candle_core::Device::Cpu),
    }
}

impl CustomOp1 for FrozenQLinear {
    fn name(&self) -> &'static str {
        "frozen-qlinear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "frozen-qlinear")?;
        let (out_f, in_f) = self.weight.shape().dims2()?;
        let dims = l.dims();
        let k = dims.last().copied().unwrap_or(0);
        if k != in_f {
            candle_core::bail!("frozen-qlinear: input has {k} features, weight expects {in_f}")
        }
        let m = x.len() / in_f.max(1);
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("rank >= 1") = out_f;
        if m < DEQUANT_GEMM_MIN_ROWS {
            // f32 activations against blocks dequantized in the dot product;
            // other block types use candle's 8-bit-activation kernels.
            return match crate::qgemv::qgemv(&self.weight, x, in_f)? {
                Some(y) => Ok((CpuStorage::F32(y), Shape::from(out_dims))),
                None => CustomOp1::cpu_fwd(&*self.weight, s, l),
            };
        }
        let w = dequantized(&self.weight)?;
        let dst = with_f32(&w, "frozen-qlinear", |w| sgemm_new(m, out_f, in_f, x, in_f, 1, w, 1, in_f, 1.0))?;
        Ok((CpuStorage::F32(dst), Shape::from(out_dims)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (out_f, in_f) = self.weight.shape().dims2()?;
        let g = grad.contiguous()?;
        let m = g.elem_count() / out_f;
        // One matrix at a time is dequantized and dropped right after.
        let w = dequantized(&self.weight)?;
        let dx = with_f32(&g, "frozen-qlinear-bwd", |g| {
            with_f32(&w, "frozen-qlinear-bwd", |w| sgemm_new(m, in_f, out_f, g, out_f, 1, w, in_f, 1, 1.0))
        })??;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// `x·Wᵀ` for a frozen quantized `W` (out, in): no weight gradient, and no
/// full-precision copy of `W` kept between calls.
pub fn frozen_qlinear(x: &Tensor, weight: &Arc<QTensor>) -> Result<Tensor> {
    if x.dtype() != DType::F32 || !x.device().is_cpu() {
        let w = weight.dequantize(x.device())?;
        return crate::ops::device_matmul(x, &w.t()?);
    }
    x.contiguous()?.apply_op1(FrozenQLinear { weight: weight.clone() })
}

#[cfg(test)]
#[path = "ops_decoder_tests.rs"]
mod tests;
