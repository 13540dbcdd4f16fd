//! Fused multi-head self-attention for the encoder (BERT), CPU, with an
//! explicit backward pass.
//!
//! `ctx = dropout(softmax(Q·Kᵀ·scale + mask)) · V`, per batch row and head,
//! reading Q, K, V straight from the projections' `(B, T, H)` layout and
//! writing the context in the same layout: no head-split transposes, no
//! materialised `(B, heads, T, T)` scores or probabilities, one parallel
//! region per call (over batch × heads) with small single-threaded GEMMs
//! inside, instead of thousands of tiny multi-threaded ones.
//!
//! When a gradient will be needed the forward keeps the probabilities (one
//! `B·heads·T²` buffer, where the unfused path keeps the probabilities and
//! their dropped copy), and the backward frees them; otherwise (inference)
//! nothing is kept, and a backward without them recomputes each block.
//! Queries may cover fewer positions than keys and values (`Tq < T`: the
//! encoder's last layer, whose only output used is the first token's, asks
//! for that token alone).
//!
//! Dropout on the probabilities uses the same counter-based mask as
//! [`crate::ops::dropout`] over the same flat `(B, heads, T, T)` index, drawn
//! from the same seed sequence, so the fused op and the reference path
//! ([`attention_reference`]) draw identical masks.

use crate::ops::{device_matmul, dropout, masked_softmax, next_dropout_seed, with_f32, SendPtr};
// dst = scale · lhs · rhs per (batch, head) block, single-threaded.
use crate::simd::{self, Mask};
use crate::small_mm::mm;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

struct Attention {
    heads: usize,
    scale: f32,
    /// (B, T) additive mask, contiguous; a constant.
    bias: Tensor,
    dropout: Option<Mask>,
    /// Keep the probabilities for the backward pass (training); without them
    /// the backward recomputes them block by block.
    keep: bool,
    saved: std::sync::Mutex<Option<Vec<f32>>>,
    /// The forward's dropout keep bits, `bit_words(T²)` words per (batch,
    /// head) block, for the backward pass (kept with the probabilities).
    kept: std::sync::Mutex<Option<Vec<u64>>>,
}

/// Shapes of one call: batch, query positions, key (and value) positions,
/// hidden, head dim.
struct Dims {
    b: usize,
    tq: usize,
    tk: usize,
    h: usize,
    d: usize,
}

impl Dims {
    /// Offset of block (b, head) in the queries and in the keys and values.
    fn offsets(&self, b: usize, hd: usize) -> (usize, usize) {
        (b * self.tq * self.h + hd * self.d, b * self.tk * self.h + hd * self.d)
    }
}

impl Attention {
    /// From the queries' and the keys' layouts (the values' is the keys').
    fn dims(&self, ql: &Layout, kl: &Layout) -> Result<Dims> {
        let (b, tq, h) = ql.shape().dims3()?;
        let (kb, tk, kh) = kl.shape().dims3()?;
        let (bb, bt) = self.bias.dims2()?;
        if kb != b || kh != h || bb != b || bt != tk || h % self.heads != 0 || tq == 0 {
            candle_core::bail!("attention: q ({b}, {tq}, {h}), k ({kb}, {tk}, {kh}) do not fit {} heads and a ({bb}, {bt}) mask", self.heads)
        }
        Ok(Dims { b, tq, tk, h, d: h / self.heads })
    }

    /// `p (Tq×Tk) = softmax(Q_bh·K_bhᵀ·scale + mask_b)` for block `bh`.
    ///
    /// # Safety
    /// `q` points at the (B, Tq, H) queries, `k` at the (B, Tk, H) keys.
    unsafe fn probs(&self, z: &Dims, bh: usize, q: *const f32, k: *const f32, mask: &[f32], p: &mut [f32]) {
        let (b, hd) = (bh / self.heads, bh % self.heads);
        let (oq, ok) = z.offsets(b, hd);
        // rhs = K_bhᵀ (d×Tk): element (j, s) at k[ok + s·H + j].
        mm(z.tq, z.tk, z.d, p.as_mut_ptr(), z.tk, q.add(oq), z.h, 1, k.add(ok), 1, z.h, self.scale);
        simd::masked_softmax_rows(p, &mask[b * z.tk..(b + 1) * z.tk], z.tk);
    }

