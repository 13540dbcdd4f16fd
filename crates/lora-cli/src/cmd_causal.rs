//! `lora train|eval --task causal-lm`, `lora generate`, `lora chat`.

use crate::cmd_classify::{EvalArgs, TrainArgs, RUN_FILE};
use crate::ui;
use anyhow::{bail, Context, Result};
use clap::Args;
use lora_core::{AdapterPlan, LoraConfig, LoraInit, TargetSpec};
use lora_data::{EvalRecord as LogEval, MetricsLog};
use lora_tasks::causal::data::{self as lmdata, LmExample, LmFormat, Message};
use lora_tasks::causal::generate::{generate, SamplingConfig};
use lora_tasks::causal::{build_causal, CausalLm, LmAdapter, LmMeta, LmTask};
use lora_train::{Hooks, Outcome, Schedule, TrainConfig, Trainer};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

/// Training and validation sequences for the data files of a run.
fn load_data(lm: &CausalLm, args: &TrainArgs) -> Result<(Vec<LmExample>, Vec<LmExample>, LmFormat)> {
    let train_path = args.train.clone().context("--train is required")?;
    let fmt = LmFormat::of(&train_path)?;
    let read = |p: &Path| -> Result<Vec<LmExample>> {
        Ok(match LmFormat::of(p)? {
            LmFormat::Text => lmdata::text_blocks(&lm.tokenizer, p, args.block_size)?,
            LmFormat::Chat => {
                let (ex, dropped) = lmdata::chat_examples(&lm.tokenizer, &lm.template()?, p, args.max_len())?;
                if dropped > 0 {
                    eprintln!("note: {}: {dropped} conversations have no assistant token within --max-len {} and are skipped", p.display(), args.max_len());
                }
                ex
            }
        })
    };
    let mut train = read(&train_path)?;
    let valid = match &args.valid {
        Some(v) => read(v)?,
        None => {
            if !(args.valid_fraction > 0.0 && args.valid_fraction < 1.0) {
                bail!("--valid-fraction {} must be in (0, 1) when --valid is not given", args.valid_fraction);
            }
            let n = ((train.len() as f64 * args.valid_fraction).round() as usize).max(1);
            if n >= train.len() {
                bail!("{}: too little data to hold out a validation share", train_path.display());
            }
            if fmt == LmFormat::Chat {
                use rand::seq::SliceRandom;
                use rand::SeedableRng;
                train.shuffle(&mut rand::rngs::StdRng::seed_from_u64(args.seed));
            }
            // Text: the last blocks (contiguous, so no context leaks into training).
            train.split_off(train.len() - n)
        }
    };
    Ok((train, valid, fmt))
}

struct LmHooks<'a> {
    lm: &'a CausalLm,
    meta: LmMeta,
    out: PathBuf,
    log: MetricsLog,
    bar: indicatif::ProgressBar,
    quiet: bool,
}

impl Hooks for LmHooks<'_> {
    fn on_start(&mut self, state: &lora_train::TrainState) {
        self.bar.set_length(state.total_steps as u64);
        self.bar.set_position(state.step as u64);
        self.bar.reset_eta();
    }

    fn on_step(&mut self, r: &lora_train::StepRecord, logged: bool) {
        crate::cmd_classify::report_step(&self.bar, &mut self.log, r, logged, self.quiet, "sequences");
    }

    fn on_eval(&mut self, r: &lora_train::EvalRecord, improved: bool) -> lora_train::Result<()> {
        let _ = self.log.log_eval(LogEval { step: r.step as u64, epoch: r.epoch, metrics: r.metrics.clone() });
        let line = format!(
            "eval step {} epoch {:.2}: loss {:.4} perplexity {:.3}{}",
            r.step,
            r.epoch,
            r.metrics.get("loss").copied().unwrap_or(f64::NAN),
            r.metrics.get("perplexity").copied().unwrap_or(f64::NAN),
            if improved { " (best, saved)" } else { "" }
        );
        if !self.quiet {
            if ui::interactive() {
                self.bar.println(line);
            } else {
                eprintln!("{line}");
            }
        }
        if improved {
            self.lm.save(&self.out, &self.meta).map_err(|e| lora_train::TrainError::Task(e.to_string()))?;
        }
        Ok(())
    }
}

/// `--init`: the LoRA init, and for PiSSA/OLoRA the weight-based init
/// (the targeted base weights become dense residuals, as in PEFT).
fn parse_init(s: &str, seed: u64) -> Result<(LoraInit, Option<lora_lowrank::WeightInit>)> {
    Ok(match s {
        "kaiming" => (LoraInit::KaimingUniform, None),
        "gaussian" => (LoraInit::Gaussian, None),
        o => match lora_lowrank::WeightInit::parse(o, seed) {
            Some(w) => (LoraInit::KaimingUniform, Some(w)),
            None => bail!("--init {o}: expected kaiming, gaussian, pissa, pissa-niter-N or olora"),
        },
    })
}

