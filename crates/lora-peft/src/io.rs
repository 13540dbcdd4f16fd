//! Reading and writing an adapter directory the way PEFT's
//! `save_pretrained` / `from_pretrained` do:
//!
//! ```text
//! adapter/
//!   adapter_config.json         json.dumps(config, indent=2, sort_keys=True)
//!   adapter_model.safetensors   metadata {"format": "pt"}, keys as in keys.rs
//!   ...extra files (labels.json, README.md)
//! ```
//!
//! Every file is written atomically (temp file in the same directory, fsync,
//! rename), so a crash leaves either the old file or the new one.

use crate::config::AdapterConfig;
use crate::error::{first_line, PeftError, Result};
use crate::keys::{classify_key, LoraPart};
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView};
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

pub const CONFIG_NAME: &str = "adapter_config.json";
pub const WEIGHTS_NAME: &str = "adapter_model.safetensors";
/// PEFT's pickle format; recognised only to say it is not read.
const PICKLE_WEIGHTS_NAME: &str = "adapter_model.bin";

/// An adapter read from disk: its config and every tensor, as f32, keyed by
/// the canonical PEFT key (adapter-name segments removed).
#[derive(Debug, Clone)]
pub struct LoadedAdapter {
    pub config: AdapterConfig,
    pub tensors: BTreeMap<String, Tensor>,
}

impl LoadedAdapter {
    /// Module paths that carry a LoRA pair, sorted.
    pub fn lora_modules(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .tensors
            .keys()
            .filter_map(|k| crate::keys::parse_lora_key(k))
            .filter(|(_, part)| *part == LoraPart::A)
            .map(|(p, _)| p)
            .collect();
        v.sort();
        v
    }

    /// `(A, B)` for `module_path`: A is (r, in_features), B is (out_features, r).
    pub fn lora_pair(&self, module_path: &str) -> Option<(&Tensor, &Tensor)> {
        let a = self
            .tensors
            .get(&crate::keys::lora_key(module_path, LoraPart::A))?;
        let b = self
            .tensors
            .get(&crate::keys::lora_key(module_path, LoraPart::B))?;
        Some((a, b))
    }

    /// Tensors of `modules_to_save` modules: module path -> param -> tensor
    /// (e.g. `classifier` -> `weight`).
    pub fn saved_modules(&self) -> BTreeMap<String, BTreeMap<String, Tensor>> {
        let names = self.config.modules_to_save.clone().unwrap_or_default();
        let mut out: BTreeMap<String, BTreeMap<String, Tensor>> = BTreeMap::new();
        for (k, t) in &self.tensors {
            if crate::keys::parse_lora_key(k).is_some() {
                continue;
            }
            if let Some((m, p)) = crate::keys::parse_saved_module_key(k, &names) {
                out.entry(m).or_default().insert(p, t.clone());
            }
        }
        out
    }
}

/// Read and parse `adapter_config.json` (a file, or a directory holding it).
/// Does not validate, so `inspect` can show configs we would refuse.
pub fn read_config(path: &Path) -> Result<AdapterConfig> {
    let file = if path.is_dir() {
        path.join(CONFIG_NAME)
    } else {
        path.to_path_buf()
    };
    if !file.is_file() {
        return Err(PeftError::NotFound {
            path: file,
            what: "adapter config",
        });
    }
    let text = fs::read_to_string(&file).map_err(|e| io_err(&file, e))?;
    serde_json::from_str(&text).map_err(|e| PeftError::Json {
        path: file,
        msg: first_line(&e.to_string()),
    })
}

/// Load the adapter in `dir` onto `device`.
///
/// Refuses (naming the file, key or field): a missing directory, config or
/// weights file; invalid JSON (with serde's line/column); configs that
/// `validate()` refuses; truncated or corrupt safetensors; non-float tensors;
/// keys that are not LoRA factors or `modules_to_save` parameters; LoRA
/// pairs whose shapes disagree with each other or with the configured rank.
/// f16/bf16/f64 tensors are converted to f32.
pub fn load_adapter(dir: &Path, device: &Device) -> Result<LoadedAdapter> {
    if !dir.is_dir() {
        return Err(PeftError::NotFound {
            path: dir.to_path_buf(),
            what: "adapter directory",
        });
    }
    let config = read_config(dir)?;
    config.validate()?;

    let weights = dir.join(WEIGHTS_NAME);
    if !weights.is_file() {
        if dir.join(PICKLE_WEIGHTS_NAME).is_file() {
            return Err(PeftError::Safetensors {
                path: dir.join(PICKLE_WEIGHTS_NAME),
                msg: "pickle weights are not read; re-save with safe_serialization=True".into(),
            });
        }
        return Err(PeftError::NotFound {
            path: weights,
            what: "adapter weights",
        });
    }
    let bytes = fs::read(&weights).map_err(|e| io_err(&weights, e))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| PeftError::Safetensors {
        path: weights.clone(),
        msg: format!(
            "not a valid safetensors file ({})",
            first_line(&e.to_string())
        ),
    })?;

    let modules_to_save = config.modules_to_save.clone().unwrap_or_default();
    let mut tensors = BTreeMap::new();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    for name in names {
        let kind = classify_key(&name, &modules_to_save)?;
        let key = kind.canonical();
        let view = st.tensor(&name).map_err(|e| PeftError::Tensor {
            key: name.clone(),
            msg: first_line(&e.to_string()),
        })?;
        let t = view_to_f32(&name, &view, device)?;
        if tensors.insert(key.clone(), t).is_some() {
            return Err(PeftError::Tensor {
                key: name,
                msg: format!("appears twice (also as {key})"),
            });
        }
    }
    let adapter = LoadedAdapter { config, tensors };
    check_pairs(&adapter)?;
    Ok(adapter)
}