    /// `pd = dropout(p)` for block `bh` (the flat (B, heads, Tq, Tk) index).
    fn drop_into(&self, dr: &Mask, z: &Dims, bh: usize, p: &[f32], pd: &mut [f32]) {
        dr.apply((bh * z.tq * z.tk) as u64, p, pd, false)
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(&self, qs: &CpuStorage, ql: &Layout, ks: &CpuStorage, kl: &Layout, vs: &CpuStorage, vl: &Layout) -> Result<(CpuStorage, Shape)> {
        let z = self.dims(ql, kl)?;
        if vl.dims() != kl.dims() {
            candle_core::bail!("attention: k {:?} and v {:?} differ", kl.dims(), vl.dims())
        }
        let q = crate::ops::f32_slice(qs, ql, "attention")?;
        let k = crate::ops::f32_slice(ks, kl, "attention")?;
        let v = crate::ops::f32_slice(vs, vl, "attention")?;
        // Every element of `out` is written by exactly one (batch, head)
        // block's product (which does not read its destination), and each
        // block of `saved` is zeroed by its task before use: neither buffer
        // needs a zero-fill pass of its own.
        let mut out: Vec<f32> = Vec::with_capacity(q.len());
        let dst = SendPtr(out.as_mut_ptr());
        let tt = z.tq * z.tk;
        let mut saved: Vec<f32> = Vec::with_capacity(if self.keep { z.b * self.heads * tt } else { 0 });
        let sp = SendPtr(saved.as_mut_ptr());
        // Keep bits of the dropout mask, when the probabilities are kept.
        let wpb = simd::bit_words(tt);
        let record = self.keep && self.dropout.is_some() && crate::ops::record_masks();
        let mut kept = vec![0u64; if record { z.b * self.heads * wpb } else { 0 }];
        let kp = SendPtr(kept.as_mut_ptr());
        with_f32(&self.bias, "attention", |mask| {
            (0..z.b * self.heads).into_par_iter().for_each_init(
                || (vec![0f32; if self.keep { 0 } else { tt }], vec![0f32; if self.dropout.is_some() { tt } else { 0 }]),
                |(scratch, pd), bh| {
                    let (dst, sp, kp) = (dst, sp, kp);
                    let (b, hd) = (bh / self.heads, bh % self.heads);
                    let (oq, ok) = z.offsets(b, hd);
                    // SAFETY: inputs are (B, Tq|Tk, H) contiguous; block bh
                    // writes only rows b·Tq.. and columns hd·d.. of `out`, and
                    // its own Tq×Tk block of `saved`.
                    unsafe {
                        let p: &mut [f32] = if self.keep {
                            std::ptr::write_bytes(sp.0.add(bh * tt), 0, tt);
                            std::slice::from_raw_parts_mut(sp.0.add(bh * tt), tt)
                        } else {
                            scratch
                        };
                        self.probs(&z, bh, q.as_ptr(), k.as_ptr(), mask, p);
                        let pp: &[f32] = match &self.dropout {
                            Some(dr) if record => {
                                // Block bh's own words of `kept`.
                                let bits = std::slice::from_raw_parts_mut(kp.0.add(bh * wpb), wpb);
                                dr.apply_recording((bh * tt) as u64, p, pd, false, bits);
                                pd
                            }
                            Some(dr) => {
                                self.drop_into(dr, &z, bh, p, pd);
                                pd
                            }
                            None => p,
                        };
                        mm(z.tq, z.d, z.tk, dst.0.add(oq), z.h, pp.as_ptr(), z.tk, 1, v.as_ptr().add(ok), z.h, 1, 1.0);
                    }
                },
            )
        })?;
        // SAFETY: the B·heads blocks above wrote all of `out` (heads·d = H
        // columns of every row) and zeroed then filled all of `saved`.
        unsafe {
            out.set_len(q.len());
            if self.keep {
                saved.set_len(z.b * self.heads * tt);
            }
        }
        if self.keep {
            *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
            if record {
                *self.kept.lock().unwrap_or_else(|e| e.into_inner()) = Some(kept);
            }
        }
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }

    fn bwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        let z = self.dims(q.layout(), k.layout())?;
        let (nq, nk) = (q.elem_count(), k.elem_count());
        // Written block by block without being read (see the forward).
        let (mut dq, mut dk, mut dv): (Vec<f32>, Vec<f32>, Vec<f32>) = (Vec::with_capacity(nq), Vec::with_capacity(nk), Vec::with_capacity(nk));
        let (pdq, pdk, pdv) = (SendPtr(dq.as_mut_ptr()), SendPtr(dk.as_mut_ptr()), SendPtr(dv.as_mut_ptr()));
        let tt = z.tq * z.tk;
        let mut saved = self.saved.lock().unwrap_or_else(|e| e.into_inner()).take();
        let sp = saved.as_mut().map(|v| SendPtr(v.as_mut_ptr()));
        // The forward's keep bits (with its probabilities), else the mask is drawn again.
        let wpb = simd::bit_words(tt);
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner()).take().filter(|k| sp.is_some() && k.len() == z.b * self.heads * wpb);
        let kept = kept.as_deref();
        with_f32(&q, "attention-bwd", |qd| {
            with_f32(&k, "attention-bwd", |kd| {
                with_f32(&v, "attention-bwd", |vd| {
                    with_f32(&g, "attention-bwd", |gd| {
                        with_f32(&self.bias, "attention-bwd", |mask| {
                            (0..z.b * self.heads).into_par_iter().for_each_init(
                                || (vec![0f32; if sp.is_some() { 0 } else { tt }], vec![0f32; if self.dropout.is_some() { tt } else { 0 }], vec![0f32; tt]),
                                |(scratch, pd, dp), bh| {
                                    let (pdq, pdk, pdv, sp) = (pdq, pdk, pdv, sp);
                                    let (b, hd) = (bh / self.heads, bh % self.heads);
                                    let (oq, ok) = z.offsets(b, hd);
                                    // SAFETY: as in the forward; block bh writes only its
                                    // rows/columns of dq, dk, dv and reads its saved block.
                                    unsafe {
                                        let p: &[f32] = match sp {
                                            Some(sp) => std::slice::from_raw_parts(sp.0.add(bh * tt), tt),
                                            None => {
                                                self.probs(&z, bh, qd.as_ptr(), kd.as_ptr(), mask, scratch);
                                                scratch
                                            }
                                        };
                                        let bits = kept.map(|k| &k[bh * wpb..(bh + 1) * wpb]);
                                        let pp: &[f32] = match (&self.dropout, bits) {
                                            (Some(dr), Some(bits)) => {
                                                simd::bits_apply(bits, dr.scale, p, pd, false);
                                                pd
                                            }
                                            (Some(dr), None) => {
                                                self.drop_into(dr, &z, bh, p, pd);
                                                pd
                                            }
                                            (None, _) => p,
                                        };
                                        let (go, vo) = (gd.as_ptr().add(oq), vd.as_ptr().add(ok));
                                        // dPd = dO·Vᵀ (Tq×Tk)
                                        mm(z.tq, z.tk, z.d, dp.as_mut_ptr(), z.tk, go, z.h, 1, vo, 1, z.h, 1.0);
                                        // dV = Pdᵀ·dO (Tk×d)
                                        mm(z.tk, z.d, z.tq, pdv.0.add(ok), z.h, pp.as_ptr(), 1, z.tk, go, z.h, 1, 1.0);
                                        match (&self.dropout, bits) {
                                            (Some(dr), Some(bits)) => simd::bits_inplace(bits, dr.scale, dp),
                                            (Some(dr), None) => dr.apply_inplace((bh * tt) as u64, dp),
                                            (None, _) => {}
                                        }
                                        // dS = P ⊙ (dP − rowsum(dP ⊙ P)), in place in dp.
                                        simd::softmax_bwd_inplace_rows(p, dp, z.tk);
                                        // dQ = dS·K·scale (Tq×d), dK = dSᵀ·Q·scale (Tk×d)
                                        mm(z.tq, z.d, z.tk, pdq.0.add(oq), z.h, dp.as_ptr(), z.tk, 1, kd.as_ptr().add(ok), z.h, 1, self.scale);
                                        mm(z.tk, z.d, z.tq, pdk.0.add(ok), z.h, dp.as_ptr(), 1, z.tk, qd.as_ptr().add(oq), z.h, 1, self.scale);
                                    }
                                },
                            )
                        })
                    })
                })
            })
        })?????;
        // SAFETY: each (batch, head) block wrote its rows and columns of dq,
        // dk and dv (products that do not read their destination); together
        // they cover all n elements.
        unsafe {
            dq.set_len(nq);
            dk.set_len(nk);
            dv.set_len(nk);
        }
        let dev = q.device();
        Ok((Some(Tensor::from_vec(dq, q.shape(), dev)?), Some(Tensor::from_vec(dk, k.shape(), dev)?), Some(Tensor::from_vec(dv, v.shape(), dev)?)))
    }
}

