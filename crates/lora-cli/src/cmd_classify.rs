//! `lora train|eval|predict` for text classification.

use crate::ui;
use anyhow::{bail, Context, Result};
use clap::Args;
use lora_core::{AdapterPlan, LoraConfig, LoraInit, TargetSpec};
use lora_data::{EvalRecord as LogEval, MetricsLog, TrainRecord};
use lora_models::Head;
use lora_tasks::classify::adapter::{self, AdapterSource, Classifier, TaskMeta};
use lora_tasks::classify::{self as task, ClassifyTask};
use lora_train::{Hooks, Outcome, Schedule, TrainConfig, Trainer};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct TrainArgs {
    /// Task: classify (text classification) or causal-lm (language modelling on
    /// plain text, or prompt/response chat data, with a LLaMA-family decoder).
    #[arg(long, default_value = "classify")]
    pub task: String,
    /// Base model: a Hugging Face folder (config.json, model.safetensors,
    /// tokenizer.json) or, for causal-lm, a .gguf file (QLoRA over its quantized weights).
    #[arg(long, required_unless_present = "resume")]
    pub model: Option<PathBuf>,
    /// Training data: .csv, .tsv or .jsonl (classify); .txt (plain text, packed
    /// into --block-size blocks) or .jsonl with prompt/response or messages (causal-lm).
    #[arg(long, required_unless_present = "resume")]
    pub train: Option<PathBuf>,
    /// Validation data; when absent, --valid-fraction of --train is held out (seeded, stratified).
    #[arg(long)]
    pub valid: Option<PathBuf>,
    #[arg(long, default_value_t = 0.1)]
    pub valid_fraction: f64,
    #[arg(long, default_value = "text")]
    pub text_column: String,
    #[arg(long, default_value = "label")]
    pub label_column: String,
    /// Classifier head: pooler ([CLS] → dense+tanh, as BertForSequenceClassification) or mean (mean pooling).
    #[arg(long, default_value = "pooler")]
    pub head: String,
    /// LoRA rank r.
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with --rslora).
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f64,
    /// Dropout on the LoRA branch input.
    #[arg(long, default_value_t = 0.1)]
    pub dropout: f32,
    /// Target modules: names (query,value / q_proj,v_proj), all-linear, or
    /// re:<regex> over module paths [default: query,value for classify,
    /// all-linear for causal-lm].
    #[arg(long)]
    pub targets: Option<String>,
    /// Only adapt these layer indices (e.g. 0,1,2).
    #[arg(long, value_delimiter = ',')]
    pub layers: Option<Vec<usize>>,
    /// Rank-stabilised scaling alpha/sqrt(r).
    #[arg(long)]
    pub rslora: bool,
    /// A/B initialisation: kaiming (PEFT default: A uniform, B zero), gaussian, or from the
    /// weight: pissa, pissa-niter-N (randomized SVD, N power iterations), olora. The last three
    /// train on the residual base and save a plain LoRA (rank 2r) for the original base.
    #[arg(long, default_value = "kaiming")]
    pub init: String,
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    /// Stop after this many optimizer steps.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Peak learning rate [default: 5e-4 classify, 2e-4 causal-lm].
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Share of steps for linear warm-up.
    #[arg(long, default_value_t = 0.06)]
    pub warmup_ratio: f64,
    /// Learning-rate decay after warm-up: linear, cosine or constant.
    #[arg(long, default_value = "linear")]
    pub schedule: String,
    /// Clip the global gradient norm (0 disables).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Examples (blocks) per micro-batch [default: 32 classify, 8 causal-lm].
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long, default_value_t = 64)]
    pub eval_batch_size: usize,
    /// Truncate texts to this many tokens [default: 128 classify (with
    /// [CLS]/[SEP]), 256 causal-lm chat data; attention memory grows with
    /// batch x length², ~0.3 GB per 8 x 256 batch on SmolLM2].
    #[arg(long)]
    pub max_len: Option<usize>,
    /// causal-lm plain text: tokens per training block.
    #[arg(long, default_value_t = 128)]
    #[serde(default = "default_block")]
    pub block_size: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Evaluate every N steps (default: every epoch).
    #[arg(long)]
    pub eval_every: Option<usize>,
    #[arg(long, default_value_t = 10)]
    pub log_every: usize,
    /// Metric that selects the best checkpoint: macro_f1, accuracy, weighted_f1
    /// or loss (classify); loss or perplexity (causal-lm) [default: macro_f1 / loss].
    #[arg(long)]
    pub metric: Option<String>,
    /// Stop after this many evaluations without improvement.
    #[arg(long)]
    pub patience: Option<usize>,
    /// Output folder: the best adapter (PEFT format), metrics.jsonl, plots, checkpoint/.
    #[arg(long, required_unless_present = "resume")]
    pub out: Option<PathBuf>,
    /// Continue an interrupted run in this folder with its recorded settings.
    #[arg(long)]
    #[serde(skip)]
    pub resume: Option<PathBuf>,
    /// Replace an existing run in --out.
    #[arg(long)]
    #[serde(skip)]
    pub overwrite: bool,
    /// Print the final summary as JSON on stdout.
    #[arg(long)]
    #[serde(skip)]
    pub json: bool,
}

