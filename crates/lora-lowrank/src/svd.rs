//! Truncated SVD of f32 weight matrices: exact (faer's divide-and-conquer
//! SVD) and randomized (Halko, Martinsson & Tropp 2011, Algorithm 4.4:
//! Gaussian sketch, oversampling, power iterations with a QR
//! re-orthonormalisation after every product). Both run on faer's global
//! rayon parallelism.
//!
//! A matrix `A (m, n)` is factored as `A ≈ U·diag(s)·Vᵀ` with `U (m, k)`,
//! `V (n, k)` orthonormal columns and `s` descending.

use crate::error::{check_energy, check_rank, LowRankError, Result};
use candle_core::{Device, Tensor};
use faer::{Mat, MatRef};
use rand::{Rng, SeedableRng};

/// Parameters of the randomized SVD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RsvdParams {
    /// Extra sketch columns beyond the rank (HMT's `p`; 10 is their default).
    pub oversample: usize,
    /// Power (subspace) iterations `q`: each multiplies by `A·Aᵀ` and re-orthonormalises.
    pub power_iters: usize,
    /// Seed of the Gaussian sketch.
    pub seed: u64,
}

impl Default for RsvdParams {
    fn default() -> Self {
        Self { oversample: 10, power_iters: 2, seed: 0 }
    }
}

/// How a truncated SVD is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SvdSolver {
    /// Full thin SVD, then truncation.
    #[default]
    Exact,
    /// Randomized range finder + SVD of the small projected matrix.
    Randomized(RsvdParams),
}

/// `A ≈ U·diag(s)·Vᵀ`.
#[derive(Debug, Clone)]
pub struct TruncatedSvd {
    /// (m, k)
    pub u: Mat<f32>,
    /// k singular values, descending.
    pub s: Vec<f32>,
    /// (n, k)
    pub v: Mat<f32>,
}

impl TruncatedSvd {
    /// Number of triplets held.
    pub fn rank(&self) -> usize {
        self.s.len()
    }

    /// The first `r` triplets.
    pub fn truncate(mut self, r: usize) -> Self {
        let r = r.min(self.s.len());
        self.u = self.u.as_ref().subcols(0, r).to_owned();
        self.v = self.v.as_ref().subcols(0, r).to_owned();
        self.s.truncate(r);
        self
    }

    /// `U·diag(s)·Vᵀ` (m, n).
    pub fn reconstruct(&self) -> Mat<f32> {
        let us = Mat::from_fn(self.u.nrows(), self.s.len(), |i, j| self.u[(i, j)] * self.s[j]);
        &us * self.v.as_ref().transpose()
    }
}

/// A 2-D f32 tensor as a faer matrix (copies).
pub fn tensor_to_mat(t: &Tensor) -> Result<Mat<f32>> {
    let (m, n) = t.dims2()?;
    let v: Vec<f32> = t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?;
    Ok(Mat::from_fn(m, n, |i, j| v[i * n + j]))
}

/// A faer matrix as a 2-D f32 tensor on `dev`.
pub fn mat_to_tensor(m: MatRef<'_, f32>, dev: &Device) -> Result<Tensor> {
    let (r, c) = (m.nrows(), m.ncols());
    let mut v = Vec::with_capacity(r * c);
    for i in 0..r {
        for j in 0..c {
            v.push(m[(i, j)]);
        }
    }
    Ok(Tensor::from_vec(v, (r, c), dev)?)
}

fn check_finite(module: &str, a: MatRef<'_, f32>) -> Result<()> {
    for j in 0..a.ncols() {
        for i in 0..a.nrows() {
            if !a[(i, j)].is_finite() {
                return Err(LowRankError::Linalg {
                    module: module.to_string(),
                    msg: format!("non-finite value {} at ({i}, {j})", a[(i, j)]),
                });
            }
        }
    }
    Ok(())
}

/// The full thin SVD (k = min(m, n)).
pub fn exact_svd(module: &str, a: MatRef<'_, f32>) -> Result<TruncatedSvd> {
    check_finite(module, a)?;
    let svd = a.thin_svd().map_err(|e| LowRankError::Linalg {
        module: module.to_string(),
        msg: format!("SVD did not converge ({e:?})"),
    })?;
    let s = svd.S().column_vector();
    Ok(TruncatedSvd {
        u: svd.U().to_owned(),
        s: (0..s.nrows()).map(|i| s[i]).collect(),
        v: svd.V().to_owned(),
    })
}

/// All singular values, descending.
pub fn singular_values(module: &str, a: MatRef<'_, f32>) -> Result<Vec<f32>> {
    check_finite(module, a)?;
    a.singular_values().map_err(|e| LowRankError::Linalg {
        module: module.to_string(),
        msg: format!("SVD did not converge ({e:?})"),
    })
}

/// Orthonormal basis of the column space of `y` (thin Householder QR).
fn orthonormal(y: MatRef<'_, f32>) -> Mat<f32> {
    y.qr().compute_thin_Q()
}

/// A (rows, cols) matrix of independent N(0, 1) draws (Box–Muller), seeded.
pub fn gaussian(rows: usize, cols: usize, seed: u64) -> Mat<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut draw = move || {
        let u1: f64 = rng.random_range(f64::EPSILON..1.0);
        let u2: f64 = rng.random();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    };
    let mut m = Mat::zeros(rows, cols);
    for j in 0..cols {
        for i in 0..rows {
            m[(i, j)] = draw();
        }
    }
    m
}

