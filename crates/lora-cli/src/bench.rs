//! `lora bench`: the fixed-shape workload of `bench/reference/peft_bench.py`,
//! so the two can be run side by side (`bench/compare.sh`).
//! Default: MiniLM-L6 shape (6 layers, hidden 384, 12 heads, FFN 1536), batch
//! 32 × 128 tokens, LoRA r=8 alpha=16 dropout 0.1 on query,value, 4-class head.

use crate::ui;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use lora_core::{AdapterPlan, LoraConfig, MemorySource, ModelBuilder, TargetSpec};
use lora_models::{BertClassifier, BertConfig, BertInput, Head};
use lora_train::{AdamW, AdamWConfig};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// What to measure: train, infer or all (separate processes give clean peak RSS).
    #[arg(long, default_value = "all")]
    pub mode: String,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    #[arg(long, default_value = "query,value")]
    pub targets: String,
    /// Timed steps (after 2 warm-up steps); the median is reported.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Use real weights from this model folder instead of random ones.
    #[arg(long)]
    pub model: Option<std::path::PathBuf>,
    #[arg(long)]
    pub json: bool,
}

fn minilm_config() -> BertConfig {
    serde_json::from_value(serde_json::json!({
        "vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6,
        "num_attention_heads": 12, "intermediate_size": 1536, "hidden_act": "gelu",
        "max_position_embeddings": 512, "type_vocab_size": 2
    }))
    .expect("static config")
}

fn random_weights(c: &BertConfig, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut t = HashMap::new();
    let dev = Device::Cpu;
    let mut rnd = |shape: &[usize]| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-0.05f32..0.05)).collect();
        Tensor::from_vec(v, shape, &dev).expect("shape")
    };
    let (h, f) = (c.hidden_size, c.intermediate_size);
    t.insert("embeddings.word_embeddings.weight".into(), rnd(&[c.vocab_size, h]));
    t.insert("embeddings.position_embeddings.weight".into(), rnd(&[c.max_position_embeddings, h]));
    t.insert("embeddings.token_type_embeddings.weight".into(), rnd(&[c.type_vocab_size, h]));
    let ones = |n: usize| Tensor::ones(n, DType::F32, &Device::Cpu).expect("ones");
    let zeros = |n: usize| Tensor::zeros(n, DType::F32, &Device::Cpu).expect("zeros");
    let ln = |t: &mut HashMap<String, Tensor>, p: String| {
        t.insert(format!("{p}.weight"), ones(h));
        t.insert(format!("{p}.bias"), zeros(h));
    };
    ln(&mut t, "embeddings.LayerNorm".into());
    for i in 0..c.num_hidden_layers {
        let p = format!("encoder.layer.{i}");
        for (name, o, inp) in [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", f, h),
            ("output.dense", h, f),
        ] {
            t.insert(format!("{p}.{name}.weight"), rnd(&[o, inp]));
            t.insert(format!("{p}.{name}.bias"), rnd(&[o]));
        }
        ln(&mut t, format!("{p}.attention.output.LayerNorm"));
        ln(&mut t, format!("{p}.output.LayerNorm"));
    }
    t.insert("pooler.dense.weight".into(), rnd(&[h, h]));
    t.insert("pooler.dense.bias".into(), rnd(&[h]));
    t
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

fn build(args: &BenchArgs, with_adapter: bool) -> Result<(BertClassifier, lora_core::AdapterSet, BertConfig)> {
    let dev = Device::Cpu;
    let (src, cfg): (Box<dyn lora_core::WeightSource>, BertConfig) = match &args.model {
        Some(d) => {
            let f = lora_models::HfFolder::open(d)?;
            (Box::new(f.weight_source()?), BertConfig::from_file(&f.config)?)
        }
        None => {
            let c = minilm_config();
            (Box::new(MemorySource::new("random", random_weights(&c, 0))), c)
        }
    };
    let plan = with_adapter.then(|| {
        let lc = LoraConfig { r: args.rank, alpha: 16.0, dropout: 0.1, ..Default::default() };
        TargetSpec::parse(&args.targets).map(|t| AdapterPlan::new(lc, t, 0))
    });
    let plan = plan.transpose()?;
    let vb = ModelBuilder::new(src, dev)
        .with_optional_prefixes(&["bert."])
        .with_modules_to_save(&["classifier".to_string()])
        .with_adapter(plan)
        .init_missing_heads(true);
    let model = BertClassifier::load(&vb, &cfg, 4, Head::Pooler)?;
    let set = vb.finish()?;
    Ok((model, set, cfg))
}

