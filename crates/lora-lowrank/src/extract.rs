//! Adapter extraction: for every target module, `ΔW = W_tuned − W_base` and
//! its best rank-r approximation (Eckart–Young), written as a PEFT adapter.
//!
//! `ΔW ≈ U_r·S_r·V_rᵀ = B·A` with `B = U_r·√S_r` (out, r) and
//! `A = √S_r·V_rᵀ` (r, in); each module's alpha equals its rank, so the
//! scaling is 1. With an energy threshold each module gets the smallest rank
//! holding that share of `‖ΔW‖²_F`; ranks that differ from the most common
//! one go to `rank_pattern` / `alpha_pattern` (full module paths).

use crate::error::{check_rank, LowRankError, Result};
use crate::svd::{exact_svd, mat_to_tensor, rank_for_energy, retained_energy, tensor_to_mat, truncated_svd, SvdSolver};
use crate::source::ModelWeights;
use candle_core::{Device, Tensor};
use faer::Mat;
use lora_core::TargetSpec;
use lora_peft::{AdapterConfig, LoraPart, TargetModules};
use std::collections::BTreeMap;

/// How the rank of each module is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RankRule {
    /// The same rank everywhere.
    Fixed(usize),
    /// The smallest rank holding this share (0, 1] of `Σσ²`.
    Energy(f64),
}

impl RankRule {
    /// Checks the values (rank ≥ 1, energy in (0, 1]).
    pub fn validate(&self) -> Result<()> {
        match *self {
            RankRule::Fixed(0) => Err(LowRankError::ZeroRank),
            RankRule::Energy(e) => crate::error::check_energy(e),
            _ => Ok(()),
        }
    }

    /// The rank for spectrum `s` of a (rows, cols) matrix.
    pub fn rank(&self, module: &str, s: &[f32], rows: usize, cols: usize) -> Result<usize> {
        match *self {
            RankRule::Fixed(r) => {
                check_rank(module, r, rows, cols)?;
                Ok(r)
            }
            RankRule::Energy(e) => rank_for_energy(s, e),
        }
    }
}

/// The extracted factors of one module.
#[derive(Debug, Clone)]
pub struct ExtractedModule {
    /// Module path (without `.weight`).
    pub module: String,
    /// (r, in)
    pub a: Tensor,
    /// (out, r)
    pub b: Tensor,
    pub rank: usize,
    /// Share of `‖ΔW‖²_F` kept.
    pub energy: f64,
    /// `‖ΔW‖_F`.
    pub delta_norm: f64,
    /// `‖ΔW‖_F / ‖W_base‖_F`.
    pub relative_change: f64,
}

/// Low-rank factors of `ΔW = tuned − base` for one module.
pub fn extract_module(module: &str, base: &Tensor, tuned: &Tensor, rule: RankRule, solver: SvdSolver) -> Result<ExtractedModule> {
    if base.dims() != tuned.dims() {
        return Err(LowRankError::ShapeMismatch { module: module.into(), base: base.dims().to_vec(), tuned: tuned.dims().to_vec() });
    }
    let dev = base.device().clone();
    let wb = tensor_to_mat(base)?;
    let wt = tensor_to_mat(tuned)?;
    let d = Mat::from_fn(wb.nrows(), wb.ncols(), |i, j| wt[(i, j)] - wb[(i, j)]);
    let dn = crate::svd::frob(d.as_ref());
    let bn = crate::svd::frob(wb.as_ref());
    // Energy needs the whole spectrum; a fixed rank may use the randomized solver.
    let (t, energy) = match (rule, solver) {
        (RankRule::Fixed(r), SvdSolver::Randomized(_)) => {
            let t = truncated_svd(module, d.as_ref(), r, solver)?;
            let kept: f64 = t.s.iter().map(|&x| (x as f64).powi(2)).sum();
            let e = if dn > 0.0 { (kept / (dn * dn)).min(1.0) } else { 1.0 };
            (t, e)
        }
        _ => {
            let full = exact_svd(module, d.as_ref())?;
            let r = rule.rank(module, &full.s, d.nrows(), d.ncols())?;
            let e = retained_energy(&full.s, r);
            (full.truncate(r), e)
        }
    };
    let r = t.rank();
    let root: Vec<f32> = t.s.iter().map(|&x| x.max(0.0).sqrt()).collect();
    let a = Mat::from_fn(r, d.ncols(), |i, j| root[i] * t.v[(j, i)]);
    let b = Mat::from_fn(d.nrows(), r, |i, j| t.u[(i, j)] * root[j]);
    Ok(ExtractedModule {
        module: module.into(),
        a: mat_to_tensor(a.as_ref(), &dev)?,
        b: mat_to_tensor(b.as_ref(), &dev)?,
        rank: r,
        energy,
        delta_norm: dn,
        relative_change: if bn > 0.0 { dn / bn } else { 0.0 },
    })
}