/// Randomized truncated SVD of rank `r` (HMT Algorithms 4.4 + 5.1).
///
/// `Ω (n, r+p)` Gaussian; `Q = qr(A·Ω)`; `q` times: `Q = qr(A·qr(Aᵀ·Q))`;
/// `B = Qᵀ·A`; `B = Ũ·Σ·Vᵀ`; `U = Q·Ũ`; keep `r` triplets. The sketch width is
/// capped at `min(m, n)`. With `oversample = 0` this is `torch.svd_lowrank(A,
/// q=r, niter=q)` (what PEFT's `pissa_niter_N` calls).
pub fn randomized_svd(module: &str, a: MatRef<'_, f32>, r: usize, p: RsvdParams) -> Result<TruncatedSvd> {
    let (m, n) = (a.nrows(), a.ncols());
    check_rank(module, r, m, n)?;
    check_finite(module, a)?;
    let k = (r + p.oversample).min(m.min(n));
    let omega = gaussian(n, k, p.seed);
    let mut q = orthonormal((a * &omega).as_ref());
    for _ in 0..p.power_iters {
        let z = orthonormal((a.transpose() * &q).as_ref());
        q = orthonormal((a * &z).as_ref());
    }
    let b = q.as_ref().transpose() * a; // (k, n)
    let small = exact_svd(module, b.as_ref())?;
    let u = &q * &small.u;
    Ok(TruncatedSvd { u, s: small.s, v: small.v }.truncate(r))
}

/// Rank-`r` truncated SVD by the chosen solver.
pub fn truncated_svd(module: &str, a: MatRef<'_, f32>, r: usize, solver: SvdSolver) -> Result<TruncatedSvd> {
    check_rank(module, r, a.nrows(), a.ncols())?;
    match solver {
        SvdSolver::Exact => Ok(exact_svd(module, a)?.truncate(r)),
        SvdSolver::Randomized(p) => randomized_svd(module, a, r, p),
    }
}

/// The smallest rank whose leading singular values hold at least `energy`
/// of `Σσ²` (at least 1). All-zero spectra give 1.
pub fn rank_for_energy(s: &[f32], energy: f64) -> Result<usize> {
    check_energy(energy)?;
    let total: f64 = s.iter().map(|&x| (x as f64) * (x as f64)).sum();
    if total <= 0.0 || s.is_empty() {
        return Ok(1);
    }
    let mut acc = 0.0;
    for (i, &x) in s.iter().enumerate() {
        acc += (x as f64) * (x as f64);
        // Relative tolerance so that energy = 1.0 is reached despite rounding.
        if acc >= energy * total * (1.0 - 1e-12) {
            return Ok(i + 1);
        }
    }
    Ok(s.len())
}

/// Share of `Σσ²` held by the first `r` values.
pub fn retained_energy(s: &[f32], r: usize) -> f64 {
    let total: f64 = s.iter().map(|&x| (x as f64) * (x as f64)).sum();
    if total <= 0.0 {
        return 1.0;
    }
    s.iter().take(r).map(|&x| (x as f64) * (x as f64)).sum::<f64>() / total
}

/// Frobenius norm of `a - b`.
pub fn frob_diff(a: MatRef<'_, f32>, b: MatRef<'_, f32>) -> f64 {
    let mut acc = 0.0f64;
    for j in 0..a.ncols() {
        for i in 0..a.nrows() {
            let d = (a[(i, j)] - b[(i, j)]) as f64;
            acc += d * d;
        }
    }
    acc.sqrt()
}

/// Frobenius norm.
pub fn frob(a: MatRef<'_, f32>) -> f64 {
    let mut acc = 0.0f64;
    for j in 0..a.ncols() {
        for i in 0..a.nrows() {
            acc += (a[(i, j)] as f64).powi(2);
        }
    }
    acc.sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_reconstructs_and_randomized_is_near_optimal() {
        // A = G1 · diag(decay) · G2 with a decaying spectrum.
        let (m, n) = (60, 40);
        let g = gaussian(m, n, 1);
        let full = exact_svd("t", g.as_ref()).unwrap();
        let back = full.reconstruct();
        assert!(frob_diff(back.as_ref(), g.as_ref()) / frob(g.as_ref()) < 1e-5);
        let r = 5;
        let opt: f64 = full.s[r..].iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        let rs = randomized_svd("t", g.as_ref(), r, RsvdParams { oversample: 10, power_iters: 4, seed: 3 }).unwrap();
        let err = frob_diff(rs.reconstruct().as_ref(), g.as_ref());
        assert!(err <= 1.05 * opt, "randomized {err} vs optimal {opt}");
    }

    #[test]
    fn bad_rank_and_energy_are_errors() {
        let g = gaussian(4, 3, 0);
        let e = truncated_svd("layer.q", g.as_ref(), 4, SvdSolver::Exact).unwrap_err();
        assert_eq!(e.to_string(), "layer.q: rank 4 is out of range for a 4x3 matrix (must be 1..=3)");
        assert!(truncated_svd("x", g.as_ref(), 0, SvdSolver::Exact).is_err());
        assert_eq!(rank_for_energy(&[1.0], 1.5).unwrap_err().to_string(), "energy 1.5 is out of range (must be in (0, 1])");
        assert!(rank_for_energy(&[1.0], 0.0).is_err());
        assert_eq!(rank_for_energy(&[3.0, 1.0, 1.0], 0.9).unwrap(), 2);
        assert_eq!(rank_for_energy(&[3.0, 1.0, 1.0], 1.0).unwrap(), 3);
    }
}
