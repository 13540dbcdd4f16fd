//! Decoder adapters and models out to llama.cpp and Hugging Face:
//! `lora export --format gguf` (a llama.cpp LoRA adapter) and `lora merge` for
//! LLaMA-family models (GGUF at F32/F16/Q8_0 or the base's own quantization,
//! or a Hugging Face safetensors folder).

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use clap::Args;
use lora_models::gguf::{hf_to_gguf_name, rope_row_permutation};
use lora_models::gguf_write;
use lora_tasks::causal::{build_causal, CausalLm, LmAdapter};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Base model the adapter was trained on (.gguf or Hugging Face folder).
    #[arg(long)]
    pub model: PathBuf,
    /// Adapter folder (PEFT format).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output format: gguf (llama.cpp LoRA adapter, load with `--lora FILE`).
    #[arg(long, default_value = "gguf")]
    pub format: String,
    /// Output file.
    #[arg(long)]
    pub out: PathBuf,
}

/// The rows of `B` (out, r) for module `path` in llama.cpp's layout.
fn b_rows_for_gguf(lm: &CausalLm, path: &str, b: &Tensor) -> Result<Tensor> {
    let c = &lm.model.config;
    let heads = if path.ends_with("self_attn.q_proj") {
        Some(c.num_attention_heads)
    } else if path.ends_with("self_attn.k_proj") {
        Some(c.num_key_value_heads)
    } else {
        None
    };
    Ok(match heads {
        Some(h) => lora_models::gguf::permute_dense_rows(b, &rope_row_permutation(b.dim(0)?, h, false))?,
        None => b.clone(),
    })
}

/// `lora export --format gguf`: tensors `blk.N.<name>.weight.lora_a` (r, in) and
/// `.lora_b` (out, r) in f32, `general.type=adapter`, `adapter.type=lora`,
/// `adapter.lora.alpha`. llama.cpp scales by alpha/r per module; rsLoRA and
/// per-module alphas are folded into B so every module keeps its exact scale.
pub fn export(a: ExportArgs) -> Result<i32> {
    if a.format != "gguf" {
        bail!("--format {}: only gguf is supported (the PEFT folder already is the safetensors format)", a.format);
    }
    let lm = build_causal(&a.model, LmAdapter::Saved(&a.adapter), &Device::Cpu)?;
    let plan = lm.adapters.plan.as_ref().context("no adapter")?;
    let alpha = plan.config.alpha;
    let mut tensors = vec![];
    for (path, am, bm, s) in lm.adapters.lora_tensors() {
        let base = hf_to_gguf_name(&format!("{path}.weight"))
            .with_context(|| format!("{path}: no llama.cpp tensor name for this module"))?;
        let r = am.dim(0)?;
        let llama_cpp_scale = alpha / r as f64;
        let bm = b_rows_for_gguf(&lm, &path, &bm)?;
        let bm = if (s / llama_cpp_scale - 1.0).abs() > 1e-9 { (bm * (s / llama_cpp_scale))? } else { bm };
        tensors.push((format!("{base}.lora_a"), QTensor::quantize(&am.contiguous()?, GgmlDType::F32)?));
        tensors.push((format!("{base}.lora_b"), QTensor::quantize(&bm.contiguous()?, GgmlDType::F32)?));
    }
    let name = a.adapter.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "adapter".into());
    let meta = vec![
        ("general.architecture".to_string(), Value::String("llama".into())),
        ("general.type".to_string(), Value::String("adapter".into())),
        ("general.name".to_string(), Value::String(name)),
        ("adapter.type".to_string(), Value::String("lora".into())),
        ("adapter.lora.alpha".to_string(), Value::F32(alpha as f32)),
    ];
    gguf_write::write_gguf(&a.out, &meta, &tensors)?;
    eprintln!(
        "wrote {} ({} LoRA pairs, alpha {alpha}); use: llama-completion -no-cnv -m {} --lora {}",
        a.out.display(),
        tensors.len() / 2,
        a.model.display(),
        a.out.display()
    );
    Ok(0)
}

/// Is `model` a LLaMA-family decoder (GGUF file, or a folder whose config says so)?
pub fn is_decoder(model: &Path) -> bool {
    if model.is_file() {
        return true;
    }
    std::fs::read_to_string(model.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("model_type").and_then(|m| m.as_str()).map(|m| m == "llama" || m == "mistral"))
        .unwrap_or(false)
}

fn parse_dtype(s: &str) -> Result<Option<GgmlDType>> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "same" => None,
        "f32" => Some(GgmlDType::F32),
        "f16" => Some(GgmlDType::F16),
        "q8_0" => Some(GgmlDType::Q8_0),
        "q4_0" => Some(GgmlDType::Q4_0),
        "q4_1" => Some(GgmlDType::Q4_1),
        o => bail!("--dtype {o}: expected same, f32, f16, q8_0, q4_0 or q4_1"),
    })
}

