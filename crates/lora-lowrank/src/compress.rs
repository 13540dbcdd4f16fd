//! Model compression: chosen weight matrices `W (out, in)` are replaced by
//! the rank-r factors of their truncated SVD, `W ≈ B·A` with
//! `B = U_r·√S_r` (out, r), `A = √S_r·V_rᵀ` (r, in).
//!
//! The output folder holds
//! - `lowrank.safetensors`: the compact model: every factored weight stored
//!   as `<module>.lowrank_A` / `<module>.lowrank_B` instead of
//!   `<module>.weight`, every other tensor unchanged (checkpoint key names);
//! - `model.safetensors`: the same model with `B·A` multiplied out, so
//!   transformers and this toolkit load it unchanged (same size as the input);
//! - `lowrank.json`: per module rank, retained energy and relative error;
//! - `config.json` and the tokenizer files, copied.
//!
//! A module whose factors would not be smaller than `W`
//! (`r·(out+in) ≥ out·in`) is kept dense.

use crate::error::{LowRankError, Result};
use crate::extract::RankRule;
use crate::source::ModelWeights;
use crate::svd::{exact_svd, mat_to_tensor, retained_energy, tensor_to_mat, truncated_svd, SvdSolver};
use candle_core::{Device, Tensor};
use faer::Mat;
use lora_core::TargetSpec;
use serde::Serialize;
use std::collections::HashMap;
use std::path::Path;

/// File name of the factored model.
pub const FACTORED_NAME: &str = "lowrank.safetensors";
/// Files copied from the input folder when present.
const COPIED: &[&str] = &["config.json", "tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"];

/// What happened to one weight matrix.
#[derive(Debug, Clone, Serialize)]
pub struct CompressedModule {
    pub module: String,
    pub shape: [usize; 2],
    pub rank: usize,
    /// False when the factors would not be smaller (kept dense).
    pub factored: bool,
    /// Share of `‖W‖²_F` kept.
    pub energy: f64,
    /// `‖W − B·A‖_F / ‖W‖_F`.
    pub relative_error: f64,
}

/// Totals of a compression.
#[derive(Debug, Clone, Serialize)]
pub struct CompressReport {
    pub modules: Vec<CompressedModule>,
    pub params_before: usize,
    pub params_after: usize,
    pub bytes_before: u64,
    /// Size of `lowrank.safetensors`.
    pub bytes_after: u64,
}

/// Compresses the target linear weights of `model` into `out_dir`.
pub fn compress_model(model: &ModelWeights, targets: &TargetSpec, heads: &[String], rule: RankRule, solver: SvdSolver, out_dir: &Path) -> Result<CompressReport> {
    rule.validate()?;
    let dev = Device::Cpu;
    let mut dense: HashMap<String, Tensor> = HashMap::new();
    let mut factored: HashMap<String, Tensor> = HashMap::new();
    let mut modules = vec![];
    let (mut before, mut after) = (0usize, 0usize);
    for key in model.keys() {
        let orig = model.original_key(&key).unwrap_or(&key).to_string();
        let t = model.get_required(&key, &dev)?;
        before += t.elem_count();
        let module = key.strip_suffix(".weight").unwrap_or(&key).to_string();
        let head = heads.iter().any(|h| key.starts_with(&format!("{h}.")));
        let linear = key.ends_with(".weight") && t.rank() == 2 && !module.contains("embed") && !head;
        if !(linear && targets.matches(&module, false)) {
            after += t.elem_count();
            factored.insert(orig.clone(), t.clone());
            dense.insert(orig, t);
            continue;
        }
        let w = tensor_to_mat(&t)?;
        let (o, i) = (w.nrows(), w.ncols());
        let (svd, energy) = match (rule, solver) {
            (RankRule::Fixed(r), SvdSolver::Randomized(_)) => {
                let s = truncated_svd(&module, w.as_ref(), r, solver)?;
                let n2 = crate::svd::frob(w.as_ref()).powi(2);
                let kept: f64 = s.s.iter().map(|&x| (x as f64).powi(2)).sum();
                (s, if n2 > 0.0 { (kept / n2).min(1.0) } else { 1.0 })
            }
            _ => {
                let full = exact_svd(&module, w.as_ref())?;
                let r = rule.rank(&module, &full.s, o, i)?;
                let e = retained_energy(&full.s, r);
                (full.truncate(r), e)
            }
        };
        let r = svd.rank();
        let smaller = r * (o + i) < o * i;
        if !smaller {
            after += t.elem_count();
            modules.push(CompressedModule { module, shape: [o, i], rank: r, factored: false, energy: 1.0, relative_error: 0.0 });
            factored.insert(orig.clone(), t.clone());
            dense.insert(orig, t);
            continue;
        }
        let root: Vec<f32> = svd.s.iter().map(|&x| x.max(0.0).sqrt()).collect();
        let a = Mat::from_fn(r, i, |p, q| root[p] * svd.v[(q, p)]);
        let b = Mat::from_fn(o, r, |p, q| svd.u[(p, q)] * root[q]);
        let ba = &b * &a;
        let rel = crate::svd::frob_diff(ba.as_ref(), w.as_ref()) / crate::svd::frob(w.as_ref()).max(f64::MIN_POSITIVE);
        after += r * (o + i);
        let stem = orig.strip_suffix(".weight").unwrap_or(&orig).to_string();
        factored.insert(format!("{stem}.lowrank_A"), mat_to_tensor(a.as_ref(), &dev)?);
        factored.insert(format!("{stem}.lowrank_B"), mat_to_tensor(b.as_ref(), &dev)?);
        dense.insert(orig, mat_to_tensor(ba.as_ref(), &dev)?);
        modules.push(CompressedModule { module, shape: [o, i], rank: r, factored: true, energy, relative_error: rel });
    }
    if modules.is_empty() {
        return Err(LowRankError::Input(format!("no linear layer of {} matches the targets {:?}", model.name(), targets.modules)));
    }
    std::fs::create_dir_all(out_dir).map_err(|e| io(out_dir, e))?;
    let bytes_before: u64 = crate::source::weight_files(&model.dir)?.iter().filter_map(|p| std::fs::metadata(p).ok()).map(|m| m.len()).sum();
    save(&factored, &out_dir.join(FACTORED_NAME))?;
    save(&dense, &out_dir.join("model.safetensors"))?;
    for f in COPIED {
        let src = model.dir.join(f);
        if src.is_file() {
            std::fs::copy(&src, out_dir.join(f)).map_err(|e| io(&src, e))?;
        }
    }
    let bytes_after = std::fs::metadata(out_dir.join(FACTORED_NAME)).map(|m| m.len()).unwrap_or(0);
    let rep = CompressReport { modules, params_before: before, params_after: after, bytes_before, bytes_after };
    let json = serde_json::to_string_pretty(&rep).map_err(|e| LowRankError::Input(e.to_string()))?;
    std::fs::write(out_dir.join("lowrank.json"), json).map_err(|e| io(out_dir, e))?;
    Ok(rep)
}

fn save(t: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    candle_core::safetensors::save(t, &tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))
}

fn io(p: &Path, e: std::io::Error) -> LowRankError {
    LowRankError::Io { path: p.display().to_string(), msg: e.to_string() }
}
