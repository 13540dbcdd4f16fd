//! What is in an adapter (for `inspect`), and the shape check used when an
//! adapter is attached to a model.

use crate::error::{PeftError, Result};
use crate::fields::TaskType;
use crate::io::LoadedAdapter;
use crate::keys::{lora_key, LoraPart};
use candle_core::Tensor;
use std::collections::BTreeMap;

/// One adapted module.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetSummary {
    /// Rank read from the tensors (A is (r, in)).
    pub r: usize,
    pub in_features: usize,
    pub out_features: usize,
    /// From the config: alpha/r or alpha/sqrt(r), with rank/alpha patterns applied.
    pub scaling: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSummary {
    pub task_type: Option<TaskType>,
    pub base_model_name_or_path: Option<String>,
    pub peft_version: Option<String>,
    /// Module paths with a LoRA pair, sorted.
    pub targets: Vec<String>,
    /// Module path -> rank (from the tensors).
    pub ranks: BTreeMap<String, usize>,
    pub modules: BTreeMap<String, TargetSummary>,
    /// `modules_to_save` modules: module path -> [(param, shape)].
    pub saved_modules: BTreeMap<String, Vec<(String, Vec<usize>)>>,
    /// Elements in all lora_A/lora_B tensors.
    pub lora_params: usize,
    /// Elements in all `modules_to_save` tensors (e.g. the classifier head).
    pub head_params: usize,
}

impl AdapterSummary {
    pub fn total_params(&self) -> usize {
        self.lora_params + self.head_params
    }
}

pub fn summarize(adapter: &LoadedAdapter) -> AdapterSummary {
    let mut modules = BTreeMap::new();
    let mut lora_params = 0;
    for path in adapter.lora_modules() {
        if let Some((a, b)) = adapter.lora_pair(&path) {
            lora_params += a.elem_count() + b.elem_count();
            let (ad, bd) = (a.dims(), b.dims());
            if ad.len() == 2 && bd.len() == 2 {
                let s = TargetSummary {
                    r: ad[0],
                    in_features: ad[1],
                    out_features: bd[0],
                    scaling: adapter.config.scaling_for(&path),
                };
                modules.insert(path, s);
            }
        }
    }
    let mut saved_modules = BTreeMap::new();
    let mut head_params = 0;
    for (module, params) in adapter.saved_modules() {
        let mut list = Vec::new();
        for (param, t) in params {
            head_params += t.elem_count();
            list.push((param, t.dims().to_vec()));
        }
        saved_modules.insert(module, list);
    }
    AdapterSummary {
        task_type: adapter.config.task_type.clone(),
        base_model_name_or_path: adapter.config.base_model_name_or_path.clone(),
        peft_version: adapter.config.peft_version.clone(),
        targets: modules.keys().cloned().collect(),
        ranks: modules.iter().map(|(k, s)| (k.clone(), s.r)).collect(),
        modules,
        saved_modules,
        lora_params,
        head_params,
    }
}

/// Check that a LoRA pair fits a Linear layer `in_features -> out_features`
/// with rank `expected_r`: A must be (r, in), B (out, r). The error names
/// the lora_A key and both shapes.
pub fn check_pair(
    module_path: &str,
    a: &Tensor,
    b: &Tensor,
    in_features: usize,
    out_features: usize,
    expected_r: usize,
) -> Result<()> {
    let (ad, bd) = (a.dims(), b.dims());
    if ad == [expected_r, in_features] && bd == [out_features, expected_r] {
        return Ok(());
    }
    Err(PeftError::Tensor {
        key: lora_key(module_path, LoraPart::A),
        msg: format!(
            "lora_A {ad:?} / lora_B {bd:?} do not fit a {in_features} -> {out_features} layer with r={expected_r} (expected lora_A [{expected_r}, {in_features}], lora_B [{out_features}, {expected_r}])"
        ),
    })
}
