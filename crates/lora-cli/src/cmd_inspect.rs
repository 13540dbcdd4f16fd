//! `lora inspect`: what a model or adapter folder holds.

use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// A model folder (config.json) or an adapter folder (adapter_config.json).
    pub path: PathBuf,
    #[arg(long)]
    pub json: bool,
}

pub fn inspect(a: InspectArgs) -> Result<i32> {
    let p = &a.path;
    if p.join("adapter_config.json").is_file() {
        return inspect_adapter(&a);
    }
    if p.join("config.json").is_file() {
        return inspect_model(&a);
    }
    bail!("{}: neither an adapter folder (adapter_config.json) nor a model folder (config.json)", p.display())
}

fn inspect_adapter(a: &InspectArgs) -> Result<i32> {
    let ad = lora_peft::load_adapter(&a.path, &candle_core::Device::Cpu)?;
    let s = lora_peft::summarize(&ad);
    let labels: Option<Vec<String>> = std::fs::read_to_string(a.path.join("labels.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let task: Option<serde_json::Value> = std::fs::read_to_string(a.path.join("lora_task.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    // Share of the base model, when the base folder is reachable.
    let base_params = ad
        .config
        .base_model_name_or_path
        .as_ref()
        .and_then(|b| count_params(&PathBuf::from(b)).ok());
    let c = &ad.config;
    let mut names: Vec<String> = s.targets.iter().map(|t| t.rsplit('.').next().unwrap_or(t).to_string()).collect();
    names.sort();
    names.dedup();
    let ranks: std::collections::BTreeSet<usize> = s.ranks.values().copied().collect();
    let v = serde_json::json!({
        "kind": "adapter",
        "peft_type": "LORA",
        "task_type": c.task_type.as_ref().map(|t| t.as_str().to_string()),
        "base_model": c.base_model_name_or_path,
        "r": c.r,
        "lora_alpha": c.lora_alpha,
        "use_rslora": c.use_rslora,
        "lora_dropout": c.lora_dropout,
        "target_names": names,
        "adapted_modules": s.targets.len(),
        "ranks": ranks,
        "modules_to_save": c.modules_to_save,
        "lora_params": s.lora_params,
        "head_params": s.head_params,
        "trainable_params": s.total_params(),
        "base_params": base_params,
        "trainable_share": base_params.map(|b| s.total_params() as f64 / b as f64),
        "labels": labels,
        "head": task.as_ref().and_then(|t| t.get("head").cloned()),
    });
    if a.json {
        println!("{v}");
        return Ok(0);
    }
    println!("adapter      {}", a.path.display());
    println!("type         LoRA ({})", v["task_type"].as_str().unwrap_or("no task type"));
    println!("base model   {}", c.base_model_name_or_path.clone().unwrap_or_default());
    println!("targets      {} ({} modules)", names.join(", "), s.targets.len());
    println!("rank         r={} alpha={} scaling={}{}", c.r, c.lora_alpha, if c.use_rslora { "alpha/sqrt(r)" } else { "alpha/r" }, if ranks.len() > 1 { format!(" (per-module ranks {ranks:?})") } else { String::new() });
    println!("dropout      {}", c.lora_dropout);
    println!("saved heads  {:?}", s.saved_modules.keys().collect::<Vec<_>>());
    match base_params {
        Some(b) => println!(
            "parameters   {} trainable ({} LoRA + {} head) of {} = {:.3}%",
            s.total_params(), s.lora_params, s.head_params, b, 100.0 * s.total_params() as f64 / b as f64
        ),
        None => println!("parameters   {} trainable ({} LoRA + {} head)", s.total_params(), s.lora_params, s.head_params),
    }
    if let Some(l) = labels {
        println!("labels       {}", l.join(", "));
    }
    if let Some(h) = v["head"].as_str() {
        println!("head         {h}");
    }
    Ok(0)
}

fn count_params(dir: &std::path::Path) -> Result<usize> {
    let f = lora_models::HfFolder::open(dir)?;
    let src = f.weight_source()?;
    use lora_core::WeightSource;
    Ok(src.keys().iter().filter(|k| !k.ends_with("position_ids")).filter_map(|k| src.shape(k)).map(|s| s.iter().product::<usize>()).sum())
}

fn inspect_model(a: &InspectArgs) -> Result<i32> {
    let f = lora_models::HfFolder::open(&a.path)?;
    let cfg = lora_models::BertConfig::from_file(&f.config)?;
    let src = f.weight_source()?;
    use lora_core::WeightSource;
    let keys = src.keys();
    let params = count_params(&a.path)?;
    let mut linear: Vec<String> = keys
        .iter()
        .filter(|k| k.ends_with(".weight") && src.shape(k).map(|s| s.len() == 2).unwrap_or(false) && !k.contains("embeddings"))
        .map(|k| k.trim_end_matches(".weight").rsplit('.').next().unwrap_or("").to_string())
        .collect();
    linear.sort();
    linear.dedup();
    let prefixed = keys.iter().any(|k| k.starts_with("bert."));
    let has_head = keys.iter().any(|k| k.starts_with("classifier."));
    let labels: Option<Vec<String>> = cfg.id2label.as_ref().map(|m| m.values().cloned().collect());
    let v = serde_json::json!({
        "kind": "model",
        "architecture": cfg.architectures.clone().unwrap_or_default(),
        "model_type": cfg.model_type,
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "heads": cfg.num_attention_heads,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "params": params,
        "tensors": keys.len(),
        "bert_prefix": prefixed,
        "classifier_head": has_head,
        "linear_module_names": linear,
        "labels": if has_head { labels } else { None },
        "tokenizer": f.tokenizer.is_file(),
    });
    if a.json {
        println!("{v}");
        return Ok(0);
    }
    println!("model        {}", a.path.display());
    println!("architecture {} ({})", cfg.architectures.clone().unwrap_or_default().join(", "), cfg.model_type.clone().unwrap_or_default());
    println!("shape        {} layers, hidden {}, {} heads, FFN {}, vocab {}", cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.vocab_size);
    println!("parameters   {} in {} tensors", params, keys.len());
    println!("LoRA targets {} (use with --targets, or all-linear)", linear.join(", "));
    println!("head         {}", if has_head { "classifier present" } else { "none (a new head is trained with the adapter)" });
    if has_head {
        if let Some(l) = v["labels"].as_array() {
            println!("labels       {}", l.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(", "));
        }
    }
    println!("tokenizer    {}", if f.tokenizer.is_file() { "tokenizer.json" } else { "missing" });
    Ok(0)
}
