//! One training loop for every task: gradient accumulation, clipping, AdamW,
//! warmup + decay, periodic evaluation, best-checkpoint tracking, early
//! stopping, NaN guard, Ctrl-C checkpointing and exact resume.

use crate::checkpoint::{self, TrainState};
use crate::error::{Result, TrainError};
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig};
use crate::schedule::Schedule;
use candle_core::Tensor;
use lora_core::NamedVar;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub epochs: usize,
    /// Stop after this many optimizer steps (overrides epochs when smaller).
    pub max_steps: Option<usize>,
    pub lr: f64,
    pub schedule: Schedule,
    /// Share of the total steps spent warming up linearly from 0.
    pub warmup_ratio: f64,
    pub adamw: AdamWConfig,
    /// Global gradient-norm clip (0 disables).
    pub max_grad_norm: f64,
    pub grad_accum: usize,
    /// Evaluate every N optimizer steps; `None`: at the end of every epoch.
    pub eval_every: Option<usize>,
    pub log_every: usize,
    /// Metric that picks the best checkpoint (a key of `Task::evaluate`).
    pub metric: String,
    pub greater_is_better: bool,
    /// Stop after this many evaluations without improvement.
    pub patience: Option<usize>,
    pub seed: u64,
    /// Data-parallel shards per micro-batch (see `Task::shard`); `None`: one
    /// per worker thread (`lora_core::parallel::shards_for`), 1: off.
    pub shards: Option<usize>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 3,
            max_steps: None,
            lr: 5e-4,
            schedule: Schedule::Linear,
            warmup_ratio: 0.06,
            adamw: AdamWConfig::default(),
            max_grad_norm: 1.0,
            grad_accum: 1,
            eval_every: None,
            log_every: 10,
            metric: "macro_f1".into(),
            greater_is_better: true,
            patience: None,
            seed: 0,
            shards: None,
        }
    }
}

/// What the loop needs from a task.
pub trait Task {
    type Batch;
    /// The micro-batches of one epoch, in order; must be deterministic per epoch.
    fn epoch_batches(&self, epoch: usize) -> Vec<Self::Batch>;
    /// Number of examples in a batch.
    fn samples(&self, batch: &Self::Batch) -> usize;
    /// Mean loss of the batch in training mode (a scalar).
    fn loss(&self, batch: &Self::Batch) -> candle_core::Result<Tensor>;
    /// Validation metrics (eval mode), e.g. `loss`, `accuracy`, `macro_f1`.
    fn evaluate(&self) -> Result<BTreeMap<String, f64>>;
    /// Splits a batch into at most `parts` shards for data-parallel training
    /// (one per core, see `lora_core::parallel`), each with its
    /// [`Task::loss_weight`]; `None` (the default) keeps the batch whole.
    fn shard(&self, _batch: &Self::Batch, _parts: usize) -> Option<Vec<Self::Batch>> {
        None
    }
    /// How many terms the batch's mean loss averages (examples, or target
    /// tokens for a language model): shards' losses are weighted by it so
    /// that their summed gradients equal the whole batch's.
    fn loss_weight(&self, batch: &Self::Batch) -> f64 {
        self.samples(batch) as f64
    }
}

/// One optimizer step, as logged.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepRecord {
    pub step: usize,
    pub total_steps: usize,
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub samples_per_s: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct EvalRecord {
    pub step: usize,
    pub epoch: f64,
    pub metrics: BTreeMap<String, f64>,
}

/// Callbacks from the loop to whoever runs it (progress bar, files).
pub trait Hooks {
    fn on_start(&mut self, _state: &TrainState) {}
    /// Every optimizer step (`logged` is true every `log_every` steps).
    fn on_step(&mut self, _rec: &StepRecord, _logged: bool) {}
    /// After an evaluation; `improved` when this is the new best (save it then).
    fn on_eval(&mut self, _rec: &EvalRecord, _improved: bool) -> Result<()> {
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Finished,
    EarlyStopped,
    Interrupted,
}

pub struct Trainer {
    pub cfg: TrainConfig,
    pub opt: AdamW,
    pub state: TrainState,
    pub checkpoint_dir: PathBuf,
}

impl Trainer {
    pub fn new(vars: Vec<NamedVar>, cfg: TrainConfig, checkpoint_dir: PathBuf) -> Self {
        let opt = AdamW::new(vars, cfg.adamw.clone());
        Self {
            cfg,
            opt,
            state: TrainState::default(),
            checkpoint_dir,
        }
    }

