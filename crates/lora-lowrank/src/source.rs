//! A model folder's weights under canonical module paths.
//!
//! BERT checkpoints come with or without the `bert.` prefix (`BertModel` vs
//! `BertForSequenceClassification`); keys are canonicalised to the prefixed
//! form, which is also the path PEFT uses inside `BertForSequenceClassification`.

use crate::error::{LowRankError, Result};
use candle_core::{Device, Tensor};
use lora_core::{SafetensorsSource, WeightSource};
use std::sync::Arc;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The canonical path of checkpoint key `key` for a model of `model_type`.
pub fn canonical(key: &str, model_type: &str) -> String {
    let top = ["embeddings.", "encoder.", "pooler."];
    if model_type == "bert" && top.iter().any(|t| key.starts_with(t)) {
        format!("bert.{key}")
    } else {
        key.to_string()
    }
}

/// The weights of an HF model folder (`model.safetensors` or shards), or of
/// a llama GGUF file (dequantized to f32, Hugging Face names and layout).
pub struct ModelWeights {
    /// The folder, or the `.gguf` file.
    pub dir: PathBuf,
    pub model_type: String,
    /// True for a `.gguf` file.
    pub gguf: bool,
    source: Box<dyn WeightSource>,
    /// canonical -> checkpoint key
    map: BTreeMap<String, String>,
}

/// `*.safetensors` weight files of a folder (sorted), excluding our own
/// factored file.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| LowRankError::Io { path: dir.display().to_string(), msg: e.to_string() })?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            n.ends_with(".safetensors") && n.starts_with("model") && n != crate::compress::FACTORED_NAME
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(LowRankError::Io { path: dir.display().to_string(), msg: "no model*.safetensors weights in this folder".into() });
    }
    Ok(files)
}

/// `model_type` from `config.json` (empty when absent).
pub fn model_type(dir: &Path) -> Result<String> {
    let p = dir.join("config.json");
    let text = std::fs::read_to_string(&p).map_err(|e| LowRankError::Io { path: p.display().to_string(), msg: e.to_string() })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| LowRankError::Io { path: p.display().to_string(), msg: e.to_string() })?;
    Ok(v.get("model_type").and_then(|t| t.as_str()).unwrap_or("").to_string())
}

impl ModelWeights {
    /// Opens the folder (needs `config.json` and weights) or a `.gguf` file.
    pub fn open(dir: &Path) -> Result<Self> {
        if dir.is_file() && dir.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
            let bad = |e: String| LowRankError::Io { path: dir.display().to_string(), msg: e };
            let file = lora_models::GgufFile::open(dir).map_err(|e| bad(e.to_string()))?;
            let model_type = file.architecture().map_err(|e| bad(e.to_string()))?;
            let source = lora_models::GgufSource::new(Arc::new(file)).map_err(|e| bad(e.to_string()))?;
            let map = source.keys().into_iter().map(|k| (k.clone(), k)).collect();
            return Ok(Self { dir: dir.to_path_buf(), model_type, gguf: true, source: Box::new(source), map });
        }
        if !dir.is_dir() {
            return Err(LowRankError::Io { path: dir.display().to_string(), msg: "model folder not found".into() });
        }
        let model_type = model_type(dir)?;
        let source = SafetensorsSource::open(&weight_files(dir)?)?;
        let map = source.keys().into_iter().map(|k| (canonical(&k, &model_type), k)).collect();
        Ok(Self { dir: dir.to_path_buf(), model_type, gguf: false, source: Box::new(source), map })
    }

    /// A decoder-only language model (llama family), whose adapters are CAUSAL_LM.
    pub fn is_decoder(&self) -> bool {
        matches!(self.model_type.as_str(), "llama" | "mistral" | "qwen2" | "smollm")
    }

    /// A name for messages (the folder).
    pub fn name(&self) -> String {
        self.dir.display().to_string()
    }

    /// Canonical keys, sorted.
    pub fn keys(&self) -> Vec<String> {
        self.map.keys().cloned().collect()
    }

    /// The checkpoint key of a canonical key.
    pub fn original_key(&self, key: &str) -> Option<&str> {
        self.map.get(key).map(|s| s.as_str())
    }

    pub fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.map.get(key).and_then(|k| self.source.shape(k))
    }

    /// The tensor as f32, or None.
    pub fn get(&self, key: &str, dev: &Device) -> Result<Option<Tensor>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(k) => Ok(self.source.get(k, dev)?),
        }
    }

    /// The tensor as f32; an error naming the key when absent.
    pub fn get_required(&self, key: &str, dev: &Device) -> Result<Tensor> {
        self.get(key, dev)?.ok_or_else(|| LowRankError::Missing { module: key.into(), present: "the key list".into(), missing: self.name() })
    }
}