/// What an extraction produced beyond the factors.
#[derive(Debug, Clone, Default)]
pub struct ExtractReport {
    pub modules: Vec<ExtractedModule>,
    /// Head modules (e.g. `classifier`) copied whole: path -> param -> tensor.
    pub saved: BTreeMap<String, BTreeMap<String, Tensor>>,
    /// Other tensors that changed but are not captured: (key, ‖Δ‖/‖base‖).
    pub dropped: Vec<(String, f64)>,
    /// The base is a decoder-only language model (the adapter is CAUSAL_LM).
    pub decoder: bool,
}

/// Extracts every target module of two models. Linear weights are the 2-D
/// `*.weight` tensors outside embeddings (keys containing `embed`); `heads` (e.g. `classifier`) are
/// copied whole when the tuned model has them and they are new or changed.
pub fn extract(base: &ModelWeights, tuned: &ModelWeights, targets: &TargetSpec, heads: &[String], rule: RankRule, solver: SvdSolver) -> Result<ExtractReport> {
    rule.validate()?;
    let dev = Device::Cpu;
    let mut rep = ExtractReport { decoder: base.is_decoder(), ..Default::default() };
    let tuned_keys = tuned.keys();
    let base_keys = base.keys();
    // A target weight of the base missing from the tuned model means the two
    // are different models; other tensors (buffers such as position_ids) may be absent.
    for k in &base_keys {
        if !tuned_keys.contains(k) && !is_head(k, heads) && is_linear(k, base.shape(k).as_deref()) && targets.matches(k.trim_end_matches(".weight"), false) {
            return Err(LowRankError::Missing { module: k.clone(), present: base.name(), missing: tuned.name() });
        }
    }
    for k in &tuned_keys {
        let Some(module) = k.strip_suffix(".weight").or_else(|| k.strip_suffix(".bias")) else {
            rep_dropped(&mut rep, base, tuned, k)?;
            continue;
        };
        if is_head(k, heads) {
            let (m, p) = head_split(k, heads);
            let changed = match base.get(k, &dev)? {
                None => true,
                Some(b) => delta_rel(&b, &tuned.get_required(k, &dev)?)? > 0.0,
            };
            if changed {
                rep.saved.entry(m).or_default().insert(p, tuned.get_required(k, &dev)?);
            }
            continue;
        }
        if !base_keys.contains(k) {
            return Err(LowRankError::Missing { module: k.clone(), present: tuned.name(), missing: base.name() });
        }
        if is_linear(k, tuned.shape(k).as_deref()) && targets.matches(module, false) {
            let b = base.get_required(k, &dev)?;
            let t = tuned.get_required(k, &dev)?;
            rep.modules.push(extract_module(module, &b, &t, rule, solver)?);
        } else {
            rep_dropped(&mut rep, base, tuned, k)?;
        }
    }
    if rep.modules.is_empty() {
        return Err(LowRankError::Input(format!("no linear layer of {} matches the targets {:?}", tuned.name(), targets.modules)));
    }
    Ok(rep)
}

