//! `lora train|eval --task causal-lm`, `lora generate` and bad decoder input,
//! on the tiny random LLaMA (tests/fixtures/tiny-llama) and a quantized GGUF
//! copy of it written here.

mod common;

use common::*;
use std::path::{Path, PathBuf};

fn tiny_llama() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llama/model")
}

/// Repetitive text, so that a few steps lower the perplexity clearly.
fn text() -> String {
    let mut s = String::new();
    for i in 0..120 {
        s.push_str(&format!("the cat sat on the mat {}. the dog ran to the park. ", i % 7));
        if i % 10 == 9 {
            s.push('\n');
        }
    }
    s
}

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// The tiny model with a ChatML template in tokenizer_config.json.
fn chat_model(dir: &TempDir) -> PathBuf {
    let m = dir.join("chat-model");
    copy_dir(&tiny_llama(), &m);
    let mut tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(m.join("tokenizer_config.json")).unwrap()).unwrap();
    tc["chat_template"] = serde_json::Value::String(CHATML.into());
    std::fs::write(m.join("tokenizer_config.json"), tc.to_string()).unwrap();
    m
}

fn train_lm(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> Run {
    let mut a = args!["train", "--task", "causal-lm", "--model", model, "--train", data, "--out", out, "--json"];
    for (k, v) in [
        ("--block-size", "16"),
        ("--batch-size", "4"),
        ("--lr", "5e-3"),
        ("--epochs", "3"),
        ("--rank", "4"),
        ("--dropout", "0"),
        ("--warmup-ratio", "0"),
    ] {
        if !extra.contains(&k) {
            a.extend(args![k, v]);
        }
    }
    a.extend(extra.iter().map(std::ffi::OsString::from));
    lora(a)
}

#[test]
fn text_training_lowers_perplexity_and_generation_agrees_merged() {
    let dir = TempDir::new("lm-text");
    let data = dir.file("train.txt", text());
    let out = dir.join("run");
    let r = train_lm(&tiny_llama(), &data, &out, &[]).ok();
    let j = r.json();
    let base = j["base_perplexity"].as_f64().unwrap();
    let best = j["best_metric"]["value"].as_f64().unwrap().exp();
    assert!(best < 0.5 * base, "perplexity {base} -> {best}");
    // PEFT format with Hugging Face module names.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    // all-linear is saved resolved to the module names, as PEFT does.
    assert_eq!(cfg["target_modules"].as_array().unwrap().len(), 7);
    let st = candle_core::safetensors::load(out.join("adapter_model.safetensors"), &candle_core::Device::Cpu).unwrap();
    assert!(st.contains_key("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"));
    assert_eq!(st.len(), 28);
    assert!(out.join("training.svg").is_file());

    // Greedy tokens are the same unmerged and merged.
    let g = |merge: bool| {
        let mut a = args!["generate", "--model", tiny_llama(), "--adapter", &out, "--prompt", "the cat", "--max-new-tokens", "12", "--json"];
        if merge {
            a.push("--merge".into());
        }
        lora(a).ok().json()
    };
    let (u, m) = (g(false), g(true));
    assert_eq!(u["ids"], m["ids"]);
    assert_eq!(u["ids"].as_array().unwrap().len(), 12);

    // Merged models, as a Hugging Face folder and as GGUF (f32), give the same tokens.
    let hf = dir.join("merged-hf");
    lora(args!["merge", "--model", tiny_llama(), "--adapter", &out, "--out", &hf]).ok();
    let gg = dir.join("merged.gguf");
    lora(args!["merge", "--model", tiny_llama(), "--adapter", &out, "--out", &gg, "--dtype", "f32"]).ok();
    for m in [&hf, &gg] {
        let j = lora(args!["generate", "--model", m, "--prompt", "the cat", "--max-new-tokens", "12", "--json"]).ok().json();
        assert_eq!(j["ids"], u["ids"], "merged model {}", m.display());
    }
    // llama.cpp adapter: lora_a / lora_b pairs for all 14 modules.
    let ga = dir.join("adapter.gguf");
    lora(args!["export", "--model", tiny_llama(), "--adapter", &out, "--out", &ga]).ok();
    let f = lora_models::GgufFile::open(&ga).unwrap();
    assert_eq!(f.content.tensor_infos.len(), 28);
    assert!(f.content.tensor_infos.contains_key("blk.0.attn_q.weight.lora_a"));
    assert_eq!(f.meta_str("adapter.type").unwrap(), "lora");

    // eval: adapter beside base on held-out text.
    let valid = dir.file("valid.txt", text().replace("cat", "dog"));
    let e = lora(args!["eval", "--task", "causal-lm", "--model", tiny_llama(), "--adapter", &out, "--data", &valid, "--json"]).ok().json();
    let rows = e["results"].as_array().unwrap();
    assert_eq!(rows[0]["model"], "base");
    assert!(rows[1]["perplexity"].as_f64().unwrap() < rows[0]["perplexity"].as_f64().unwrap());
}

#[test]
fn chat_training_learns_responses_and_reports_bleu() {
    let dir = TempDir::new("lm-chat");
    let model = chat_model(&dir);
    let mut lines = String::new();
    for i in 0..24 {
        let (p, r) = if i % 2 == 0 { ("hello there", "hi friend") } else { ("how are you", "very well thanks") };
        lines.push_str(&serde_json::json!({"prompt": p, "response": r}).to_string());
        lines.push('\n');
    }
    let data = dir.file("train.jsonl", &lines);
    let out = dir.join("run");
    let r = train_lm(&model, &data, &out, &["--epochs", "8"]).ok();
    let j = r.json();
    assert!(j["best_metric"]["value"].as_f64().unwrap() < 1.0, "{}", r.describe());
    let e = lora(args![
        "eval", "--task", "causal-lm", "--model", &model, "--adapter", &out, "--data", &data, "--json",
        "--generate-limit", "4", "--max-new-tokens", "8"
    ])
    .ok()
    .json();
    let rows = e["results"].as_array().unwrap();
    let gen = &rows[1]["generation"];
    assert_eq!(gen["n"], 4);
    assert!(gen["chrf"].as_f64().unwrap() > rows[0]["generation"]["chrf"].as_f64().unwrap(), "{e}");
}

#[test]
fn chat_reads_turns_from_stdin() {
    use std::io::Write;
    let dir = TempDir::new("lm-chat-repl");
    let model = chat_model(&dir);
    let (mut c, _) = command(args!["chat", "--model", &model, "--max-new-tokens", "4"]);
    let mut child = c
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"hello\n/reset\nhow are you\n/exit\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Two answers, one line each.
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2);
}

