//! `lora extract/combine/compress/analyze/convert` end to end on the tiny
//! fixtures, and their one-line errors.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn lora(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lora")).args(args).current_dir(root()).output().expect("run lora");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lora-cli-lowrank-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

const TINY: &str = "tests/fixtures/tiny-bert/model";
const A1: &str = "tests/fixtures/lowrank/adapters/a1";
const A2: &str = "tests/fixtures/lowrank/adapters/a2";
const A3: &str = "tests/fixtures/lowrank/adapters/a3";

#[test]
fn combine_analyze_convert_compress_extract() {
    let d = tmp("flow");
    let (c, _, e) = lora(&["combine", "--adapters", &format!("{A1}:0.7,{A2}:0.3"), "--method", "ties", "--density", "0.5", "--out", d.join("ties").to_str().unwrap()]);
    assert_eq!(c, 0, "{e}");
    let (c, out, e) = lora(&["analyze", d.join("ties").to_str().unwrap(), "--other", A1, "--json", "--plot", d.join("sim.svg").to_str().unwrap()]);
    assert_eq!(c, 0, "{e}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["modules"].as_array().unwrap().len(), 4);
    assert!(d.join("sim.svg").is_file());
    let (c, _, e) = lora(&["convert", "--initial", "tests/fixtures/lowrank/pissa_initial", "--trained", "tests/fixtures/lowrank/pissa_trained", "--out", d.join("conv").to_str().unwrap()]);
    assert_eq!(c, 0, "{e}");
    let (c, out, e) = lora(&["compress", "--model", TINY, "--rank", "8", "--out", d.join("comp").to_str().unwrap(), "--json"]);
    assert_eq!(c, 0, "{e}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(v["params_after"].as_u64().unwrap() < v["params_before"].as_u64().unwrap());
    // The compressed folder is a model folder: extract its difference from the original.
    let (c, out, e) = lora(&["extract", "--base", TINY, "--tuned", d.join("comp").to_str().unwrap(), "--energy", "0.9", "--out", d.join("ex").to_str().unwrap(), "--json"]);
    assert_eq!(c, 0, "{e}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(v["modules"].as_array().unwrap().iter().all(|m| m["energy"].as_f64().unwrap() >= 0.9));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn bad_inputs_give_one_line_errors() {
    let d = tmp("errors");
    let o = d.join("x");
    let o = o.to_str().unwrap();
    for (args, want) in [
        (vec!["combine", "--adapters", &format!("{A1}:0.5,{A3}:0.5"), "--method", "linear", "--out", o], "error: method linear needs adapters with the same rank: tests/fixtures/lowrank/adapters/a1 r=4, tests/fixtures/lowrank/adapters/a3 r=2"),
        (vec!["combine", "--adapters", &format!("{A1}:0.5,{A2}:0.5"), "--method", "ties", "--density", "1.5", "--out", o], "error: density 1.5 is out of range (must be in (0, 1])"),
        (vec!["compress", "--model", TINY, "--rank", "0", "--out", o], "error: rank 0 is out of range (must be at least 1)"),
        (vec!["compress", "--model", TINY, "--rank", "33", "--out", o], "error: bert.encoder.layer.0.attention.output.dense: rank 33 is out of range for a 32x32 matrix (must be 1..=32)"),
        (vec!["extract", "--base", TINY, "--tuned", TINY, "--energy", "0", "--out", o], "error: energy 0 is out of range (must be in (0, 1])"),
        (vec!["extract", "--base", TINY, "--tuned", "tests/fixtures/minilm", "--rank", "2", "--out", o], "error:"),
    ] {
        let (c, _, e) = lora(&args);
        assert_eq!(c, 1, "{args:?}: {e}");
        assert_eq!(e.trim().lines().count(), 1, "{args:?}: {e}");
        assert!(e.trim().starts_with(want), "{args:?}: {e}");
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// Max-abs difference of two `--dump-logits` files.
fn logits_diff(a: &Path, b: &Path) -> f32 {
    let dev = candle_core::Device::Cpu;
    let la = candle_core::safetensors::load(a, &dev).unwrap()["logits.0"].clone();
    let lb = candle_core::safetensors::load(b, &dev).unwrap()["logits.0"].clone();
    (la - lb).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn decoder_compress_then_extract_from_gguf() {
    let d = tmp("decoder");
    let s = |p: &PathBuf| p.to_str().unwrap().to_string();
    let (comp, gguf, ad) = (d.join("comp"), d.join("tiny.gguf"), d.join("ad"));
    let (l_comp, l_ad, l_base) = (d.join("comp.st"), d.join("ad.st"), d.join("base.st"));
    let tiny = "tests/fixtures/tiny-llama/model";
    // Compress the decoder's attention and MLP projections (not lm_head, not embeddings).
    let (c, out, e) = lora(&["compress", "--model", tiny, "--rank", "4", "--out", &s(&comp), "--json"]);
    assert_eq!(c, 0, "{e}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let mods: Vec<&str> = v["modules"].as_array().unwrap().iter().map(|m| m["module"].as_str().unwrap()).collect();
    assert_eq!(mods.len(), 14, "{mods:?}");
    assert!(mods.iter().all(|m| m.contains("self_attn") || m.contains("mlp")), "{mods:?}");
    // The same base as an f32 GGUF (llama.cpp's layout), then the difference
    // GGUF -> compressed folder extracted in full: base.gguf + adapter == compressed.
    let (c, _, e) = lora(&["merge", "--model", tiny, "--out", &s(&gguf), "--dtype", "f32"]);
    assert_eq!(c, 0, "{e}");
    let (c, _, e) = lora(&["extract", "--base", &s(&gguf), "--tuned", &s(&comp), "--energy", "1.0", "--out", &s(&ad)]);
    assert_eq!(c, 0, "{e}");
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ad.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    let gen = |model: &PathBuf, adapter: Option<&PathBuf>, dump: &PathBuf| {
        let mut a = vec!["generate".to_string(), "--model".into(), s(model), "--prompt".into(), "the cat sat on".into(), "--max-new-tokens".into(), "6".into(), "--json".into(), "--dump-logits".into(), s(dump)];
        if let Some(ad) = adapter {
            a.extend(["--adapter".to_string(), s(ad)]);
        }
        let r: Vec<&str> = a.iter().map(|x| x.as_str()).collect();
        let (c, out, e) = lora(&r);
        assert_eq!(c, 0, "{e}");
        serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()["ids"].clone()
    };
    let g_comp = gen(&comp, None, &l_comp);
    let g_ad = gen(&gguf, Some(&ad), &l_ad);
    gen(&gguf, None, &l_base);
    // Tolerance: the full-rank SVD of dW in f32 and the unmerged adapter's
    // other summation order; the compression itself moves the logits ~100x more.
    let (diff, moved) = (logits_diff(&l_comp, &l_ad), logits_diff(&l_comp, &l_base));
    assert!(diff < 5e-4, "compressed folder vs GGUF base + extracted adapter: logits differ by {diff}");
    assert!(moved > 100.0 * diff, "the compression changed the model: {moved} vs {diff}");
    assert_eq!(g_comp, g_ad);
    // A GGUF is not compressed in place: one line naming the way.
    let (c, _, e) = lora(&["compress", "--model", &s(&gguf), "--rank", "4", "--out", &s(&d.join("x"))]);
    assert_eq!(c, 1);
    assert!(e.starts_with("error: ") && e.trim().lines().count() == 1 && e.contains("lora merge"), "{e}");
    let _ = std::fs::remove_dir_all(&d);
}
