//! The LLaMA decoder against Hugging Face transformers.
//!
//! Fixtures, each dumped by the `make_*.py` script beside it (transformers
//! 5.24, float32, eager attention):
//! - `tests/fixtures/tiny-llama/` (random LlamaForCausalLM, GQA, separate head)
//!   and `tiny-llama-tied/` (tied head, old-style `rope_theta` config key):
//!   logits and final hidden states within 1e-4; KV-cache decoding equals the
//!   full pass within 1e-4.
//! - `tests/fixtures/smollm2/`: the real SmolLM2-135M-Instruct Q4_1 GGUF, which
//!   transformers dequantizes to f32. Our prefill of >= 16 tokens also runs on
//!   dequantized weights, so last-position logits agree within 2e-3; token ids of
//!   the GGUF tokenizer are identical; greedy chat decoding says Paris.

use candle_core::{DType, Device, Tensor};
use lora_core::ModelBuilder;
use lora_models::{DecoderFiles, KvCache, Llama};
use std::collections::HashMap;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn load_expected(path: PathBuf) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).expect("fixture")
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

fn build(path: &std::path::Path) -> (Llama, DecoderFiles) {
    let mut files = DecoderFiles::open(path).unwrap();
    let src = std::mem::replace(&mut files.source, Box::new(lora_core::MemorySource::default()));
    let vb = ModelBuilder::new(src, Device::Cpu);
    let model = Llama::load(&vb, &files.config).unwrap();
    vb.finish().unwrap();
    (model, files)
}

fn ids(t: &Tensor) -> Tensor {
    t.to_dtype(DType::U32).unwrap()
}

#[test]
fn tiny_llama_matches_transformers_with_kv_cache() {
    let dir = fixtures().join("tiny-llama");
    let e = load_expected(dir.join("expected.safetensors"));
    let (m, _) = build(&dir.join("model"));
    for s in ["0", "1"] {
        let x = ids(&e[&format!("input_ids.{s}")]);
        let logits = m.forward(&x, None, false).unwrap();
        let d = max_abs(&logits, &e[&format!("logits.{s}")]);
        assert!(d < 1e-4, "logits.{s}: {d}");
        let h = m.hidden(&x, None, false).unwrap();
        assert!(max_abs(&h, &e[&format!("last_hidden.{s}")]) < 1e-4);
        // Prompt in one pass, then the continuation one token at a time.
        let mut cache = KvCache::new(&m.config, 64);
        m.forward(&x, Some(&mut cache), false).unwrap();
        let cont = ids(&e[&format!("cont_ids.{s}")]);
        let mut steps = vec![];
        for i in 0..cont.dim(1).unwrap() {
            steps.push(m.forward(&cont.narrow(1, i, 1).unwrap(), Some(&mut cache), false).unwrap());
        }
        let inc = Tensor::cat(&steps, 1).unwrap();
        let d = max_abs(&inc, &e[&format!("cont_logits_incremental.{s}")]);
        assert!(d < 1e-4, "incremental logits.{s}: {d}");
    }
}

#[test]
fn tiny_llama_tied_head_matches_transformers() {
    let dir = fixtures().join("tiny-llama-tied");
    let e = load_expected(dir.join("expected.safetensors"));
    let (m, files) = build(&dir.join("model"));
    assert!(files.config.tie_word_embeddings);
    for s in ["0", "1"] {
        let logits = m.forward(&ids(&e[&format!("input_ids.{s}")]), None, false).unwrap();
        let d = max_abs(&logits, &e[&format!("logits.{s}")]);
        assert!(d < 1e-4, "logits.{s}: {d}");
    }
}

fn smollm2() -> PathBuf {
    let cache = std::env::var("LORA_CACHE").map(PathBuf::from).unwrap_or_else(|_| {
        PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/lora-rs")
    });
    let p = cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.is_file(), "{} missing: run scripts/fetch_assets.sh smollm2", p.display());
    p
}

fn json(path: PathBuf) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The real SmolLM2 GGUF: config, Q/K un-permutation, tokenizer, logits, greedy answer.
#[test]
fn smollm2_gguf_matches_transformers() {
    let dir = fixtures().join("smollm2");
    let e = load_expected(dir.join("expected.safetensors"));
    let j = json(dir.join("expected.json"));
    let (m, files) = build(&smollm2());
    let c = &files.config;
    assert_eq!((c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads), (576, 30, 9, 3));
    assert!(c.tie_word_embeddings);
    assert_eq!(files.chat_template.as_deref(), j["chat_template"].as_str());

    // Q/K rows un-permuted from llama.cpp's rope layout: exact.
    let gguf = files.gguf.as_ref().unwrap();
    let src = lora_models::GgufSource::new(gguf.clone()).unwrap();
    for (hf, key) in [("q_proj", "attn_q"), ("k_proj", "attn_k")] {
        let w = lora_core::WeightSource::get(&src, &format!("model.layers.0.self_attn.{hf}.weight"), &Device::Cpu)
            .unwrap()
            .unwrap();
        let d = max_abs(&w.narrow(0, 0, 8).unwrap(), &e[&format!("dequant.{key}.0.hf_rows0_8")]);
        assert_eq!(d, 0.0, "{key}");
    }

    // Tokenizer built from GGUF metadata equals transformers' on tricky strings.
    let cases = json(dir.join("tokenizer_cases.json"));
    for case in cases["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let got = files.tokenizer.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(got, want, "tokenization of {text:?}");
        let back = files.tokenizer.decode(&got, false).unwrap();
        assert_eq!(back, case["decoded"].as_str().unwrap(), "decoding of {text:?}");
    }

    for name in ["plain", "chat", "unicode"] {
        let p = &j["prompts"][name];
        let want: Vec<u32> = p["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let text = p.get("rendered_text").or_else(|| p.get("text")).unwrap().as_str().unwrap();
        let got = files.tokenizer.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(got, want, "prompt {name}");
        let x = Tensor::new(want.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        // All positions: every matmul (the tied LM head too) has >= 16 rows and
        // runs on dequantized weights.
        let all = m.forward(&x, None, false).unwrap().squeeze(0).unwrap();
        let logits = all.get(want.len() - 1).unwrap();
        let d = max_abs(&logits, &e[&format!("last_logits.{name}")]);
        assert!(d < 2e-3, "last logits of {name}: {d}");
        // The last position alone: the head's one row goes through the
        // quantized-weight x f32-activation kernel, exact to rounding too.
        let last = m.forward_last(&x, None).unwrap().squeeze(0).unwrap();
        let d = max_abs(&last, &e[&format!("last_logits.{name}")]);
        assert!(d < 2e-3, "last-position logits of {name}: {d}");
    }

    // Greedy decoding with the KV cache (decode steps use quantized matmuls).
    let prompt: Vec<u32> =
        j["prompts"]["chat"]["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let mut cache = KvCache::new(c, 128);
    let mut x = Tensor::new(prompt.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let mut out = vec![];
    for _ in 0..8 {
        let l = m.forward_last(&x, Some(&mut cache)).unwrap();
        let next = lora_models::llama::argmax_last(&l).unwrap()[0];
        out.push(next);
        x = Tensor::new(&[next], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    }
    let text = files.tokenizer.decode(&out, false).unwrap();
    assert_eq!(text, "The capital of France is Paris.<|im_end|>");
}
