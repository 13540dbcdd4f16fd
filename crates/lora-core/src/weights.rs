//! Where frozen weights come from: memory-mapped safetensors files or an
//! in-memory map (tests, random models). A source is keyed by checkpoint name;
//! the [`crate::ModelBuilder`] maps module paths to those names.

use crate::error::{CoreError, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub trait WeightSource: Send + Sync {
    /// A name for error messages (usually the file name).
    fn name(&self) -> String;
    fn contains(&self, key: &str) -> bool;
    /// The tensor stored under `key`, as f32 on `device`; `Ok(None)` when absent.
    fn get(&self, key: &str, device: &Device) -> Result<Option<Tensor>>;
    fn keys(&self) -> Vec<String>;
    /// Shape without loading data, when the format allows.
    fn shape(&self, key: &str) -> Option<Vec<usize>>;
    /// The tensor in its stored block-quantized form (GGUF), when it is
    /// quantized; `Ok(None)` for dense tensors and formats without quantization.
    fn get_quantized(
        &self,
        _key: &str,
        _device: &Device,
    ) -> Result<Option<std::sync::Arc<candle_core::quantized::QTensor>>> {
        Ok(None)
    }
}

/// One or more memory-mapped safetensors files (sharded checkpoints supported).
pub struct SafetensorsSource {
    files: Vec<PathBuf>,
    inner: candle_core::safetensors::MmapedSafetensors,
}

impl SafetensorsSource {
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        for p in paths {
            if !p.exists() {
                return Err(CoreError::BadFile {
                    path: p.display().to_string(),
                    msg: "file not found".into(),
                });
            }
        }
        // SAFETY: the files are opened read-only; a concurrent writer truncating
        // them is outside what we guard against (as in candle and transformers).
        let inner = unsafe { candle_core::safetensors::MmapedSafetensors::multi(paths) }.map_err(
            |e| {
                // candle wraps the cause as `path: "file" cause`; the path is already named.
                let e = match e {
                    candle_core::Error::WithPath { inner, .. } => *inner,
                    e => e,
                };
                CoreError::BadFile {
                    path: display_files(paths),
                    msg: format!("not a valid safetensors file ({})", first_line(&e.to_string())),
                }
            },
        )?;
        Ok(Self {
            files: paths.to_vec(),
            inner,
        })
    }

    pub fn open_one(path: &Path) -> Result<Self> {
        Self::open(&[path.to_path_buf()])
    }
}

fn display_files(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").to_string()
}

impl WeightSource for SafetensorsSource {
    fn name(&self) -> String {
        display_files(&self.files)
    }
    fn contains(&self, key: &str) -> bool {
        self.inner.get(key).is_ok()
    }
    fn get(&self, key: &str, device: &Device) -> Result<Option<Tensor>> {
        let view = match self.inner.get(key) {
            Ok(v) => v,
            Err(_) => return Ok(None),
        };
        let bad = |msg: String| CoreError::BadTensor {
            source_name: self.name(),
            key: key.to_string(),
            msg,
        };
        let t = candle_core::safetensors::Load::load(&view, device)
            .map_err(|e| bad(first_line(&e.to_string())))?;
        let t = match t.dtype() {
            DType::F32 => t,
            DType::F16 | DType::BF16 | DType::F64 => t.to_dtype(DType::F32)?,
            other => return Err(bad(format!("expected a float tensor, found {other:?}"))),
        };
        Ok(Some(t))
    }
    fn keys(&self) -> Vec<String> {
        self.inner.tensors().into_iter().map(|(k, _)| k).collect()
    }
    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.inner.get(key).ok().map(|v| v.shape().to_vec())
    }
}

/// Tensors held in memory (tests, random models, merged weights).
#[derive(Default, Clone)]
pub struct MemorySource {
    pub name: String,
    pub tensors: HashMap<String, Tensor>,
}

impl MemorySource {
    pub fn new(name: impl Into<String>, tensors: HashMap<String, Tensor>) -> Self {
        Self {
            name: name.into(),
            tensors,
        }
    }
}

impl WeightSource for MemorySource {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }
    fn get(&self, key: &str, device: &Device) -> Result<Option<Tensor>> {
        match self.tensors.get(key) {
            None => Ok(None),
            Some(t) => Ok(Some(t.to_device(device)?.to_dtype(DType::F32)?)),
        }
    }
    fn keys(&self) -> Vec<String> {
        let mut k: Vec<_> = self.tensors.keys().cloned().collect();
        k.sort();
        k
    }
    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.tensors.get(key).map(|t| t.dims().to_vec())
    }
}
