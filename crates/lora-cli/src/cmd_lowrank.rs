//! Low-rank tools: `lora extract`, `lora combine`, `lora compress`,
//! `lora analyze`, `lora convert` (see crates/lora-lowrank).

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::{Args, ValueEnum};
use lora_core::TargetSpec;
use lora_lowrank::analyze::{analyze_adapter, compare_adapters};
use lora_lowrank::{CombineMethod, MajoritySign, ModelWeights, RankRule, RsvdParams, SvdSolver, Weighted};
use lora_tasks::classify::adapter::{build_classifier, AdapterSource};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

/// Task heads, never factored by `compress` (BERT classifier, LLaMA score/lm_head).
const HEADS: [&str; 3] = ["classifier", "score", "lm_head"];

/// `--rank R` or `--energy E` (exactly one).
#[derive(Args, Debug, Clone)]
#[group(required = true, multiple = false)]
pub struct RankArgs {
    /// The same rank for every module (1..=min(out, in)).
    #[arg(long)]
    pub rank: Option<usize>,
    /// Per module, the smallest rank keeping this share of the squared Frobenius norm, in (0, 1].
    #[arg(long)]
    pub energy: Option<f64>,
}

impl RankArgs {
    fn rule(&self) -> Result<RankRule> {
        let rule = match (self.rank, self.energy) {
            (Some(r), None) => RankRule::Fixed(r),
            (None, Some(e)) => RankRule::Energy(e),
            _ => bail!("give exactly one of --rank and --energy"),
        };
        rule.validate()?;
        Ok(rule)
    }
}

/// Randomized-SVD switches shared by extract and compress.
#[derive(Args, Debug, Clone)]
pub struct SolverArgs {
    /// Use the randomized SVD (with --rank only; --energy needs the whole spectrum).
    #[arg(long)]
    pub randomized: bool,
    /// Randomized SVD: power iterations.
    #[arg(long, default_value_t = 2)]
    pub power_iters: usize,
    /// Randomized SVD: oversampling columns.
    #[arg(long, default_value_t = 10)]
    pub oversample: usize,
    /// Seed of the randomized SVD's Gaussian sketch (and of compress's recovery fine-tune).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SolverArgs {
    fn solver(&self) -> SvdSolver {
        if self.randomized {
            SvdSolver::Randomized(RsvdParams { oversample: self.oversample, power_iters: self.power_iters, seed: self.seed })
        } else {
            SvdSolver::Exact
        }
    }
}

#[derive(Args, Debug)]
pub struct ExtractArgs {
    /// Base model folder.
    #[arg(long)]
    pub base: PathBuf,
    /// Fully fine-tuned model folder (same architecture).
    #[arg(long)]
    pub tuned: PathBuf,
    #[command(flatten)]
    pub rank: RankArgs,
    /// Modules to extract: names (query,value), all-linear, or re:<regex>.
    #[arg(long, default_value = "all-linear")]
    pub targets: String,
    /// Head modules copied whole when new or changed (PEFT modules_to_save).
    #[arg(long, value_delimiter = ',', default_value = "classifier,score,lm_head")]
    pub heads: Vec<String>,
    #[command(flatten)]
    pub solver: SolverArgs,
    /// Output adapter folder (PEFT format).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub json: bool,
}