fn default_block() -> usize {
    128
}

impl TrainArgs {
    pub fn is_lm(&self) -> bool {
        self.task == "causal-lm"
    }

    /// Fills the per-task defaults of the optional flags.
    pub fn fill_defaults(&mut self) {
        let lm = self.is_lm();
        self.targets.get_or_insert_with(|| if lm { "all-linear" } else { "query,value" }.into());
        self.metric.get_or_insert_with(|| if lm { "loss" } else { "macro_f1" }.into());
        self.batch_size.get_or_insert(if lm { 8 } else { 32 });
        self.lr.get_or_insert(if lm { 2e-4 } else { 5e-4 });
        self.max_len.get_or_insert(if lm { 256 } else { 128 });
    }
    pub fn targets(&self) -> &str {
        self.targets.as_deref().unwrap_or("query,value")
    }
    pub fn metric(&self) -> &str {
        self.metric.as_deref().unwrap_or("macro_f1")
    }
    pub fn batch_size(&self) -> usize {
        self.batch_size.unwrap_or(32)
    }
    pub fn lr(&self) -> f64 {
        self.lr.unwrap_or(5e-4)
    }
    pub fn max_len(&self) -> usize {
        self.max_len.unwrap_or(128)
    }
}

pub(crate) const RUN_FILE: &str = "run_config.json";

fn load_split(args: &TrainArgs) -> Result<(Vec<lora_data::Example>, Vec<lora_data::Example>, PathBuf, PathBuf)> {
    let train_path = args.train.clone().context("--train is required")?;
    let train = lora_data::read_examples(&train_path, &args.text_column, Some(&args.label_column), None)?;
    match &args.valid {
        Some(v) => {
            let valid = lora_data::read_examples(v, &args.text_column, Some(&args.label_column), None)?;
            Ok((train, valid, train_path.clone(), v.clone()))
        }
        None => {
            if !(args.valid_fraction > 0.0 && args.valid_fraction < 1.0) {
                bail!("--valid-fraction {} must be in (0, 1) when --valid is not given", args.valid_fraction);
            }
            let (t, v) = lora_data::split_train_valid(train, args.valid_fraction, args.seed)?;
            if v.is_empty() {
                bail!("{}: too few rows to hold out a validation split", train_path.display());
            }
            Ok((t, v, train_path.clone(), train_path))
        }
    }
}

fn validate_args(a: &TrainArgs) -> Result<()> {
    if a.task != "classify" && a.task != "causal-lm" {
        bail!("--task {}: expected classify or causal-lm", a.task);
    }
    if a.batch_size() == 0 || a.eval_batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if a.max_len() < 2 {
        bail!("--max-len {} is too small (needs room for [CLS] and [SEP])", a.max_len());
    }
    if a.block_size < 2 {
        bail!("--block-size {} must be at least 2", a.block_size);
    }
    if a.epochs == 0 {
        bail!("--epochs must be at least 1");
    }
    if !(a.lr().is_finite() && a.lr() > 0.0) {
        bail!("--lr {} must be a positive number", a.lr());
    }
    if !(0.0..1.0).contains(&a.warmup_ratio) {
        bail!("--warmup-ratio {} must be in [0, 1)", a.warmup_ratio);
    }
    if a.is_lm() {
        if !["loss", "perplexity"].contains(&a.metric()) {
            bail!("--metric {}: expected loss or perplexity for causal-lm", a.metric());
        }
    } else if !["macro_f1", "accuracy", "weighted_f1", "loss"].contains(&a.metric()) {
        bail!("--metric {}: expected macro_f1, accuracy, weighted_f1 or loss", a.metric());
    }
    Ok(())
}