// ---- bad input ----

fn s(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn bad_decoder_input_gets_one_line_errors() {
    let dir = TempDir::new("lm-bad");
    let data = dir.file("train.txt", text());
    // Not a GGUF file.
    let junk = dir.file("junk.gguf", b"this is not a gguf file at all");
    train_lm(&junk, &data, &dir.join("o1"), &[]).clean_error(&[&s(&junk), "GGUF"]);
    assert!(!dir.join("o1").exists());
    // A truncated GGUF: written here from the tiny model, then cut.
    let src = candle_core::safetensors::load(tiny_llama().join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let good = dir.join("tiny.gguf");
    lora_models::gguf_write::write_llama_gguf(&good, &tiny_llama(), &src, |_, _| None).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let cut = dir.file("cut.gguf", &bytes[..bytes.len() - 1000]);
    lora(args!["generate", "--model", &cut, "--prompt", "hi"]).clean_error(&[&s(&cut), "truncated"]);
    // The untruncated copy works (GGUF written by our writer, f32).
    lora(args!["generate", "--model", &good, "--prompt", "the cat", "--max-new-tokens", "3"]).ok();
    // Unsupported architecture, named.
    let mut other = bytes.clone();
    let pos = other.windows(5).position(|w| w == b"llama").unwrap();
    other[pos..pos + 5].copy_from_slice(b"gpt2x");
    let arch = dir.file("arch.gguf", &other);
    lora(args!["generate", "--model", &arch, "--prompt", "hi"]).clean_error(&["gpt2x", "not supported"]);
    // A prompt longer than the context (128 tokens).
    let long = "the cat sat on the mat ".repeat(60);
    lora(args!["generate", "--model", tiny_llama(), "--prompt", &long]).clean_error(&["context"]);
    // Empty text.
    let empty = dir.file("empty.txt", "  \n");
    train_lm(&tiny_llama(), &empty, &dir.join("o2"), &[]).clean_error(&[&s(&empty), "empty"]);
    // Too little text for one block.
    let short = dir.file("short.txt", "the cat");
    train_lm(&tiny_llama(), &short, &dir.join("o3"), &[]).clean_error(&[&s(&short), "block"]);
    // Malformed chat data, with the line number.
    let bad = dir.file("bad.jsonl", "{\"prompt\": \"a\", \"response\": \"b\"}\n{\"prompt\": \"a\"}\n");
    train_lm(&chat_model(&dir), &bad, &dir.join("o4"), &[]).clean_error(&["bad.jsonl:2", "response"]);
    // Chat data on a model without a chat template.
    train_lm(&tiny_llama(), &bad, &dir.join("o5"), &[]).clean_error(&["chat template"]);
    // An adapter trained for another model (BERT names): the unmatched module is named.
    let bert_adapter = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-bert-peft/adapter");
    lora(args!["generate", "--model", tiny_llama(), "--adapter", &bert_adapter, "--prompt", "hi"])
        .clean_error(&["SEQ_CLS"]);
    // An adapter whose shapes do not fit this model: the module and shapes are named.
    let peft = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llama-peft/adapter");
    let wrong = dir.join("wrong-adapter");
    copy_dir(&peft, &wrong);
    let mut t = candle_core::safetensors::load(wrong.join("adapter_model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    t.insert(key.to_string(), candle_core::Tensor::zeros((4, 32), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap());
    candle_core::safetensors::save(&t, wrong.join("adapter_model.safetensors")).unwrap();
    lora(args!["generate", "--model", tiny_llama(), "--adapter", &wrong, "--prompt", "hi"])
        .clean_error(&["model.layers.0.self_attn.q_proj"]);
    // The PEFT adapter itself fits and runs.
    lora(args!["generate", "--model", tiny_llama(), "--adapter", &peft, "--prompt", "hi", "--max-new-tokens", "2"]).ok();
    // Bad sampling values.
    lora(args!["generate", "--model", tiny_llama(), "--prompt", "hi", "--top-p", "1.5"]).clean_error(&["--top-p"]);
}

/// PiSSA on the decoder: trained on the residual base, saved as a plain LoRA
/// (PEFT's conversion) for the original base, whose base + adapter reproduces
/// the model that was trained.
#[test]
fn pissa_on_a_decoder_converts_to_plain_lora() {
    let dir = TempDir::new("lm-pissa");
    let data = dir.file("train.txt", text());
    let out = dir.join("run");
    let r = train_lm(&tiny_llama(), &data, &out, &["--init", "pissa", "--max-steps", "6"]).ok();
    let j = r.json();
    let best = j["best_metric"]["value"].as_f64().unwrap();
    for d in ["residual_adapter", "initial_adapter"] {
        assert!(out.join(d).join("adapter_model.safetensors").is_file(), "{d} missing");
    }
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["r"], 8, "conversion doubles the rank (2 x 4): {cfg}");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    // The converted adapter on the unmodified base carries the training:
    // lower perplexity than the base (a wrong conversion lands far off).
    let e = lora(args!["eval", "--task", "causal-lm", "--model", tiny_llama(), "--adapter", &out, "--data", &data, "--json"]).ok().json();
    let ppl = |i: usize| e["results"][i]["perplexity"].as_f64().unwrap_or_else(|| panic!("{e}"));
    assert!(ppl(1) < 0.9 * ppl(0), "base {} -> converted adapter {} (trained best {})", ppl(0), ppl(1), best.exp());
}