/// A linear layer's weight: 2-D `*.weight` outside embedding tables.
fn is_linear(key: &str, shape: Option<&[usize]>) -> bool {
    key.ends_with(".weight") && shape.map(|s| s.len() == 2).unwrap_or(false) && !key.contains("embed")
}

fn rep_dropped(rep: &mut ExtractReport, base: &ModelWeights, tuned: &ModelWeights, k: &str) -> Result<()> {
    let dev = Device::Cpu;
    // Non-float buffers (position_ids) cannot be read as f32: nothing to report.
    let (Ok(Some(b)), Ok(Some(t))) = (base.get(k, &dev), tuned.get(k, &dev)) else { return Ok(()) };
    if b.dims() != t.dims() {
        return Err(LowRankError::ShapeMismatch { module: k.into(), base: b.dims().to_vec(), tuned: t.dims().to_vec() });
    }
    let r = delta_rel(&b, &t)?;
    if r > 0.0 {
        rep.dropped.push((k.to_string(), r));
    }
    Ok(())
}

fn delta_rel(b: &Tensor, t: &Tensor) -> Result<f64> {
    if b.dims() != t.dims() {
        return Ok(f64::INFINITY);
    }
    let d: f32 = (t - b)?.sqr()?.sum_all()?.to_scalar()?;
    let n: f32 = b.sqr()?.sum_all()?.to_scalar()?;
    Ok(if n > 0.0 { (d / n).sqrt() as f64 } else { d.sqrt() as f64 })
}

fn is_head(key: &str, heads: &[String]) -> bool {
    heads.iter().any(|h| key.starts_with(&format!("{h}.")))
}

fn head_split(key: &str, heads: &[String]) -> (String, String) {
    for h in heads {
        if let Some(p) = key.strip_prefix(&format!("{h}.")) {
            return (h.clone(), p.to_string());
        }
    }
    (key.to_string(), String::new())
}

/// The PEFT config and tensors for an extraction. `r` is the most common
/// rank; other ranks go to `rank_pattern`/`alpha_pattern` (alpha = rank).
pub fn to_adapter(rep: &ExtractReport, base_model: &str) -> (AdapterConfig, Vec<(String, Tensor)>) {
    let mut count: BTreeMap<usize, usize> = BTreeMap::new();
    for m in &rep.modules {
        *count.entry(m.rank).or_default() += 1;
    }
    let r = count.iter().max_by_key(|(r, c)| (**c, std::cmp::Reverse(**r))).map(|(r, _)| *r).unwrap_or(1);
    let mut names: Vec<String> = rep.modules.iter().map(|m| m.module.rsplit('.').next().unwrap_or(&m.module).to_string()).collect();
    names.sort();
    names.dedup();
    let mut cfg = AdapterConfig::new(r, r as f64, TargetModules::Names(names));
    cfg.base_model_name_or_path = Some(base_model.to_string());
    cfg.inference_mode = true;
    if rep.decoder {
        cfg.task_type = Some(lora_peft::TaskType::CausalLm);
    }
    let mut tensors = vec![];
    for m in &rep.modules {
        if m.rank != r {
            cfg.rank_pattern.insert(m.module.clone(), m.rank);
            cfg.alpha_pattern.insert(m.module.clone(), m.rank as f64);
        }
        tensors.push((lora_peft::lora_key(&m.module, LoraPart::A), m.a.clone()));
        tensors.push((lora_peft::lora_key(&m.module, LoraPart::B), m.b.clone()));
    }
    if !rep.saved.is_empty() {
        cfg.modules_to_save = Some(rep.saved.keys().cloned().collect());
        if !rep.decoder {
            cfg.task_type = Some(lora_peft::TaskType::SeqCls);
        }
        for (m, params) in &rep.saved {
            for (p, t) in params {
                tensors.push((lora_peft::saved_module_key(m, p), t.clone()));
            }
        }
    }
    (cfg, tensors)
}