fn view_to_f32(key: &str, view: &TensorView<'_>, device: &Device) -> Result<Tensor> {
    let dtype = match view.dtype() {
        StDtype::F32 => DType::F32,
        StDtype::F16 => DType::F16,
        StDtype::BF16 => DType::BF16,
        StDtype::F64 => DType::F64,
        other => {
            return Err(PeftError::Tensor {
                key: key.to_string(),
                msg: format!("dtype {other:?} is not supported (expected F32, F16, BF16 or F64)"),
            })
        }
    };
    let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.to_device(device))
        .map_err(|e| PeftError::Tensor {
            key: key.to_string(),
            msg: first_line(&e.to_string()),
        })?;
    Ok(t)
}

/// Every LoRA module has both factors, 2-D, with A (r, in) and B (out, r)
/// for the rank `config.rank_for(module)`.
fn check_pairs(adapter: &LoadedAdapter) -> Result<()> {
    let mut parts: BTreeMap<String, Vec<LoraPart>> = BTreeMap::new();
    for k in adapter.tensors.keys() {
        if let Some((p, part)) = crate::keys::parse_lora_key(k) {
            parts.entry(p).or_default().push(part);
        }
    }
    for (path, have) in parts {
        for part in [LoraPart::A, LoraPart::B] {
            if !have.contains(&part) {
                let other = if part == LoraPart::A {
                    LoraPart::B
                } else {
                    LoraPart::A
                };
                return Err(PeftError::Tensor {
                    key: crate::keys::lora_key(&path, other),
                    msg: format!("has no partner {}", crate::keys::lora_key(&path, part)),
                });
            }
        }
        let (a, b) = adapter.lora_pair(&path).ok_or_else(|| PeftError::Tensor {
            key: crate::keys::lora_key(&path, LoraPart::A),
            msg: "missing".into(),
        })?;
        let r = adapter.config.rank_for(&path);
        let (a_dims, b_dims) = (a.dims(), b.dims());
        if a_dims.len() != 2 || b_dims.len() != 2 || a_dims[0] != r || b_dims[1] != r {
            return Err(PeftError::Tensor {
                key: crate::keys::lora_key(&path, LoraPart::A),
                msg: format!(
                    "shape {a_dims:?} and lora_B shape {b_dims:?} do not fit rank {r} (expected A [{r}, in] and B [out, {r}])"
                ),
            });
        }
    }
    Ok(())
}

/// Write `adapter_config.json`, `adapter_model.safetensors` (f32, contiguous,
/// metadata `{"format": "pt"}`) and `extra_files` into `dir` (created if
/// needed), each atomically. The config is validated first, so nothing is
/// written that `load_adapter` would refuse.
pub fn save_adapter(
    dir: &Path,
    config: &AdapterConfig,
    tensors: &[(String, Tensor)],
    extra_files: &[(&str, Vec<u8>)],
) -> Result<()> {
    config.validate()?;
    for (name, _) in extra_files {
        let plain = !name.is_empty()
            && !name.contains(['/', '\\'])
            && *name != "."
            && *name != ".."
            && *name != CONFIG_NAME
            && *name != WEIGHTS_NAME;
        if !plain {
            return Err(PeftError::Save(format!(
                "extra file name {name:?} must be a plain file name other than {CONFIG_NAME} and {WEIGHTS_NAME}"
            )));
        }
    }
    let weights = safetensors_bytes(tensors)?;
    fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    atomic_write(&dir.join(WEIGHTS_NAME), &weights)?;
    for (name, bytes) in extra_files {
        atomic_write(&dir.join(name), bytes)?;
    }
    // The config last: a directory with a config always has its weights.
    atomic_write(&dir.join(CONFIG_NAME), config.to_json().as_bytes())
}

/// One tensor in the form `safetensors::serialize` wants.
struct F32Data {
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl safetensors::View for &F32Data {
    fn dtype(&self) -> StDtype {
        StDtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn safetensors_bytes(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let mut data: BTreeMap<&str, F32Data> = BTreeMap::new();
    for (name, t) in tensors {
        if name.is_empty() {
            return Err(PeftError::Save("a tensor has an empty name".into()));
        }
        if !t.dtype().is_float() {
            return Err(PeftError::Tensor {
                key: name.clone(),
                msg: format!("dtype {:?} is not a float type", t.dtype()),
            });
        }
        let values: Vec<f32> = t
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| PeftError::Tensor {
                key: name.clone(),
                msg: first_line(&e.to_string()),
            })?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let entry = F32Data {
            shape: t.dims().to_vec(),
            bytes,
        };
        if data.insert(name.as_str(), entry).is_some() {
            return Err(PeftError::Save(format!("tensor {name} is given twice")));
        }
    }
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    safetensors::serialize(data.iter().map(|(k, v)| (*k, v)), Some(metadata)).map_err(|e| {
        PeftError::Save(format!(
            "serializing safetensors: {}",
            first_line(&e.to_string())
        ))
    })
}

/// Write `bytes` to `path` atomically: a temp file in the same directory,
/// fsync, rename over `path`, then fsync the directory (best effort).
pub(crate) fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Unique per process and call, so concurrent writers never share a temp file.
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.tmp-{}-{seq}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(path, e));
    }
    // Make the rename itself durable. Directories cannot be opened on every
    // platform; the data is already safe, so failures here are ignored.
    if let Ok(d) = fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn io_err(path: &Path, e: std::io::Error) -> PeftError {
    PeftError::Io {
        path: path.to_path_buf(),
        msg: first_line(&e.to_string()),
    }
}