/// `lora merge` for a decoder: `out` ending in `.gguf` writes GGUF (weights at
/// `dtype`, or each in its base type for `same`), otherwise a Hugging Face folder.
pub fn merge(model: &Path, adapter: Option<&Path>, out: &Path, dtype: &str) -> Result<i32> {
    let target = parse_dtype(dtype)?;
    let src = match adapter {
        Some(a) => LmAdapter::Saved(a),
        None => LmAdapter::None,
    };
    let lm = build_causal(model, src, &Device::Cpu)?;
    lm.adapters.merge_all()?;
    let merged: HashMap<String, Tensor> =
        lm.adapters.lora_layers.iter().map(|l| Ok((format!("{}.weight", l.path()), l.weight()?))).collect::<Result<_>>()?;
    let to_gguf = out.extension().and_then(|e| e.to_str()) == Some("gguf");
    if to_gguf {
        let (meta, tensors) = match &lm.gguf {
            Some(src) => {
                let mut meta: Vec<(String, Value)> = src.content.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                meta.sort_by(|a, b| a.0.cmp(&b.0));
                let mut names: Vec<&String> = src.content.tensor_infos.keys().collect();
                names.sort();
                let mut tensors = vec![];
                for g in names {
                    let stored = src.qtensor(g)?;
                    let hf = lora_models::gguf::gguf_to_hf_name(g);
                    let t = match hf.as_ref().and_then(|h| merged.get(h)) {
                        Some(w) => {
                            let dt = target.unwrap_or(stored.dtype());
                            let q = QTensor::quantize(&w.contiguous()?, dt)?;
                            gguf_write::to_gguf_tensor(&lm.model.config, hf.as_deref().unwrap_or(g), q)?.1
                        }
                        None => match target {
                            // Norms stay f32; other matrices follow --dtype.
                            Some(dt) if stored.shape().rank() == 2 && dt != stored.dtype() => {
                                QTensor::quantize(&stored.dequantize(&Device::Cpu)?, dt)?
                            }
                            _ => stored,
                        },
                    };
                    tensors.push((g.clone(), t));
                }
                (meta, tensors)
            }
            None => {
                let dir = model;
                let cfg = &lm.model.config;
                let mut meta = gguf_write::llama_metadata(cfg, "merged");
                meta.extend(gguf_write::tokenizer_metadata_from_hf(&dir.join("tokenizer.json"), cfg, lm.chat_template.as_deref())?);
                let base = lora_models::HfFolder::open(dir)?;
                let mut tensors = vec![];
                for f in &base.weights {
                    for (k, v) in candle_core::safetensors::load(f, &Device::Cpu)? {
                        let w = merged.get(&k).cloned().unwrap_or(v).to_dtype(candle_core::DType::F32)?;
                        let dt = match target {
                            Some(dt) if w.rank() == 2 => dt,
                            _ => GgmlDType::F32,
                        };
                        tensors.push(gguf_write::to_gguf_tensor(cfg, &k, QTensor::quantize(&w.contiguous()?, dt)?)?);
                    }
                }
                (meta, tensors)
            }
        };
        gguf_write::write_gguf(out, &meta, &tensors)?;
        if adapter.is_some() {
            eprintln!("merged {} adapted matrices into {}", merged.len(), out.display());
        } else {
            eprintln!("converted {} into {}", model.display(), out.display());
        }
        return Ok(0);
    }
    // Hugging Face folder: every tensor in f32, Hugging Face names and layout.
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    match &lm.gguf {
        Some(src) => {
            let s = lora_models::GgufSource::new(src.clone())?;
            for k in lora_core::WeightSource::keys(&s) {
                if let Some(t) = lora_core::WeightSource::get(&s, &k, &Device::Cpu)? {
                    tensors.insert(k, t);
                }
            }
        }
        None => {
            for f in &lora_models::HfFolder::open(model)?.weights {
                tensors.extend(candle_core::safetensors::load(f, &Device::Cpu)?);
            }
        }
    }
    for (k, w) in &merged {
        tensors.insert(k.clone(), w.clone());
    }
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let tmp = out.join("model.safetensors.tmp");
    candle_core::safetensors::save(&tensors, &tmp)?;
    std::fs::rename(&tmp, out.join("model.safetensors"))?;
    let c = &lm.model.config;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim(),
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    });
    lora_data::write_atomic(&out.join("config.json"), serde_json::to_string_pretty(&config)?.as_bytes())?;
    lm.tokenizer
        .save(out.join("tokenizer.json"), false)
        .map_err(|e| anyhow::anyhow!("{}: cannot write the tokenizer: {e}", out.display()))?;
    let mut tc = serde_json::json!({"bos_token": lm.bos_token, "eos_token": lm.eos_token, "pad_token": lm.eos_token});
    if let Some(t) = &lm.chat_template {
        tc["chat_template"] = serde_json::Value::String(t.clone());
    }
    lora_data::write_atomic(&out.join("tokenizer_config.json"), serde_json::to_string_pretty(&tc)?.as_bytes())?;
    eprintln!("merged {} adapted matrices into {} (Hugging Face folder, f32)", merged.len(), out.display());
    Ok(0)
}