/// Multi-head self-attention `dropout(softmax(Q·Kᵀ/√d + mask))·V` on
/// `(B, T, H)` projections with `heads` heads; `mask` is `(B, T)` additive
/// (0 or a large negative value). Dropout `p` applies when `train`.
/// Returns the context `(B, T, H)`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, heads: usize, p: f32, train: bool) -> Result<Tensor> {
    let cpu = q.device().is_cpu() && q.dtype() == DType::F32;
    if !cpu {
        return attention_reference(q, k, v, mask, heads, p, train);
    }
    if !(0.0..1.0).contains(&p) {
        candle_core::bail!("dropout probability must be in [0, 1), got {p}")
    }
    let d = q.dim(2)? / heads.max(1);
    let dropout = (train && p > 0.0).then(|| Mask::new(next_dropout_seed(), p));
    let keep = q.track_op() || k.track_op() || v.track_op();
    let op = Attention { heads, scale: 1.0 / (d as f32).sqrt(), bias: mask.detach().contiguous()?, dropout, keep, saved: Default::default(), kept: Default::default() };
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// The same attention from candle primitives (and the masked softmax and
/// dropout ops): head split, batched matmuls, materialised probabilities.
/// Queries may cover fewer positions than keys and values: q `(B, Tq, H)`,
/// k and v `(B, T, H)`, mask `(B, T)`; the context is `(B, Tq, H)`, as in
/// the fused op.
pub fn attention_reference(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, heads: usize, p: f32, train: bool) -> Result<Tensor> {
    let (b, tq, h) = q.dims3()?;
    let t = k.dim(1)?;
    let d = h / heads;
    let split = |y: &Tensor, t: usize| -> Result<Tensor> { y.reshape((b, t, heads, d))?.transpose(1, 2)?.contiguous() };
    let q = split(&(q * (1.0 / (d as f64).sqrt()))?, tq)?;
    let (k, v) = (split(k, t)?, split(v, t)?);
    let scores = device_matmul(&q, &k.t()?)?;
    let mut probs = masked_softmax(&scores, mask)?;
    if train && p > 0.0 {
        probs = dropout(&probs, p)?;
    }
    device_matmul(&probs, &v)?.transpose(1, 2)?.reshape((b, tq, h))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::set_dropout_seed;
    use crate::ops::tests::{max_abs, randn, DROPOUT_LOCK};
    use candle_core::Var;

    fn run(f: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>, seed: u64) -> (Tensor, [Tensor; 3]) {
        run_tq(f, seed, 7)
    }

    /// [`run`] with queries at the first `tq` of the 7 positions.
    fn run_tq(f: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>, seed: u64, tq: usize) -> (Tensor, [Tensor; 3]) {
        let (b, t, h) = (3, 7, 8);
        let q = Var::from_tensor(&randn(&[b, t, h], 1).narrow(1, 0, tq).unwrap().contiguous().unwrap()).unwrap();
        let k = Var::from_tensor(&randn(&[b, t, h], 2)).unwrap();
        let v = Var::from_tensor(&randn(&[b, t, h], 3)).unwrap();
        let w = randn(&[b, tq, h], 4);
        set_dropout_seed(seed);
        let y = f(q.as_tensor(), k.as_tensor(), v.as_tensor()).unwrap();
        let loss = (&y * &w).unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        // A second backward over the same graph: the fused op has handed its
        // kept probabilities to the first one and recomputes them.
        let g2 = loss.backward().unwrap();
        for x in [&q, &k, &v] {
            assert!(max_abs(g.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap()) < 1e-6);
        }
        let gr = |x: &Var| g.get(x.as_tensor()).expect("gradient reaches the input").clone();
        (y, [gr(&q), gr(&k), gr(&v)])
    }

    fn mask() -> Tensor {
        // Batch row 1 masks its last two tokens, row 2 its last one.
        let mut m = vec![0f32; 3 * 7];
        m[7 + 5] = -1e4;
        m[7 + 6] = -1e4;
        m[14 + 6] = -1e4;
        Tensor::from_vec(m, (3, 7), &candle_core::Device::Cpu).unwrap()
    }

    #[test]
    fn fused_attention_matches_reference_values_and_gradients() {
        let _guard = DROPOUT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        for (p, train) in [(0.0, false), (0.0, true), (0.3, true), (0.3, false)] {
            let m = mask();
            let (y, g) = run(|q, k, v| attention(q, k, v, &m, 2, p, train), 7);
            let (yr, gr) = run(|q, k, v| attention_reference(q, k, v, &m, 2, p, train), 7);
            assert!(max_abs(&y, &yr) < 1e-5, "p={p} train={train}: values differ by {}", max_abs(&y, &yr));
            for (i, (a, b)) in g.iter().zip(&gr).enumerate() {
                let e = max_abs(a, b);
                assert!(e < 1e-4, "p={p} train={train}: gradient of input {i} differs by {e}");
                assert!(a.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
            }
        }
    }

    #[test]
    fn fewer_queries_than_keys_match_the_reference() {
        // The encoder's last layer: queries at the first position (or a
        // few), keys and values at all of them.
        let _guard = DROPOUT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        for tq in [1, 3] {
            for (p, train) in [(0.0, true), (0.3, true), (0.3, false)] {
                let m = mask();
                let (y, g) = run_tq(|q, k, v| attention(q, k, v, &m, 2, p, train), 5, tq);
                let (yr, gr) = run_tq(|q, k, v| attention_reference(q, k, v, &m, 2, p, train), 5, tq);
                assert_eq!(y.dims(), &[3, tq, 8]);
                assert!(max_abs(&y, &yr) < 1e-5, "tq={tq} p={p}: values differ by {}", max_abs(&y, &yr));
                for (i, (a, b)) in g.iter().zip(&gr).enumerate() {
                    assert_eq!(a.dims(), b.dims());
                    let e = max_abs(a, b);
                    assert!(e < 1e-4, "tq={tq} p={p} train={train}: gradient of input {i} differs by {e}");
                    assert!(a.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
                }
            }
        }
        // A mask that does not fit the keys is an error, not a panic.
        let q = randn(&[3, 1, 8], 1);
        let k = randn(&[3, 7, 8], 2);
        let bad = Tensor::zeros((3, 6), DType::F32, &candle_core::Device::Cpu).unwrap();
        assert!(attention(&q, &k, &k, &bad, 2, 0.0, false).is_err());
    }

    #[test]
    fn dropout_masks_follow_the_seed() {
        let _guard = DROPOUT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let m = mask();
        let (a, _) = run(|q, k, v| attention(q, k, v, &m, 2, 0.5, true), 1);
        let (b, _) = run(|q, k, v| attention(q, k, v, &m, 2, 0.5, true), 1);
        let (c, _) = run(|q, k, v| attention(q, k, v, &m, 2, 0.5, true), 2);
        assert_eq!(max_abs(&a, &b), 0.0);
        assert!(max_abs(&a, &c) > 1e-3);
    }
}
