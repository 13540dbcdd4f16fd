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
    if model.gguf {
        return Err(LowRankError::Input(format!(
            "{}: compress writes a Hugging Face folder; convert the GGUF first (lora merge --model {} --out DIR --dtype f32 writes DIR as a folder when DIR does not end in .gguf), then compress DIR",
            model.name(),
            model.name()
        )));
    }
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

/// What [`fold_adapter`] changed.
#[derive(Debug, Clone, Serialize)]
pub struct FoldReport {
    /// Factored modules whose factors grew by the adapter's rank.
    pub grown: usize,
    /// Dense modules the update was added to.
    pub added: usize,
    /// Tensors of `modules_to_save` (e.g. the classifier head) replaced.
    pub replaced: usize,
    /// Parameters of the compact model after folding.
    pub params_after: usize,
    /// Size of `lowrank.safetensors` after folding.
    pub bytes_after: u64,
}

/// Folds a LoRA adapter trained on a compressed model (the recovery
/// fine-tune) into the compressed folder `dir`, exactly:
/// - a factored module `W ≈ B·A` gets `W' = B·A + s·B_l·A_l = [B | s·B_l]·[A ; A_l]`
///   (its factors grow by the adapter's rank, no approximation);
/// - a module kept dense gets `W + s·B_l·A_l`;
/// - `modules_to_save` tensors (the head) replace the folder's.
///
/// Both `lowrank.safetensors` and the multiplied-out `model.safetensors` are
/// rewritten (atomically); `lowrank.json` is left to the caller.
pub fn fold_adapter(dir: &Path, adapter: &lora_peft::LoadedAdapter) -> Result<FoldReport> {
    let dev = Device::Cpu;
    let model = ModelWeights::open(dir)?;
    let lowrank_path = dir.join(FACTORED_NAME);
    let mut factored: HashMap<String, Tensor> = candle_core::safetensors::load(&lowrank_path, &dev)?.into_iter().collect();
    let dense_path = dir.join("model.safetensors");
    let mut dense: HashMap<String, Tensor> = candle_core::safetensors::load(&dense_path, &dev)?.into_iter().collect();
    let (mut grown, mut added, mut replaced) = (0, 0, 0);
    for module in adapter.lora_modules() {
        let (a_l, b_l) = adapter.lora_pair(&module).expect("listed module has a pair");
        let s = adapter.config.scaling_for(&module);
        let key = format!("{module}.weight");
        let orig = model.original_key(&key).ok_or_else(|| LowRankError::Missing { module: module.clone(), present: "the adapter".into(), missing: model.name() })?.to_string();
        let stem = orig.strip_suffix(".weight").unwrap_or(&orig).to_string();
        let b_s = (b_l.to_dtype(candle_core::DType::F32)? * s)?;
        let a_l = a_l.to_dtype(candle_core::DType::F32)?;
        let delta = b_s.matmul(&a_l)?;
        let w = dense.get(&orig).ok_or_else(|| LowRankError::Missing { module: module.clone(), present: "the adapter".into(), missing: dense_path.display().to_string() })?;
        if delta.dims() != w.dims() {
            return Err(LowRankError::Input(format!("{module}: the adapter's update is {:?} but the weight is {:?}", delta.dims(), w.dims())));
        }
        let w_new = (w.to_dtype(candle_core::DType::F32)? + &delta)?;
        dense.insert(orig.clone(), w_new.clone());
        let (ka, kb) = (format!("{stem}.lowrank_A"), format!("{stem}.lowrank_B"));
        match (factored.get(&ka), factored.get(&kb)) {
            (Some(a), Some(b)) => {
                let a2 = Tensor::cat(&[a, &a_l], 0)?;
                let b2 = Tensor::cat(&[b, &b_s], 1)?;
                factored.insert(ka, a2);
                factored.insert(kb, b2);
                grown += 1;
            }
            _ => {
                factored.insert(orig, w_new);
                added += 1;
            }
        }
    }
    for (module, params) in adapter.saved_modules() {
        for (p, t) in params {
            let key = format!("{module}.{p}");
            let orig = model.original_key(&key).unwrap_or(&key).to_string();
            dense.insert(orig.clone(), t.clone());
            factored.insert(orig, t);
            replaced += 1;
        }
    }
    save(&factored, &lowrank_path)?;
    save(&dense, &dense_path)?;
    let params_after = factored.values().map(|t| t.elem_count()).sum();
    let bytes_after = std::fs::metadata(&lowrank_path).map(|m| m.len()).unwrap_or(0);
    Ok(FoldReport { grown, added, replaced, params_after, bytes_after })
}