/// `lora extract`.
pub fn extract(a: ExtractArgs) -> Result<i32> {
    let t0 = Instant::now();
    let rule = a.rank.rule()?;
    let targets = TargetSpec::parse(&a.targets)?;
    let base = ModelWeights::open(&a.base)?;
    let tuned = ModelWeights::open(&a.tuned)?;
    let rep = lora_lowrank::extract(&base, &tuned, &targets, &a.heads, rule, a.solver.solver())?;
    let (cfg, tensors) = lora_lowrank::extract::to_adapter(&rep, &a.base.display().to_string());
    lora_peft::save_adapter(&a.out, &cfg, &tensors, &[])?;
    copy_labels(&a.tuned, &a.out)?;
    let params: usize = rep.modules.iter().map(|m| m.a.elem_count() + m.b.elem_count()).sum();
    if a.json {
        let mods: Vec<_> = rep.modules.iter().map(|m| serde_json::json!({"module": m.module, "rank": m.rank, "energy": m.energy, "delta_norm": m.delta_norm, "relative_change": m.relative_change})).collect();
        let dropped: Vec<_> = rep.dropped.iter().map(|(k, r)| serde_json::json!({"tensor": k, "relative_change": r})).collect();
        println!("{}", serde_json::json!({"modules": mods, "saved_modules": rep.saved.keys().collect::<Vec<_>>(), "not_captured": dropped, "lora_params": params, "seconds": t0.elapsed().as_secs_f64()}));
        return Ok(0);
    }
    println!("{:<55} {:>5} {:>9} {:>10}", "module", "rank", "energy", "|dW|/|W|");
    for m in &rep.modules {
        println!("{:<55} {:>5} {:>9.4} {:>10.4}", m.module, m.rank, m.energy, m.relative_change);
    }
    let total_e: f64 = rep.modules.iter().map(|m| m.energy * m.delta_norm.powi(2)).sum::<f64>() / rep.modules.iter().map(|m| m.delta_norm.powi(2)).sum::<f64>().max(f64::MIN_POSITIVE);
    println!("\n{} modules, {} LoRA parameters, overall retained energy {:.4}", rep.modules.len(), params, total_e);
    if !rep.saved.is_empty() {
        println!("copied whole (modules_to_save): {}", rep.saved.keys().cloned().collect::<Vec<_>>().join(", "));
    }
    if !rep.dropped.is_empty() {
        let worst = rep.dropped.iter().map(|d| d.1).fold(0.0, f64::max);
        println!("note: {} other changed tensors (biases, LayerNorm, embeddings) are not captured by a LoRA adapter (largest relative change {:.2e})", rep.dropped.len(), worst);
    }
    println!("wrote {} ({:.1}s)", a.out.display(), t0.elapsed().as_secs_f64());
    Ok(0)
}

