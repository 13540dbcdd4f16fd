//! LoRA on the LLaMA decoder against PEFT.
//!
//! Fixture `tests/fixtures/tiny-llama-peft/` (make_peft_llama.py, PEFT 0.21.2,
//! transformers 5.24, float32): a rank-4 adapter on all seven projections of the
//! tiny random LLaMA, with random non-zero A and B. Checked here: logits with the
//! adapter unmerged and merged (1e-4), the causal-LM loss (1e-5), and the
//! gradient of every lora_A / lora_B tensor (1e-4 max-abs); frozen weights do
//! not change under an optimizer step; save -> load round-trips bit-exactly.

use candle_core::{Device, Tensor};
use lora_tasks::causal::data::LmExample;
use lora_tasks::causal::{build_causal, LmAdapter, LmMeta};
use std::path::PathBuf;

mod common;

use common::{fixtures, max_abs};

#[test]
fn peft_llama_adapter_logits_loss_and_gradients() {
    common::check_llama_peft(&Device::Cpu);
}

#[test]
fn qlora_training_step_changes_only_adapters_and_round_trips() {
    use candle_core::quantized::{GgmlDType, QTensor};
    // A quantized copy of the tiny LLaMA (Q8_0 projections) through a GGUF file.
    let model = fixtures().join("tiny-llama/model");
    let src = candle_core::safetensors::load(model.join("model.safetensors"), &Device::Cpu).unwrap();
    let tmp = tempdir("qlora");
    let gguf = tmp.join("tiny.gguf");
    lora_models::gguf_write::write_llama_gguf(&gguf, &model, &src, |name, t| {
        if name.contains("proj") { Some(QTensor::quantize(t, GgmlDType::Q8_0).unwrap()) } else { None }
    })
    .unwrap();
    let plan = lora_core::AdapterPlan::new(
        lora_core::LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, use_rslora: false, init: lora_core::LoraInit::Random },
        lora_core::TargetSpec::parse("all-linear").unwrap(),
        3,
    );
    let lm = build_causal(&gguf, LmAdapter::New(plan), &Device::Cpu).unwrap();
    assert_eq!(lm.adapters.lora_layers.len(), 14);
    assert!(lm.adapters.lora_layers.iter().all(|l| matches!(l.frozen_weight(), Some(lora_core::FrozenWeight::Quantized(_)))));
    let before: Vec<Tensor> = lm.adapters.lora_layers.iter().map(|l| l.weight().unwrap()).collect();
    let ex = LmExample { ids: vec![1, 5, 9, 33, 2, 7, 100, 3], labels: vec![1, 5, 9, 33, 2, 7, 100, 3] };
    let vars = lm.adapters.trainable();
    let a0: Vec<Tensor> = vars.iter().map(|v| v.var.as_tensor().copy().unwrap()).collect();
    let (loss, _) = lm.batch_loss(&[&ex], true).unwrap();
    let grads = loss.backward().unwrap();
    for v in &vars {
        let g = grads.get(v.var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {}", v.name));
        let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(norm > 0.0, "zero gradient for {}", v.name);
        v.var.set(&(v.var.as_tensor() - (g * 0.1).unwrap()).unwrap()).unwrap();
    }
    for (v, a) in vars.iter().zip(&a0) {
        assert!(max_abs(v.var.as_tensor(), a) > 0.0, "{} did not change", v.name);
    }
    for (l, w) in lm.adapters.lora_layers.iter().zip(&before) {
        assert_eq!(max_abs(&l.weight().unwrap(), w), 0.0, "frozen {} changed", l.path());
    }
    // Save and load back: identical tensors and logits.
    let out = tmp.join("adapter");
    let meta = LmMeta {
        task: "causal-lm".into(),
        base_model: gguf.display().to_string(),
        data_format: lora_tasks::causal::data::LmFormat::Text,
        block_size: 8,
        max_len: 8,
        tool: "test".into(),
    };
    lm.save(&out, &meta).unwrap();
    let back = build_causal(&gguf, LmAdapter::Saved(&out), &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[1u32, 5, 9, 33]], &Device::Cpu).unwrap();
    let d = max_abs(&lm.model.forward(&ids, None, false).unwrap(), &back.model.forward(&ids, None, false).unwrap());
    assert_eq!(d, 0.0);
}

fn tempdir(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("lora-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}
