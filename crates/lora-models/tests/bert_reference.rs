//! BERT against Hugging Face transformers.
//!
//! Fixtures: `tests/fixtures/tiny-bert/` (tiny random BertForSequenceClassification)
//! and `tests/fixtures/minilm/` (real all-MiniLM-L6-v2 hidden states), dumped by
//! the `make_*.py` scripts beside them with `transformers` in float32, eval mode.
//! Tolerance: 1e-4 max-abs on hidden states, pooler output and logits.

use candle_core::{DType, Device, Tensor};
use lora_core::ModelBuilder;
use lora_models::{BertClassifier, BertConfig, BertInput, BertModel, Head, HfFolder};
use std::collections::HashMap;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn load_expected(path: PathBuf) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).expect("fixture")
}

fn input(e: &HashMap<String, Tensor>) -> BertInput {
    BertInput {
        input_ids: e["input_ids"].to_dtype(DType::U32).unwrap(),
        token_type_ids: e["token_type_ids"].to_dtype(DType::U32).unwrap(),
        attention_mask: e["attention_mask"].to_dtype(DType::F32).unwrap(),
    }
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

/// Max-abs difference over the positions where the mask is 1 (padded positions
/// are undefined in both implementations).
fn masked_max_abs(a: &Tensor, b: &Tensor, mask: &Tensor) -> f32 {
    let m = mask.to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap();
    max_abs(&a.broadcast_mul(&m).unwrap(), &b.broadcast_mul(&m).unwrap())
}

fn tokenize(tok: &tokenizers::Tokenizer, sentences: &[String], ids: &Tensor) {
    let ids = ids.to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap();
    let mut tok = tok.clone();
    tok.with_padding(None);
    tok.with_truncation(None).unwrap();
    for (s, row) in sentences.iter().zip(ids) {
        let enc = tok.encode(s.as_str(), true).unwrap();
        let got: Vec<i64> = enc.get_ids().iter().map(|&i| i as i64).collect();
        assert_eq!(&row[..got.len()], &got[..], "tokenization of {s:?}");
        assert!(row[got.len()..].iter().all(|&i| i == 0), "padding of {s:?}");
    }
}

fn sentences(dir: &PathBuf) -> Vec<String> {
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    j["sentences"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
}

#[test]
fn tiny_bert_matches_transformers() {
    let dir = fixtures().join("tiny-bert");
    let folder = HfFolder::open(&dir.join("model")).unwrap();
    let cfg = BertConfig::from_file(&folder.config).unwrap();
    let vb = ModelBuilder::new(Box::new(folder.weight_source().unwrap()), Device::Cpu)
        .with_optional_prefixes(&["bert."])
        .with_modules_to_save(&["classifier".to_string()]);
    let model = BertClassifier::load(&vb, &cfg, 3, Head::Pooler).unwrap();
    let e = load_expected(dir.join("expected.safetensors"));
    tokenize(&folder.load_tokenizer().unwrap(), &sentences(&dir), &e["input_ids"]);
    let inp = input(&e);
    let h = model.bert.forward(&inp, false).unwrap();
    let d = masked_max_abs(&h, &e["last_hidden_state"], &inp.attention_mask);
    assert!(d < 1e-4, "last_hidden_state max-abs {d}");
    let p = model.bert.pool(&h, false).unwrap();
    assert!(max_abs(&p, &e["pooler_output"]) < 1e-4);
    let logits = model.forward(&inp, false).unwrap();
    let d = max_abs(&logits, &e["logits"]);
    assert!(d < 1e-4, "logits max-abs {d}");
}

/// The real all-MiniLM-L6-v2, fetched by `scripts/fetch_assets.sh minilm`
/// (the test suite's set-up runs it).
#[test]
fn minilm_matches_transformers() {
    let cache = std::env::var("LORA_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/lora-rs"));
    let mdir = cache.join("models/all-MiniLM-L6-v2");
    assert!(
        mdir.join("model.safetensors").exists(),
        "{} missing: run scripts/fetch_assets.sh minilm",
        mdir.display()
    );
    let folder = HfFolder::open(&mdir).unwrap();
    let cfg = BertConfig::from_file(&folder.config).unwrap();
    // MiniLM's checkpoint has no `bert.` prefix: load at the root.
    let vb = ModelBuilder::new(Box::new(folder.weight_source().unwrap()), Device::Cpu);
    let model = BertModel::load(&vb, &cfg, true).unwrap();
    let dir = fixtures().join("minilm");
    let e = load_expected(dir.join("expected.safetensors"));
    tokenize(&folder.load_tokenizer().unwrap(), &sentences(&dir), &e["input_ids"]);
    let inp = input(&e);
    let h = model.forward(&inp, false).unwrap();
    let d = masked_max_abs(&h, &e["last_hidden_state"], &inp.attention_mask);
    assert!(d < 1e-4, "last_hidden_state max-abs {d}");
    let pooled = lora_models::bert::mean_pool(&h, &inp.attention_mask).unwrap();
    assert!(max_abs(&pooled, &e["mean_pooled"]) < 1e-4);
}