/// `lora train --task causal-lm`.
pub fn train(args: TrainArgs, stop: &AtomicBool, resuming: bool) -> Result<i32> {
    let t0 = Instant::now();
    let out = args.out.clone().context("--out is required")?;
    let model = args.model.clone().context("--model is required")?;
    if !resuming && out.join(RUN_FILE).exists() && !args.overwrite {
        bail!(
            "{}: already holds a training run; pass --resume {} to continue it, --overwrite to replace it, or choose another --out",
            out.display(),
            out.display()
        );
    }
    let schedule = Schedule::parse(&args.schedule).map_err(anyhow::Error::msg)?;
    let (init, weight_init) = parse_init(&args.init, args.seed)?;
    let lcfg = LoraConfig { r: args.rank, alpha: args.alpha, dropout: args.dropout, use_rslora: args.rslora, init };
    let targets = TargetSpec::parse(args.targets())?.with_layers(args.layers.clone());
    let mut plan = AdapterPlan::new(lcfg, targets, args.seed);
    plan.weight_init = weight_init.map(lora_lowrank::init::builder_hook);
    let device = ui::device();
    let lm = build_causal(&model, LmAdapter::New(plan), &device)?;
    let initial = weight_init.map(|_| lm.adapters.lora_tensors_snapshot()).transpose()?;
    let (train_set, valid_set, fmt) = load_data(&lm, &args)?;
    std::fs::create_dir_all(&out).with_context(|| format!("{}: cannot create", out.display()))?;
    let trainable = lm.adapters.trainable_params();
    let total = lm.adapters.total_params();
    let train_tokens: usize = train_set.iter().map(|e| e.targets()).sum();
    if !args.json {
        eprintln!(
            "model {} ({:?}, {} layers, {:.0} MB of weights in memory)\ntrain {} · valid {} sequences ({} target tokens) · LoRA r={} alpha={} on {} modules · trainable {} of {} params ({:.3}%)",
            model.display(),
            lm.format,
            lm.model.config.num_hidden_layers,
            lm.model.weight_bytes() as f64 / 1e6,
            train_set.len(),
            valid_set.len(),
            train_tokens,
            args.rank,
            args.alpha,
            lm.adapters.lora_layers.len(),
            ui::human_count(trainable),
            ui::human_count(total),
            100.0 * trainable as f64 / total as f64
        );
    }
    let meta = LmMeta {
        task: "causal-lm".into(),
        base_model: lora_tasks::classify::adapter::base_model_name(&model),
        data_format: fmt,
        block_size: args.block_size,
        max_len: args.max_len(),
        tool: format!("lora {}", env!("CARGO_PKG_VERSION")),
    };
    let tcfg = TrainConfig {
        epochs: args.epochs,
        max_steps: args.max_steps,
        lr: args.lr(),
        schedule,
        warmup_ratio: args.warmup_ratio,
        adamw: lora_train::AdamWConfig { weight_decay: args.weight_decay, ..Default::default() },
        max_grad_norm: args.max_grad_norm,
        grad_accum: args.grad_accum.max(1),
        eval_every: args.eval_every,
        log_every: args.log_every.max(1),
        metric: args.metric().to_string(),
        greater_is_better: false,
        patience: args.patience,
        seed: args.seed,
        shards: None,
    };
    let task = LmTask {
        lm: &lm,
        train: &train_set,
        valid: &valid_set,
        batch_size: args.batch_size(),
        eval_batch_size: args.eval_batch_size.min(16),
        seed: args.seed,
    };
    let mut trainer = Trainer::new(lm.adapters.trainable(), tcfg, out.join("checkpoint"));
    let metrics_path = out.join("metrics.jsonl");
    let mut base_ppl = None;
    let log = if resuming {
        trainer.resume()?;
        lora_data::rewrite_truncated(&metrics_path, trainer.state.step as u64)?;
        if !args.json {
            eprintln!("resuming at step {} (epoch {})", trainer.state.step, trainer.state.epoch);
        }
        MetricsLog::append(&metrics_path)?
    } else {
        let _ = std::fs::remove_dir_all(out.join("checkpoint"));
        let text = serde_json::to_string_pretty(&args)?;
        lora_data::write_atomic(&out.join(RUN_FILE), text.as_bytes())?;
        // The starting point: with B = 0 the adapter is a no-op, so this is the base model.
        let bar = ui::bar(valid_set.len() as u64, "sequences", args.json);
        let (loss, ppl, _) = lm.perplexity(&valid_set, task.eval_batch_size, &mut |n| bar.inc(n as u64))?;
        bar.finish_and_clear();
        if !args.json {
            eprintln!("before training: validation loss {loss:.4} perplexity {ppl:.3}");
        }
        base_ppl = Some(ppl);
        let mut log = MetricsLog::create(&metrics_path)?;
        let mut m = std::collections::BTreeMap::new();
        m.insert("loss".to_string(), loss);
        m.insert("perplexity".to_string(), ppl);
        let _ = log.log_eval(LogEval { step: 0, epoch: 0.0, metrics: m });
        log
    };
    let mut hooks = LmHooks { lm: &lm, meta, out: out.clone(), log, bar: ui::bar(0, "steps", args.json), quiet: args.json };
    let outcome = trainer.fit(&task, &mut hooks, stop);
    hooks.bar.finish_and_clear();
    crate::cmd_classify::write_plots(&out, None);
    let outcome = outcome?;
    if let (Some(init), true) = (&initial, outcome != Outcome::Interrupted) {
        crate::cmd_lowrank::convert_trained(&out, init, &args.init)?;
    }
    let secs = t0.elapsed().as_secs_f64();
    let best = trainer.state.best_metric;
    let summary = serde_json::json!({
        "outcome": format!("{outcome:?}").to_lowercase(),
        "out": out.display().to_string(),
        "steps": trainer.state.step,
        "best_step": trainer.state.best_step,
        "best_metric": {"name": args.metric(), "value": best},
        "base_perplexity": base_ppl,
        "trainable_params": trainable,
        "total_params": total,
        "train_seconds": secs,
        "peak_rss_mb": ui::peak_rss_mb(),
        "matmul_precision": lora_core::amx::matmul_precision().to_string(),
        "device": lora_core::device::name(&ui::device()),
    });
    if args.json {
        println!("{summary}");
    } else {
        eprintln!(
            "{} after {} steps in {:.1}s; best {} {:.4} at step {}; adapter in {}; peak RSS {:.0} MB",
            match outcome {
                Outcome::Finished => "finished",
                Outcome::EarlyStopped => "early-stopped",
                Outcome::Interrupted => "interrupted",
            },
            trainer.state.step,
            secs,
            args.metric(),
            best.unwrap_or(f64::NAN),
            trainer.state.best_step.unwrap_or(0),
            out.display(),
            ui::peak_rss_mb()
        );
    }
    if outcome == Outcome::Interrupted {
        eprintln!("checkpoint saved; continue with: lora train --resume {}", out.display());
        return Ok(130);
    }
    Ok(0)
}

