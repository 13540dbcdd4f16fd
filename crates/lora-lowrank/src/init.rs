//! Adapter initialisation from the weight itself, and PEFT's conversion of
//! such adapters to plain LoRA.
//!
//! PiSSA (PEFT `tuners/lora/layer.py::pissa_init`): `W = U·S·Vᵀ`; with the
//! top-r triplets and `S_r ← S_r / s` (s the LoRA scaling),
//! `A = diag(√S_r)·V_rᵀ` (r, in), `B = U_r·diag(√S_r)` (out, r) and the frozen
//! base becomes the residual `W − s·B·A`. `pissa` uses the exact SVD,
//! `pissa_niter_N` `torch.svd_lowrank(W, q=r, niter=N)` (here: the randomized
//! SVD with no oversampling and N power iterations).
//!
//! OLoRA (`olora_init`): `W = Q·R`; `A = R[:r]`, `B = Q[:, :r]`, residual
//! `W − s·B·A`.
//!
//! Conversion (`LoraModel.subtract_mutated_init` and
//! `save_pretrained(path_initial_model_for_weight_conversion=...)`): with
//! `W = W_res + s·B₀A₀` and the trained `W_res + s·B·A`, the update over the
//! original W is `s·(B·A − B₀·A₀) = s'·[B, −B₀]·[A; A₀]` with rank 2r and
//! alpha doubled (×√2 with rsLoRA) so that `s' = s`.

use crate::error::{check_rank, LowRankError, Result};
use crate::svd::{mat_to_tensor, tensor_to_mat, truncated_svd, RsvdParams, SvdSolver};
use candle_core::Tensor;
use faer::{Mat, MatRef};
use lora_peft::{AdapterConfig, InitLoraWeights, LoadedAdapter, LoraPart};

/// How adapter factors are derived from the weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightInit {
    /// PiSSA with the exact SVD (PEFT `"pissa"`).
    Pissa,
    /// PiSSA with the randomized SVD, `niter` power iterations, no
    /// oversampling (PEFT `"pissa_niter_N"`); seeded.
    PissaNiter { niter: usize, seed: u64 },
    /// OLoRA: thin QR (PEFT `"olora"`).
    Olora,
}

impl WeightInit {
    /// PEFT's `init_lora_weights` value for this method.
    pub fn peft_value(&self) -> InitLoraWeights {
        match self {
            WeightInit::Pissa => InitLoraWeights::Pissa { niter: None },
            WeightInit::PissaNiter { niter, .. } => InitLoraWeights::Pissa { niter: Some(*niter) },
            WeightInit::Olora => InitLoraWeights::Olora,
        }
    }
}

/// Factors and the residual base weight of one layer.
#[derive(Debug, Clone)]
pub struct InitFactors {
    /// (r, in)
    pub a: Mat<f32>,
    /// (out, r)
    pub b: Mat<f32>,
    /// `W − s·B·A` (out, in): the new frozen base.
    pub residual: Mat<f32>,
}

/// Initial `A`, `B` and residual for weight `w` (out, in), rank `r`, LoRA
/// scaling `scaling`.
pub fn init_from_weight(module: &str, w: MatRef<'_, f32>, r: usize, scaling: f64, method: WeightInit) -> Result<InitFactors> {
    let (out_f, in_f) = (w.nrows(), w.ncols());
    check_rank(module, r, out_f, in_f)?;
    if !(scaling.is_finite() && scaling > 0.0) {
        return Err(LowRankError::Input(format!("{module}: LoRA scaling {scaling} must be a positive number")));
    }
    let (a, b) = match method {
        WeightInit::Pissa | WeightInit::PissaNiter { .. } => {
            let solver = match method {
                WeightInit::PissaNiter { niter, seed } => {
                    SvdSolver::Randomized(RsvdParams { oversample: 0, power_iters: niter, seed })
                }
                _ => SvdSolver::Exact,
            };
            let t = truncated_svd(module, w, r, solver)?;
            let root: Vec<f32> = t.s.iter().map(|&x| ((x as f64) / scaling).max(0.0).sqrt() as f32).collect();
            let a = Mat::from_fn(r, in_f, |i, j| root[i] * t.v[(j, i)]);
            let b = Mat::from_fn(out_f, r, |i, j| t.u[(i, j)] * root[j]);
            (a, b)
        }
        WeightInit::Olora => {
            let qr = w.qr();
            let q = qr.compute_thin_Q();
            let rm = qr.thin_R();
            (rm.subrows(0, r).to_owned(), q.as_ref().subcols(0, r).to_owned())
        }
    };
    let ba = &b * &a;
    let s = scaling as f32;
    let residual = Mat::from_fn(out_f, in_f, |i, j| w[(i, j)] - s * ba[(i, j)]);
    Ok(InitFactors { a, b, residual })
}

