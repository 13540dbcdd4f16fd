//! What rank an adapter really uses.
//!
//! Per module, the singular values of `ΔW = s·B·A`, computed without forming
//! ΔW: `B = Q_B·R_B`, `Aᵀ = Q_A·R_A`, so `ΔW = Q_B·(s·R_B·R_Aᵀ)·Q_Aᵀ` has the
//! singular values of the r×r core. Effective ranks:
//!
//! - `entropy_rank`: Roy & Vetterli (2007), `exp(−Σ pᵢ ln pᵢ)` with
//!   `pᵢ = σᵢ / Σσⱼ` (1 for a single direction, r for a flat spectrum);
//! - `rank90`: the smallest k whose `Σ_{i≤k} σᵢ²` reaches 90% of `‖ΔW‖²_F`;
//! - `stable_rank`: `‖ΔW‖²_F / σ₁²`.
//!
//! Subspace similarity of two adapters (Hu et al. 2021, LoRA, section 7):
//! with `U₁`, `U₂` the right-singular vectors of `A₁`, `A₂` (columns in the
//! input space, by decreasing singular value),
//! `φ(A₁, A₂, i, j) = ‖U₁[:, :i]ᵀ·U₂[:, :j]‖²_F / min(i, j)` ∈ [0, 1].

use crate::error::{LowRankError, Result};
use crate::svd::{exact_svd, rank_for_energy, tensor_to_mat};
use faer::Mat;
use lora_peft::LoadedAdapter;
use serde::Serialize;

/// The spectrum of one module's update.
#[derive(Debug, Clone, Serialize)]
pub struct ModuleSpectrum {
    pub module: String,
    /// The adapter's rank r on this module.
    pub rank: usize,
    pub scaling: f64,
    /// r singular values of ΔW, descending.
    pub singular_values: Vec<f32>,
    pub entropy_rank: f64,
    pub rank90: usize,
    pub stable_rank: f64,
    /// `‖ΔW‖_F`.
    pub norm: f64,
}

/// The spectrum of `s·B·A`.
pub fn spectrum(module: &str, a: &candle_core::Tensor, b: &candle_core::Tensor, scaling: f64) -> Result<ModuleSpectrum> {
    let am = tensor_to_mat(a)?; // (r, in)
    let bm = tensor_to_mat(b)?; // (out, r)
    let r = am.nrows();
    if bm.ncols() != r {
        return Err(LowRankError::Shape { module: module.into(), msg: format!("lora_A is {:?} but lora_B is {:?}", a.dims(), b.dims()) });
    }
    let rb = r_factor(bm.as_ref(), r);
    let ra = r_factor(am.as_ref().transpose(), r);
    let core = &rb * ra.as_ref().transpose();
    let s = scaling as f32;
    let core = Mat::from_fn(core.nrows(), core.ncols(), |i, j| core[(i, j)] * s);
    let sv = exact_svd(module, core.as_ref())?.s;
    Ok(summarize(module, r, scaling, sv))
}

/// The (r, r) triangular factor of a tall (n, r) matrix (zero-padded when n < r).
fn r_factor(m: faer::MatRef<'_, f32>, r: usize) -> Mat<f32> {
    let qr = m.qr();
    let t = qr.thin_R();
    Mat::from_fn(r, r, |i, j| if i < t.nrows() { t[(i, j)] } else { 0.0 })
}

fn summarize(module: &str, rank: usize, scaling: f64, sv: Vec<f32>) -> ModuleSpectrum {
    let sum: f64 = sv.iter().map(|&x| x as f64).sum();
    let sq: f64 = sv.iter().map(|&x| (x as f64).powi(2)).sum();
    let entropy_rank = if sum > 0.0 {
        let h: f64 = sv.iter().map(|&x| x as f64 / sum).filter(|&p| p > 0.0).map(|p| -p * p.ln()).sum();
        h.exp()
    } else {
        0.0
    };
    let top = sv.first().copied().unwrap_or(0.0) as f64;
    ModuleSpectrum {
        module: module.into(),
        rank,
        scaling,
        rank90: if sq > 0.0 { rank_for_energy(&sv, 0.9).unwrap_or(rank) } else { 0 },
        stable_rank: if top > 0.0 { sq / (top * top) } else { 0.0 },
        norm: sq.sqrt(),
        entropy_rank,
        singular_values: sv,
    }
}

/// Spectra of every LoRA module of an adapter.
pub fn analyze_adapter(ad: &LoadedAdapter) -> Result<Vec<ModuleSpectrum>> {
    ad.lora_modules()
        .iter()
        .map(|m| {
            let (a, b) = crate::init::pair(ad, m, "adapter")?;
            spectrum(m, a, b, ad.config.scaling_for(m))
        })
        .collect()
}

/// Subspace similarity grid of one module: `phi[i-1][j-1] = φ(A₁, A₂, i, j)`.
#[derive(Debug, Clone, Serialize)]
pub struct Similarity {
    pub module: String,
    pub r1: usize,
    pub r2: usize,
    pub phi: Vec<Vec<f64>>,
}

/// `φ(A₁, A₂, i, j)` for all `i ≤ r₁`, `j ≤ r₂` (A: (r, in), same `in`).
pub fn subspace_similarity(module: &str, a1: &candle_core::Tensor, a2: &candle_core::Tensor) -> Result<Similarity> {
    let m1 = tensor_to_mat(a1)?;
    let m2 = tensor_to_mat(a2)?;
    if m1.ncols() != m2.ncols() {
        return Err(LowRankError::Shape { module: module.into(), msg: format!("lora_A shapes {:?} and {:?} have different input sizes", a1.dims(), a2.dims()) });
    }
    // Right-singular vectors of A = left-singular vectors of Aᵀ (in, r).
    let u1 = exact_svd(module, m1.as_ref().transpose())?.u;
    let u2 = exact_svd(module, m2.as_ref().transpose())?.u;
    let g = u1.as_ref().transpose() * &u2; // (r1, r2)
    let (r1, r2) = (g.nrows(), g.ncols());
    // Prefix sums of squared entries: ‖G[:i, :j]‖²_F.
    let mut ps = vec![vec![0.0f64; r2 + 1]; r1 + 1];
    for i in 0..r1 {
        for j in 0..r2 {
            ps[i + 1][j + 1] = (g[(i, j)] as f64).powi(2) + ps[i][j + 1] + ps[i + 1][j] - ps[i][j];
        }
    }
    let phi = (1..=r1).map(|i| (1..=r2).map(|j| ps[i][j] / i.min(j) as f64).collect()).collect();
    Ok(Similarity { module: module.into(), r1, r2, phi })
}

/// Similarity grids for every module both adapters adapt.
pub fn compare_adapters(x: &LoadedAdapter, y: &LoadedAdapter) -> Result<Vec<Similarity>> {
    let ym = y.lora_modules();
    let common: Vec<String> = x.lora_modules().into_iter().filter(|m| ym.contains(m)).collect();
    if common.is_empty() {
        return Err(LowRankError::Incompatible { method: "subspace similarity".into(), what: "modules", detail: "the two adapters share no module".into() });
    }
    common
        .iter()
        .map(|m| {
            let (a1, _) = crate::init::pair(x, m, "first adapter")?;
            let (a2, _) = crate::init::pair(y, m, "second adapter")?;
            subspace_similarity(m, a1, a2)
        })
        .collect()
}