struct TrainHooks<'a> {
    clf: &'a Classifier,
    meta: TaskMeta,
    out: PathBuf,
    log: MetricsLog,
    bar: indicatif::ProgressBar,
    quiet: bool,
    best_report: Option<lora_data::ClassificationReport>,
    task: &'a ClassifyTask<'a>,
}

impl Hooks for TrainHooks<'_> {
    fn on_start(&mut self, state: &lora_train::TrainState) {
        self.bar.set_length(state.total_steps as u64);
        self.bar.set_position(state.step as u64);
        self.bar.reset_eta();
    }

    fn on_step(&mut self, r: &lora_train::StepRecord, logged: bool) {
        report_step(&self.bar, &mut self.log, r, logged, self.quiet, "samples");
    }

    fn on_eval(&mut self, r: &lora_train::EvalRecord, improved: bool) -> lora_train::Result<()> {
        let _ = self.log.log_eval(LogEval {
            step: r.step as u64,
            epoch: r.epoch,
            metrics: r.metrics.clone(),
        });
        let line = format!(
            "eval step {} epoch {:.2}: loss {:.4} accuracy {:.4} macro_f1 {:.4}{}",
            r.step,
            r.epoch,
            r.metrics.get("loss").copied().unwrap_or(f64::NAN),
            r.metrics.get("accuracy").copied().unwrap_or(f64::NAN),
            r.metrics.get("macro_f1").copied().unwrap_or(f64::NAN),
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
            adapter::save_classifier(&self.out, self.clf, &self.meta)
                .map_err(|e| lora_train::TrainError::Task(e.to_string()))?;
            self.best_report = self.task.last_report.lock().unwrap_or_else(|e| e.into_inner()).clone();
        }
        Ok(())
    }
}

