//! `lora merge`: fold an adapter into the base weights and write a full model
//! folder that transformers loads as `BertForSequenceClassification`.

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use clap::Args;
use lora_models::Head;
use lora_tasks::classify::adapter::{self, AdapterSource};
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// Base model folder.
    #[arg(long)]
    pub model: PathBuf,
    /// Adapter folder (PEFT format). A decoder may be converted without one
    /// (e.g. a 4-bit GGUF to an f32 GGUF or a Hugging Face folder).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Output: a model folder (config.json, model.safetensors, tokenizer files),
    /// or for a decoder a `.gguf` file (llama.cpp).
    #[arg(long)]
    pub out: PathBuf,
    /// Decoder to GGUF: weight type of the output (same = each matrix in its
    /// base type, e.g. Q4_1 re-quantized after merging; f32; f16; q8_0; q4_0; q4_1).
    #[arg(long, default_value = "same")]
    pub dtype: String,
}

pub fn merge(a: MergeArgs) -> Result<i32> {
    if crate::cmd_decoder_io::is_decoder(&a.model) {
        return crate::cmd_decoder_io::merge(&a.model, a.adapter.as_deref(), &a.out, &a.dtype);
    }
    let adapter_dir = a.adapter.clone().context("--adapter is required for an encoder")?;
    let dev = Device::Cpu;
    let clf = adapter::build_classifier(&a.model, AdapterSource::Saved(&adapter_dir), &dev)?;
    clf.adapters.merge_all()?;
    // Every base tensor (any dtype), renamed to BertForSequenceClassification's keys.
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for f in &clf.folder.weights {
        let t = candle_core::safetensors::load(f, &dev).with_context(|| format!("{}", f.display()))?;
        for (k, v) in t {
            let key = if k.starts_with("bert.") || k.starts_with("classifier.") { k } else { format!("bert.{k}") };
            tensors.insert(key, v);
        }
    }
    let mut replaced = 0;
    for l in &clf.adapters.lora_layers {
        tensors.insert(format!("{}.weight", l.path()), l.weight()?);
        replaced += 1;
    }
    for h in &clf.adapters.heads {
        tensors.insert(format!("{}.weight", h.path()), h.weight()?);
        if let Some(b) = h.bias() {
            tensors.insert(format!("{}.bias", h.path()), b);
        }
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("{}: cannot create", a.out.display()))?;
    let tmp = a.out.join(format!(".model.safetensors.tmp-{}", std::process::id()));
    candle_core::safetensors::save(&tensors, &tmp).with_context(|| format!("{}", tmp.display()))?;
    std::fs::rename(&tmp, a.out.join("model.safetensors"))?;

    let text = std::fs::read_to_string(&clf.folder.config)?;
    let mut cfg: serde_json::Value = serde_json::from_str(&text)?;
    cfg["architectures"] = serde_json::json!(["BertForSequenceClassification"]);
    let id2label: serde_json::Map<String, serde_json::Value> =
        clf.labels.iter().enumerate().map(|(i, l)| (i.to_string(), serde_json::json!(l))).collect();
    let label2id: serde_json::Map<String, serde_json::Value> =
        clf.labels.iter().enumerate().map(|(i, l)| (l.clone(), serde_json::json!(i))).collect();
    cfg["id2label"] = serde_json::Value::Object(id2label);
    cfg["label2id"] = serde_json::Value::Object(label2id);
    if clf.head == Head::Mean {
        cfg["lora_head"] = serde_json::json!("mean");
        eprintln!("note: mean-pooling head: this tool honours it (lora_head in config.json); transformers' BertForSequenceClassification would use the pooler instead");
    }
    lora_data::write_atomic(&a.out.join("config.json"), serde_json::to_string_pretty(&cfg)?.as_bytes())?;
    for f in ["tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"] {
        let src = clf.folder.dir.join(f);
        if src.is_file() {
            let bytes = std::fs::read(&src)?;
            lora_data::write_atomic(&a.out.join(f), &bytes)?;
        }
    }
    eprintln!(
        "merged {} adapted layers into {} ({} tensors); load it with AutoModelForSequenceClassification",
        replaced,
        a.out.display(),
        tensors.len()
    );
    Ok(0)
}
