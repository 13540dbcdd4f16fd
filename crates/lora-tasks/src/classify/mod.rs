//! Text classification: train a LoRA classifier from a labelled table,
//! evaluate it (accuracy, per-class and macro P/R/F1, confusion), predict.

pub mod adapter;
pub mod data;

use crate::error::{Result, TaskError};
use adapter::Classifier;
use candle_core::{DType, Device, Tensor};
use lora_data::ClassificationReport;
use std::collections::BTreeMap;

/// Logits (N, C) for encoded examples, in input order.
pub fn predict_logits(clf: &Classifier, ids: &[Vec<u32>], batch_size: usize, device: &Device, progress: &mut dyn FnMut(usize)) -> Result<Vec<Vec<f32>>> {
    let _no_grad = lora_core::no_grad();
    let lengths: Vec<usize> = ids.iter().map(|s| s.len()).collect();
    let mut out: Vec<Vec<f32>> = vec![vec![]; ids.len()];
    for batch in data::make_batches(&lengths, batch_size, None) {
        // One shard of the batch per core (lora_core::parallel), each padded
        // to its own longest sequence, the shards' padded costs balanced.
        let shards = lora_core::parallel::split_by_length_of(&batch, lora_core::parallel::shards_on(device, batch.len()), |&i| lengths[i]);
        let parts = lora_core::parallel::run_shards(shards.len(), 0, |k| -> Result<Vec<Vec<f32>>> {
            let seqs: Vec<&[u32]> = shards[k].iter().map(|&i| ids[i].as_slice()).collect();
            let input = data::to_input(&seqs, clf.pad_id, device)?;
            Ok(clf.model.forward(&input, false)?.to_vec2::<f32>()?)
        });
        for (logits, rows) in parts.into_iter().zip(&shards) {
            for (row, &i) in logits?.into_iter().zip(rows) {
                out[i] = row;
            }
        }
        progress(batch.len());
    }
    Ok(out)
}

pub fn softmax(row: &[f32]) -> Vec<f32> {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = row.iter().map(|v| (v - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

pub fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) })
        .0
}

/// Mean cross-entropy of logits against labels.
pub fn mean_cross_entropy(logits: &[Vec<f32>], labels: &[usize]) -> f64 {
    let n = logits.len().max(1) as f64;
    logits
        .iter()
        .zip(labels)
        .map(|(row, &y)| -(softmax(row)[y].max(1e-30) as f64).ln())
        .sum::<f64>()
        / n
}

/// Report and mean loss of a classifier on encoded, labelled data.
pub fn evaluate(clf: &Classifier, set: &data::Encoded, batch_size: usize, device: &Device, progress: &mut dyn FnMut(usize)) -> Result<(ClassificationReport, f64, Vec<Vec<f32>>)> {
    let logits = predict_logits(clf, &set.ids, batch_size, device, progress)?;
    let preds: Vec<usize> = logits.iter().map(|r| argmax(r)).collect();
    let report = ClassificationReport::new(&clf.labels, &set.labels, &preds)?;
    let loss = mean_cross_entropy(&logits, &set.labels);
    Ok((report, loss, logits))
}

/// The classification task as the trainer sees it.
pub struct ClassifyTask<'a> {
    pub clf: &'a Classifier,
    pub train: &'a data::Encoded,
    pub valid: &'a data::Encoded,
    pub batch_size: usize,
    pub eval_batch_size: usize,
    pub seed: u64,
    pub device: Device,
    /// The latest validation report (for plots after training).
    pub last_report: std::sync::Mutex<Option<ClassificationReport>>,
}

impl lora_train::Task for ClassifyTask<'_> {
    type Batch = Vec<usize>;

    fn epoch_batches(&self, epoch: usize) -> Vec<Vec<usize>> {
        let lengths: Vec<usize> = self.train.ids.iter().map(|s| s.len()).collect();
        data::make_batches(&lengths, self.batch_size, Some(self.seed.wrapping_add(epoch as u64)))
    }

    fn samples(&self, batch: &Vec<usize>) -> usize {
        batch.len()
    }

    fn shard(&self, batch: &Vec<usize>, parts: usize) -> Option<Vec<Vec<usize>>> {
        // On a GPU one stream runs the whole batch.
        if !self.device.is_cpu() {
            return None;
        }
        Some(lora_core::parallel::split_by_length_of(batch, parts, |&i| self.train.ids[i].len()))
    }

    fn loss(&self, batch: &Vec<usize>) -> candle_core::Result<Tensor> {
        let seqs: Vec<&[u32]> = batch.iter().map(|&i| self.train.ids[i].as_slice()).collect();
        let input = data::to_input(&seqs, self.clf.pad_id, &self.device)?;
        let labels: Vec<u32> = batch.iter().map(|&i| self.train.labels[i] as u32).collect();
        let labels = Tensor::new(labels.as_slice(), &self.device)?;
        let logits = self.clf.model.forward(&input, true)?;
        candle_nn::loss::cross_entropy(&logits.to_dtype(DType::F32)?, &labels)
    }

    fn evaluate(&self) -> lora_train::Result<BTreeMap<String, f64>> {
        let (report, loss, _) = evaluate(self.clf, self.valid, self.eval_batch_size, &self.device, &mut |_| {})
            .map_err(|e| lora_train::TrainError::Task(e.to_string()))?;
        let mut m = BTreeMap::new();
        m.insert("loss".to_string(), loss);
        m.insert("accuracy".to_string(), report.accuracy);
        m.insert("macro_f1".to_string(), report.macro_avg.f1);
        m.insert("weighted_f1".to_string(), report.weighted_avg.f1);
        *self.last_report.lock().unwrap_or_else(|e| e.into_inner()) = Some(report);
        Ok(m)
    }
}

/// Encodes examples with the classifier's tokenizer.
pub fn encode(clf: &Classifier, texts: &[String], labels: Vec<usize>, max_len: usize) -> Result<data::Encoded> {
    let tok = data::prepare_tokenizer(&clf.tokenizer, max_len, &clf.folder.tokenizer)?;
    let ids = data::encode_texts(&tok, texts)?;
    if ids.iter().any(|s| s.is_empty()) {
        return Err(TaskError::Input("a text encoded to no tokens".into()));
    }
    Ok(data::Encoded { ids, labels })
}
