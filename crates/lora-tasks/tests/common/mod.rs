//! The PEFT reference checks shared by the CPU tests (`peft_reference.rs`,
//! `peft_llama_reference.rs`) and the GPU ones (`cuda_reference.rs`): each
//! takes the device, so both run the same assertions against the same
//! fixtures and tolerances.

#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use lora_models::BertInput;
use lora_tasks::causal::data::LmExample;
use lora_tasks::causal::{build_causal, LmAdapter};
use lora_tasks::classify::adapter::{build_classifier, AdapterSource};
use std::collections::HashMap;
use std::path::PathBuf;

/// `tests/fixtures`: `LORA_FIXTURES` when set (a test binary run away from
/// the checkout it was built in), else the checkout's, else the working
/// directory's.
pub fn fixtures() -> PathBuf {
    if let Some(d) = std::env::var_os("LORA_FIXTURES") {
        return PathBuf::from(d);
    }
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    if built.is_dir() {
        built
    } else {
        PathBuf::from("tests/fixtures")
    }
}

pub fn load(path: PathBuf) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Max-abs difference, the operands on any devices.
pub fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (a.to_device(&Device::Cpu).unwrap(), b.to_device(&Device::Cpu).unwrap());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

pub fn assert_on(t: &Tensor, dev: &Device, what: &str) {
    assert_eq!(t.device().location(), dev.location(), "{what} is not on {dev:?}");
}

pub fn bert_input(e: &HashMap<String, Tensor>, dev: &Device) -> BertInput {
    let on = |k: &str, dt: DType| e[k].to_dtype(dt).unwrap().to_device(dev).unwrap();
    BertInput {
        input_ids: on("input_ids", DType::U32),
        token_type_ids: on("token_type_ids", DType::U32),
        attention_mask: on("attention_mask", DType::F32),
    }
}

/// PEFT's saved BERT adapter `name` (tiny-bert-peft) on `dev`: PEFT's logits
/// (`key`, 1e-4), its merged logits (`merged_key`, 1e-4), and unmerging
/// restores the weights (1e-6).
pub fn check_bert_peft_adapter(dev: &Device, name: &str, key: &str, merged_key: &str) {
    let e = load(fixtures().join("tiny-bert-peft/expected.safetensors"));
    let model = fixtures().join("tiny-bert/model");
    let clf = build_classifier(&model, AdapterSource::Saved(&fixtures().join("tiny-bert-peft").join(name)), dev).unwrap();
    assert_eq!(clf.labels, vec!["neg", "neu", "pos"]);
    let inp = bert_input(&e, dev);
    let logits = clf.model.forward(&inp, false).unwrap();
    assert_on(&logits, dev, "the logits");
    let d = max_abs(&logits, &e[key]);
    assert!(d < 1e-4, "{name}: logits differ from PEFT by {d} on {dev:?}");
    let w0: Vec<Tensor> = clf.adapters.lora_layers.iter().map(|l| l.weight().unwrap().copy().unwrap()).collect();
    clf.adapters.merge_all().unwrap();
    let d = max_abs(&clf.model.forward(&inp, false).unwrap(), &e[merged_key]);
    assert!(d < 1e-4, "{name}: merged logits differ from PEFT by {d} on {dev:?}");
    clf.adapters.unmerge_all().unwrap();
    for (l, w) in clf.adapters.lora_layers.iter().zip(w0) {
        assert!(max_abs(&l.weight().unwrap(), &w) < 1e-6, "unmerge did not restore {}", l.path());
    }
}

/// PEFT's LLaMA adapter (tiny-llama-peft, rank 4 on all seven projections)
/// on `dev`: logits unmerged and merged (1e-4), the causal-LM loss (1e-5) and
/// the gradient of every lora_A / lora_B tensor (1e-4), all left on `dev`.
pub fn check_llama_peft(dev: &Device) {
    let dir = fixtures().join("tiny-llama-peft");
    let e = load(dir.join("expected.safetensors"));
    let lm = build_causal(&fixtures().join("tiny-llama/model"), LmAdapter::Saved(&dir.join("adapter")), dev).unwrap();
    assert_eq!(lm.adapters.lora_layers.len(), 14);
    let ids = |s: &str| e[&format!("input_ids.{s}")].to_dtype(DType::U32).unwrap().to_device(dev).unwrap();
    for s in ["0", "1"] {
        let logits = lm.model.forward(&ids(s), None, false).unwrap();
        assert_on(&logits, dev, "the logits");
        let d = max_abs(&logits, &e[&format!("logits.{s}")]);
        assert!(d < 1e-4, "unmerged logits.{s} differ by {d} on {dev:?}");
    }
    lm.adapters.merge_all().unwrap();
    for s in ["0", "1"] {
        let d = max_abs(&lm.model.forward(&ids(s), None, false).unwrap(), &e[&format!("logits_merged.{s}")]);
        assert!(d < 1e-4, "merged logits.{s} differ by {d} on {dev:?}");
    }
    lm.adapters.unmerge_all().unwrap();

    let v: Vec<u32> = e["input_ids.0"].to_dtype(DType::U32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let ex = LmExample { labels: v.iter().map(|&i| i as i64).collect(), ids: v };
    let (loss, n) = lm.batch_loss(&[&ex], false).unwrap();
    assert_eq!(n, 6);
    let want: f32 = e["loss"].to_scalar().unwrap();
    let got: f32 = loss.to_device(&Device::Cpu).unwrap().to_scalar().unwrap();
    assert!((got - want).abs() < 1e-5, "loss {got} vs PEFT's {want} on {dev:?}");
    let grads = loss.backward().unwrap();
    let want = load(dir.join("grads.safetensors"));
    let trainable = lm.adapters.trainable();
    assert_eq!(trainable.len(), want.len());
    for v in &trainable {
        let key = format!("base_model.model.{}", v.name);
        let g = grads.get(v.var.as_tensor()).unwrap_or_else(|| panic!("no gradient reached {key} on {dev:?}"));
        assert_on(g, dev, &format!("the gradient of {key}"));
        let d = max_abs(g, &want[&key]);
        assert!(d < 1e-4, "gradient of {key} differs by {d} on {dev:?}");
    }
}
