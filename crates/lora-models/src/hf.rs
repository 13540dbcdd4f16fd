//! A Hugging Face model folder: `config.json`, `model.safetensors` (or shards
//! listed in `model.safetensors.index.json`) and `tokenizer.json`.

use crate::error::{ModelError, Result};
use lora_core::SafetensorsSource;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct HfFolder {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub weights: Vec<PathBuf>,
    pub tokenizer: PathBuf,
}

impl HfFolder {
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(ModelError::Io {
                path: dir.display().to_string(),
                msg: if dir.exists() { "not a directory".into() } else { "model folder not found".into() },
            });
        }
        let config = dir.join("config.json");
        if !config.is_file() {
            return Err(ModelError::Io {
                path: config.display().to_string(),
                msg: "file not found (a Hugging Face model folder needs config.json)".into(),
            });
        }
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let weights = if single.is_file() {
            vec![single]
        } else if index.is_file() {
            read_index(&index)?
        } else if dir.join("pytorch_model.bin").is_file() {
            return Err(ModelError::Io {
                path: dir.join("pytorch_model.bin").display().to_string(),
                msg: "PyTorch pickle checkpoints are not supported; convert to model.safetensors".into(),
            });
        } else {
            return Err(ModelError::Io {
                path: single.display().to_string(),
                msg: "file not found".into(),
            });
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            weights,
            tokenizer: dir.join("tokenizer.json"),
        })
    }

    pub fn weight_source(&self) -> Result<SafetensorsSource> {
        Ok(SafetensorsSource::open(&self.weights)?)
    }

    pub fn load_tokenizer(&self) -> Result<tokenizers::Tokenizer> {
        load_tokenizer(&self.tokenizer)
    }
}

fn read_index(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| ModelError::io(index, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Config {
        path: index.display().to_string(),
        msg: e.to_string(),
    })?;
    let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| ModelError::Config {
        path: index.display().to_string(),
        msg: "missing weight_map".into(),
    })?;
    let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
    files.sort();
    files.dedup();
    let dir = index.parent().unwrap_or(Path::new("."));
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

pub fn load_tokenizer(path: &Path) -> Result<tokenizers::Tokenizer> {
    if !path.is_file() {
        return Err(ModelError::Io {
            path: path.display().to_string(),
            msg: "file not found".into(),
        });
    }
    tokenizers::Tokenizer::from_file(path).map_err(|e| ModelError::Tokenizer {
        path: path.display().to_string(),
        msg: e.to_string().lines().next().unwrap_or("").to_string(),
    })
}