/// `lora eval --task causal-lm`.
pub fn eval(a: EvalArgs) -> Result<i32> {
    let t0 = Instant::now();
    let io = &a.io;
    let dev = ui::device();
    let with = match &io.adapter {
        Some(d) => Some(build_causal(&io.model, LmAdapter::Saved(d), &dev)?),
        None => None,
    };
    let base = if with.is_none() || !a.no_base { Some(build_causal(&io.model, LmAdapter::None, &dev)?) } else { None };
    let first = with.as_ref().or(base.as_ref()).context("no model")?;
    let meta = with.as_ref().and_then(|m| m.meta.clone());
    let block = a.block_size.or(meta.as_ref().map(|m| m.block_size)).unwrap_or(128);
    let max_len = io.max_len.or(meta.as_ref().map(|m| m.max_len)).unwrap_or(256);
    let fmt = LmFormat::of(&io.data)?;
    let (examples, convs) = match fmt {
        LmFormat::Text => (lmdata::text_blocks(&first.tokenizer, &io.data, block)?, vec![]),
        LmFormat::Chat => {
            let (ex, _) = lmdata::chat_examples(&first.tokenizer, &first.template()?, &io.data, max_len)?;
            (ex, lmdata::read_conversations(&io.data)?)
        }
    };
    let mut rows = vec![];
    let models: Vec<(&str, &CausalLm)> =
        [("base", base.as_ref()), ("adapter", with.as_ref())].into_iter().filter_map(|(n, m)| m.map(|m| (n, m))).collect();
    for (name, lm) in &models {
        let bar = ui::bar(examples.len() as u64, "sequences", a.json);
        let (loss, ppl, n) = lm.perplexity(&examples, io.batch_size.clamp(1, 16), &mut |k| bar.inc(k as u64))?;
        bar.finish_and_clear();
        let mut row = serde_json::json!({"model": name, "tokens": n, "loss": loss, "perplexity": ppl});
        if fmt == LmFormat::Chat && a.generate_limit > 0 {
            let report = generation_scores(lm, &convs, a.generate_limit, a.max_new_tokens, a.json)?;
            row["generation"] = serde_json::to_value(&report)?;
        }
        rows.push(row);
    }
    let secs = t0.elapsed().as_secs_f64();
    if a.json {
        println!("{}", serde_json::json!({"data": io.data.display().to_string(), "results": rows, "seconds": secs}));
        return Ok(0);
    }
    println!("{} · {} sequences · {:.1}s\n", io.data.display(), examples.len(), secs);
    println!("{:<8} {:>9} {:>8} {:>11} {:>7} {:>7} {:>7} {:>7}", "model", "tokens", "loss", "perplexity", "BLEU", "chrF", "dist-1", "dist-2");
    for r in &rows {
        let g = |k: &str| r["generation"].get(k).and_then(|v| v.as_f64()).map(|v| format!("{v:.3}")).unwrap_or("-".into());
        let bleu = r["generation"]["bleu"]["score"].as_f64().map(|v| format!("{v:.2}")).unwrap_or("-".into());
        println!(
            "{:<8} {:>9} {:>8.4} {:>11.3} {:>7} {:>7} {:>7} {:>7}",
            r["model"].as_str().unwrap_or(""),
            r["tokens"],
            r["loss"].as_f64().unwrap_or(f64::NAN),
            r["perplexity"].as_f64().unwrap_or(f64::NAN),
            bleu,
            r["generation"].get("chrf").and_then(|v| v.as_f64()).map(|v| format!("{v:.2}")).unwrap_or("-".into()),
            g("distinct_1"),
            g("distinct_2"),
        );
    }
    Ok(0)
}

