//! Adapters saved by PEFT load here and give PEFT's logits.
//!
//! Fixtures: `tests/fixtures/tiny-bert-peft/` written by `make_peft_adapter.py`
//! beside them (PEFT 0.21, transformers, float32, eval mode) on the tiny random
//! BERT of `tests/fixtures/tiny-bert/`. Tolerance: 1e-4 max-abs on logits.
//! Also: every LoRA tensor and the head receive gradients through the whole
//! model, frozen weights never change, and merge/unmerge round-trips.

use candle_core::{Device, Tensor};
use lora_core::{AdapterPlan, LoraConfig, TargetSpec};
use lora_models::{BertInput, Head};
use lora_tasks::classify::adapter::{build_classifier, save_classifier, AdapterSource, TaskMeta};
use std::collections::HashMap;

mod common;

use common::{bert_input, fixtures as fx, max_abs};

fn expected() -> HashMap<String, Tensor> {
    common::load(fx().join("tiny-bert-peft/expected.safetensors"))
}

fn input(e: &HashMap<String, Tensor>) -> BertInput {
    bert_input(e, &Device::Cpu)
}

#[test]
fn peft_adapter_gives_peft_logits() {
    common::check_bert_peft_adapter(&Device::Cpu, "adapter", "logits", "logits_merged");
}

#[test]
fn peft_rslora_adapter_on_key_and_dense_gives_peft_logits() {
    common::check_bert_peft_adapter(&Device::Cpu, "adapter_rslora", "logits_rslora", "logits_rslora_merged");
}

#[test]
fn save_then_load_round_trips() {
    let e = expected();
    let model = fx().join("tiny-bert/model");
    let src = fx().join("tiny-bert-peft/adapter");
    let clf = build_classifier(&model, AdapterSource::Saved(&src), &Device::Cpu).unwrap();
    let out = std::env::temp_dir().join(format!("lora-rt-{}", std::process::id()));
    let meta = TaskMeta {
        task: "classify".into(),
        head: "pooler".into(),
        labels: clf.labels.clone(),
        max_len: 32,
        text_column: "text".into(),
        label_column: "label".into(),
        base_model: model.display().to_string(),
        tool: "test".into(),
    };
    save_classifier(&out, &clf, &meta).unwrap();
    let again = build_classifier(&model, AdapterSource::Saved(&out), &Device::Cpu).unwrap();
    let inp = input(&e);
    let a = clf.model.forward(&inp, false).unwrap();
    let b = again.model.forward(&inp, false).unwrap();
    assert_eq!(max_abs(&a, &b), 0.0);
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn gradients_reach_every_adapter_tensor_and_frozen_weights_stay() {
    let e = expected();
    let model = fx().join("tiny-bert/model");
    for targets in ["query,value", "all-linear"] {
        let plan = AdapterPlan::new(
            LoraConfig { r: 4, alpha: 8.0, dropout: 0.1, ..Default::default() },
            TargetSpec::parse(targets).unwrap(),
            0,
        );
        let clf = build_classifier(
            &model,
            AdapterSource::New { plan, labels: vec!["a".into(), "b".into(), "c".into()], head: Head::Pooler },
            &Device::Cpu,
        )
        .unwrap();
        let frozen: Vec<(String, Tensor)> =
            clf.adapters.lora_layers.iter().map(|l| (l.path(), l.weight().unwrap().copy().unwrap())).collect();
        let vars = clf.adapters.trainable();
        let expected_layers = if targets == "all-linear" { 2 * 6 + 1 } else { 4 };
        assert_eq!(clf.adapters.lora_layers.len(), expected_layers, "{targets}");
        let mut opt = lora_train::AdamW::new(vars.clone(), Default::default());
        let labels = Tensor::new(&[0u32, 1, 2, 1], &Device::Cpu).unwrap();
        for step in 0..2 {
            let logits = clf.model.forward(&input(&e), true).unwrap();
            let loss = candle_nn::loss::cross_entropy(&logits, &labels).unwrap();
            let g = loss.backward().unwrap();
            let mut grads = vec![];
            for v in &vars {
                let gv = g.get(v.var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {}", v.name));
                let n: f32 = gv.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
                // lora_A's gradient is zero at step 0 because B starts at zero.
                if !(step == 0 && v.name.ends_with("lora_A.weight")) {
                    assert!(n > 0.0, "zero gradient for {} at step {step}", v.name);
                }
                grads.push(gv.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            }
            opt.step(&grads, 1e-2).unwrap();
        }
        for (p, w) in frozen {
            let l = clf.adapters.lora_layers.iter().find(|l| l.path() == p).unwrap();
            assert_eq!(max_abs(&l.weight().unwrap(), &w), 0.0, "frozen weight {p} changed");
        }
    }
}

/// Batched, sharded prediction (three shards balanced by padded length,
/// `lora_core::parallel::split_by_length`) returns each row's logits in the
/// input's order: equal to the sequence run alone, within 1e-5.
#[test]
fn sharded_predictions_keep_row_order() {
    let model = fx().join("tiny-bert/model");
    let clf = build_classifier(&model, AdapterSource::Saved(&fx().join("tiny-bert-peft/adapter")), &Device::Cpu).unwrap();
    let vocab = clf.config.vocab_size as u32;
    // Lengths out of order, with one long sequence among short ones.
    let lens = [5usize, 17, 3, 9, 30, 4, 12, 6, 8, 2, 11];
    let ids: Vec<Vec<u32>> = lens.iter().enumerate().map(|(i, &n)| (0..n).map(|p| ((i * 31 + p * 7) as u32 % (vocab - 5)) + 5).collect()).collect();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
    let got = pool.install(|| lora_tasks::classify::predict_logits(&clf, &ids, 8, &Device::Cpu, &mut |_| {})).unwrap();
    assert_eq!(got.len(), ids.len());
    let _g = lora_core::no_grad();
    for (i, seq) in ids.iter().enumerate() {
        let alone = lora_tasks::classify::data::to_input(&[seq.as_slice()], clf.pad_id, &Device::Cpu).unwrap();
        let want: Vec<f32> = clf.model.forward(&alone, false).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let e = want.iter().zip(&got[i]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(e < 1e-5, "row {i} (length {}): {:?} vs {:?}", seq.len(), got[i], want);
    }
}