/// `lora train`.
pub fn train(mut args: TrainArgs, stop: &AtomicBool) -> Result<i32> {
    let t0 = Instant::now();
    let resuming = args.resume.is_some();
    if let Some(dir) = args.resume.clone() {
        let run = dir.join(RUN_FILE);
        let text = std::fs::read_to_string(&run)
            .with_context(|| format!("{}: cannot resume: no recorded run", run.display()))?;
        let (json, overwrite) = (args.json, args.overwrite);
        args = serde_json::from_str(&text).with_context(|| format!("{}", run.display()))?;
        args.out = Some(dir.clone());
        args.json = json;
        args.overwrite = overwrite;
        if !dir.join("checkpoint").join("trainer_state.json").is_file() {
            bail!("{}: no checkpoint to resume from", dir.join("checkpoint").display());
        }
    }
    args.fill_defaults();
    validate_args(&args)?;
    if args.is_lm() {
        return crate::cmd_causal::train(args, stop, resuming);
    }
    let out = args.out.clone().context("--out is required")?;
    let model_dir = args.model.clone().context("--model is required")?;
    if !resuming && out.join(RUN_FILE).exists() && !args.overwrite {
        bail!(
            "{}: already holds a training run; pass --resume {} to continue it, --overwrite to replace it, or choose another --out",
            out.display(),
            out.display()
        );
    }
    let head = Head::parse(&args.head).map_err(anyhow::Error::msg)?;
    let schedule = Schedule::parse(&args.schedule).map_err(anyhow::Error::msg)?;
    let (init, weight_init) = match args.init.as_str() {
        "kaiming" => (LoraInit::KaimingUniform, None),
        "gaussian" => (LoraInit::Gaussian, None),
        o => match lora_lowrank::WeightInit::parse(o, args.seed) {
            Some(w) => (LoraInit::KaimingUniform, Some(w)),
            None => bail!("--init {o}: expected kaiming, gaussian, pissa, pissa-niter-N or olora"),
        },
    };
    let (train_ex, valid_ex, train_path, valid_path) = load_split(&args)?;
    let labels = lora_data::LabelSet::from_examples(&train_ex)?;
    if labels.len() < 2 {
        bail!("{}: the training data has only one label ({:?}); a classifier needs at least two", train_path.display(), labels.names());
    }
    let train_y = lora_data::label_ids(&train_ex, &labels, &train_path)?;
    let valid_y = lora_data::label_ids(&valid_ex, &labels, &valid_path)?;

    let device = ui::device();
    let lcfg = LoraConfig { r: args.rank, alpha: args.alpha, dropout: args.dropout, use_rslora: args.rslora, init };
    let targets = TargetSpec::parse(args.targets())?.with_layers(args.layers.clone());
    let mut plan = AdapterPlan::new(lcfg, targets, args.seed);
    plan.weight_init = weight_init.map(lora_lowrank::init::builder_hook);
    let clf = adapter::build_classifier(
        &model_dir,
        AdapterSource::New { plan, labels: labels.names().to_vec(), head },
        &device,
    )?;
    let initial = weight_init.map(|_| clf.adapters.lora_tensors_snapshot()).transpose()?;
    let texts = |ex: &[lora_data::Example]| ex.iter().map(|e| e.text.clone()).collect::<Vec<_>>();
    let train_set = task::encode(&clf, &texts(&train_ex), train_y, args.max_len())?;
    let valid_set = task::encode(&clf, &texts(&valid_ex), valid_y, args.max_len())?;

    for n in &clf.adapters.notes {
        eprintln!("note: {n}");
    }
    std::fs::create_dir_all(&out).with_context(|| format!("{}: cannot create", out.display()))?;
    let trainable = clf.adapters.trainable_params();
    let total = clf.adapters.total_params();
    if !args.json {
        eprintln!(
            "model {} · {} layers · labels {:?}\ntrain {} · valid {} examples · LoRA r={} alpha={} on {} modules · trainable {} of {} params ({:.3}%)",
            model_dir.display(),
            clf.config.num_hidden_layers,
            clf.labels,
            train_set.len(),
            valid_set.len(),
            args.rank,
            args.alpha,
            clf.adapters.lora_layers.len(),
            ui::human_count(trainable),
            ui::human_count(total),
            100.0 * trainable as f64 / total as f64
        );
    }
    let meta = TaskMeta {
        task: "classify".into(),
        head: head.as_str().into(),
        labels: clf.labels.clone(),
        max_len: args.max_len(),
        text_column: args.text_column.clone(),
        label_column: args.label_column.clone(),
        base_model: adapter::base_model_name(&model_dir),
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
        greater_is_better: args.metric() != "loss",
        patience: args.patience,
        seed: args.seed,
        shards: None,
    };
    let mut trainer = Trainer::new(clf.adapters.trainable(), tcfg, out.join("checkpoint"));
    let metrics_path = out.join("metrics.jsonl");
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
        MetricsLog::create(&metrics_path)?
    };
    let ctask = ClassifyTask {
        clf: &clf,
        train: &train_set,
        valid: &valid_set,
        batch_size: args.batch_size(),
        eval_batch_size: args.eval_batch_size,
        seed: args.seed,
        device: device.clone(),
        last_report: Default::default(),
    };
    let mut hooks = TrainHooks {
        clf: &clf,
        meta,
        out: out.clone(),
        log,
        bar: ui::bar(0, "steps", args.json),
        quiet: args.json,
        best_report: None,
        task: &ctask,
    };
    let outcome = trainer.fit(&ctask, &mut hooks, stop);
    hooks.bar.finish_and_clear();
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            write_plots(&out, hooks.best_report.as_ref());
            return Err(e.into());
        }
    };
    write_plots(&out, hooks.best_report.as_ref());
    if let (Some(init), true) = (&initial, outcome != Outcome::Interrupted) {
        crate::cmd_lowrank::convert_trained(&out, init, &args.init)?;
    }
    let secs = t0.elapsed().as_secs_f64();
    let summary = serde_json::json!({
        "outcome": format!("{outcome:?}").to_lowercase(),
        "out": out.display().to_string(),
        "steps": trainer.state.step,
        "best_step": trainer.state.best_step,
        "best_metric": {"name": args.metric(), "value": trainer.state.best_metric},
        "trainable_params": trainable,
        "total_params": total,
        "trainable_share": trainable as f64 / total as f64,
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
            trainer.state.best_metric.unwrap_or(f64::NAN),
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

/// Progress bar, `metrics.jsonl` and (when not on a terminal) a log line for
/// one optimizer step; `unit` names what the rate counts.
pub(crate) fn report_step(
    bar: &indicatif::ProgressBar,
    log: &mut MetricsLog,
    r: &lora_train::StepRecord,
    logged: bool,
    quiet: bool,
    unit: &str,
) {
    bar.set_position(r.step as u64);
    bar.set_message(format!("epoch {:.2} loss {:.4} lr {:.2e}", r.epoch, r.loss, r.lr));
    if logged {
        let _ = log.log_train(TrainRecord {
            step: r.step as u64,
            epoch: r.epoch,
            loss: r.loss,
            lr: r.lr,
            samples_per_s: r.samples_per_s,
        });
        if !ui::interactive() && !quiet {
            eprintln!(
                "step {}/{} epoch {:.2} loss {:.4} lr {:.2e} {:.2} {unit}/s",
                r.step, r.total_steps, r.epoch, r.loss, r.lr, r.samples_per_s
            );
        }
    }
}

pub(crate) fn write_plots(out: &Path, best: Option<&lora_data::ClassificationReport>) {
    if let Ok(records) = lora_data::read_metrics_log(&out.join("metrics.jsonl")) {
        let loss = lora_data::train_loss_series(&records);
        let valid = lora_data::eval_series(&records);
        if let Err(e) = lora_data::plot_training(&out.join("training.svg"), &loss, &valid) {
            eprintln!("warning: cannot draw training.svg: {e}");
        }
    }
    if let Some(r) = best {
        if let Err(e) = lora_data::plot_confusion(&out.join("confusion_valid.svg"), &r.labels, &r.confusion, "Validation confusion (best checkpoint)") {
            eprintln!("warning: cannot draw confusion_valid.svg: {e}");
        }
    }
}

/// The inputs `eval` and `predict` share.
#[derive(Args, Debug)]
pub struct ModelData {
    /// Base model folder (or .gguf file for causal-lm).
    #[arg(long)]
    pub model: PathBuf,
    /// Adapter folder (PEFT format). Without it the model's own head is used (e.g. a merged model).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Data: .csv, .tsv or .jsonl (classify); .txt or prompt/response .jsonl (causal-lm).
    #[arg(long)]
    pub data: PathBuf,
    /// Text column (default: as trained, else "text").
    #[arg(long)]
    pub text_column: Option<String>,
    /// Truncation length (default: as trained, else 128).
    #[arg(long)]
    pub max_len: Option<usize>,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Task: classify (accuracy, P/R/F1, confusion) or causal-lm (perplexity,
    /// base vs adapter; with prompt/response data also BLEU, chrF, distinct-n).
    #[arg(long, default_value = "classify")]
    pub task: String,
    #[command(flatten)]
    pub io: ModelData,
    /// causal-lm plain text: tokens per perplexity block (default: as trained, else 128).
    #[arg(long)]
    pub block_size: Option<usize>,
    /// causal-lm chat data: new tokens generated per prompt for BLEU/chrF/distinct-n.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// causal-lm chat data: generate for at most this many prompts (0: skip generation).
    #[arg(long, default_value_t = 50)]
    pub generate_limit: usize,
    /// causal-lm: do not evaluate the base model beside the adapter.
    #[arg(long)]
    pub no_base: bool,
    /// Label column (default: as trained, else "label").
    #[arg(long)]
    pub label_column: Option<String>,
    /// Also draw the confusion matrix to this file (.svg).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// One JSON object on stdout instead of tables.
    #[arg(long)]
    pub json: bool,
}

fn open_classifier(model: &Path, adapter_dir: Option<&Path>) -> Result<Classifier> {
    let src = match adapter_dir {
        Some(d) => AdapterSource::Saved(d),
        None => AdapterSource::None,
    };
    Ok(adapter::build_classifier(model, src, &ui::device())?)
}

fn columns(clf: &Classifier, text: &Option<String>, label: &Option<String>, max_len: Option<usize>) -> (String, String, usize) {
    let m = clf.meta.as_ref();
    (
        text.clone().or_else(|| m.map(|m| m.text_column.clone())).unwrap_or_else(|| "text".into()),
        label.clone().or_else(|| m.map(|m| m.label_column.clone())).unwrap_or_else(|| "label".into()),
        max_len.or_else(|| m.map(|m| m.max_len)).unwrap_or(128),
    )
}

/// `lora eval`.
pub fn eval(a: EvalArgs) -> Result<i32> {
    match a.task.as_str() {
        "causal-lm" => return crate::cmd_causal::eval(a),
        "classify" => {}
        other => bail!("--task {other}: expected classify or causal-lm"),
    }
    let t0 = Instant::now();
    let io = &a.io;
    let clf = open_classifier(&io.model, io.adapter.as_deref())?;
    let (tc, lc, max_len) = columns(&clf, &io.text_column, &a.label_column, io.max_len);
    let ex = lora_data::read_examples(&io.data, &tc, Some(&lc), None)?;
    let labels = lora_data::LabelSet::from_names(clf.labels.clone())?;
    let y = lora_data::label_ids(&ex, &labels, &io.data)?;
    let texts: Vec<String> = ex.iter().map(|e| e.text.clone()).collect();
    let set = task::encode(&clf, &texts, y, max_len)?;
    let bar = ui::bar(set.len() as u64, "examples", a.json);
    let (report, loss, _) = task::evaluate(&clf, &set, io.batch_size.max(1), &ui::device(), &mut |n| bar.inc(n as u64))?;
    bar.finish_and_clear();
    if let Some(p) = &a.plot {
        lora_data::plot_confusion(p, &report.labels, &report.confusion, "Confusion matrix")?;
    }
    let secs = t0.elapsed().as_secs_f64();
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        v["loss"] = serde_json::json!(loss);
        v["data"] = serde_json::json!(io.data.display().to_string());
        v["seconds"] = serde_json::json!(secs);
        println!("{v}");
    } else {
        println!("{} · {} examples · loss {:.4} · {:.1}s\n", io.data.display(), report.n, loss, secs);
        println!("{}", report.render_table());
    }
    Ok(0)
}

#[derive(Args, Debug)]
pub struct PredictArgs {
    #[command(flatten)]
    pub io: ModelData,
    /// Output JSONL file (default: stdout).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// `lora predict`.
pub fn predict(a: PredictArgs) -> Result<i32> {
    let io = &a.io;
    let clf = open_classifier(&io.model, io.adapter.as_deref())?;
    let (tc, _, max_len) = columns(&clf, &io.text_column, &None, io.max_len);
    let ex = lora_data::read_examples(&io.data, &tc, None, None)?;
    let texts: Vec<String> = ex.iter().map(|e| e.text.clone()).collect();
    let set = task::encode(&clf, &texts, vec![], max_len)?;
    let bar = ui::bar(set.len() as u64, "examples", a.out.is_none());
    let logits = task::predict_logits(&clf, &set.ids, io.batch_size.max(1), &ui::device(), &mut |n| bar.inc(n as u64))?;
    bar.finish_and_clear();
    let mut buf = String::new();
    for (i, row) in logits.iter().enumerate() {
        let probs = task::softmax(row);
        let k = task::argmax(row);
        let obj = serde_json::json!({
            "index": i,
            "label": clf.labels[k],
            "probs": probs,
            "logits": row,
        });
        buf.push_str(&obj.to_string());
        buf.push('\n');
    }
    match &a.out {
        Some(p) => {
            lora_data::write_atomic(p, buf.as_bytes()).with_context(|| format!("{}: cannot write", p.display()))?;
            eprintln!("wrote {} predictions to {}", logits.len(), p.display());
        }
        None => print!("{buf}"),
    }
    Ok(0)
}
