//! Building a classifier from a base folder plus a new or saved adapter, and
//! saving it in PEFT's format (`adapter_config.json`, `adapter_model.safetensors`)
//! with `labels.json` and `lora_task.json` beside it.

use crate::error::{Result, TaskError};
use candle_core::{Device, Tensor};
use lora_core::{AdapterPlan, AdapterSet, LoraConfig, LoraInit, ModelBuilder, Preloaded};
use lora_models::{BertClassifier, BertConfig, Head, HfFolder};
use lora_peft::{AdapterConfig, InitLoraWeights, OneOrMany, TaskType};
use crate::peft_glue::{read_json, spec_from_peft};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What the task needs to use an adapter again (saved as `lora_task.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskMeta {
    pub task: String,
    pub head: String,
    pub labels: Vec<String>,
    pub max_len: usize,
    pub text_column: String,
    pub label_column: String,
    pub base_model: String,
    pub tool: String,
}

pub const TASK_FILE: &str = "lora_task.json";
pub const LABELS_FILE: &str = "labels.json";

/// A ready classifier: model, its adapter set, labels, tokenizer.
pub struct Classifier {
    pub model: BertClassifier,
    pub adapters: AdapterSet,
    pub labels: Vec<String>,
    pub head: Head,
    pub config: BertConfig,
    pub folder: HfFolder,
    pub tokenizer: tokenizers::Tokenizer,
    pub meta: Option<TaskMeta>,
    pub pad_id: u32,
}

pub enum AdapterSource<'a> {
    /// A fresh adapter to train.
    New { plan: AdapterPlan, labels: Vec<String>, head: Head },
    /// An adapter folder written by this tool or by PEFT.
    Saved(&'a Path),
    /// The base folder alone (e.g. a merged model with its own classifier).
    None,
}

/// Loads base + adapter into a classifier.
pub fn build_classifier(model_dir: &Path, source: AdapterSource, device: &Device) -> Result<Classifier> {
    let folder = HfFolder::open(model_dir)?;
    let config = BertConfig::from_file(&folder.config)?;
    let tokenizer = folder.load_tokenizer()?;
    let pad_id = config.pad_token_id.unwrap_or(0);
    let mut vb = ModelBuilder::new(Box::new(folder.weight_source()?), device.clone())
        .with_optional_prefixes(&["bert."])
        .with_modules_to_save(&["classifier".to_string()]);
    let (labels, head, meta) = match source {
        AdapterSource::New { plan, labels, head } => {
            plan.config.validate()?;
            vb = vb.with_adapter(Some(plan)).init_missing_heads(true);
            (labels, head, None)
        }
        AdapterSource::Saved(dir) => {
            let loaded = lora_peft::load_adapter(dir, device)?;
            let c = &loaded.config;
            if let Some(t) = &c.task_type {
                if *t != TaskType::SeqCls {
                    return Err(TaskError::Input(format!(
                        "{}: task_type={} but a sequence-classification adapter (SEQ_CLS) is needed",
                        dir.join("adapter_config.json").display(),
                        t.as_str()
                    )));
                }
            }
            if c.init_lora_weights.mutates_base_weights() {
                return Err(TaskError::Input(format!(
                    "{}: init_lora_weights={} changes the base weights when PEFT loads it; convert it to a plain LoRA first (PEFT: path_initial_model_for_weight_conversion)",
                    dir.join("adapter_config.json").display(),
                    c.init_lora_weights.to_value()
                )));
            }
            let meta: Option<TaskMeta> = read_json(&dir.join(TASK_FILE))?;
            let mut pre = Preloaded::default();
            for m in loaded.lora_modules() {
                let (a, b) = loaded.lora_pair(&m).ok_or_else(|| {
                    TaskError::Input(format!("{}: lora_B missing for {m}", dir.display()))
                })?;
                pre.lora.insert(m, (a.clone(), b.clone()));
            }
            let mut num_labels = None;
            for (m, params) in loaded.saved_modules() {
                let w = params.get("weight").cloned().ok_or_else(|| {
                    TaskError::Input(format!("{}: saved module {m} has no weight", dir.display()))
                })?;
                if m == "classifier" {
                    num_labels = Some(w.dim(0)?);
                }
                pre.modules.insert(m, (w, params.get("bias").cloned()));
            }
            let Some(num_labels) = num_labels else {
                return Err(TaskError::Input(format!(
                    "{}: the adapter holds no classifier head (base_model.model.classifier.weight)",
                    dir.display()
                )));
            };
            let labels: Vec<String> = match (read_json::<Vec<String>>(&dir.join(LABELS_FILE))?, &meta) {
                (Some(l), _) => l,
                (None, Some(m)) => m.labels.clone(),
                (None, None) => default_labels(&config, num_labels),
            };
            if labels.len() != num_labels {
                return Err(TaskError::Input(format!(
                    "{}: {} labels but the classifier has {num_labels} outputs",
                    dir.join(LABELS_FILE).display(),
                    labels.len()
                )));
            }
            let head = match &meta {
                Some(m) => Head::parse(&m.head).map_err(TaskError::Input)?,
                None => Head::Pooler,
            };
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
            vb = vb
                .with_adapter(Some(plan))
                .with_modules_to_save(&c.modules_to_save.clone().unwrap_or_else(|| vec!["classifier".into()]))
                .with_preloaded(pre);
            (labels, head, meta)
        }
        AdapterSource::None => {
            let n = config.id2label.as_ref().map(|m| m.len()).unwrap_or(0);
            if n == 0 || !vb.pp("classifier").contains("weight") {
                return Err(TaskError::Input(format!(
                    "{}: no classifier head in this model; pass --adapter",
                    model_dir.display()
                )));
            }
            let head = match &config.lora_head {
                Some(h) => Head::parse(h).map_err(TaskError::Input)?,
                None => Head::Pooler,
            };
            (default_labels(&config, n), head, None)
        }
    };
    let model = BertClassifier::load(&vb, &config, labels.len(), head)?;
    let adapters = vb.finish()?;
    Ok(Classifier { model, adapters, labels, head, config, folder, tokenizer, meta, pad_id })
}

fn default_labels(config: &BertConfig, n: usize) -> Vec<String> {
    match &config.id2label {
        Some(m) if m.len() == n => (0..n).map(|i| m.get(&i.to_string()).cloned().unwrap_or(format!("LABEL_{i}"))).collect(),
        _ => (0..n).map(|i| format!("LABEL_{i}")).collect(),
    }
}

/// Writes the adapter in PEFT's format plus our task files, atomically.
pub fn save_classifier(dir: &Path, clf: &Classifier, meta: &TaskMeta) -> Result<()> {
    let plan = clf
        .adapters
        .plan
        .as_ref()
        .ok_or_else(|| TaskError::Input("no adapter to save".into()))?;
    let paths: Vec<String> = clf.adapters.lora_layers.iter().map(|l| l.path()).collect();
    let names = match plan.targets.names_for_config(&paths) {
        lora_core::TargetModules::Names(n) => lora_peft::TargetModules::Names(n),
        lora_core::TargetModules::Regex(r) => lora_peft::TargetModules::Regex(r),
        lora_core::TargetModules::AllLinear => lora_peft::TargetModules::AllLinear,
    };
    let mut c = AdapterConfig::new(plan.config.r, plan.config.alpha, names);
    c.task_type = Some(TaskType::SeqCls);
    c.base_model_name_or_path = Some(meta.base_model.clone());
    c.lora_dropout = (plan.config.dropout as f64 * 1e6).round() / 1e6;
    c.use_rslora = plan.config.use_rslora;
    c.modules_to_save = Some(vec!["classifier".into()]);
    c.inference_mode = true;
    c.init_lora_weights = match plan.config.init {
        LoraInit::KaimingUniform => InitLoraWeights::Default,
        LoraInit::Gaussian => InitLoraWeights::Gaussian,
        LoraInit::Random => InitLoraWeights::Random,
    };
    c.layers_to_transform = plan.targets.layers.clone().map(OneOrMany::Many);
    c.layers_pattern = plan.targets.layers_pattern.clone().map(OneOrMany::Many);
    for (p, r) in clf.adapters.ranks() {
        if r != plan.config.r {
            c.rank_pattern.insert(p, r);
        }
    }
    c.alpha_pattern = plan.alpha_pattern.iter().cloned().collect();
    let mut tensors: Vec<(String, Tensor)> = vec![];
    for (path, a, b, _) in clf.adapters.lora_tensors() {
        tensors.push((lora_peft::lora_key(&path, lora_peft::LoraPart::A), a));
        tensors.push((lora_peft::lora_key(&path, lora_peft::LoraPart::B), b));
    }
    for h in &clf.adapters.heads {
        let p = h.path();
        tensors.push((lora_peft::saved_module_key(&p, "weight"), h.weight()?));
        if let Some(b) = h.bias() {
            tensors.push((lora_peft::saved_module_key(&p, "bias"), b));
        }
    }
    let labels = serde_json::to_vec(&clf.labels).map_err(|e| TaskError::Input(e.to_string()))?;
    let task = serde_json::to_vec_pretty(meta).map_err(|e| TaskError::Input(e.to_string()))?;
    lora_peft::save_adapter(dir, &c, &tensors, &[(LABELS_FILE, labels), (TASK_FILE, task)])?;
    Ok(())
}

/// The path recorded as `base_model_name_or_path`.
pub fn base_model_name(dir: &Path) -> String {
    std::fs::canonicalize(dir).unwrap_or_else(|_| PathBuf::from(dir)).display().to_string()
}
