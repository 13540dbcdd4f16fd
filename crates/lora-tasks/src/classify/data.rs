//! Text → token ids, length-bucketed batches with dynamic padding.

use crate::error::{Result, TaskError};
use candle_core::{Device, Tensor};
use lora_models::BertInput;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::path::Path;

/// Tokenized examples (ids include [CLS]/[SEP], truncated to `max_len`).
#[derive(Debug, Clone, Default)]
pub struct Encoded {
    pub ids: Vec<Vec<u32>>,
    pub labels: Vec<usize>,
}

impl Encoded {
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// A tokenizer with transformers' `truncation=True, max_length` behaviour and
/// no padding (we pad per batch).
pub fn prepare_tokenizer(tok: &tokenizers::Tokenizer, max_len: usize, path: &Path) -> Result<tokenizers::Tokenizer> {
    let mut t = tok.clone();
    t.with_padding(None);
    t.with_truncation(Some(tokenizers::TruncationParams {
        max_length: max_len,
        ..Default::default()
    }))
    .map_err(|e| TaskError::Input(format!("{}: cannot set truncation: {e}", path.display())))?;
    Ok(t)
}

pub fn encode_texts(tok: &tokenizers::Tokenizer, texts: &[String]) -> Result<Vec<Vec<u32>>> {
    let enc = tok
        .encode_batch(texts.to_vec(), true)
        .map_err(|e| TaskError::Input(format!("tokenizer failed: {e}")))?;
    Ok(enc.into_iter().map(|e| e.get_ids().to_vec()).collect())
}

/// Batches of example indices. With a seed: HF-style length grouping (shuffle,
/// sort by length inside mega-batches of 50 batches, shuffle batch order), so
/// each batch pads little but order stays random. Without: sorted by length
/// (for evaluation; the caller restores the order).
pub fn make_batches(lengths: &[usize], batch_size: usize, seed: Option<u64>) -> Vec<Vec<usize>> {
    let bs = batch_size.max(1);
    let mut idx: Vec<usize> = (0..lengths.len()).collect();
    match seed {
        None => {
            idx.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
            idx.chunks(bs).map(|c| c.to_vec()).collect()
        }
        Some(s) => {
            let mut rng = rand::rngs::StdRng::seed_from_u64(s);
            idx.shuffle(&mut rng);
            let mut batches: Vec<Vec<usize>> = vec![];
            for mega in idx.chunks(bs * 50) {
                let mut m = mega.to_vec();
                m.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
                batches.extend(m.chunks(bs).map(|c| c.to_vec()));
            }
            batches.shuffle(&mut rng);
            batches
        }
    }
}

/// Pads a batch to its longest sequence: ids (B, T) u32, types zeros, mask (B, T) f32.
pub fn to_input(seqs: &[&[u32]], pad_id: u32, device: &Device) -> candle_core::Result<BertInput> {
    let b = seqs.len();
    let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0).max(1);
    let mut ids = vec![pad_id; b * t];
    let mut mask = vec![0f32; b * t];
    for (i, s) in seqs.iter().enumerate() {
        ids[i * t..i * t + s.len()].copy_from_slice(s);
        mask[i * t..i * t + s.len()].iter_mut().for_each(|m| *m = 1.0);
    }
    Ok(BertInput {
        input_ids: Tensor::from_vec(ids, (b, t), device)?,
        token_type_ids: Tensor::zeros((b, t), candle_core::DType::U32, device)?,
        attention_mask: Tensor::from_vec(mask, (b, t), device)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cover_everything_once_and_are_seeded() {
        let lengths: Vec<usize> = (0..1000).map(|i| (i * 37) % 101 + 1).collect();
        let a = make_batches(&lengths, 32, Some(3));
        let b = make_batches(&lengths, 32, Some(3));
        let c = make_batches(&lengths, 32, Some(4));
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mut all: Vec<usize> = a.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
        // Bucketing: padding waste far below random batching.
        let waste = |bs: &Vec<Vec<usize>>| -> usize {
            bs.iter()
                .map(|b| {
                    let m = b.iter().map(|&i| lengths[i]).max().unwrap();
                    b.iter().map(|&i| m - lengths[i]).sum::<usize>()
                })
                .sum()
        };
        let random: Vec<Vec<usize>> = (0..1000).collect::<Vec<_>>().chunks(32).map(|c| c.to_vec()).collect();
        assert!(waste(&a) * 5 < waste(&random));
    }

    #[test]
    fn padding() {
        let s1 = [2u32, 5, 3];
        let s2 = [2u32, 3];
        let inp = to_input(&[&s1, &s2], 0, &Device::Cpu).unwrap();
        assert_eq!(inp.input_ids.to_vec2::<u32>().unwrap(), vec![vec![2, 5, 3], vec![2, 3, 0]]);
        assert_eq!(inp.attention_mask.to_vec2::<f32>().unwrap(), vec![vec![1., 1., 1.], vec![1., 1., 0.]]);
    }
}