/// Copies id2label of a model folder as labels.json, so `lora eval` knows the classes.
fn copy_labels(model: &Path, out: &Path) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(model.join("config.json")) else { return Ok(()) };
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}", model.join("config.json").display()))?;
    if let Some(m) = v.get("id2label").and_then(|m| m.as_object()) {
        let mut pairs: Vec<(usize, String)> = m.iter().filter_map(|(k, l)| Some((k.parse().ok()?, l.as_str()?.to_string()))).collect();
        pairs.sort();
        let labels: Vec<String> = pairs.into_iter().map(|p| p.1).collect();
        lora_data::write_atomic(&out.join("labels.json"), serde_json::to_string(&labels)?.as_bytes())?;
    }
    Ok(())
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum MethodArg {
    Linear,
    Cat,
    Svd,
    Ties,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignArg {
    Total,
    Frequency,
}

#[derive(Args, Debug)]
pub struct CombineArgs {
    /// Adapters and weights: DIR:WEIGHT,DIR:WEIGHT (weights may be negative).
    #[arg(long, value_delimiter = ',', required = true)]
    pub adapters: Vec<String>,
    #[arg(long, value_enum, default_value = "svd")]
    pub method: MethodArg,
    /// TIES: share of entries kept per tensor, in (0, 1].
    #[arg(long)]
    pub density: Option<f64>,
    /// TIES: sign election.
    #[arg(long, value_enum, default_value = "total")]
    pub majority_sign: SignArg,
    /// svd: rank of the result (default: the largest input rank).
    #[arg(long)]
    pub svd_rank: Option<usize>,
    /// Output adapter folder.
    #[arg(long)]
    pub out: PathBuf,
}

/// `lora combine`.
pub fn combine(a: CombineArgs) -> Result<i32> {
    let dev = Device::Cpu;
    let mut loaded = vec![];
    for item in &a.adapters {
        let (path, w) = item.rsplit_once(':').with_context(|| format!("--adapters {item:?}: expected DIR:WEIGHT"))?;
        let w: f64 = w.trim().parse().with_context(|| format!("--adapters {item:?}: weight {w:?} is not a number"))?;
        let ad = lora_peft::load_adapter(Path::new(path), &dev)?;
        loaded.push((path.to_string(), ad, w));
    }
    let method = match a.method {
        MethodArg::Linear => CombineMethod::Linear,
        MethodArg::Cat => CombineMethod::Cat,
        MethodArg::Svd => CombineMethod::Svd { rank: a.svd_rank },
        MethodArg::Ties => CombineMethod::Ties {
            density: a.density.context("--method ties needs --density (share of entries kept, e.g. 0.5)")?,
            sign: match a.majority_sign {
                SignArg::Total => MajoritySign::Total,
                SignArg::Frequency => MajoritySign::Frequency,
            },
        },
    };
    let inputs: Vec<Weighted> = loaded.iter().map(|(n, ad, w)| Weighted { name: n.clone(), adapter: ad, weight: *w }).collect();
    let (cfg, tensors) = lora_lowrank::combine(&inputs, method)?;
    lora_peft::save_adapter(&a.out, &cfg, &tensors, &[])?;
    for f in ["labels.json", "lora_task.json"] {
        let src = Path::new(&loaded[0].0).join(f);
        if src.is_file() {
            std::fs::copy(&src, a.out.join(f)).with_context(|| format!("{}", src.display()))?;
        }
    }
    eprintln!("combined {} adapters ({}) into {}: r={} on {} modules", inputs.len(), method.name(), a.out.display(), cfg.r, tensors.len() / 2);
    Ok(0)
}

#[derive(Args, Debug)]
pub struct CompressArgs {
    /// Model folder (a merged classifier when using --eval without --adapter).
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub rank: RankArgs,
    /// Matrices to factor: names, all-linear, or re:<regex>.
    #[arg(long, default_value = "all-linear")]
    pub targets: String,
    #[command(flatten)]
    pub solver: SolverArgs,
    /// Output model folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Labelled data: report accuracy before and after.
    #[arg(long)]
    pub eval: Option<PathBuf>,
    /// Adapter applied on top of the model for --eval (e.g. a sentiment LoRA on the compressed base).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Label column for --eval.
    #[arg(long, default_value = "label")]
    pub label_column: String,
    /// Text column for --eval.
    #[arg(long, default_value = "text")]
    pub text_column: String,
    /// Recover accuracy: after compressing, fine-tune a LoRA adapter on the
    /// compressed classifier with this labelled data (same columns as --eval),
    /// then fold it into the output exactly (factored matrices grow by
    /// --recover-rank: [B | s*B_l][A ; A_l]; the head is replaced). The run
    /// (adapter, metrics, plots) stays in OUT/recovery.
    #[arg(long)]
    pub recover_train: Option<PathBuf>,
    /// Optimizer steps of the recovery fine-tune.
    #[arg(long, default_value_t = 200)]
    pub recover_steps: usize,
    /// LoRA rank of the recovery fine-tune.
    #[arg(long, default_value_t = 8)]
    pub recover_rank: usize,
    /// Target modules of the recovery fine-tune.
    #[arg(long, default_value = "all-linear")]
    pub recover_targets: String,
    /// Learning rate of the recovery fine-tune.
    #[arg(long, default_value_t = 5e-4)]
    pub recover_lr: f64,
    /// Batch size of the recovery fine-tune.
    #[arg(long, default_value_t = 32)]
    pub recover_batch_size: usize,
    /// Max tokens per text of the recovery fine-tune.
    #[arg(long, default_value_t = 128)]
    pub recover_max_len: usize,
    #[arg(long)]
    pub json: bool,
}

/// Runs `lora train` (classification) with these arguments.
fn run_train(args: Vec<String>, stop: &AtomicBool) -> Result<i32> {
    #[derive(clap::Parser)]
    struct Wrap {
        #[command(flatten)]
        a: crate::cmd_classify::TrainArgs,
    }
    let w = <Wrap as clap::Parser>::try_parse_from(std::iter::once("lora-train".to_string()).chain(args)).map_err(|e| anyhow::anyhow!("recovery arguments: {}", e.to_string().lines().next().unwrap_or("")))?;
    crate::cmd_classify::train(w.a, stop)
}

/// `lora compress`.
pub fn compress(a: CompressArgs, stop: &AtomicBool) -> Result<i32> {
    let t0 = Instant::now();
    let rule = a.rank.rule()?;
    let targets = TargetSpec::parse(&a.targets)?;
    let model = ModelWeights::open(&a.model)?;
    if a.recover_train.is_some() {
        if a.adapter.is_some() {
            bail!("--recover-train works on a merged classifier: merge --adapter into the model first (lora merge), then compress that");
        }
        if a.recover_steps == 0 {
            bail!("--recover-steps 0: must be at least 1");
        }
        if a.recover_rank == 0 {
            bail!("--recover-rank 0: must be at least 1");
        }
    }
    let rep = lora_lowrank::compress::compress_model(&model, &targets, &HEADS.map(String::from), rule, a.solver.solver(), &a.out)?;
    let acc = match &a.eval {
        Some(data) => Some((accuracy(&a.model, a.adapter.as_deref(), data, &a.text_column, &a.label_column)?, accuracy(&a.out, a.adapter.as_deref(), data, &a.text_column, &a.label_column)?)),
        None => None,
    };
    let recovery = match &a.recover_train {
        Some(train) => Some(recover(&a, train, stop)?),
        None => None,
    };
    let recovered_acc = match (&a.eval, &recovery) {
        (Some(data), Some(_)) => Some(accuracy(&a.out, None, data, &a.text_column, &a.label_column)?),
        _ => None,
    };
    let secs = t0.elapsed().as_secs_f64();
    let ratio = rep.params_before as f64 / rep.params_after.max(1) as f64;
    let recovered_ratio = recovery.as_ref().map(|f| rep.params_before as f64 / f.params_after.max(1) as f64);
    if let Some(f) = &recovery {
        let path = a.out.join("lowrank.json");
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        v["recovery"] = serde_json::json!({
            "train": a.recover_train, "steps": a.recover_steps, "rank": a.recover_rank,
            "targets": a.recover_targets, "lr": a.recover_lr, "fold": f,
            "accuracy_before_recovery": acc.map(|x| x.1), "accuracy_after_recovery": recovered_acc,
        });
        lora_data::write_atomic(&path, serde_json::to_string_pretty(&v)?.as_bytes())?;
    }
    if a.json {
        let mut v = serde_json::to_value(&rep)?;
        v["compression_ratio"] = serde_json::json!(ratio);
        v["accuracy_before"] = serde_json::json!(acc.map(|x| x.0));
        v["accuracy_after"] = serde_json::json!(acc.map(|x| x.1));
        v["recovery"] = serde_json::json!(recovery);
        v["compression_ratio_recovered"] = serde_json::json!(recovered_ratio);
        v["accuracy_recovered"] = serde_json::json!(recovered_acc);
        v["seconds"] = serde_json::json!(secs);
        println!("{v}");
        return Ok(0);
    }
    let factored = rep.modules.iter().filter(|m| m.factored).count();
    let mean_err = rep.modules.iter().map(|m| m.relative_error).sum::<f64>() / rep.modules.len() as f64;
    println!("factored {factored} of {} matrices (mean relative error {mean_err:.4})", rep.modules.len());
    println!("parameters  {} -> {} ({ratio:.2}x)", rep.params_before, rep.params_after);
    println!("file size   {} -> {} bytes ({})", rep.bytes_before, rep.bytes_after, lora_lowrank::compress::FACTORED_NAME);
    if let Some((b, c)) = acc {
        println!("accuracy    {b:.4} -> {c:.4}");
    }
    if let (Some(f), Some(r)) = (&recovery, recovered_ratio) {
        println!(
            "recovery    LoRA r={} on {} modules for {} steps, folded into the factors: parameters {} ({r:.2}x), {} bytes",
            a.recover_rank,
            f.grown + f.added,
            a.recover_steps,
            f.params_after,
            f.bytes_after
        );
        if let Some(x) = recovered_acc {
            println!("accuracy    {x:.4} after recovery");
        }
    }
    println!("wrote {} ({secs:.1}s)", a.out.display());
    Ok(0)
}

/// The recovery fine-tune: LoRA on the compressed model in `a.out`, run in
/// `a.out/recovery`, then folded into the compressed folder.
fn recover(a: &CompressArgs, train: &Path, stop: &AtomicBool) -> Result<lora_lowrank::compress::FoldReport> {
    let run = a.out.join("recovery");
    let s = |p: &Path| p.display().to_string();
    let args: Vec<String> = vec![
        "--task".into(), "classify".into(),
        "--model".into(), s(&a.out),
        "--train".into(), s(train),
        "--out".into(), s(&run),
        "--overwrite".into(),
        "--text-column".into(), a.text_column.clone(),
        "--label-column".into(), a.label_column.clone(),
        "--max-steps".into(), a.recover_steps.to_string(),
        // --max-steps decides; the epoch count only has to be large enough.
        "--epochs".into(), a.recover_steps.to_string(),
        "--rank".into(), a.recover_rank.to_string(),
        "--alpha".into(), (2 * a.recover_rank).to_string(),
        "--targets".into(), a.recover_targets.clone(),
        "--lr".into(), a.recover_lr.to_string(),
        "--batch-size".into(), a.recover_batch_size.to_string(),
        "--max-len".into(), a.recover_max_len.to_string(),
        "--seed".into(), a.solver.seed.to_string(),
    ];
    if !a.json {
        eprintln!("recovery fine-tune: LoRA r={} on {} of the compressed model, {} steps, into {}", a.recover_rank, a.recover_targets, a.recover_steps, run.display());
    }
    let code = run_train(args, stop)?;
    if code != 0 {
        bail!("recovery fine-tune stopped (exit {code}); {} holds the compressed model without recovery, {} the run (lora train --resume continues it)", a.out.display(), run.display());
    }
    let ad = lora_peft::load_adapter(&run, &Device::Cpu)?;
    Ok(lora_lowrank::compress::fold_adapter(&a.out, &ad)?)
}

/// Accuracy of `model` (+ `adapter`) on labelled `data`.
fn accuracy(model: &Path, adapter: Option<&Path>, data: &Path, text: &str, label: &str) -> Result<f64> {
    let src = match adapter {
        Some(d) => AdapterSource::Saved(d),
        None => AdapterSource::None,
    };
    let clf = build_classifier(model, src, &Device::Cpu)?;
    let max_len = clf.meta.as_ref().map(|m| m.max_len).unwrap_or(128);
    let ex = lora_data::read_examples(data, text, Some(label), None)?;
    let labels = lora_data::LabelSet::from_names(clf.labels.clone())?;
    let y = lora_data::label_ids(&ex, &labels, data)?;
    let texts: Vec<String> = ex.iter().map(|e| e.text.clone()).collect();
    let set = lora_tasks::classify::encode(&clf, &texts, y, max_len)?;
    let (report, _, _) = lora_tasks::classify::evaluate(&clf, &set, 64, &Device::Cpu, &mut |_| {})?;
    Ok(report.accuracy)
}

#[derive(Args, Debug)]
pub struct AnalyzeArgs {
    /// Adapter folder (PEFT format).
    pub adapter: PathBuf,
    /// A second adapter: subspace similarity of the two (LoRA paper, section 7).
    #[arg(long)]
    pub other: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
    /// SVG plot of the spectra (and of the similarity with --other).
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

/// `lora analyze`.
pub fn analyze(a: AnalyzeArgs) -> Result<i32> {
    let dev = Device::Cpu;
    let ad = lora_peft::load_adapter(&a.adapter, &dev)?;
    let spectra = analyze_adapter(&ad)?;
    let sims = match &a.other {
        Some(o) => Some(compare_adapters(&ad, &lora_peft::load_adapter(o, &dev)?)?),
        None => None,
    };
    if let Some(p) = &a.plot {
        plot(p, &spectra, sims.as_deref())?;
    }
    if a.json {
        println!("{}", serde_json::json!({"modules": spectra, "similarity": sims}));
        return Ok(0);
    }
    println!("{:<55} {:>4} {:>9} {:>8} {:>6} {:>7}  singular values of s*B*A", "module", "r", "|dW|_F", "erank", "r90", "stable");
    for s in &spectra {
        let sv: Vec<String> = s.singular_values.iter().take(6).map(|x| format!("{x:.3e}")).collect();
        println!("{:<55} {:>4} {:>9.3e} {:>8.2} {:>6} {:>7.2}  {}", s.module, s.rank, s.norm, s.entropy_rank, s.rank90, s.stable_rank, sv.join(" "));
    }
    println!("erank: entropy effective rank exp(H(sigma/sum sigma)) (Roy & Vetterli 2007); r90: smallest rank with 90% of |dW|_F^2; stable: |dW|_F^2/sigma_1^2");
    if let Some(sims) = &sims {
        println!("\nsubspace similarity phi(i, j) = |U1[:, :i]^T U2[:, :j]|_F^2 / min(i, j) (right-singular vectors of lora_A)");
        for s in sims {
            let row: Vec<String> = (1..=s.r1.min(s.r2)).map(|k| format!("{:.3}", s.phi[k - 1][k - 1])).collect();
            println!("{:<55} phi(1,1)={:.3} phi(i,i): {}  phi({},{})={:.3}", s.module, s.phi[0][0], row.join(" "), s.r1, s.r2, s.phi[s.r1 - 1][s.r2 - 1]);
        }
    }
    Ok(0)
}

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// The PiSSA/OLoRA adapter as initialised (saved before training).
    #[arg(long)]
    pub initial: PathBuf,
    /// The same adapter after training.
    #[arg(long)]
    pub trained: PathBuf,
    /// Output: a plain LoRA (rank 2r) on the unmodified base.
    #[arg(long)]
    pub out: PathBuf,
}

/// `lora convert`: PiSSA/OLoRA adapter to plain LoRA (PEFT's
/// `path_initial_model_for_weight_conversion`).
pub fn convert(a: ConvertArgs) -> Result<i32> {
    let dev = Device::Cpu;
    let initial = read_any(&a.initial, &dev)?;
    let trained = read_any(&a.trained, &dev)?;
    let (cfg, tensors) = lora_lowrank::convert_to_plain_lora(&initial, &trained)?;
    lora_peft::save_adapter(&a.out, &cfg, &tensors, &[])?;
    for f in ["labels.json", "lora_task.json"] {
        let src = a.trained.join(f);
        if src.is_file() {
            std::fs::copy(&src, a.out.join(f))?;
        }
    }
    eprintln!("wrote plain LoRA r={} alpha={} to {}", cfg.r, cfg.lora_alpha, a.out.display());
    Ok(0)
}

/// Loads an adapter whose config may say PiSSA/OLoRA (validation passes; the
/// base-mutating init is what conversion is for).
fn read_any(dir: &Path, dev: &Device) -> Result<lora_peft::LoadedAdapter> {
    Ok(lora_peft::load_adapter(dir, dev)?)
}

/// Spectra (σᵢ/σ₁ by index, the 10 modules with the largest update) and,
/// with a second adapter, the mean φ(i, j) over modules for a few i.
fn plot(path: &Path, spectra: &[lora_lowrank::analyze::ModuleSpectrum], sims: Option<&[lora_lowrank::analyze::Similarity]>) -> Result<()> {
    let mut order: Vec<&lora_lowrank::analyze::ModuleSpectrum> = spectra.iter().collect();
    order.sort_by(|x, y| y.norm.total_cmp(&x.norm));
    let mut series: Vec<lora_data::Series> = order
        .iter()
        .take(10)
        .map(|s| {
            let top = s.singular_values.first().copied().unwrap_or(0.0).max(f32::MIN_POSITIVE) as f64;
            (s.module.clone(), s.singular_values.iter().enumerate().map(|(i, &v)| ((i + 1) as f64, v as f64 / top)).collect())
        })
        .collect();
    let mut title = "singular values of s*B*A (sigma_i / sigma_1), largest updates".to_string();
    if let Some(sims) = sims.filter(|s| !s.is_empty()) {
        let (r1, r2) = (sims.iter().map(|s| s.r1).min().unwrap_or(1), sims.iter().map(|s| s.r2).min().unwrap_or(1));
        let mut picks = vec![1, r1 / 2, r1];
        picks.retain(|&i| i >= 1);
        picks.dedup();
        series = picks
            .iter()
            .map(|&i| {
                let pts = (1..=r2).map(|j| (j as f64, sims.iter().map(|s| s.phi[i - 1][j - 1]).sum::<f64>() / sims.len() as f64)).collect();
                (format!("i = {i}"), pts)
            })
            .collect();
        title = format!("subspace similarity phi(i, j), mean over {} modules", sims.len());
        lora_data::plot_curves(path, &title, &series, "j", "phi")?;
        return Ok(());
    }
    lora_data::plot_curves(path, &title, &series, "index i", "sigma_i / sigma_1")?;
    Ok(())
}

/// After training with a weight-derived init (PiSSA/OLoRA): the adapter in
/// `out` holds the trained A, B relative to the residual base. Keeps it in
/// `out/residual_adapter` (config says the init, as PEFT writes it), writes
/// the initial factors to `out/initial_adapter` (`init_lora_weights = true`,
/// PEFT's recipe), and replaces `out`'s adapter by the plain-LoRA conversion
/// (rank 2r) that PEFT and `lora eval` load on the unmodified base.
pub fn convert_trained(out: &Path, initial: &[(String, candle_core::Tensor, candle_core::Tensor, f64)], init_name: &str) -> Result<()> {
    let dev = Device::Cpu;
    let mut trained = lora_peft::load_adapter(out, &dev)?;
    let peft_name = init_name.replace("pissa-niter-", "pissa_niter_");
    trained.config.init_lora_weights = serde_json::from_value(serde_json::json!(peft_name))?;
    let all: Vec<(String, candle_core::Tensor)> = trained.tensors.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    lora_peft::save_adapter(&out.join("residual_adapter"), &trained.config, &all, &[])?;
    let mut init = trained.clone();
    init.config.init_lora_weights = lora_peft::InitLoraWeights::Default;
    for (path, a, b, _) in initial {
        init.tensors.insert(lora_peft::lora_key(path, lora_peft::LoraPart::A), a.clone());
        init.tensors.insert(lora_peft::lora_key(path, lora_peft::LoraPart::B), b.clone());
    }
    let init_t: Vec<(String, candle_core::Tensor)> = init.tensors.iter().filter(|(k, _)| lora_peft::parse_lora_key(k).is_some()).map(|(k, v)| (k.clone(), v.clone())).collect();
    lora_peft::save_adapter(&out.join("initial_adapter"), &init.config, &init_t, &[])?;
    let (cfg, tensors) = lora_lowrank::convert_to_plain_lora(&init, &trained)?;
    lora_peft::save_adapter(out, &cfg, &tensors, &[])?;
    eprintln!("{init_name}: saved a plain LoRA (r={}, alpha={}) for the original base in {} (trained factors on the residual base in residual_adapter/)", cfg.r, cfg.lora_alpha, out.display());
    Ok(())
}