    /// Restores a checkpoint written by an earlier (interrupted) run.
    pub fn resume(&mut self) -> Result<()> {
        self.state = checkpoint::load(&self.checkpoint_dir, &mut self.opt)?;
        Ok(())
    }

    pub fn save_checkpoint(&self) -> Result<()> {
        checkpoint::save(&self.checkpoint_dir, &self.opt, &self.state)
    }

    fn total_steps(&self, batches_per_epoch: usize) -> usize {
        let per_epoch = batches_per_epoch.div_ceil(self.cfg.grad_accum.max(1));
        let t = per_epoch * self.cfg.epochs;
        self.cfg.max_steps.map_or(t, |m| m.min(t))
    }

    fn evaluate<T: Task>(&mut self, task: &T, hooks: &mut dyn Hooks, epoch: f64) -> Result<bool> {
        let metrics = task.evaluate()?;
        let value = *metrics.get(&self.cfg.metric).ok_or_else(|| {
            TrainError::Task(format!(
                "metric '{}' is not reported by this task (available: {})",
                self.cfg.metric,
                metrics.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })?;
        let improved = match self.state.best_metric {
            None => true,
            Some(b) if self.cfg.greater_is_better => value > b,
            Some(b) => value < b,
        };
        if improved {
            self.state.best_metric = Some(value);
            self.state.best_step = Some(self.state.step);
            self.state.evals_since_best = 0;
        } else {
            self.state.evals_since_best += 1;
        }
        let rec = EvalRecord {
            step: self.state.step,
            epoch,
            metrics,
        };
        hooks.on_eval(&rec, improved)?;
        self.save_checkpoint()?;
        Ok(self.cfg.patience.is_some_and(|p| self.state.evals_since_best >= p))
    }

    /// Runs (or continues) training until done, early-stopped or interrupted.
    pub fn fit<T: Task + Sync>(&mut self, task: &T, hooks: &mut dyn Hooks, stop: &AtomicBool) -> Result<Outcome>
    where
        T::Batch: Sync,
    {
        let accum = self.cfg.grad_accum.max(1);
        let n_batches = task.epoch_batches(0).len();
        if n_batches == 0 {
            return Err(TrainError::Task("no training batches".into()));
        }
        self.state.total_steps = self.total_steps(n_batches);
        let total = self.state.total_steps;
        let warmup = (self.cfg.warmup_ratio * total as f64).ceil() as usize;
        hooks.on_start(&self.state);
        let mut window_samples = 0usize;
        let mut window_start = Instant::now();
        while self.state.epoch < self.cfg.epochs && self.state.step < total && !self.state.finished {
            let batches = task.epoch_batches(self.state.epoch);
            while self.state.batch_in_epoch < batches.len() && self.state.step < total {
                let start = self.state.batch_in_epoch;
                let group = &batches[start..(start + accum).min(batches.len())];
                let step_seed = self.cfg.seed.wrapping_mul(1_000_003) ^ self.state.step as u64;
                lora_core::ops::set_dropout_seed(step_seed);
                let mut grads: Vec<Vec<f32>> =
                    self.opt.params.iter().map(|p| vec![0f32; p.var.elem_count()]).collect();
                let mut loss_sum = 0f64;
                let mut samples = 0usize;
                for (mi, b) in group.iter().enumerate() {
                    let n = task.samples(b);
                    samples += n;
                    let parts = self.cfg.shards.unwrap_or_else(|| lora_core::parallel::shards_for(n)).min(n);
                    let shards = if parts > 1 { task.shard(b, parts).filter(|s| s.len() > 1) } else { None };
                    let lv = match shards {
                        None => {
                            let loss = task.loss(b)?;
                            let lv = loss.to_scalar::<f32>()?;
                            if lv.is_finite() {
                                let gs = (loss / group.len() as f64)?.backward()?;
                                add_grads(&self.opt, &gs, &mut grads)?;
                            }
                            lv as f64
                        }
                        Some(parts) => {
                            // One shard per core, each forward and backward on
                            // its own thread; the loss and gradients are the
                            // weighted sums of the shards'.
                            let w: Vec<f64> = parts.iter().map(|p| task.loss_weight(p)).collect();
                            let total: f64 = w.iter().sum::<f64>().max(f64::MIN_POSITIVE);
                            let seed = step_seed ^ (mi as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                            let opt = &self.opt;
                            let results = lora_core::parallel::run_shards(parts.len(), seed, |i| -> Result<(f64, Vec<Vec<f32>>)> {
                                let mut g: Vec<Vec<f32>> = opt.params.iter().map(|p| vec![0f32; p.var.elem_count()]).collect();
                                if w[i] <= 0.0 {
                                    return Ok((0.0, g)); // nothing to learn from (no target tokens)
                                }
                                let loss = task.loss(&parts[i])?;
                                let lv = loss.to_scalar::<f32>()? as f64;
                                if lv.is_finite() {
                                    let gs = (loss * (w[i] / total / group.len() as f64))?.backward()?;
                                    add_grads(opt, &gs, &mut g)?;
                                }
                                Ok((lv, g))
                            });
                            let mut lv = 0f64;
                            for (i, r) in results.into_iter().enumerate() {
                                let (l, g) = r?;
                                if w[i] > 0.0 {
                                    lv += l * w[i] / total;
                                }
                                for (acc, g) in grads.iter_mut().zip(g) {
                                    acc.iter_mut().zip(g).for_each(|(a, b)| *a += b);
                                }
                            }
                            lv
                        }
                    };
                    if !lv.is_finite() {
                        return Err(TrainError::NonFinite { step: self.state.step + 1, value: lv as f32 });
                    }
                    loss_sum += lv;
                }
                if grads.iter().flatten().any(|g| !g.is_finite()) {
                    return Err(TrainError::NonFinite { step: self.state.step + 1, value: f32::NAN });
                }
                let grad_norm = clip_grad_norm(&mut grads, self.cfg.max_grad_norm);
                let lr = self.cfg.schedule.lr(self.cfg.lr, self.state.step, warmup, total);
                self.opt.step(&grads, lr)?;
                self.state.step += 1;
                self.state.batch_in_epoch += group.len();
                self.state.samples_seen += samples;
                window_samples += samples;
                let elapsed = window_start.elapsed().as_secs_f64().max(1e-9);
                let epoch_f = self.state.epoch as f64 + self.state.batch_in_epoch as f64 / batches.len() as f64;
                let logged = self.state.step % self.cfg.log_every.max(1) == 0 || self.state.step == total;
                hooks.on_step(
                    &StepRecord {
                        step: self.state.step,
                        total_steps: total,
                        epoch: epoch_f,
                        loss: loss_sum / group.len() as f64,
                        lr,
                        grad_norm,
                        samples_per_s: window_samples as f64 / elapsed,
                    },
                    logged,
                );
                if logged {
                    window_samples = 0;
                    window_start = Instant::now();
                }
                if let Some(every) = self.cfg.eval_every {
                    if self.state.step % every == 0 && self.evaluate(task, hooks, epoch_f)? {
                        self.state.finished = true;
                        self.save_checkpoint()?;
                        return Ok(Outcome::EarlyStopped);
                    }
                }
                if stop.load(Ordering::SeqCst) {
                    self.save_checkpoint()?;
                    return Ok(Outcome::Interrupted);
                }
            }
            let at_epoch_end = self.state.batch_in_epoch >= batches.len();
            if at_epoch_end {
                self.state.epoch += 1;
                self.state.batch_in_epoch = 0;
            }
            let step_eval_done = self.cfg.eval_every.is_some_and(|e| self.state.step % e == 0);
            if at_epoch_end && self.cfg.eval_every.is_none() || (self.state.step >= total && !step_eval_done) {
                if self.evaluate(task, hooks, self.state.epoch as f64)? {
                    self.state.finished = true;
                    self.save_checkpoint()?;
                    return Ok(Outcome::EarlyStopped);
                }
            } else {
                self.save_checkpoint()?;
            }
        }
        self.state.finished = true;
        self.save_checkpoint()?;
        Ok(Outcome::Finished)
    }
}

/// Adds each parameter's gradient in `gs` to `acc` (absent ones add nothing).
fn add_grads(opt: &AdamW, gs: &candle_core::backprop::GradStore, acc: &mut [Vec<f32>]) -> Result<()> {
    for (p, acc) in opt.params.iter().zip(acc.iter_mut()) {
        if let Some(g) = gs.get(p.var.as_tensor()) {
            let g = g.flatten_all()?.to_vec1::<f32>()?;
            acc.iter_mut().zip(g).for_each(|(a, b)| *a += b);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Least squares `mean_i (w·x_i + b - y_i)²` (or a sum weighted by
    /// per-item counts, like a language model's token mean) on fixed data.
    struct Regression {
        x: Vec<[f32; 3]>,
        y: Vec<f32>,
        /// Loss terms per item (1 for a per-example mean).
        terms: Vec<usize>,
        w: Var,
        b: Var,
        sharded: bool,
    }

    impl Task for Regression {
        type Batch = Vec<usize>;
        fn epoch_batches(&self, _epoch: usize) -> Vec<Vec<usize>> {
            (0..self.x.len()).collect::<Vec<_>>().chunks(5).map(|c| c.to_vec()).collect()
        }
        fn samples(&self, batch: &Vec<usize>) -> usize {
            batch.len()
        }
        fn shard(&self, batch: &Vec<usize>, parts: usize) -> Option<Vec<Vec<usize>>> {
            self.sharded.then(|| lora_core::parallel::split(batch, parts))
        }
        fn loss_weight(&self, batch: &Vec<usize>) -> f64 {
            batch.iter().map(|&i| self.terms[i]).sum::<usize>() as f64
        }
        fn loss(&self, batch: &Vec<usize>) -> candle_core::Result<Tensor> {
            // Each item's squared error counted `terms` times, over the total count.
            let dev = Device::Cpu;
            let xs: Vec<f32> = batch.iter().flat_map(|&i| self.x[i]).collect();
            let x = Tensor::from_vec(xs, (batch.len(), 3), &dev)?;
            let y = Tensor::from_vec(batch.iter().map(|&i| self.y[i]).collect::<Vec<_>>(), batch.len(), &dev)?;
            let t: Vec<f32> = batch.iter().map(|&i| self.terms[i] as f32).collect();
            let total: f32 = t.iter().sum();
            let t = Tensor::from_vec(t, batch.len(), &dev)?;
            let pred = x.matmul(&self.w.as_tensor().unsqueeze(1)?)?.squeeze(1)?.broadcast_add(self.b.as_tensor())?;
            let e = (pred - y)?.sqr()?;
            (e * t)?.sum_all()? / total as f64
        }
        fn evaluate(&self) -> Result<BTreeMap<String, f64>> {
            Ok(BTreeMap::from([("loss".to_string(), 0.0)]))
        }
    }

    fn run(shards: usize, accum: usize, terms: &[usize]) -> (Vec<f32>, f32) {
        let dev = Device::Cpu;
        let n = 23;
        let x: Vec<[f32; 3]> = (0..n).map(|i| [(i as f32 * 0.37).sin(), (i as f32 * 0.11).cos(), 1.0 - i as f32 / n as f32]).collect();
        let y: Vec<f32> = x.iter().map(|v| 2.0 * v[0] - v[1] + 0.5 * v[2] + 0.3).collect();
        let task = Regression {
            x,
            y,
            terms: (0..n).map(|i| terms[i % terms.len()]).collect(),
            w: Var::zeros(3, DType::F32, &dev).unwrap(),
            b: Var::zeros((), DType::F32, &dev).unwrap(),
            sharded: shards > 1,
        };
        let vars = vec![
            NamedVar { name: "w".into(), var: task.w.clone(), decay: true },
            NamedVar { name: "b".into(), var: task.b.clone(), decay: false },
        ];
        let dir = std::env::temp_dir().join(format!("lora-train-shards-{}-{shards}-{accum}-{}", std::process::id(), terms.len()));
        let cfg = TrainConfig {
            epochs: 2,
            lr: 0.05,
            grad_accum: accum,
            metric: "loss".into(),
            greater_is_better: false,
            shards: Some(shards),
            ..Default::default()
        };
        let mut t = Trainer::new(vars, cfg, dir.clone());
        struct NoHooks;
        impl Hooks for NoHooks {}
        t.fit(&task, &mut NoHooks, &AtomicBool::new(false)).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        (task.w.as_tensor().to_vec1::<f32>().unwrap(), task.b.as_tensor().to_scalar::<f32>().unwrap())
    }

    use candle_core::DType;

    #[test]
    fn sharded_steps_equal_whole_batch_steps() {
        // Per-example means (classification) and token-count weights (a
        // language model's token mean), with and without accumulation, on
        // shards of uneven size (5 = 3 + 2, 5 = 2 + 2 + 1; last batch 3).
        for terms in [&[1usize][..], &[3, 1, 4, 1, 5, 0, 2]] {
            for accum in [1, 2] {
                let (w1, b1) = run(1, accum, terms);
                assert!(w1.iter().any(|v| v.abs() > 1e-2), "training moved the weights");
                for shards in [2, 3] {
                    let (w, b) = run(shards, accum, terms);
                    for (a, c) in w.iter().zip(&w1) {
                        assert!((a - c).abs() < 1e-5, "shards={shards} accum={accum} terms={terms:?}: w {w:?} vs {w1:?}");
                    }
                    assert!((b - b1).abs() < 1e-5, "shards={shards}: b {b} vs {b1}");
                }
            }
        }
    }
}
