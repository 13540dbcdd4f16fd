//! Causal language modelling with LoRA on LLaMA-family decoders (QLoRA when the
//! base is a quantized GGUF): building the model with a new or saved adapter,
//! saving it in PEFT's format, the training task, perplexity, and generation.

pub mod data;
pub mod generate;

use crate::error::{Result, TaskError};
use crate::peft_glue;
use candle_core::{Device, Tensor};
use data::{to_batch, LmExample};
use lora_core::ops_decoder::token_cross_entropy;
use lora_core::{AdapterPlan, AdapterSet, ModelBuilder};
use lora_models::{DecoderFiles, DecoderFormat, Llama};
use lora_peft::TaskType;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// What is saved beside the adapter (`lora_task.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LmMeta {
    pub task: String,
    pub base_model: String,
    pub data_format: data::LmFormat,
    pub block_size: usize,
    pub max_len: usize,
    pub tool: String,
}

/// A decoder with its adapter set, tokenizer and chat template.
pub struct CausalLm {
    pub model: Llama,
    pub adapters: AdapterSet,
    pub tokenizer: tokenizers::Tokenizer,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub eos_id: Option<u32>,
    pub pad_id: u32,
    pub format: DecoderFormat,
    pub path: std::path::PathBuf,
    pub gguf: Option<std::sync::Arc<lora_models::GgufFile>>,
    pub meta: Option<LmMeta>,
}

/// Which adapter to attach.
pub enum LmAdapter<'a> {
    New(AdapterPlan),
    Saved(&'a Path),
    None,
}

/// Loads a GGUF file or Hugging Face folder with an adapter.
pub fn build_causal(model: &Path, adapter: LmAdapter, device: &Device) -> Result<CausalLm> {
    let mut files = DecoderFiles::open(model)?;
    let source = std::mem::replace(&mut files.source, Box::new(lora_core::MemorySource::default()));
    let mut vb = ModelBuilder::new(source, device.clone());
    let mut meta = None;
    match adapter {
        LmAdapter::New(plan) => {
            plan.config.validate()?;
            vb = vb.with_adapter(Some(plan));
        }
        LmAdapter::Saved(dir) => {
            let (loaded, plan, pre) = peft_glue::saved_plan(dir, TaskType::CausalLm, device)?;
            if !loaded.saved_modules().is_empty() {
                return Err(TaskError::Input(format!(
                    "{}: modules_to_save ({}) are not supported for causal-LM adapters",
                    dir.display(),
                    loaded.saved_modules().keys().cloned().collect::<Vec<_>>().join(", ")
                )));
            }
            meta = peft_glue::read_json::<LmMeta>(&dir.join(crate::classify::adapter::TASK_FILE))?;
            vb = vb.with_adapter(Some(plan)).with_preloaded(pre);
        }
        LmAdapter::None => {}
    }
    let model = Llama::load(&vb, &files.config)?;
    let adapters = vb.finish()?;
    let eos_id = files.eos_token.as_deref().and_then(|t| files.tokenizer.token_to_id(t)).or(files.config.eos_token_id);
    let pad_id = eos_id.unwrap_or(0);
    Ok(CausalLm {
        model,
        adapters,
        tokenizer: files.tokenizer,
        chat_template: files.chat_template,
        bos_token: files.bos_token,
        eos_token: files.eos_token,
        eos_id,
        pad_id,
        format: files.format,
        path: files.path,
        gguf: files.gguf,
        meta,
    })
}

impl CausalLm {
    pub fn template(&self) -> Result<data::ChatTemplate> {
        let src = self.chat_template.as_deref().ok_or_else(|| {
            TaskError::Input(format!(
                "{}: the model has no chat template (tokenizer_config.json chat_template or GGUF tokenizer.chat_template)",
                self.path.display()
            ))
        })?;
        data::ChatTemplate::new(src, self.bos_token.clone(), self.eos_token.clone())
    }

    /// Mean token loss of a batch and its count of target tokens.
    pub fn batch_loss(&self, batch: &[&LmExample], train: bool) -> candle_core::Result<(Tensor, usize)> {
        let dev = self.model.device().clone();
        let (ids, targets) = to_batch(batch, self.pad_id, &dev)?;
        let (b, t) = ids.dims2()?;
        let h = self.model.hidden(&ids, None, train).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        // Only positions with a target go through the LM head (prompt and
        // padding positions of chat data are skipped: the head is ~20% of
        // SmolLM2's compute).
        let h = h.narrow(1, 0, t - 1)?.contiguous()?.reshape((b * (t - 1), ()))?;
        let keep: Vec<u32> = (0..targets.len() as u32).filter(|&i| targets[i as usize] >= 0).collect();
        let (h, targets) = if keep.len() == targets.len() {
            (h, targets)
        } else {
            let idx = Tensor::new(keep.as_slice(), &dev)?;
            (h.index_select(&idx, 0)?, keep.iter().map(|&i| targets[i as usize]).collect())
        };
        let logits = self.model.lm_head.forward(&h, train)?;
        token_cross_entropy(&logits, &targets)
    }

