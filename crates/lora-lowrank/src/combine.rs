//! Adapter arithmetic, numerically as PEFT's `LoraModel.add_weighted_adapter`
//! (peft/tuners/lora/model.py) and `peft/utils/merge_utils.py`:
//!
//! | method | per module | new rank |
//! |---|---|---|
//! | `linear` | `A = Σ √|wᵢsᵢ|·sign(wᵢsᵢ)·Aᵢ`, `B = Σ √|wᵢsᵢ|·Bᵢ` | the common rank |
//! | `ties`   | the same weights, but each of A and B by TIES: magnitude-prune every `Aᵢ` to `density`, elect the sign per entry (`total`: sign of Σ pruned; `frequency`: of Σ signs), keep agreeing entries, mean of the kept weighted values | the common rank |
//! | `cat`    | `A = [w₁s₁A₁; w₂s₂A₂; …]`, `B = [B₁, B₂, …]`, zero-padded to the new rank | Σ ranks |
//! | `svd`    | `ΔW = Σ wᵢ·sᵢBᵢAᵢ`; `U,S,Vᵀ = svd(ΔW)`; `B = U_r·S_r`, `A = V_rᵀ` | `svd_rank`, else max rank |
//!
//! (`sᵢ` is adapter i's scaling on that module.) The new config is the first
//! adapter's with `r = lora_alpha = new rank` (scaling 1 without rsLoRA),
//! empty patterns and the union of the targets. `linear` and `ties` refuse
//! adapters of different ranks (as PEFT) and, here, of different target
//! modules; `cat` and `svd` take the union of modules (a module missing from
//! an adapter gets nothing from it).

use crate::error::{check_rank, LowRankError, Result};
use crate::init::pair;
use crate::svd::{exact_svd, mat_to_tensor, tensor_to_mat};
use candle_core::{DType, Tensor};
use faer::Mat;
use lora_peft::{AdapterConfig, LoadedAdapter, LoraPart, TargetModules};
use std::collections::{BTreeMap, BTreeSet};

/// TIES sign election.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MajoritySign {
    /// Sign of the sum of the pruned tensors (PEFT default).
    #[default]
    Total,
    /// Sign of the sum of their signs.
    Frequency,
}

/// How adapters are combined.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CombineMethod {
    Linear,
    Cat,
    /// `rank`: PEFT's `svd_rank` (None: the largest input rank).
    Svd { rank: Option<usize> },
    Ties { density: f64, sign: MajoritySign },
}

impl CombineMethod {
    /// PEFT's `combination_type` name.
    pub fn name(&self) -> &'static str {
        match self {
            CombineMethod::Linear => "linear",
            CombineMethod::Cat => "cat",
            CombineMethod::Svd { .. } => "svd",
            CombineMethod::Ties { .. } => "ties",
        }
    }
}

/// One input: a name for messages, the adapter and its weight.
pub struct Weighted<'a> {
    pub name: String,
    pub adapter: &'a LoadedAdapter,
    pub weight: f64,
}

/// PEFT's rank used for allocation: `r`, or the max over `rank_pattern`.
fn alloc_rank(c: &AdapterConfig) -> usize {
    c.rank_pattern.values().copied().chain([c.r]).max().unwrap_or(c.r)
}