/// [`init_from_weight`] on candle tensors: `(A, B, residual)`.
pub fn init_tensors(module: &str, w: &Tensor, r: usize, scaling: f64, method: WeightInit) -> Result<(Tensor, Tensor, Tensor)> {
    let dev = w.device().clone();
    let f = init_from_weight(module, tensor_to_mat(w)?.as_ref(), r, scaling, method)?;
    Ok((mat_to_tensor(f.a.as_ref(), &dev)?, mat_to_tensor(f.b.as_ref(), &dev)?, mat_to_tensor(f.residual.as_ref(), &dev)?))
}

/// PEFT's conversion of a PiSSA/OLoRA adapter to a plain LoRA on the
/// unmodified base: `A' = [A; A₀]`, `B' = [B, −B₀]`, `r' = 2r`,
/// `alpha' = 2·alpha` (`√2·alpha` with rsLoRA), patterns doubled,
/// `init_lora_weights = true`. `initial` holds `A₀, B₀` (the adapter right
/// after initialisation), `trained` the adapter after training.
pub fn convert_to_plain_lora(initial: &LoadedAdapter, trained: &LoadedAdapter) -> Result<(AdapterConfig, Vec<(String, Tensor)>)> {
    let mut cfg = trained.config.clone();
    if cfg.use_rslora && (!cfg.rank_pattern.is_empty() || !cfg.alpha_pattern.is_empty()) {
        return Err(LowRankError::Input(
            "conversion to plain LoRA is not supported with use_rslora together with rank_pattern or alpha_pattern (as in PEFT)".into(),
        ));
    }
    let mut out = vec![];
    let init_modules = initial.lora_modules();
    for m in trained.lora_modules() {
        let (a, b) = pair(trained, &m, "trained adapter")?;
        if !init_modules.contains(&m) {
            return Err(LowRankError::Missing { module: m, present: "the trained adapter".into(), missing: "the initial adapter".into() });
        }
        let (a0, b0) = pair(initial, &m, "initial adapter")?;
        if a.dims() != a0.dims() || b.dims() != b0.dims() {
            return Err(LowRankError::Shape {
                module: m,
                msg: format!("trained A {:?} / B {:?} differ from initial A {:?} / B {:?}", a.dims(), b.dims(), a0.dims(), b0.dims()),
            });
        }
        out.push((lora_peft::lora_key(&m, LoraPart::A), Tensor::cat(&[a, a0], 0)?));
        out.push((lora_peft::lora_key(&m, LoraPart::B), Tensor::cat(&[b, &b0.neg()?], 1)?));
    }
    for (module, params) in trained.saved_modules() {
        for (p, t) in params {
            out.push((lora_peft::saved_module_key(&module, &p), t));
        }
    }
    cfg.r *= 2;
    cfg.lora_alpha *= if cfg.use_rslora { std::f64::consts::SQRT_2 } else { 2.0 };
    cfg.rank_pattern.values_mut().for_each(|v| *v *= 2);
    cfg.alpha_pattern.values_mut().for_each(|v| *v *= 2.0);
    cfg.init_lora_weights = InitLoraWeights::Default;
    Ok((cfg, out))
}

pub(crate) fn pair<'a>(ad: &'a LoadedAdapter, m: &str, what: &str) -> Result<(&'a Tensor, &'a Tensor)> {
    ad.lora_pair(m).ok_or_else(|| LowRankError::Missing {
        module: m.to_string(),
        present: "lora_A".into(),
        missing: format!("lora_B of the {what}"),
    })
}

impl WeightInit {
    /// `pissa`, `pissa-niter-N` (or PEFT's `pissa_niter_N`), `olora`; None
    /// for anything else. `seed` seeds the randomized SVD.
    pub fn parse(s: &str, seed: u64) -> Option<Self> {
        match s {
            "pissa" => Some(WeightInit::Pissa),
            "olora" => Some(WeightInit::Olora),
            _ => {
                let n = s.strip_prefix("pissa-niter-").or_else(|| s.strip_prefix("pissa_niter_"))?;
                n.parse().ok().map(|niter| WeightInit::PissaNiter { niter, seed })
            }
        }
    }
}

/// The builder hook that applies `method` to every adapted layer: initial
/// A/B from the weight, and the residual as the new frozen weight.
pub fn builder_hook(method: WeightInit) -> lora_core::WeightInitHook {
    let name = match method {
        WeightInit::Pissa => "pissa".to_string(),
        WeightInit::PissaNiter { niter, .. } => format!("pissa_niter_{niter}"),
        WeightInit::Olora => "olora".to_string(),
    };
    lora_core::WeightInitHook {
        name,
        init: std::sync::Arc::new(move |path: &str, w: &Tensor, r: usize, s: f64| {
            init_tensors(path, w, r, s, method).map_err(|e| lora_core::CoreError::InvalidConfig(e.to_string()))
        }),
    }
}