    /// Token-weighted mean loss and perplexity over examples (eval mode).
    pub fn perplexity(&self, examples: &[LmExample], batch_size: usize, progress: &mut dyn FnMut(usize)) -> Result<(f64, f64, usize)> {
        let _no_grad = lora_core::no_grad();
        let mut total = 0f64;
        let mut n = 0usize;
        let lengths: Vec<usize> = examples.iter().map(|e| e.ids.len()).collect();
        for batch in crate::classify::data::make_batches(&lengths, batch_size, None) {
            let refs: Vec<&LmExample> = batch.iter().map(|&i| &examples[i]).collect();
            // One shard of the batch per core (lora_core::parallel); each
            // returns its token-weighted loss sum.
            let shards = lora_core::parallel::split_by_length_of(&refs, lora_core::parallel::shards_on(self.model.device(), refs.len()), |e| e.ids.len());
            for part in lora_core::parallel::run_shards(shards.len(), 0, |i| -> candle_core::Result<(f64, usize)> {
                let (loss, k) = self.batch_loss(&shards[i], false)?;
                Ok(if k == 0 { (0.0, 0) } else { (loss.to_scalar::<f32>()? as f64 * k as f64, k) })
            }) {
                let (sum, k) = part?;
                total += sum;
                n += k;
            }
            progress(batch.len());
        }
        if n == 0 {
            return Err(TaskError::Input("no target tokens to evaluate".into()));
        }
        let mean = total / n as f64;
        Ok((mean, mean.exp(), n))
    }

    /// Writes the adapter in PEFT's format (Hugging Face module names) plus
    /// `lora_task.json`, atomically.
    pub fn save(&self, dir: &Path, meta: &LmMeta) -> Result<()> {
        let c = peft_glue::adapter_config(&self.adapters, TaskType::CausalLm, &meta.base_model)?;
        let tensors = peft_glue::lora_tensor_list(&self.adapters);
        let task = serde_json::to_vec_pretty(meta).map_err(|e| TaskError::Input(e.to_string()))?;
        lora_peft::save_adapter(dir, &c, &tensors, &[(crate::classify::adapter::TASK_FILE, task)])?;
        Ok(())
    }
}

/// The causal-LM task as the trainer sees it.
pub struct LmTask<'a> {
    pub lm: &'a CausalLm,
    pub train: &'a [LmExample],
    pub valid: &'a [LmExample],
    pub batch_size: usize,
    pub eval_batch_size: usize,
    pub seed: u64,
}

impl lora_train::Task for LmTask<'_> {
    type Batch = Vec<usize>;

    fn epoch_batches(&self, epoch: usize) -> Vec<Vec<usize>> {
        let lengths: Vec<usize> = self.train.iter().map(|e| e.ids.len()).collect();
        crate::classify::data::make_batches(&lengths, self.batch_size, Some(self.seed.wrapping_add(epoch as u64)))
    }

    fn samples(&self, batch: &Vec<usize>) -> usize {
        batch.len()
    }

    fn shard(&self, batch: &Vec<usize>, parts: usize) -> Option<Vec<Vec<usize>>> {
        // On a GPU one stream runs the whole batch.
        if !self.lm.model.device().is_cpu() {
            return None;
        }
        Some(lora_core::parallel::split_by_length_of(batch, parts, |&i| self.train[i].ids.len()))
    }

    /// Target tokens: the batch's loss is their mean.
    fn loss_weight(&self, batch: &Vec<usize>) -> f64 {
        batch.iter().map(|&i| self.train[i].labels.iter().skip(1).filter(|&&l| l >= 0).count()).sum::<usize>() as f64
    }

    fn loss(&self, batch: &Vec<usize>) -> candle_core::Result<Tensor> {
        let refs: Vec<&LmExample> = batch.iter().map(|&i| &self.train[i]).collect();
        Ok(self.lm.batch_loss(&refs, true)?.0)
    }

    fn evaluate(&self) -> lora_train::Result<BTreeMap<String, f64>> {
        let (loss, ppl, n) = self
            .lm
            .perplexity(self.valid, self.eval_batch_size, &mut |_| {})
            .map_err(|e| lora_train::TrainError::Task(e.to_string()))?;
        let mut m = BTreeMap::new();
        m.insert("loss".to_string(), loss);
        m.insert("perplexity".to_string(), ppl);
        m.insert("tokens".to_string(), n as f64);
        Ok(m)
    }
}
