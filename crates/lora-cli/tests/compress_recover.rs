//! `lora compress --recover-train`: a LoRA fine-tune of the compressed
//! classifier, folded exactly into the factored model.

mod common;

use common::*;
use std::path::Path;

fn probs_logits(path: &Path) -> Vec<Vec<f64>> {
    jsonl(path).iter().map(|r| r["logits"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()).collect()
}

#[test]
fn recovery_fine_tune_is_folded_exactly() {
    let dir = TempDir::new("recover");
    let m = model_dir();
    let rows = toy_rows(&["pos", "neg", "neu"], 14);
    let train = dir.file("train.csv", csv(&rows));
    let c0 = dir.join("c0");
    let c1 = dir.join("c1");
    // The same compression twice: without and with the recovery fine-tune.
    lora(args!["compress", "--model", &m, "--rank", "4", "--out", &c0]).ok();
    let v = lora(args![
        "compress", "--model", &m, "--rank", "4", "--out", &c1, "--eval", &train, "--recover-train", &train,
        "--recover-steps", "200", "--recover-rank", "2", "--recover-lr", "1e-2", "--recover-batch-size", "8", "--recover-max-len", "32", "--json"
    ])
    .ok()
    .json();
    let rec = &v["recovery"];
    // tiny-bert: 2 layers x 6 linear + pooler = 13 factored matrices, each grown by r=2.
    assert_eq!(rec["grown"], 13, "{v}");
    assert_eq!(rec["added"], 0, "{v}");
    assert!(rec["replaced"].as_u64().unwrap() >= 2, "head weight and bias replaced: {v}");
    let grown: u64 = v["modules"].as_array().unwrap().iter().map(|m| 2 * (m["shape"][0].as_u64().unwrap() + m["shape"][1].as_u64().unwrap())).sum();
    assert!(rec["params_after"].as_u64().unwrap() >= v["params_after"].as_u64().unwrap() + grown, "{v}");
    let (before, after) = (v["accuracy_after"].as_f64().unwrap(), v["accuracy_recovered"].as_f64().unwrap());
    assert!(after > before, "recovery should raise training accuracy on the toy data: {before} -> {after}");
    assert!(after >= 0.6, "{after}");
    let lj = read_json(&c1.join("lowrank.json"));
    assert_eq!(lj["recovery"]["accuracy_after_recovery"].as_f64(), Some(after));

    // Folded model == compressed model + recovery adapter (unmerged), and the
    // factors grew by the adapter's rank: lowrank_A is (4 + 2, in).
    let p_fold = dir.join("fold.jsonl");
    let p_adapter = dir.join("adapter.jsonl");
    lora(args!["predict", "--model", &c1, "--data", &train, "--max-len", "32", "--out", &p_fold]).ok();
    lora(args!["predict", "--model", &c0, "--adapter", c1.join("recovery"), "--data", &train, "--max-len", "32", "--out", &p_adapter]).ok();
    let (a, b) = (probs_logits(&p_fold), probs_logits(&p_adapter));
    assert_eq!(a.len(), rows.len());
    let worst = a.iter().flatten().zip(b.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0f64, f64::max);
    assert!(worst < 1e-4, "folded vs adapter logits differ by {worst}");
    let st = candle_core::safetensors::load(c1.join("lowrank.safetensors"), &candle_core::Device::Cpu).unwrap();
    let a0 = st.iter().find(|(k, _)| k.ends_with("attention.self.query.lowrank_A")).unwrap().1;
    assert_eq!(a0.dims()[0], 6);

    // Bad values: one line, non-zero exit.
    let r = lora(args!["compress", "--model", &m, "--rank", "4", "--out", dir.join("x"), "--recover-train", &train, "--recover-rank", "0"]);
    assert_eq!(r.code, 1, "{}", r.describe());
    assert_eq!(r.stderr.trim(), "error: --recover-rank 0: must be at least 1");
}
