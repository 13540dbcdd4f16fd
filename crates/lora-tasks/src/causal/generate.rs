//! Text generation with a KV cache: greedy or sampled (temperature, top-k,
//! top-p, repetition penalty, seed), stop strings, streaming.

use super::CausalLm;
use crate::error::{Result, TaskError};
use candle_core::Tensor;
use lora_models::KvCache;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct SamplingConfig {
    /// 0 means greedy (argmax).
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    /// > 1 discourages tokens already in the prompt or output (as transformers).
    pub repetition_penalty: f64,
    pub seed: u64,
    pub max_new_tokens: usize,
    /// Generation stops before the first occurrence of any of these.
    pub stop: Vec<String>,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: None, top_p: None, repetition_penalty: 1.0, seed: 0, max_new_tokens: 128, stop: vec![] }
    }
}

impl SamplingConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(TaskError::Input(format!("--temperature {} must be >= 0", self.temperature)));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(TaskError::Input(format!("--top-p {p} must be in (0, 1]")));
            }
        }
        if self.top_k == Some(0) {
            return Err(TaskError::Input("--top-k must be at least 1".into()));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(TaskError::Input(format!("--repetition-penalty {} must be > 0", self.repetition_penalty)));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Eos,
    StopString,
    MaxTokens,
    Context,
}

#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub text: String,
    pub ids: Vec<u32>,
    pub prompt_tokens: usize,
    pub stop_reason: StopReason,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
}

impl Generation {
    pub fn decode_tokens_per_s(&self) -> f64 {
        (self.ids.len().saturating_sub(1)) as f64 / self.decode_seconds.max(1e-9)
    }
    pub fn prefill_tokens_per_s(&self) -> f64 {
        if self.prefill_seconds > 0.0 {
            self.prompt_tokens as f64 / self.prefill_seconds
        } else {
            0.0
        }
    }
}

/// Picks the next token from last-position logits.
pub struct Sampler {
    cfg: SamplingConfig,
    rng: rand::rngs::StdRng,
}

impl Sampler {
    pub fn new(cfg: SamplingConfig) -> Self {
        let rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
        Self { cfg, rng }
    }

    pub fn next(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let p = self.cfg.repetition_penalty as f32;
        if p != 1.0 {
            let mut seen = history.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for &t in &seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / p } else { *l * p };
                }
            }
        }
        if self.cfg.temperature == 0.0 {
            return argmax(logits);
        }
        let t = self.cfg.temperature as f32;
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        idx.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        if let Some(k) = self.cfg.top_k {
            idx.truncate(k.max(1));
        }
        let max = logits[idx[0]];
        let mut probs: Vec<f64> = idx.iter().map(|&i| (((logits[i] - max) / t) as f64).exp()).collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|v| *v /= sum);
        if let Some(top_p) = self.cfg.top_p {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, v) in probs.iter().enumerate() {
                acc += v;
                if acc >= top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let s: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|v| *v /= s);
        }
        let u: f64 = self.rng.random();
        let mut acc = 0.0;
        for (i, v) in probs.iter().enumerate() {
            acc += v;
            if u < acc {
                return idx[i] as u32;
            }
        }
        idx[probs.len() - 1] as u32
    }
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Length of the longest suffix of `text` that is a proper prefix of a stop string.
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut keep = 0;
    for s in stops {
        for (i, _) in s.char_indices().skip(1) {
            if text.ends_with(&s[..i]) {
                keep = keep.max(i);
            }
        }
    }
    keep
}

