//! Writing llama models and LoRA adapters as GGUF files (for llama.cpp).
//!
//! Tensors come in Hugging Face naming and layout; the writer maps names to
//! llama.cpp's (`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`)
//! and permutes Q/K rows into llama.cpp's rope layout. Files are written to a
//! temporary name and renamed, so an interrupted write leaves nothing behind.

use crate::error::{ModelError, Result};
use crate::gguf::{hf_to_gguf_name, rope_row_permutation, GgufFile};
use crate::llama::LlamaConfig;
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::Path;

/// `general.*` and `llama.*` metadata for a model.
pub fn llama_metadata(cfg: &LlamaConfig, name: &str) -> Vec<(String, Value)> {
    let u = |v: usize| Value::U32(v as u32);
    vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("general.type".into(), Value::String("model".into())),
        ("general.name".into(), Value::String(name.into())),
        ("llama.block_count".into(), u(cfg.num_hidden_layers)),
        ("llama.context_length".into(), u(cfg.max_position_embeddings)),
        ("llama.embedding_length".into(), u(cfg.hidden_size)),
        ("llama.feed_forward_length".into(), u(cfg.intermediate_size)),
        ("llama.attention.head_count".into(), u(cfg.num_attention_heads)),
        ("llama.attention.head_count_kv".into(), u(cfg.num_key_value_heads)),
        ("llama.rope.freq_base".into(), Value::F32(cfg.rope_theta as f32)),
        ("llama.rope.dimension_count".into(), u(cfg.head_dim())),
        ("llama.attention.layer_norm_rms_epsilon".into(), Value::F32(cfg.rms_norm_eps as f32)),
        ("llama.vocab_size".into(), u(cfg.vocab_size)),
    ]
}

/// The `tokenizer.*` metadata of an existing GGUF file, unchanged.
pub fn tokenizer_metadata_from_gguf(src: &GgufFile) -> Vec<(String, Value)> {
    let mut v: Vec<(String, Value)> = src
        .content
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// `tokenizer.*` metadata from a Hugging Face byte-level BPE `tokenizer.json`.
pub fn tokenizer_metadata_from_hf(path: &Path, cfg: &LlamaConfig, chat_template: Option<&str>) -> Result<Vec<(String, Value)>> {
    let bad = |msg: String| ModelError::Tokenizer { path: path.display().to_string(), msg };
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    let j: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON ({e})")))?;
    let model = &j["model"];
    if model["type"].as_str() != Some("BPE") {
        return Err(bad(format!("only BPE tokenizers can be written to GGUF, this one is {}", model["type"])));
    }
    let vocab = model["vocab"].as_object().ok_or_else(|| bad("model.vocab is missing".into()))?;
    let mut tokens = vec![String::new(); cfg.vocab_size.max(vocab.len())];
    let mut types = vec![1i32; tokens.len()];
    for (t, id) in vocab {
        if let Some(i) = id.as_u64().map(|i| i as usize).filter(|&i| i < tokens.len()) {
            tokens[i] = t.clone();
        }
    }
    for a in j["added_tokens"].as_array().into_iter().flatten() {
        if let (Some(i), Some(c)) = (a["id"].as_u64().map(|i| i as usize), a["content"].as_str()) {
            if i < tokens.len() {
                tokens[i] = c.to_string();
                types[i] = if a["special"].as_bool().unwrap_or(false) { 3 } else { 4 };
            }
        }
    }
    for (i, t) in tokens.iter_mut().enumerate() {
        if t.is_empty() {
            *t = format!("[PAD{i}]");
            types[i] = 5;
        }
    }
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(p) => Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?)),
            _ => None,
        })
        .map(Value::String)
        .collect();
    let mut v = vec![
        ("tokenizer.ggml.model".to_string(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".to_string(), Value::String("default".into())),
        ("tokenizer.ggml.tokens".to_string(), Value::Array(tokens.into_iter().map(Value::String).collect())),
        ("tokenizer.ggml.token_type".to_string(), Value::Array(types.into_iter().map(Value::I32).collect())),
        ("tokenizer.ggml.merges".to_string(), Value::Array(merges)),
        ("tokenizer.ggml.add_bos_token".to_string(), Value::Bool(false)),
    ];
    if let Some(b) = cfg.bos_token_id {
        v.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b)));
    }
    if let Some(e) = cfg.eos_token_id {
        v.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(e)));
        v.push(("tokenizer.ggml.padding_token_id".into(), Value::U32(e)));
    }
    if let Some(t) = chat_template {
        v.push(("tokenizer.chat_template".into(), Value::String(t.into())));
    }
    Ok(v)
}

/// A Hugging Face-named tensor as it is stored in a llama GGUF: the GGUF name,
/// Q/K rows permuted to llama.cpp's rope layout.
pub fn to_gguf_tensor(cfg: &LlamaConfig, hf_name: &str, t: QTensor) -> Result<(String, QTensor)> {
    let name = hf_to_gguf_name(hf_name).ok_or_else(|| ModelError::Config {
        path: hf_name.into(),
        msg: "no GGUF name for this tensor".into(),
    })?;
    let heads = if hf_name.ends_with("self_attn.q_proj.weight") {
        Some(cfg.num_attention_heads)
    } else if hf_name.ends_with("self_attn.k_proj.weight") {
        Some(cfg.num_key_value_heads)
    } else {
        None
    };
    let t = match heads {
        Some(h) => {
            let rows = t.shape().dims2()?.0;
            crate::gguf::permute_rows(&t, &rope_row_permutation(rows, h, false))?
        }
        None => t,
    };
    Ok((name, t))
}

/// A dense f32 tensor as a GGML tensor of `dtype` (F32, F16 or a block type).
pub fn quantize(t: &Tensor, dtype: GgmlDType) -> Result<QTensor> {
    Ok(QTensor::quantize(&t.contiguous()?, dtype)?)
}

/// Writes a GGUF file atomically (temporary file, then rename).
pub fn write_gguf(path: &Path, metadata: &[(String, Value)], tensors: &[(String, QTensor)]) -> Result<()> {
    let tmp = path.with_extension("gguf.tmp");
    let io = |e: std::io::Error| ModelError::io(&tmp, e);
    {
        let f = std::fs::File::create(&tmp).map_err(io)?;
        let mut w = std::io::BufWriter::new(f);
        let meta: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        candle_core::quantized::gguf_file::write(&mut w, &meta, &ts)?;
        let f = w.into_inner().map_err(|e| io(e.into_error()))?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))?;
    Ok(())
}

/// Converts a Hugging Face llama folder's tensors (`tensors`, HF names) into
/// a GGUF file at `path`; `quantize` picks a block type per tensor (None: F32).
pub fn write_llama_gguf(
    path: &Path,
    model_dir: &Path,
    tensors: &HashMap<String, Tensor>,
    quantize: impl Fn(&str, &Tensor) -> Option<QTensor>,
) -> Result<()> {
    let cfg = LlamaConfig::from_hf_file(&model_dir.join("config.json"))?;
    let mut meta = llama_metadata(&cfg, "converted");
    meta.extend(tokenizer_metadata_from_hf(&model_dir.join("tokenizer.json"), &cfg, None)?);
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut out = vec![];
    for n in names {
        let t = &tensors[n];
        let q = match quantize(n, t) {
            Some(q) => q,
            None => QTensor::quantize(&t.to_dtype(candle_core::DType::F32)?.contiguous()?, GgmlDType::F32)?,
        };
        out.push(to_gguf_tensor(&cfg, n, q)?);
    }
    write_gguf(path, &meta, &out)
}
