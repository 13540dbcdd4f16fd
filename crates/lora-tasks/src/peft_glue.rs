//! Between the LoRA core and PEFT's on-disk format, for every task: target
//! specs from `adapter_config.json`, a saved adapter as a build plan plus
//! preloaded tensors, and the config + tensors to save.

use crate::error::{Result, TaskError};
use candle_core::{Device, Tensor};
use lora_core::{AdapterPlan, AdapterSet, LoraConfig, LoraInit, Preloaded, TargetSpec};
use lora_peft::{AdapterConfig, InitLoraWeights, LoadedAdapter, OneOrMany, TaskType};
use serde::Deserialize;
use std::path::Path;

pub fn spec_from_peft(c: &AdapterConfig) -> Result<TargetSpec> {
    let modules = match &c.target_modules {
        Some(lora_peft::TargetModules::Names(n)) => lora_core::TargetModules::Names(n.clone()),
        Some(lora_peft::TargetModules::Regex(r)) => lora_core::TargetModules::Regex(r.clone()),
        Some(lora_peft::TargetModules::AllLinear) => lora_core::TargetModules::AllLinear,
        None => return Err(TaskError::Input("adapter_config.json: target_modules is missing".into())),
    };
    let mut s = TargetSpec::new(modules);
    s.layers = c.layers_to_transform.as_ref().map(|l| l.to_vec());
    s.layers_pattern = c.layers_pattern.as_ref().map(|l| l.to_vec());
    if let Some(ex) = &c.exclude_modules {
        match ex {
            lora_peft::TargetModules::Names(n) => s.exclude = n.clone(),
            _ => return Err(TaskError::Input("adapter_config.json: exclude_modules as a regex is not supported".into())),
        }
    }
    s.validate()?;
    Ok(s)
}

pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| TaskError::Input(format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| TaskError::Input(format!("{}: {e}", path.display())))
}

/// A saved adapter folder as a build plan and its LoRA tensors. Refuses
/// adapters whose init changes the base weights (PiSSA, OLoRA, …) and a task
/// type other than `want` when the config names one.
pub fn saved_plan(dir: &Path, want: TaskType, device: &Device) -> Result<(LoadedAdapter, AdapterPlan, Preloaded)> {
    let loaded = lora_peft::load_adapter(dir, device)?;
    let c = &loaded.config;
    let cfg_path = dir.join("adapter_config.json");
    if let Some(t) = &c.task_type {
        if *t != want {
            return Err(TaskError::Input(format!(
                "{}: task_type={} but a {} adapter is needed",
                cfg_path.display(),
                t.as_str(),
                want.as_str()
            )));
        }
    }
    if c.init_lora_weights.mutates_base_weights() {
        return Err(TaskError::Input(format!(
            "{}: init_lora_weights={} changes the base weights when PEFT loads it; convert it to a plain LoRA first (lora convert)",
            cfg_path.display(),
            c.init_lora_weights.to_value()
        )));
    }
    let mut pre = Preloaded::default();
    for m in loaded.lora_modules() {
        let (a, b) = loaded
            .lora_pair(&m)
            .ok_or_else(|| TaskError::Input(format!("{}: lora_B missing for {m}", dir.display())))?;
        pre.lora.insert(m, (a.clone(), b.clone()));
    }
    let lc = LoraConfig {
        r: c.r,
        alpha: c.lora_alpha,
        dropout: c.lora_dropout as f32,
        use_rslora: c.use_rslora,
        init: LoraInit::KaimingUniform,
    };
    let mut plan = AdapterPlan::new(lc, spec_from_peft(c)?, 0);
    plan.rank_pattern = c.rank_pattern.iter().map(|(k, v)| (k.clone(), *v)).collect();
    plan.alpha_pattern = c.alpha_pattern.iter().map(|(k, v)| (k.clone(), *v)).collect();
    Ok((loaded, plan, pre))
}

/// PEFT's `adapter_config.json` for a built adapter set.
pub fn adapter_config(set: &AdapterSet, task_type: TaskType, base_model: &str) -> Result<AdapterConfig> {
    let plan = set.plan.as_ref().ok_or_else(|| TaskError::Input("no adapter to save".into()))?;
    let paths: Vec<String> = set.lora_layers.iter().map(|l| l.path()).collect();
    let names = match plan.targets.names_for_config(&paths) {
        lora_core::TargetModules::Names(n) => lora_peft::TargetModules::Names(n),
        lora_core::TargetModules::Regex(r) => lora_peft::TargetModules::Regex(r),
        lora_core::TargetModules::AllLinear => lora_peft::TargetModules::AllLinear,
    };
    let mut c = AdapterConfig::new(plan.config.r, plan.config.alpha, names);
    c.task_type = Some(task_type);
    c.base_model_name_or_path = Some(base_model.to_string());
    c.lora_dropout = (plan.config.dropout as f64 * 1e6).round() / 1e6;
    c.use_rslora = plan.config.use_rslora;
    c.inference_mode = true;
    c.init_lora_weights = match plan.config.init {
        LoraInit::Gaussian => InitLoraWeights::Gaussian,
        LoraInit::Random => InitLoraWeights::Random,
        _ => InitLoraWeights::Default,
    };
    c.layers_to_transform = plan.targets.layers.clone().map(OneOrMany::Many);
    c.layers_pattern = plan.targets.layers_pattern.clone().map(OneOrMany::Many);
    for (p, r) in set.ranks() {
        if r != plan.config.r {
            c.rank_pattern.insert(p, r);
        }
    }
    c.alpha_pattern = plan.alpha_pattern.iter().cloned().collect();
    Ok(c)
}

/// `(PEFT key, tensor)` for every LoRA A and B.
pub fn lora_tensor_list(set: &AdapterSet) -> Vec<(String, Tensor)> {
    let mut tensors = vec![];
    for (path, a, b, _) in set.lora_tensors() {
        tensors.push((lora_peft::lora_key(&path, lora_peft::LoraPart::A), a));
        tensors.push((lora_peft::lora_key(&path, lora_peft::LoraPart::B), b));
    }
    tensors
}
