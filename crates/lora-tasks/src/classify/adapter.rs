//! Building a classifier from a base folder plus a new or saved adapter, and
//! saving it in PEFT's format (`adapter_config.json`, `adapter_model.safetensors`)
//! with `labels.json` and `lora_task.json` beside it.

use crate::error::{Result, TaskError};
use candle_core::Device;
use lora_core::{AdapterPlan, AdapterSet, ModelBuilder};
use lora_models::{BertClassifier, BertConfig, Head, HfFolder};
use lora_peft::TaskType;
use crate::peft_glue::read_json;
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
            let (loaded, plan, mut pre) = crate::peft_glue::saved_plan(dir, TaskType::SeqCls, device)?;
            let c = &loaded.config;
            let meta: Option<TaskMeta> = read_json(&dir.join(TASK_FILE))?;
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
    let mut c = crate::peft_glue::adapter_config(&clf.adapters, TaskType::SeqCls, &meta.base_model)?;
    c.modules_to_save = Some(vec!["classifier".into()]);
    let mut tensors = crate::peft_glue::lora_tensor_list(&clf.adapters);
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