/// Greedy answers to the first `limit` prompts, scored against the references.
fn generation_scores(lm: &CausalLm, convs: &[Vec<Message>], limit: usize, max_new: usize, quiet: bool) -> Result<lora_data::GenerationReport> {
    let tpl = lm.template()?;
    let cfg = SamplingConfig { max_new_tokens: max_new, ..Default::default() };
    let mut hyps = vec![];
    let mut refs = vec![];
    let take: Vec<&Vec<Message>> = convs.iter().take(limit).collect();
    let bar = ui::bar(take.len() as u64, "prompts", quiet);
    for c in take {
        let Some(last) = c.iter().rposition(|m| m.role == "assistant") else { continue };
        let prompt = tpl.render(&c[..last], true)?;
        let ids = lm.tokenizer.encode(prompt.as_str(), false).map_err(anyhow::Error::msg)?.get_ids().to_vec();
        let g = generate(lm, &ids, &cfg, &mut |_| {})?;
        hyps.push(g.text.trim().to_string());
        refs.push(c[last].content.clone());
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(lora_data::GenerationReport::new(&hyps, &refs)?)
}

/// Sampling flags shared by `generate` and `chat`.
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// 0 = greedy (deterministic); e.g. 0.7 for varied text.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Sample only among the k most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling: the smallest set of tokens with this total probability.
    #[arg(long)]
    pub top_p: Option<f64>,
    /// > 1.0 penalises tokens already present (1.1-1.3 curbs repetition).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Stop before this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    fn config(&self) -> SamplingConfig {
        SamplingConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            max_new_tokens: self.max_new_tokens,
            stop: self.stop.clone(),
        }
    }
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Base model: .gguf file or Hugging Face folder.
    #[arg(long)]
    pub model: PathBuf,
    /// LoRA adapter folder (PEFT format).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Fold the adapter into the weights first (same greedy tokens, no adapter cost).
    #[arg(long)]
    pub merge: bool,
    /// The prompt text.
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat (default: the template's own).
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print one JSON object (text, ids, timings) instead of streaming.
    #[arg(long)]
    pub json: bool,
    /// Also write the prompt's logits at every position (safetensors: logits.0
    /// [T, V], input_ids.0) to check them against transformers/PEFT
    /// (scripts/reference/check_peft_llama.py).
    #[arg(long)]
    pub dump_logits: Option<PathBuf>,
}

fn open_for_generation(model: &Path, adapter: Option<&Path>, merge: bool) -> Result<CausalLm> {
    let src = match adapter {
        Some(d) => LmAdapter::Saved(d),
        None => LmAdapter::None,
    };
    let lm = build_causal(model, src, &ui::device())?;
    if merge {
        if adapter.is_none() {
            bail!("--merge needs --adapter");
        }
        lm.adapters.merge_all()?;
    }
    Ok(lm)
}