/// Generates a continuation of `prompt_ids`; `on_text` receives the new text
/// as it becomes final (stop strings are never streamed).
pub fn generate(lm: &CausalLm, prompt_ids: &[u32], cfg: &SamplingConfig, on_text: &mut dyn FnMut(&str)) -> Result<Generation> {
    cfg.validate()?;
    let _no_grad = lora_core::no_grad();
    let ctx = lm.model.config.max_position_embeddings;
    if prompt_ids.is_empty() {
        return Err(TaskError::Input("the prompt is empty".into()));
    }
    if prompt_ids.len() >= ctx {
        return Err(TaskError::Input(format!(
            "the prompt has {} tokens; the model's context is {ctx}",
            prompt_ids.len()
        )));
    }
    let room = ctx - prompt_ids.len();
    let max_new = cfg.max_new_tokens.min(room);
    let mut cache = KvCache::new(&lm.model.config, prompt_ids.len() + max_new + 1);
    let mut sampler = Sampler::new(cfg.clone());
    let mut history = prompt_ids.to_vec();
    let mut out: Vec<u32> = vec![];
    let mut emitted = 0usize; // bytes of text already streamed
    let t0 = Instant::now();
    let dev = lm.model.device().clone();
    let mut x = Tensor::new(prompt_ids, &dev)?.unsqueeze(0)?;
    let mut prefill = 0.0;
    let mut reason = if max_new < cfg.max_new_tokens { StopReason::Context } else { StopReason::MaxTokens };
    let mut text = String::new();
    for step in 0..max_new {
        let logits = lm.model.forward_last(&x, Some(&mut cache))?;
        if step == 0 {
            prefill = t0.elapsed().as_secs_f64();
        }
        let mut row = logits.squeeze(0)?.to_vec1::<f32>()?;
        let next = sampler.next(&mut row, &history);
        if Some(next) == lm.eos_id {
            reason = StopReason::Eos;
            break;
        }
        out.push(next);
        history.push(next);
        text = lm.tokenizer.decode(&out, true).map_err(|e| TaskError::Input(format!("decode failed: {e}")))?;
        if let Some(pos) = cfg.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            text.truncate(pos);
            if pos > emitted {
                on_text(&text[emitted..]);
            }
            emitted = text.len();
            reason = StopReason::StopString;
            break;
        }
        // Stream what is final: no half UTF-8 character, no possible stop prefix.
        if !text.ends_with('\u{FFFD}') {
            let safe = text.len() - held_back(&text, &cfg.stop);
            if safe > emitted && text.is_char_boundary(safe) {
                on_text(&text[emitted..safe]);
                emitted = safe;
            }
        }
        x = Tensor::new(&[next], &dev)?.unsqueeze(0)?;
    }
    if reason != StopReason::StopString && text.len() > emitted {
        on_text(&text[emitted..]);
    }
    let total = t0.elapsed().as_secs_f64();
    Ok(Generation {
        text,
        ids: out,
        prompt_tokens: prompt_ids.len(),
        stop_reason: reason,
        prefill_seconds: prefill,
        decode_seconds: (total - prefill).max(0.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(t: f64) -> SamplingConfig {
        SamplingConfig { temperature: t, ..Default::default() }
    }

    #[test]
    fn greedy_top_k_and_top_p() {
        let logits = vec![0.0f32, 3.0, 1.0, 2.9];
        assert_eq!(Sampler::new(cfg(0.0)).next(&mut logits.clone(), &[]), 1);
        // top-k 1 is greedy at any temperature.
        let mut s = Sampler::new(SamplingConfig { top_k: Some(1), ..cfg(5.0) });
        assert!((0..50).all(|_| s.next(&mut logits.clone(), &[]) == 1));
        // top-p keeps the smallest set reaching p: tokens 1 and 3 only.
        let mut s = Sampler::new(SamplingConfig { top_p: Some(0.8), ..cfg(1.0) });
        let picks: Vec<u32> = (0..200).map(|_| s.next(&mut logits.clone(), &[])).collect();
        assert!(picks.iter().all(|&p| p == 1 || p == 3));
        assert!(picks.contains(&1) && picks.contains(&3));
        // Same seed, same draws.
        let draw = |seed| {
            let mut s = Sampler::new(SamplingConfig { seed, ..cfg(1.0) });
            (0..20).map(|_| s.next(&mut logits.clone(), &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
    }

    #[test]
    fn repetition_penalty_as_transformers() {
        let mut l = vec![2.0f32, -1.0, 1.9];
        let mut s = Sampler::new(SamplingConfig { repetition_penalty: 2.0, ..cfg(0.0) });
        assert_eq!(s.next(&mut l, &[0, 1]), 2);
        assert_eq!(l, vec![1.0, -2.0, 1.9]);
    }

    #[test]
    fn stop_prefixes_are_held_back() {
        let stops = vec!["\nUser:".to_string()];
        assert_eq!(held_back("hello\nUs", &stops), 3);
        assert_eq!(held_back("hello", &stops), 0);
        assert!(SamplingConfig { top_p: Some(0.0), ..cfg(1.0) }.validate().is_err());
        assert!(SamplingConfig { temperature: -1.0, ..cfg(1.0) }.validate().is_err());
    }
}
