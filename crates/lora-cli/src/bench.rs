//! `lora bench`: the fixed-shape workload of `bench/reference/peft_bench.py`,
//! so the two can be run side by side (`bench/run_all.py`).
//! Default: MiniLM-L6 shape (6 layers, hidden 384, 12 heads, FFN 1536), batch
//! 32 × 128 tokens, LoRA r=8 alpha=16 dropout 0.1 on query,value, 4-class head.
//!
//! `--mode decoder`: full QLoRA training steps on a GGUF decoder (default
//! SmolLM2-135M Q4_1), built exactly as `lora train --task causal-lm` builds it
//! (`build_causal`), LoRA r=16 alpha=32 dropout 0.05 on q,k,v,o,gate,up,down,
//! random tokens B × T (default 4 × 128), loss + backward + grad-norm clip 1.0 +
//! AdamW (lr 3e-4, weight decay 0.01); the counterpart of
//! `bench/reference/decoder_bench.py`.
//!
//! `--mode gemm`: f32 GEMM GFLOP/s on N × N squares (`--sizes`), through
//! candle's `matmul` and through the frozen-linear op the models use
//! (`lora_core::ops::frozen_linear`, the `gemm` crate), at the thread count in use.

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
    /// What to measure: train, infer or all (the encoder workload; separate
    /// processes give clean peak RSS), decoder (QLoRA training steps on a GGUF
    /// decoder) or gemm (f32 GEMM GFLOP/s).
    #[arg(long, default_value = "all")]
    pub mode: String,
    /// Sequences per batch [default: 32; decoder 4].
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    /// LoRA rank [default: 8; decoder 16].
    #[arg(long)]
    pub rank: Option<usize>,
    /// decoder: LoRA alpha [default: 32].
    #[arg(long)]
    pub alpha: Option<f64>,
    /// decoder: LoRA dropout [default: 0.05].
    #[arg(long)]
    pub dropout: Option<f32>,
    /// Target modules [default: query,value; decoder q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj].
    #[arg(long)]
    pub targets: Option<String>,
    /// Timed steps (after --warmup steps); the median is reported (gemm: repetitions per size).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed warm-up steps before the timed ones.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Use real weights from this model folder instead of random ones (decoder:
    /// the .gguf file or folder [default: $LORA_CACHE or ~/.cache/lora-rs, models/SmolLM2-135M-Instruct.Q4_1.gguf]).
    #[arg(long)]
    pub model: Option<std::path::PathBuf>,
    /// gemm: square sizes N (N × N · N × N).
    #[arg(long, value_delimiter = ',', default_value = "1024,2048")]
    pub sizes: Vec<usize>,
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