fn batch(args: &BenchArgs, vocab: usize) -> Result<(BertInput, Tensor)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let (b, t) = (args.batch_size, args.seq_len);
    let ids: Vec<u32> = (0..b * t).map(|_| rng.random_range(0..vocab as u32)).collect();
    let labels: Vec<u32> = (0..b).map(|_| rng.random_range(0..4)).collect();
    let dev = Device::Cpu;
    Ok((
        BertInput {
            input_ids: Tensor::from_vec(ids, (b, t), &dev)?,
            token_type_ids: Tensor::zeros((b, t), DType::U32, &dev)?,
            attention_mask: Tensor::ones((b, t), DType::F32, &dev)?,
        },
        Tensor::from_vec(labels, b, &dev)?,
    ))
}

fn time_it(steps: usize, mut f: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    for _ in 0..2 {
        f()?;
    }
    let mut v = vec![];
    for _ in 0..steps {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64());
    }
    Ok(v)
}

pub fn run(args: BenchArgs) -> Result<i32> {
    if !["train", "infer", "all"].contains(&args.mode.as_str()) {
        bail!("--mode {}: expected train, infer or all", args.mode);
    }
    let threads = candle_core::utils::get_num_threads();
    let mut out = serde_json::json!({
        "tool": "lora (candle)",
        "threads": threads,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "rank": args.rank,
        "targets": args.targets,
    });
    let bs = args.batch_size as f64;
    if args.mode == "train" || args.mode == "all" {
        let (model, set, cfg) = build(&args, true)?;
        let (input, labels) = batch(&args, cfg.vocab_size)?;
        let mut opt = AdamW::new(set.trainable(), AdamWConfig::default());
        let times = time_it(args.steps, || {
            let logits = model.forward(&input, true)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
            let g = loss.backward()?;
            let grads: Vec<Vec<f32>> = opt
                .params
                .iter()
                .map(|p| match g.get(p.var.as_tensor()) {
                    Some(t) => t.flatten_all().and_then(|t| t.to_vec1::<f32>()).unwrap_or_default(),
                    None => vec![0.0; p.var.elem_count()],
                })
                .collect();
            opt.step(&grads, 5e-4)?;
            Ok(())
        })?;
        let med = median(times);
        out["train_step_s"] = serde_json::json!(med);
        out["train_samples_per_s"] = serde_json::json!(bs / med);
        out["trainable_params"] = serde_json::json!(set.trainable_params());
        out["peak_rss_mb_train"] = serde_json::json!(ui::peak_rss_mb());
    }
    if args.mode == "infer" || args.mode == "all" {
        let (model, set, cfg) = build(&args, true)?;
        let (input, _) = batch(&args, cfg.vocab_size)?;
        let infer = |m: &BertClassifier| -> Result<f64> {
            let t = time_it(args.steps, || {
                m.forward(&input, false)?.to_vec2::<f32>()?;
                Ok(())
            })?;
            Ok(bs / median(t))
        };
        out["infer_samples_per_s_unmerged"] = serde_json::json!(infer(&model)?);
        set.merge_all()?;
        out["infer_samples_per_s_merged"] = serde_json::json!(infer(&model)?);
        drop((model, set));
        let (base, _, _) = build(&args, false)?;
        out["infer_samples_per_s_base"] = serde_json::json!(infer(&base)?);
        out["peak_rss_mb_infer"] = serde_json::json!(ui::peak_rss_mb());
    }
    if args.json {
        println!("{out}");
    } else {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(0)
}
