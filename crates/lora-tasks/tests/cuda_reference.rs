//! The models with their LoRA adapters on a CUDA device, against the same
//! Hugging Face transformers / PEFT fixtures as the CPU tests (built only with
//! `--features cuda`; needs a GPU and its driver, see docs/cuda.md).
//!
//! Fixtures (dumped by the scripts beside them, float32, eval mode):
//! `tests/fixtures/tiny-bert-peft/` (PEFT adapters on the tiny random BERT) and
//! `tests/fixtures/tiny-llama-peft/` (a rank-4 adapter on all seven projections
//! of the tiny random LLaMA). Tolerances, as on the CPU: logits 1e-4 max-abs
//! (unmerged and merged), causal-LM loss 1e-5, adapter gradients 1e-4. At bf16
//! matmul precision (`--matmul-precision bf16` on a GPU: linears and attention
//! products with bf16 inputs, f32 sums) the logits are within 3% of the largest
//! reference logit. A training step on the GPU reaches every adapter tensor and
//! leaves the frozen weights bit-identical.
//!
//! The binary may run away from the checkout it was built in: set
//! `LORA_FIXTURES` to the `tests/fixtures` folder, or run it from the
//! repository's root.
#![cfg(feature = "cuda")]

use candle_core::{Device, Tensor};
use lora_core::amx::{set_gpu_matmul_precision, MatmulPrecision};
use lora_tasks::causal::data::LmExample;
use lora_tasks::causal::{build_causal, LmAdapter};
use lora_tasks::classify::adapter::{build_classifier, AdapterSource};
use std::sync::Mutex;

mod common;

use common::{assert_on, bert_input, fixtures, load, max_abs};

/// The matmul precision is process-wide: tests that run the models hold this.
static PRECISION: Mutex<()> = Mutex::new(());

fn gpu() -> Device {
    Device::new_cuda(0).expect("the cuda reference tests need CUDA device 0")
}

fn largest(a: &Tensor) -> f32 {
    a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

/// PEFT's BERT adapters (plain and rsLoRA) on the GPU: PEFT's logits, merged
/// too, and unmerge restores the weights.
#[test]
fn bert_peft_adapters_give_peft_logits_on_gpu() {
    let _g = PRECISION.lock().unwrap_or_else(|p| p.into_inner());
    common::check_bert_peft_adapter(&gpu(), "adapter", "logits", "logits_merged");
    common::check_bert_peft_adapter(&gpu(), "adapter_rslora", "logits_rslora", "logits_rslora_merged");
}

/// bf16 matmul precision on the GPU: logits near PEFT's f32 logits.
#[test]
fn bert_bf16_matmuls_stay_near_the_f32_reference() {
    let _g = PRECISION.lock().unwrap_or_else(|p| p.into_inner());
    let dev = gpu();
    let e = load(fixtures().join("tiny-bert-peft/expected.safetensors"));
    let model = fixtures().join("tiny-bert/model");
    let clf = build_classifier(&model, AdapterSource::Saved(&fixtures().join("tiny-bert-peft/adapter")), &dev).unwrap();
    let inp = bert_input(&e, &dev);
    set_gpu_matmul_precision(MatmulPrecision::Bf16);
    let logits = clf.model.forward(&inp, false);
    set_gpu_matmul_precision(MatmulPrecision::F32);
    let logits = logits.unwrap();
    let (d, scale) = (max_abs(&logits, &e["logits"]), largest(&e["logits"]).max(1.0));
    assert!(d < 3e-2 * scale, "bf16 logits differ from PEFT's f32 logits by {d} (largest logit {scale})");
    assert!(d > 0.0, "bf16 logits equal the f32 ones exactly: the bf16 path did not run");
}

/// LLaMA with PEFT's adapter on the GPU: logits (unmerged and merged), loss
/// and every adapter gradient as PEFT computes them.
#[test]
fn llama_peft_adapter_logits_loss_and_gradients_on_gpu() {
    let _g = PRECISION.lock().unwrap_or_else(|p| p.into_inner());
    common::check_llama_peft(&gpu());
}

/// A training step of a new adapter on the GPU (dropout on, the trainer's
/// AdamW): every adapter tensor gets a non-zero gradient and moves; the frozen
/// weights stay bit-identical.
#[test]
fn training_step_on_gpu_moves_adapters_only() {
    let _g = PRECISION.lock().unwrap_or_else(|p| p.into_inner());
    let dev = gpu();
    let plan = lora_core::AdapterPlan::new(
        lora_core::LoraConfig { r: 4, alpha: 8.0, dropout: 0.1, use_rslora: false, init: lora_core::LoraInit::Random },
        lora_core::TargetSpec::parse("all-linear").unwrap(),
        3,
    );
    let lm = build_causal(&fixtures().join("tiny-llama/model"), LmAdapter::New(plan), &dev).unwrap();
    let frozen: Vec<Tensor> = lm.adapters.lora_layers.iter().map(|l| l.weight().unwrap().copy().unwrap()).collect();
    let vars = lm.adapters.trainable();
    let before: Vec<Tensor> = vars.iter().map(|v| v.var.as_tensor().copy().unwrap()).collect();
    let mut opt = lora_train::AdamW::new(vars.clone(), Default::default());
    let ex = LmExample { ids: vec![1, 5, 9, 33, 2, 7, 100, 3], labels: vec![1, 5, 9, 33, 2, 7, 100, 3] };
    for step in 0..2 {
        let (loss, _) = lm.batch_loss(&[&ex], true).unwrap();
        let l: f32 = loss.to_device(&Device::Cpu).unwrap().to_scalar().unwrap();
        assert!(l.is_finite(), "loss {l} at step {step}");
        let g = loss.backward().unwrap();
        let mut grads = vec![];
        for v in &vars {
            let gv = g.get(v.var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {} on the GPU", v.name));
            let n: f32 = gv.abs().unwrap().sum_all().unwrap().to_device(&Device::Cpu).unwrap().to_scalar().unwrap();
            // LoraInit::Random: B starts non-zero, so A's gradient is non-zero from the first step.
            assert!(n > 0.0, "zero gradient for {} at step {step}", v.name);
            grads.push(gv.flatten_all().unwrap().to_device(&Device::Cpu).unwrap().to_vec1::<f32>().unwrap());
        }
        opt.step(&grads, 1e-2).unwrap();
    }
    for (v, b) in vars.iter().zip(&before) {
        assert_on(v.var.as_tensor(), &dev, &v.name);
        assert!(max_abs(v.var.as_tensor(), b) > 0.0, "{} did not change", v.name);
    }
    for (l, w) in lm.adapters.lora_layers.iter().zip(&frozen) {
        assert_eq!(max_abs(&l.weight().unwrap(), w), 0.0, "frozen {} changed", l.path());
    }
}