/// The gradient of every optimizer parameter as flat f32 (zeros when none reached it).
fn grads_of(opt: &AdamW, g: &candle_core::backprop::GradStore) -> Result<Vec<Vec<f32>>> {
    opt.params
        .iter()
        .map(|p| match g.get(p.var.as_tensor()) {
            Some(t) => Ok(t.flatten_all()?.to_vec1::<f32>()?),
            None => Ok(vec![0.0; p.var.elem_count()]),
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

fn build(args: &BenchArgs, with_adapter: bool) -> Result<(BertClassifier, lora_core::AdapterSet, BertConfig)> {
    let dev = ui::device();
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
        let lc = LoraConfig { r: args.rank.unwrap_or(8), alpha: 16.0, dropout: 0.1, ..Default::default() };
        TargetSpec::parse(args.targets.as_deref().unwrap_or("query,value")).map(|t| AdapterPlan::new(lc, t, 0))
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
    let (b, t) = (args.batch_size.unwrap_or(32), args.seq_len);
    let ids: Vec<u32> = (0..b * t).map(|_| rng.random_range(0..vocab as u32)).collect();
    let labels: Vec<u32> = (0..b).map(|_| rng.random_range(0..4)).collect();
    let dev = ui::device();
    Ok((
        BertInput {
            input_ids: Tensor::from_vec(ids, (b, t), &dev)?,
            token_type_ids: Tensor::zeros((b, t), DType::U32, &dev)?,
            attention_mask: Tensor::ones((b, t), DType::F32, &dev)?,
        },
        Tensor::from_vec(labels, b, &dev)?,
    ))
}

/// Data-parallel shards for a batch of `n` on this run's device (one on a GPU).
fn cpu_shards(n: usize) -> usize {
    lora_core::parallel::shards_on(&ui::device(), n)
}

/// `acc += g`, parameter by parameter (`acc` empty: takes `g`).
fn sum_grads(acc: &mut Vec<Vec<f32>>, g: Vec<Vec<f32>>) {
    if acc.is_empty() {
        *acc = g;
    } else {
        acc.iter_mut().flatten().zip(g.iter().flatten()).for_each(|(a, b)| *a += b);
    }
}

fn narrow_input(x: &BertInput, start: usize, len: usize) -> Result<BertInput> {
    Ok(BertInput {
        input_ids: x.input_ids.narrow(0, start, len)?.contiguous()?,
        token_type_ids: x.token_type_ids.narrow(0, start, len)?.contiguous()?,
        attention_mask: x.attention_mask.narrow(0, start, len)?.contiguous()?,
    })
}

/// Wall time of each of `steps` calls after `warmup` untimed ones; on a GPU
/// the clock stops only when the device has finished the queued work.
fn time_it(warmup: usize, steps: usize, mut f: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    let dev = ui::device();
    for _ in 0..warmup {
        f()?;
    }
    dev.synchronize()?;
    let mut v = vec![];
    for _ in 0..steps {
        let t = Instant::now();
        f()?;
        dev.synchronize()?;
        v.push(t.elapsed().as_secs_f64());
    }
    Ok(v)
}

pub fn run(args: BenchArgs) -> Result<i32> {
    if !["train", "infer", "all", "decoder", "gemm"].contains(&args.mode.as_str()) {
        bail!("--mode {}: expected train, infer, all, decoder or gemm", args.mode);
    }
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let out = match args.mode.as_str() {
        "decoder" => decoder(&args)?,
        "gemm" => gemm(&args)?,
        _ => encoder(&args)?,
    };
    if args.json {
        println!("{out}");
    } else {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(0)
}

fn encoder(args: &BenchArgs) -> Result<serde_json::Value> {
    let args = BenchArgs {
        batch_size: Some(args.batch_size.unwrap_or(32)),
        rank: Some(args.rank.unwrap_or(8)),
        targets: Some(args.targets.clone().unwrap_or_else(|| "query,value".into())),
        model: args.model.clone(),
        mode: args.mode.clone(),
        sizes: vec![],
        ..*args
    };
    let threads = candle_core::utils::get_num_threads();
    let mut out = serde_json::json!({
        "tool": "lora (candle)",
        "device": lora_core::device::name(&ui::device()),
        "threads": threads,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "rank": args.rank,
        "targets": args.targets,
        "matmul_precision": lora_core::amx::matmul_precision().to_string(),
    });
    let bs = args.batch_size.unwrap_or(32) as f64;
    if args.mode == "train" || args.mode == "all" {
        let (model, set, cfg) = build(&args, true)?;
        let (input, labels) = batch(&args, cfg.vocab_size)?;
        let mut opt = AdamW::new(set.trainable(), AdamWConfig::default());
        // One shard per core, as the trainer runs it (lora_core::parallel).
        let n = input.input_ids.dim(0)?;
        let ranges = lora_core::parallel::split_ranges(n, cpu_shards(n));
        let shards = ranges
            .iter()
            .map(|r| Ok((narrow_input(&input, r.start, r.len())?, labels.narrow(0, r.start, r.len())?, r.len())))
            .collect::<Result<Vec<_>>>()?;
        let times = time_it(args.warmup, args.steps, || {
            let parts = lora_core::parallel::run_shards(shards.len(), 0, |i| -> Result<Vec<Vec<f32>>> {
                let (inp, lab, len) = &shards[i];
                let logits = model.forward(inp, true)?;
                let loss = (candle_nn::loss::cross_entropy(&logits, lab)? * (*len as f64 / n as f64))?;
                grads_of(&opt, &loss.backward()?)
            });
            let mut grads = vec![];
            for p in parts {
                sum_grads(&mut grads, p?);
            }
            opt.step(&grads, 5e-4)?;
            Ok(())
        })?;
        out["train_shards"] = serde_json::json!(shards.len());
        let med = median(times);
        out["train_step_s"] = serde_json::json!(med);
        out["train_samples_per_s"] = serde_json::json!(bs / med);
        out["trainable_params"] = serde_json::json!(set.trainable_params());
        out["peak_rss_mb_train"] = serde_json::json!(ui::peak_rss_mb());
    }
    if args.mode == "infer" || args.mode == "all" {
        // The three variants alive at once and timed round-robin (the
        // starting variant rotating), as the PyTorch reference does: drift in
        // the machine's speed then hits all three alike, which sequential
        // blocks of passes did not (their ratios swung by ±10% run to run).
        let (unmerged, _, cfg) = build(&args, true)?;
        let (merged, mset, _) = build(&args, true)?;
        mset.merge_all()?;
        let (base, _, _) = build(&args, false)?;
        let (input, _) = batch(&args, cfg.vocab_size)?;
        let _no_grad = lora_core::no_grad();
        let models = [&unmerged, &merged, &base];
        // One shard per core, as `lora eval`/`predict` run it.
        let n = input.input_ids.dim(0)?;
        let shards = lora_core::parallel::split_ranges(n, cpu_shards(n))
            .iter()
            .map(|r| narrow_input(&input, r.start, r.len()))
            .collect::<Result<Vec<_>>>()?;
        out["infer_shards"] = serde_json::json!(shards.len());
        let pass = |m: &BertClassifier| -> Result<()> {
            for r in lora_core::parallel::run_shards(shards.len(), 0, |i| -> Result<()> {
                m.forward(&shards[i], false)?.to_vec2::<f32>()?;
                Ok(())
            }) {
                r?;
            }
            Ok(())
        };
        let dev = ui::device();
        for _ in 0..args.warmup {
            for m in models {
                pass(m)?;
            }
        }
        dev.synchronize()?;
        let mut times: [Vec<f64>; 3] = Default::default();
        for step in 0..args.steps {
            for k in 0..3 {
                let i = (step + k) % 3;
                let t = Instant::now();
                pass(models[i])?;
                dev.synchronize()?;
                times[i].push(t.elapsed().as_secs_f64());
            }
        }
        // Per-round time ratios: the cost of the unmerged adapter and of
        // merging, each measured within one round.
        let ratio = |a: usize, b: usize| median(times[a].iter().zip(&times[b]).map(|(x, y)| x / y).collect());
        out["infer_unmerged_over_merged_time"] = serde_json::json!(ratio(0, 1));
        out["infer_merged_over_base_time"] = serde_json::json!(ratio(1, 2));
        let [tu, tm, tb] = times;
        out["infer_samples_per_s_unmerged"] = serde_json::json!(bs / median(tu));
        out["infer_samples_per_s_merged"] = serde_json::json!(bs / median(tm));
        out["infer_samples_per_s_base"] = serde_json::json!(bs / median(tb));
        out["peak_rss_mb_infer"] = serde_json::json!(ui::peak_rss_mb());
    }
    Ok(out)
}

fn default_decoder() -> std::path::PathBuf {
    let cache = std::env::var_os("LORA_CACHE").map(std::path::PathBuf::from).unwrap_or_else(|| {
        std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/lora-rs")
    });
    cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// QLoRA training steps on a decoder, built as `lora train --task causal-lm` builds it.
fn decoder(args: &BenchArgs) -> Result<serde_json::Value> {
    use lora_tasks::causal::data::LmExample;
    use lora_tasks::causal::{build_causal, LmAdapter};
    let path = args.model.clone().unwrap_or_else(default_decoder);
    let (b, t) = (args.batch_size.unwrap_or(4), args.seq_len);
    if b == 0 || t < 2 {
        bail!("--batch-size must be at least 1 and --seq-len at least 2");
    }
    let (r, alpha, dropout) = (args.rank.unwrap_or(16), args.alpha.unwrap_or(32.0), args.dropout.unwrap_or(0.05));
    let targets = args.targets.clone().unwrap_or_else(|| "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj".into());
    let (lr, max_grad_norm) = (3e-4, 1.0);
    let lc = LoraConfig { r, alpha, dropout, ..Default::default() };
    let plan = AdapterPlan::new(lc, TargetSpec::parse(&targets)?, 0);
    let t_load = Instant::now();
    let lm = build_causal(&path, LmAdapter::New(plan), &ui::device())?;
    let load_s = t_load.elapsed().as_secs_f64();
    let vocab = lm.model.config.vocab_size as u32;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let examples: Vec<LmExample> = (0..b)
        .map(|_| {
            // Ordinary tokens only (the first ids of SmolLM2's vocabulary are special).
            let ids: Vec<u32> = (0..t).map(|_| rng.random_range(16.min(vocab - 1)..vocab)).collect();
            let labels = ids.iter().map(|&i| i as i64).collect();
            LmExample { ids, labels }
        })
        .collect();
    let refs: Vec<&LmExample> = examples.iter().collect();
    let mut opt = AdamW::new(lm.adapters.trainable(), AdamWConfig::default());
    let mut step = 0u64;
    let mut losses = vec![];
    // One shard of the batch per core, weighted by target tokens, as the trainer runs it.
    let ranges = lora_core::parallel::split_ranges(refs.len(), cpu_shards(refs.len()));
    let weights: Vec<f64> = ranges.iter().map(|r| refs[r.clone()].iter().map(|e| e.labels.len().saturating_sub(1)).sum::<usize>() as f64).collect();
    let total: f64 = weights.iter().sum();
    let times = time_it(args.warmup, args.steps, || {
        lora_core::ops::set_dropout_seed(step);
        step += 1;
        let parts = lora_core::parallel::run_shards(ranges.len(), step, |i| -> Result<(f64, Vec<Vec<f32>>)> {
            let (loss, _) = lm.batch_loss(&refs[ranges[i].clone()], true)?;
            let lv = loss.to_scalar::<f32>()? as f64;
            Ok((lv, grads_of(&opt, &(loss * (weights[i] / total))?.backward()?)?))
        });
        let mut loss = 0f64;
        let mut grads: Vec<Vec<f32>> = vec![];
        for (i, p) in parts.into_iter().enumerate() {
            let (l, g) = p?;
            loss += l * weights[i] / total;
            sum_grads(&mut grads, g);
        }
        losses.push(loss);
        lora_train::optim::clip_grad_norm(&mut grads, max_grad_norm);
        opt.step(&grads, lr)?;
        Ok(())
    })?;
    let med = median(times.clone());
    let c = &lm.model.config;
    Ok(serde_json::json!({
        "tool": "lora (candle)",
        "mode": "decoder",
        "device": lora_core::device::name(&ui::device()),
        "threads": candle_core::utils::get_num_threads(),
        "model": path.display().to_string(),
        "format": format!("{:?}", lm.format),
        "layers": c.num_hidden_layers,
        "hidden": c.hidden_size,
        "intermediate": c.intermediate_size,
        "heads": c.num_attention_heads,
        "kv_heads": c.num_key_value_heads,
        "vocab": c.vocab_size,
        "batch_size": b,
        "seq_len": t,
        "rank": r,
        "alpha": alpha,
        "dropout": (dropout as f64 * 1e6).round() / 1e6,
        "targets": targets,
        "lr": lr,
        "lora_modules": lm.adapters.lora_layers.len(),
        "trainable_params": lm.adapters.trainable_params(),
        "weights_mb": lm.model.weight_bytes() as f64 / (1u64 << 20) as f64,
        "load_s": load_s,
        "warmup": args.warmup,
        "steps": args.steps,
        "decoder_shards": ranges.len(),
        "decoder_step_s": med,
        "decoder_step_s_all": times,
        "decoder_tokens_per_s": (b * t) as f64 / med,
        "decoder_losses": losses,
        "peak_rss_mb_decoder": ui::peak_rss_mb(),
    }))
}

/// f32 GEMM GFLOP/s on squares: candle's matmul and the frozen-linear op.
fn gemm(args: &BenchArgs) -> Result<serde_json::Value> {
    if args.sizes.is_empty() || args.sizes.contains(&0) {
        bail!("--sizes: give positive sizes, e.g. 1024,2048");
    }
    let dev = ui::device();
    let mut out = serde_json::json!({
        "tool": "lora (candle)",
        "mode": "gemm",
        "device": lora_core::device::name(&dev),
        "threads": candle_core::utils::get_num_threads(),
        "sizes": args.sizes,
        "warmup": args.warmup,
        "steps": args.steps,
    });
    let mut peak = 0f64;
    for &n in &args.sizes {
        let a = Tensor::randn(0f32, 1.0, (n, n), &dev)?;
        let b = Tensor::randn(0f32, 1.0, (n, n), &dev)?;
        let flops = 2.0 * (n as f64).powi(3);
        // candle's matmul: A·B, both contiguous (row-major).
        let t = time_it(args.warmup.max(1), args.steps, || {
            let c = a.matmul(&b)?;
            std::hint::black_box(&c);
            Ok(())
        })?;
        let g_matmul = flops / median(t) / 1e9;
        // The frozen-linear op the encoder and decoder use: X·Wᵀ through the gemm crate.
        let t = time_it(args.warmup.max(1), args.steps, || {
            let c = lora_core::ops::frozen_linear(&a, &b, None)?;
            std::hint::black_box(&c);
            Ok(())
        })?;
        let g_linear = flops / median(t) / 1e9;
        out[format!("gemm_gflops_matmul_{n}")] = serde_json::json!(g_matmul);
        out[format!("gemm_gflops_linear_{n}")] = serde_json::json!(g_linear);
        peak = peak.max(g_matmul).max(g_linear);
    }
    out["gemm_peak_gflops"] = serde_json::json!(peak);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(mode: &str) -> BenchArgs {
        BenchArgs {
            mode: mode.into(),
            batch_size: None,
            seq_len: 128,
            rank: None,
            alpha: None,
            dropout: None,
            targets: None,
            steps: 2,
            warmup: 1,
            model: None,
            sizes: vec![64, 96],
            json: true,
        }
    }

    #[test]
    fn gemm_mode_reports_every_size_and_the_peak() {
        let out = gemm(&args("gemm")).unwrap();
        let mut best = 0f64;
        for n in [64, 96] {
            for k in ["matmul", "linear"] {
                let g = out[format!("gemm_gflops_{k}_{n}")].as_f64().unwrap();
                assert!(g.is_finite() && g > 0.0, "{k} {n}: {g}");
                best = best.max(g);
            }
        }
        assert_eq!(out["gemm_peak_gflops"].as_f64().unwrap(), best);
    }

    #[test]
    fn decoder_mode_needs_an_existing_model() {
        let mut a = args("decoder");
        a.model = Some("/nonexistent/model.gguf".into());
        assert!(decoder(&a).is_err());
    }
}
