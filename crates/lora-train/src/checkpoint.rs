//! Resumable training checkpoints: trainable tensors, AdamW moments and the
//! loop position, written atomically (a temporary folder renamed into place).

use crate::error::{Result, TrainError};
use crate::optim::AdamW;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// Where the loop stands; saved as `trainer_state.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps taken.
    pub step: usize,
    pub epoch: usize,
    /// Micro-batches of `epoch` already consumed.
    pub batch_in_epoch: usize,
    pub total_steps: usize,
    pub samples_seen: usize,
    pub best_metric: Option<f64>,
    pub best_step: Option<usize>,
    pub evals_since_best: usize,
    pub finished: bool,
    /// Free-form run settings, checked on resume (e.g. the training file).
    #[serde(default)]
    pub run: serde_json::Value,
}

fn ck_err(path: &Path, msg: impl std::fmt::Display) -> TrainError {
    TrainError::Checkpoint {
        path: path.display().to_string(),
        msg: msg.to_string(),
    }
}

pub fn save(dir: &Path, opt: &AdamW, state: &TrainState) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| ck_err(parent, e))?;
    let name = dir.file_name().and_then(|s| s.to_str()).unwrap_or("checkpoint");
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| ck_err(&tmp, e))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for p in &opt.params {
        let shape = p.var.shape().clone();
        let dev = p.var.device();
        tensors.insert(format!("param/{}", p.name), p.var.as_tensor().detach());
        tensors.insert(format!("adam_m/{}", p.name), Tensor::from_slice(&p.m, &shape, dev)?);
        tensors.insert(format!("adam_v/{}", p.name), Tensor::from_slice(&p.v, &shape, dev)?);
    }
    let st = tmp.join("state.safetensors");
    candle_core::safetensors::save(&tensors, &st).map_err(|e| ck_err(&st, e))?;
    let mut state = state.clone();
    state.run["adam_t"] = serde_json::json!(opt.t);
    let js = tmp.join("trainer_state.json");
    let text = serde_json::to_string_pretty(&state).map_err(|e| ck_err(&js, e))?;
    std::fs::write(&js, text).map_err(|e| ck_err(&js, e))?;
    for f in [&st, &js] {
        if let Ok(h) = std::fs::File::open(f) {
            let _ = h.sync_all();
        }
    }
    // Swap folders: old -> .old, tmp -> dir, drop .old.
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(|e| ck_err(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| ck_err(dir, e))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// Restores tensors and moments into `opt` (names and shapes must agree) and
/// returns the loop position.
pub fn load(dir: &Path, opt: &mut AdamW) -> Result<TrainState> {
    let js = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&js).map_err(|e| ck_err(&js, e))?;
    let state: TrainState = serde_json::from_str(&text).map_err(|e| ck_err(&js, e))?;
    let st = dir.join("state.safetensors");
    let tensors = candle_core::safetensors::load(&st, &candle_core::Device::Cpu)
        .map_err(|e| ck_err(&st, e.to_string().lines().next().unwrap_or("").to_string()))?;
    for p in opt.params.iter_mut() {
        let get = |k: String| -> Result<Tensor> {
            let t = tensors.get(&k).ok_or_else(|| ck_err(&st, format!("missing tensor '{k}'")))?;
            if t.dims() != p.var.dims() {
                return Err(ck_err(&st, format!("tensor '{k}' has shape {:?}, the model needs {:?}", t.dims(), p.var.dims())));
            }
            Ok(t.to_device(p.var.device())?)
        };
        p.var.set(&get(format!("param/{}", p.name))?)?;
        p.m = get(format!("adam_m/{}", p.name))?.flatten_all()?.to_vec1()?;
        p.v = get(format!("adam_v/{}", p.name))?.flatten_all()?.to_vec1()?;
    }
    opt.t = state.run.get("adam_t").and_then(|v| v.as_u64()).unwrap_or(state.step as u64);
    Ok(state)
}