/// Generates with the text streamed to stdout as it becomes final, then a newline.
fn generate_to_stdout(lm: &CausalLm, ids: &[u32], cfg: &SamplingConfig) -> lora_tasks::Result<lora_tasks::causal::generate::Generation> {
    let mut out = std::io::stdout().lock();
    let g = generate(lm, ids, cfg, &mut |s| {
        let _ = out.write_all(s.as_bytes());
        let _ = out.flush();
    })?;
    let _ = writeln!(out);
    Ok(g)
}

/// `lora generate`.
pub fn generate_cmd(a: GenerateArgs) -> Result<i32> {
    let lm = open_for_generation(&a.model, a.adapter.as_deref(), a.merge)?;
    let text = if a.chat {
        let mut msgs = vec![];
        if let Some(s) = &a.system {
            msgs.push(Message { role: "system".into(), content: s.clone() });
        }
        msgs.push(Message { role: "user".into(), content: a.prompt.clone() });
        lm.template()?.render(&msgs, true)?
    } else {
        a.prompt.clone()
    };
    let ids = lm.tokenizer.encode(text.as_str(), false).map_err(anyhow::Error::msg)?.get_ids().to_vec();
    if let Some(p) = &a.dump_logits {
        let x = candle_core::Tensor::new(ids.as_slice(), lm.model.device())?.unsqueeze(0)?;
        let logits = lm.model.forward(&x, None, false)?.squeeze(0)?;
        let ids_t = candle_core::Tensor::new(ids.iter().map(|&i| i as i64).collect::<Vec<_>>().as_slice(), lm.model.device())?;
        let map: std::collections::HashMap<String, candle_core::Tensor> =
            [("logits.0".to_string(), logits), ("input_ids.0".to_string(), ids_t)].into_iter().collect();
        candle_core::safetensors::save(&map, p).with_context(|| format!("{}: cannot write", p.display()))?;
    }
    let cfg = a.sampling.config();
    let g = if a.json { generate(&lm, &ids, &cfg, &mut |_| {})? } else { generate_to_stdout(&lm, &ids, &cfg)? };
    if a.json {
        let mut v = serde_json::to_value(&g)?;
        v["prefill_tokens_per_s"] = serde_json::json!(g.prefill_tokens_per_s());
        v["decode_tokens_per_s"] = serde_json::json!(g.decode_tokens_per_s());
        println!("{v}");
    } else {
        eprintln!(
            "[{} prompt tokens at {:.1} tok/s · {} new tokens at {:.1} tok/s · stop: {:?}]",
            g.prompt_tokens,
            g.prefill_tokens_per_s(),
            g.ids.len(),
            g.decode_tokens_per_s(),
            g.stop_reason
        );
    }
    Ok(0)
}

#[derive(Args, Debug)]
pub struct ChatArgs {
    /// Base model: .gguf file or Hugging Face folder (needs a chat template).
    #[arg(long)]
    pub model: PathBuf,
    /// LoRA adapter folder (PEFT format).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Fold the adapter into the weights first.
    #[arg(long)]
    pub merge: bool,
    /// System message (default: the template's own).
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// `lora chat`: a conversation on stdin/stdout. `/reset` forgets, `/exit` or EOF ends.
pub fn chat(a: ChatArgs) -> Result<i32> {
    let lm = open_for_generation(&a.model, a.adapter.as_deref(), a.merge)?;
    let tpl = lm.template()?;
    let cfg = a.sampling.config();
    let mut msgs: Vec<Message> = vec![];
    if let Some(s) = &a.system {
        msgs.push(Message { role: "system".into(), content: s.clone() });
    }
    eprintln!("chatting with {} (/reset to start over, /exit or Ctrl-D to quit)", a.model.display());
    let stdin = std::io::stdin();
    let mut line = String::new();
    loop {
        eprint!("> ");
        line.clear();
        if stdin.read_line(&mut line)? == 0 {
            break;
        }
        let input = line.trim();
        match input {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                msgs.retain(|m| m.role == "system");
                continue;
            }
            _ => {}
        }
        msgs.push(Message { role: "user".into(), content: input.to_string() });
        let ids = lm.tokenizer.encode(tpl.render(&msgs, true)?.as_str(), false).map_err(anyhow::Error::msg)?.get_ids().to_vec();
        let g = match generate_to_stdout(&lm, &ids, &cfg) {
            Ok(g) => g,
            Err(e) => {
                eprintln!("error: {e}");
                msgs.pop();
                continue;
            }
        };
        msgs.push(Message { role: "assistant".into(), content: g.text.trim().to_string() });
    }
    Ok(0)
}