/// Combines `inputs` into a new adapter config and its tensors (PEFT keys).
pub fn combine(inputs: &[Weighted<'_>], method: CombineMethod) -> Result<(AdapterConfig, Vec<(String, Tensor)>)> {
    let first = inputs.first().ok_or_else(|| LowRankError::Input("no adapters to combine".into()))?;
    for w in inputs {
        if !w.weight.is_finite() {
            return Err(LowRankError::BadWeight { adapter: w.name.clone(), weight: w.weight });
        }
    }
    // PEFT: a single adapter can only be combined linearly.
    let method = if inputs.len() == 1 { CombineMethod::Linear } else { method };
    if let CombineMethod::Ties { density, .. } = method {
        if !(density.is_finite() && density > 0.0 && density <= 1.0) {
            return Err(LowRankError::BadDensity(density));
        }
    }
    let ranks: Vec<usize> = inputs.iter().map(|w| alloc_rank(&w.adapter.config)).collect();
    let modules: Vec<BTreeSet<String>> = inputs.iter().map(|w| w.adapter.lora_modules().into_iter().collect()).collect();
    let new_rank = match method {
        CombineMethod::Linear | CombineMethod::Ties { .. } => {
            if ranks.iter().any(|&r| r != ranks[0]) {
                let detail = inputs.iter().zip(&ranks).map(|(w, r)| format!("{} r={r}", w.name)).collect::<Vec<_>>().join(", ");
                return Err(LowRankError::Incompatible { method: method.name().into(), what: "rank", detail });
            }
            for (w, m) in inputs.iter().zip(&modules).skip(1) {
                if *m != modules[0] {
                    let only: Vec<_> = m.symmetric_difference(&modules[0]).take(3).cloned().collect();
                    let detail = format!("{} and {} differ on {}", first.name, w.name, only.join(", "));
                    return Err(LowRankError::Incompatible { method: method.name().into(), what: "target modules", detail });
                }
            }
            ranks[0]
        }
        CombineMethod::Cat => ranks.iter().sum(),
        CombineMethod::Svd { rank } => rank.unwrap_or_else(|| ranks.iter().copied().max().unwrap_or(1)),
    };
    let all: BTreeSet<String> = modules.iter().flatten().cloned().collect();
    let mut out = vec![];
    for m in &all {
        let present: Vec<(&Weighted, &Tensor, &Tensor, f64)> = inputs
            .iter()
            .filter(|w| w.adapter.lora_pair(m).is_some())
            .map(|w| {
                let (a, b) = pair(w.adapter, m, &w.name)?;
                Ok((w, a, b, w.adapter.config.scaling_for(m)))
            })
            .collect::<Result<_>>()?;
        let (a, b) = match method {
            CombineMethod::Cat => cat(&present, new_rank)?,
            CombineMethod::Svd { .. } => svd(m, &present, new_rank)?,
            CombineMethod::Linear | CombineMethod::Ties { .. } => arithmetic(m, &present, method)?,
        };
        out.push((lora_peft::lora_key(m, LoraPart::A), a));
        out.push((lora_peft::lora_key(m, LoraPart::B), b));
    }
    let cfg = new_config(inputs, new_rank, &mut out)?;
    Ok((cfg, out))
}

fn new_config(inputs: &[Weighted<'_>], new_rank: usize, out: &mut Vec<(String, Tensor)>) -> Result<AdapterConfig> {
    let mut cfg = inputs[0].adapter.config.clone();
    cfg.r = new_rank;
    cfg.lora_alpha = new_rank as f64;
    cfg.rank_pattern = BTreeMap::new();
    cfg.alpha_pattern = BTreeMap::new();
    let targets: Vec<&TargetModules> = inputs.iter().filter_map(|w| w.adapter.config.target_modules.as_ref()).collect();
    cfg.target_modules = if targets.iter().all(|t| matches!(t, TargetModules::Names(_))) {
        let mut u: BTreeSet<String> = BTreeSet::new();
        for t in &targets {
            if let TargetModules::Names(n) = t {
                u.extend(n.iter().cloned());
            }
        }
        Some(TargetModules::Names(u.into_iter().collect()))
    } else if targets.iter().all(|t| matches!(t, TargetModules::AllLinear)) {
        Some(TargetModules::AllLinear)
    } else if targets.iter().all(|t| matches!(t, TargetModules::Regex(_))) {
        let parts: Vec<String> = targets.iter().filter_map(|t| match t { TargetModules::Regex(r) => Some(format!("({r})")), _ => None }).collect();
        Some(TargetModules::Regex(parts.join("|")))
    } else {
        return Err(LowRankError::Incompatible {
            method: "any".into(),
            what: "kind of target_modules",
            detail: "a mix of name lists and regex strings cannot be combined (as in PEFT)".into(),
        });
    };
    // modules_to_save: PEFT refuses two adapters that both save modules; one is copied.
    let savers: Vec<&Weighted> = inputs.iter().filter(|w| !w.adapter.saved_modules().is_empty()).collect();
    if savers.len() > 1 {
        return Err(LowRankError::Incompatible {
            method: "any".into(),
            what: "modules_to_save",
            detail: format!("{} and {} both save full modules, which cannot be merged (as in PEFT)", savers[0].name, savers[1].name),
        });
    }
    cfg.modules_to_save = savers.first().and_then(|w| w.adapter.config.modules_to_save.clone());
    if let Some(w) = savers.first() {
        for (module, params) in w.adapter.saved_modules() {
            for (p, t) in params {
                out.push((lora_peft::saved_module_key(&module, &p), t));
            }
        }
    }
    Ok(cfg)
}

type Present<'a, 'b> = (&'a Weighted<'b>, &'a Tensor, &'a Tensor, f64);

fn cat(present: &[Present<'_, '_>], new_rank: usize) -> Result<(Tensor, Tensor)> {
    let mut a_parts = vec![];
    let mut b_parts = vec![];
    for (w, a, b, s) in present {
        a_parts.push(((*a * w.weight)? * *s)?);
        b_parts.push((*b).clone());
    }
    let a = Tensor::cat(&a_parts, 0)?;
    let b = Tensor::cat(&b_parts, 1)?;
    let r = a.dim(0)?;
    if r < new_rank {
        let (in_f, out_f) = (a.dim(1)?, b.dim(0)?);
        let za = Tensor::zeros((new_rank - r, in_f), DType::F32, a.device())?;
        let zb = Tensor::zeros((out_f, new_rank - r), DType::F32, b.device())?;
        return Ok((Tensor::cat(&[&a, &za], 0)?, Tensor::cat(&[&b, &zb], 1)?));
    }
    Ok((a, b))
}

fn svd(m: &str, present: &[Present<'_, '_>], new_rank: usize) -> Result<(Tensor, Tensor)> {
    let mut delta: Option<Tensor> = None;
    for (w, a, b, s) in present {
        // get_delta_weight: (B @ A) * scaling, then task_arithmetic weights.
        let d = ((b.matmul(a)? * *s)? * w.weight)?;
        delta = Some(match delta {
            None => d,
            Some(acc) => (acc + d)?,
        });
    }
    let delta = delta.ok_or_else(|| LowRankError::Input(format!("{m}: no adapter holds this module")))?;
    let dev = delta.device().clone();
    let dm = tensor_to_mat(&delta)?;
    check_rank(m, new_rank, dm.nrows(), dm.ncols())?;
    let t = exact_svd(m, dm.as_ref())?.truncate(new_rank);
    let b = Mat::from_fn(t.u.nrows(), new_rank, |i, j| t.u[(i, j)] * t.s[j]);
    let a = t.v.as_ref().transpose().to_owned();
    Ok((mat_to_tensor(a.as_ref(), &dev)?, mat_to_tensor(b.as_ref(), &dev)?))
}

fn arithmetic(m: &str, present: &[Present<'_, '_>], method: CombineMethod) -> Result<(Tensor, Tensor)> {
    let mut wa = vec![];
    let mut wb = vec![];
    for (w, _, _, s) in present {
        let ws = w.weight * s;
        let root = ws.abs().sqrt();
        wa.push(if ws >= 0.0 { root } else { -root } as f32);
        wb.push(root as f32);
    }
    let a_list: Vec<&Tensor> = present.iter().map(|p| p.1).collect();
    let b_list: Vec<&Tensor> = present.iter().map(|p| p.2).collect();
    for (i, t) in a_list.iter().enumerate().skip(1) {
        if t.dims() != a_list[0].dims() || b_list[i].dims() != b_list[0].dims() {
            return Err(LowRankError::Shape { module: m.into(), msg: format!("factors of different shapes: {:?} vs {:?}", t.dims(), a_list[0].dims()) });
        }
    }
    let a = merge_tensors(&a_list, &wa, method)?;
    let b = merge_tensors(&b_list, &wb, method)?;
    Ok((a, b))
}

/// `task_arithmetic` / `ties` of merge_utils.py on one stack of tensors.
fn merge_tensors(ts: &[&Tensor], weights: &[f32], method: CombineMethod) -> Result<Tensor> {
    let shape = ts[0].dims().to_vec();
    let dev = ts[0].device().clone();
    let data: Vec<Vec<f32>> = ts.iter().map(|t| t.flatten_all().and_then(|t| t.to_vec1::<f32>())).collect::<candle_core::Result<_>>()?;
    let n = data[0].len();
    let out: Vec<f32> = match method {
        CombineMethod::Ties { density, sign } => {
            let pruned: Vec<Vec<f32>> = data.iter().map(|d| magnitude_prune(d, density)).collect();
            (0..n)
                .map(|j| {
                    let elect = match sign {
                        MajoritySign::Total => pruned.iter().map(|p| p[j]).sum::<f32>(),
                        MajoritySign::Frequency => pruned.iter().map(|p| sgn(p[j])).sum::<f32>(),
                    };
                    let major = if elect >= 0.0 { 1.0 } else { -1.0 };
                    let mut acc = 0.0f32;
                    let mut kept = 0.0f32;
                    for (p, w) in pruned.iter().zip(weights) {
                        if sgn(p[j]) == major {
                            acc += p[j] * w;
                            kept += 1.0;
                        }
                    }
                    acc / kept.max(1.0)
                })
                .collect()
        }
        _ => (0..n).map(|j| data.iter().zip(weights).map(|(d, w)| d[j] * w).sum()).collect(),
    };
    Ok(Tensor::from_vec(out, shape, &dev)?)
}

fn sgn(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// Keeps the `int(density·n)` largest magnitudes (PEFT `magnitude_based_pruning`).
fn magnitude_prune(d: &[f32], density: f64) -> Vec<f32> {
    if density >= 1.0 {
        return d.to_vec();
    }
    let k = (density * d.len() as f64) as usize;
    let mut idx: Vec<usize> = (0..d.len()).collect();
    idx.sort_by(|&i, &j| d[j].abs().total_cmp(&d[i].abs()));
    let mut out = vec![0.0; d.len()];
    for &i in idx.iter().take(k) {
        out[i] = d[i];
    }
    out
}
