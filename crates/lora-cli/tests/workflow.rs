//! End-to-end runs of the `lora` binary on the tiny BERT fixture: train →
//! eval → predict → inspect → merge → predict on the merged model; seeded
//! determinism; Ctrl-C (SIGINT) checkpoint and exact resume.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

/// Settings shared by the training runs below.
const SMALL: &[&str] = &["--batch-size", "8", "--max-len", "32", "--lr", "5e-3"];

fn train_args(model: &Path, train: &Path, out: &Path, extra: &[&str]) -> Vec<std::ffi::OsString> {
    let mut a = args!["train", "--task", "classify", "--model", model, "--train", train, "--out", out];
    a.extend(SMALL.iter().map(std::ffi::OsString::from));
    a.extend(extra.iter().map(std::ffi::OsString::from));
    a
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array().unwrap_or_else(|| panic!("not an array: {v}")).iter().map(|x| x.as_f64().unwrap()).collect()
}

fn argmax(v: &[f64]) -> usize {
    (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b })
}

fn sorted_strings(v: &Value) -> Vec<String> {
    let mut s: Vec<String> = v.as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect();
    s.sort();
    s
}

/// Predictions file: (label, probs, logits) per row, checked for shape.
fn read_predictions(path: &Path, n: usize, labels: &[&str]) -> Vec<(String, Vec<f64>, Vec<f64>)> {
    let rows = jsonl(path);
    assert_eq!(rows.len(), n, "{}: one prediction per input row", path.display());
    rows.iter()
        .enumerate()
        .map(|(i, r)| {
            assert_eq!(r["index"].as_u64(), Some(i as u64), "{r}");
            let label = r["label"].as_str().unwrap_or_else(|| panic!("no label: {r}")).to_string();
            let probs = f64s(&r["probs"]);
            let logits = f64s(&r["logits"]);
            assert_eq!(probs.len(), labels.len(), "{r}");
            assert_eq!(logits.len(), labels.len(), "{r}");
            let sum: f64 = probs.iter().sum();
            assert!((sum - 1.0).abs() < 1e-5, "probs sum to {sum}: {r}");
            assert!(probs.iter().all(|p| (0.0..=1.0).contains(p)), "{r}");
            assert!(labels.contains(&label.as_str()), "{r}");
            assert_eq!(label, labels[argmax(&logits)], "label is the argmax of the logits: {r}");
            assert_eq!(argmax(&probs), argmax(&logits), "{r}");
            (label, probs, logits)
        })
        .collect()
}

/// Starts `lora ARGS`, waits until `ready(metrics.jsonl text)` holds, sends
/// SIGINT (as Ctrl-C does) and waits for the process to end.
#[cfg(unix)]
fn interrupt_when(args: Vec<std::ffi::OsString>, metrics: &Path, ready: impl Fn(&str) -> bool) -> Run {
    let (mut cmd, argv) = command(args);
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("cannot start lora");
    let t0 = Instant::now();
    loop {
        if std::fs::read_to_string(metrics).map(|t| ready(&t)).unwrap_or(false) {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("lora ended ({status}) before the point of interruption was reached");
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "point of interruption not reached within 60 s");
        std::thread::sleep(Duration::from_millis(2));
    }
    let k = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(k.success(), "kill -INT failed");
    from_output(child.wait_with_output().unwrap(), argv)
}

/// Checks an interrupted run: exit 130, a hint to resume, an unfinished
/// checkpoint. Returns the step it stopped at.
fn check_interrupted(r: &Run, out: &Path, total: u64) -> u64 {
    assert_eq!(
        r.code, 130,
        "expected exit 130 after SIGINT (0 means training finished before the signal landed):\n{}",
        r.describe()
    );
    assert!(!r.stderr.contains("panicked"), "{}", r.describe());
    assert!(r.stderr.contains("lora train --resume"), "{}", r.describe());
    assert_eq!(r.json()["outcome"], "interrupted", "{}", r.describe());
    let st = read_json(&out.join("checkpoint/trainer_state.json"));
    let step = st["step"].as_u64().unwrap();
    assert!(step >= 1 && step < total, "stopped at step {step}");
    assert_eq!(st["finished"], false);
    assert_eq!(r.json()["steps"].as_u64(), Some(step), "{}", r.describe());
    // The log holds nothing past the checkpoint.
    let last = train_losses(&out.join("metrics.jsonl")).last().map(|l| l.0).unwrap_or(0);
    assert!(last <= step, "log reaches step {last}, checkpoint is at {step}");
    step
}

#[test]
fn train_eval_predict_inspect_merge() {
    let dir = TempDir::new("happy");
    let m = model_dir();
    let rows = toy_rows(&["pos", "neg", "neu"], 14); // 42 rows
    let train = dir.file("train.csv", csv(&rows));
    // Validation rows from other word/frame combinations.
    let valid = dir.file("valid.csv", csv(&toy_rows(&["pos", "neg", "neu"], 18)[42..]));
    let out = dir.join("run");

    let r = lora(train_args(&m, &train, &out, &["--epochs", "40", "--seed", "0", "--valid"]).into_iter().chain(args![&valid]));
    let r = r.ok();
    assert!(r.stderr.contains("finished after 240 steps"), "{}", r.describe());

    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "labels.json",
        "lora_task.json",
        "metrics.jsonl",
        "training.svg",
        "confusion_valid.svg",
        "run_config.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing in {}", out.display());
    }
    assert!(out.join("checkpoint").is_dir());
    assert!(out.join("checkpoint/trainer_state.json").is_file());
    assert!(out.join("checkpoint/state.safetensors").is_file());

    // PEFT's adapter config.
    let c = read_json(&out.join("adapter_config.json"));
    assert_eq!(c["peft_type"], "LORA");
    assert_eq!(c["task_type"], "SEQ_CLS");
    assert_eq!(c["r"], 8);
    assert_eq!(c["lora_alpha"].as_f64(), Some(16.0));
    assert_eq!(sorted_strings(&c["target_modules"]), ["query", "value"]);
    assert!(c["modules_to_save"].as_array().unwrap().iter().any(|m| m == "classifier"), "{c}");
    assert_eq!(c["use_dora"], false);
    assert_eq!(read_json(&out.join("labels.json")), serde_json::json!(["neg", "neu", "pos"]));
    let task = read_json(&out.join("lora_task.json"));
    assert_eq!(task["task"], "classify");
    assert_eq!(task["max_len"], 32);
    let run_cfg = read_json(&out.join("run_config.json"));
    assert_eq!(run_cfg["epochs"], 40);
    assert_eq!(run_cfg["seed"], 0);
    let state = read_json(&out.join("checkpoint/trainer_state.json"));
    assert_eq!(state["step"], 240);
    assert_eq!(state["finished"], true);

    // metrics.jsonl: train and eval lines (one eval per epoch).
    let losses = train_losses(&out.join("metrics.jsonl"));
    assert!(!losses.is_empty());
    assert_eq!(losses.last().unwrap().0, 240, "the last step is logged");
    let evals = eval_records(&out.join("metrics.jsonl"));
    assert_eq!(evals.len(), 40);
    for e in &evals {
        for k in ["accuracy", "macro_f1", "loss"] {
            assert!(e[k].as_f64().is_some_and(f64::is_finite), "{k} in {e}");
        }
    }
    for svg in ["training.svg", "confusion_valid.svg"] {
        let text = std::fs::read_to_string(out.join(svg)).unwrap();
        assert!(text.contains("<svg"), "{svg} is not an SVG");
    }

    // eval --json on the training file: the toy task is learnt.
    let plot = dir.join("confusion.svg");
    let r = lora(args!["eval", "--model", &m, "--adapter", &out, "--data", &train, "--json", "--plot", &plot]).ok();
    let ev = r.json();
    let acc = ev["accuracy"].as_f64().unwrap();
    // 0.93 here (1 or 2 threads); chance is 0.33.
    assert!(acc >= 0.8, "accuracy {acc} on the training data:\n{}", r.describe());
    assert!(ev["macro_f1"].as_f64().unwrap() >= 0.75, "{ev}");
    assert!(ev["loss"].as_f64().unwrap().is_finite(), "{ev}");
    assert_eq!(ev["n"], 42);
    let per_class = ev["per_class"].as_array().unwrap();
    assert_eq!(per_class.len(), 3);
    let per_labels: Vec<&str> = per_class.iter().map(|c| c["label"].as_str().unwrap()).collect();
    assert_eq!(per_labels, ["neg", "neu", "pos"]);
    let conf: Vec<Vec<u64>> = serde_json::from_value(ev["confusion"].clone()).unwrap();
    assert_eq!(conf.len(), 3);
    assert!(conf.iter().all(|r| r.len() == 3));
    assert_eq!(conf.iter().flatten().sum::<u64>(), 42);
    assert!(std::fs::read_to_string(&plot).unwrap().contains("<svg"));

    // predict: one object per row, probabilities that sum to 1.
    let preds = dir.join("p.jsonl");
    lora(args!["predict", "--model", &m, "--adapter", &out, "--data", &train, "--out", &preds]).ok();
    let p = read_predictions(&preds, rows.len(), &["neg", "neu", "pos"]);
    let agree = p.iter().zip(&rows).filter(|(p, r)| p.0 == r.1).count();
    assert!((agree as f64 / rows.len() as f64 - acc).abs() < 1e-12, "predict and eval agree: {agree}/{} vs {acc}", rows.len());

    // predict without a label column in the data, to stdout.
    let texts = dir.file("texts.csv", "text\nwhat a great film\nthe movie was terrible\n");
    let r = lora(args!["predict", "--model", &m, "--adapter", &out, "--data", &texts]).ok();
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", r.describe());

    // inspect: adapter and model folders.
    let ia = lora(args!["inspect", &out, "--json"]).ok().json();
    assert_eq!(ia["kind"], "adapter");
    assert_eq!(ia["task_type"], "SEQ_CLS");
    assert_eq!(ia["r"], 8);
    assert_eq!(ia["lora_alpha"].as_f64(), Some(16.0));
    assert_eq!(sorted_strings(&ia["target_names"]), ["query", "value"]);
    assert_eq!(ia["adapted_modules"], 4, "query+value in 2 layers: {ia}");
    assert_eq!(ia["labels"], serde_json::json!(["neg", "neu", "pos"]));
    // 4 modules x r 8 x (32 + 32) + classifier 3x32+3
    assert_eq!(ia["lora_params"], 4 * 8 * 64, "{ia}");
    assert_eq!(ia["head_params"], 3 * 32 + 3, "{ia}");
    assert!(ia["base_params"].as_u64().unwrap() > 0, "{ia}");
    let im = lora(args!["inspect", &m, "--json"]).ok().json();
    assert_eq!(im["kind"], "model");
    assert_eq!(im["layers"], 2);
    assert_eq!(im["hidden_size"], 32);
    assert_eq!(im["intermediate_size"], 64);
    assert_eq!(im["classifier_head"], true);
    assert_eq!(im["tokenizer"], true);
    let linear = sorted_strings(&im["linear_module_names"]);
    for n in ["query", "key", "value", "dense"] {
        assert!(linear.iter().any(|l| l == n), "{n} in {linear:?}");
    }
    // Plain-text inspect works too.
    let t = lora(args!["inspect", &out]).ok();
    assert!(t.stdout.contains("query") && t.stdout.contains("r=8"), "{}", t.describe());

    // merge, then predict with the merged model's own head.
    let merged = dir.join("merged");
    lora(args!["merge", "--model", &m, "--adapter", &out, "--out", &merged]).ok();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(merged.join(f).is_file(), "{f} missing in merged model");
    }
    let mc = read_json(&merged.join("config.json"));
    assert_eq!(mc["id2label"], serde_json::json!({"0": "neg", "1": "neu", "2": "pos"}));
    let mi = lora(args!["inspect", &merged, "--json"]).ok().json();
    assert_eq!(mi["classifier_head"], true);
    assert_eq!(mi["params"], im["params"], "merging keeps the parameter count");
    let preds_merged = dir.join("pm.jsonl");
    lora(args!["predict", "--model", &merged, "--data", &train, "--max-len", "32", "--out", &preds_merged]).ok();
    let pm = read_predictions(&preds_merged, rows.len(), &["neg", "neu", "pos"]);
    let mut worst = 0f64;
    for (i, (a, b)) in p.iter().zip(&pm).enumerate() {
        for (x, y) in a.2.iter().zip(&b.2) {
            worst = worst.max((x - y).abs());
        }
        assert_eq!(a.0, b.0, "row {i}: merged label differs");
    }
    assert!(worst < 1e-4, "merged logits differ from adapter logits by {worst}");
    // eval on the merged model (no --adapter) gives the same accuracy.
    let em = lora(args!["eval", "--model", &merged, "--data", &train, "--max-len", "32", "--json"]).ok().json();
    assert_eq!(em["accuracy"].as_f64(), Some(acc));
}

#[test]
fn same_seed_same_run() {
    let dir = TempDir::new("determinism");
    let m = model_dir();
    let train = dir.file("train.csv", csv(&toy_rows(&["pos", "neg", "neu"], 14)));
    let run = |name: &str, seed: &str| {
        let out = dir.join(name);
        lora(train_args(&m, &train, &out, &["--epochs", "3", "--seed", seed, "--log-every", "1"])).ok();
        out
    };
    let a = run("a", "0");
    let b = run("b", "0");
    let c = run("c", "1");

    let la = train_losses(&a.join("metrics.jsonl"));
    let lb = train_losses(&b.join("metrics.jsonl"));
    // 42 rows, 10% held out -> 37 (or 38) training rows -> 5 batches x 3 epochs.
    assert_eq!(la.len(), 15, "{la:?}");
    assert_eq!(la, lb, "train step/epoch/loss/lr differ between runs with the same seed");
    assert_eq!(eval_records(&a.join("metrics.jsonl")), eval_records(&b.join("metrics.jsonl")));
    for f in ["adapter_model.safetensors", "adapter_config.json", "labels.json", "checkpoint/state.safetensors"] {
        let x = std::fs::read(a.join(f)).unwrap();
        let y = std::fs::read(b.join(f)).unwrap();
        assert!(x == y, "{f} differs between runs with the same seed");
    }
    // The comparison is not vacuous: another seed gives another adapter.
    let x = std::fs::read(a.join("adapter_model.safetensors")).unwrap();
    let z = std::fs::read(c.join("adapter_model.safetensors")).unwrap();
    assert!(x != z, "seed 1 gave the same adapter as seed 0");
    assert_ne!(la, train_losses(&c.join("metrics.jsonl")));
}

/// Sends SIGINT to a running training, resumes it, and expects exactly what
/// an uninterrupted run with the same settings produces.
#[test]
#[cfg(unix)]
fn ctrl_c_checkpoint_and_exact_resume() {
    let dir = TempDir::new("resume");
    let m = model_dir();
    let train = dir.file("train.csv", csv(&toy_rows(&["pos", "neg", "neu"], 14)));
    // 37 training rows -> 5 batches/epoch; 40 epochs = 200 steps: long enough
    // (a second or more) that the signal lands mid-run.
    let settings: &[&str] = &["--epochs", "40", "--seed", "3", "--log-every", "1", "--json"];

    let full = dir.join("full");
    let r = lora(train_args(&m, &train, &full, settings)).ok();
    let total = r.json()["steps"].as_u64().unwrap();
    assert_eq!(total, 200);

    // First cut: as soon as one training step is logged (mid-epoch, before
    // any evaluation or saved adapter).
    let cut = dir.join("cut");
    let metrics = cut.join("metrics.jsonl");
    let r = interrupt_when(train_args(&m, &train, &cut, settings), &metrics, |log| log.contains("\"kind\":\"train\""));
    let first = check_interrupted(&r, &cut, total);

    // Second cut, during the resumed run: after two evaluations (so the best
    // metric, a saved adapter and eval lines must survive the resume).
    let r = interrupt_when(args!["train", "--resume", &cut, "--json"], &metrics, |log| {
        log.matches("\"kind\":\"eval\"").count() >= 2
    });
    let second = check_interrupted(&r, &cut, total);
    assert!(second > first, "second cut at step {second}, first at {first}");
    assert!(second >= 10, "second cut at step {second}, before two evaluations");
    eprintln!("interrupted at steps {first} and {second} of {total}");

    // Resume with only the folder: settings come from run_config.json.
    let r = lora(args!["train", "--resume", &cut, "--json"]).ok();
    assert_eq!(r.json()["steps"].as_u64(), Some(total), "{}", r.describe());
    assert_eq!(r.json()["outcome"], "finished");

    // Bit-exact: the final trainable state, the best adapter, and the log.
    for f in ["checkpoint/state.safetensors", "adapter_model.safetensors", "adapter_config.json", "labels.json"] {
        let x = std::fs::read(full.join(f)).unwrap();
        let y = std::fs::read(cut.join(f)).unwrap();
        assert!(x == y, "{f}: resumed run (interrupted at steps {first} and {second}) differs from the uninterrupted run");
    }
    let lf = train_losses(&full.join("metrics.jsonl"));
    let lc = train_losses(&cut.join("metrics.jsonl"));
    assert_eq!(lf.len(), total as usize);
    assert_eq!(lf, lc, "train log after resume (interrupted at steps {first} and {second})");
    assert_eq!(eval_records(&full.join("metrics.jsonl")), eval_records(&cut.join("metrics.jsonl")));
    let sf = read_json(&full.join("checkpoint/trainer_state.json"));
    let sc = read_json(&cut.join("checkpoint/trainer_state.json"));
    for k in ["step", "epoch", "best_metric", "best_step", "samples_seen", "finished"] {
        assert_eq!(sf[k], sc[k], "trainer_state.json {k}");
    }

    // Resuming a finished run has nothing left to do: it must not change
    // the adapter.
    let before = std::fs::read(cut.join("adapter_model.safetensors")).unwrap();
    let r = lora(args!["train", "--resume", &cut, "--json"]).ok();
    assert_eq!(r.json()["steps"].as_u64(), Some(total));
    assert_eq!(before, std::fs::read(cut.join("adapter_model.safetensors")).unwrap());
}

/// `--matmul-precision bf16` (AMX tiles): training learns the toy task, the
/// summary says bf16, and predictions stay within the bf16 bound of the f32
/// ones on the same adapter without being identical (the path is taken).
/// An unknown precision is a one-line usage error.
#[test]
fn bf16_matmul_precision_trains_and_predicts() {
    let r = lora(args!["--matmul-precision", "fp8", "bench"]);
    assert_eq!(r.code, 2, "{}", r.describe());
    let first = r.stderr.lines().next().unwrap_or("");
    assert!(first.starts_with("error: ") && ["fp8", "f32", "bf16"].iter().all(|n| first.contains(n)), "{}", r.describe());
    assert!(!r.stderr.contains("panicked"), "{}", r.describe());
    if !lora_core::amx::available() {
        eprintln!("skipped: no AMX-BF16 here");
        return;
    }
    let dir = TempDir::new("bf16");
    let m = model_dir();
    let rows = toy_rows(&["pos", "neg", "neu"], 14);
    let train = dir.file("train.csv", csv(&rows));
    let out = dir.join("run");
    let mut a = args!["--matmul-precision", "bf16"];
    a.extend(train_args(&m, &train, &out, &["--epochs", "40", "--seed", "0", "--json"]));
    let summary = lora(a).ok().json();
    assert_eq!(summary["matmul_precision"], "bf16", "{summary}");
    let ev = lora(args!["--matmul-precision", "bf16", "eval", "--model", &m, "--adapter", &out, "--data", &train, "--json"]).ok().json();
    let acc = ev["accuracy"].as_f64().unwrap();
    // 0.79 at seed 0 in both precisions; over seeds 0-2 this toy run lands
    // anywhere in 0.67-0.98 (dropout draws), so the bar is "clearly learnt".
    assert!(acc >= 0.7, "bf16 training accuracy {acc} on the training data (chance 0.33)");
    let p16 = dir.join("p16.jsonl");
    let p32 = dir.join("p32.jsonl");
    lora(args!["--matmul-precision", "bf16", "predict", "--model", &m, "--adapter", &out, "--data", &train, "--out", &p16]).ok();
    lora(args!["predict", "--model", &m, "--adapter", &out, "--data", &train, "--out", &p32]).ok();
    let a = read_predictions(&p16, rows.len(), &["neg", "neu", "pos"]);
    let b = read_predictions(&p32, rows.len(), &["neg", "neu", "pos"]);
    let mut worst = 0f64;
    for (x, y) in a.iter().zip(&b) {
        for (u, v) in x.1.iter().zip(&y.1) {
            worst = worst.max((u - v).abs());
        }
    }
    assert!(worst > 0.0, "bf16 predictions are identical to f32: the tile path was not taken");
    assert!(worst < 0.05, "bf16 probabilities differ from f32 by {worst}");
}

/// `--device`: a bad name and a CUDA device in a build without CUDA are
/// one-line usage errors (exit 2, no fall-back to the CPU); `auto` falls back
/// to the CPU here, and the summaries say where the model computed.
#[test]
fn device_option_is_checked_and_recorded() {
    let r = lora(args!["--device", "tpu", "bench", "--mode", "gemm"]);
    assert_eq!(r.code, 2, "{}", r.describe());
    let first = r.stderr.lines().next().unwrap_or("");
    assert!(first.starts_with("error: ") && first.contains("tpu") && first.contains("cuda:N"), "{}", r.describe());
    if !lora_core::device::cuda_built() {
        let r = lora(args!["--device", "cuda:1", "bench", "--mode", "gemm", "--sizes", "8", "--steps", "1"]);
        assert_eq!(r.code, 2, "{}", r.describe());
        let first = r.stderr.lines().next().unwrap_or("");
        assert!(first.contains("--device cuda:1") && first.contains("without CUDA support"), "{}", r.describe());
        assert!(!r.stderr.contains("panicked") && r.stdout.is_empty(), "{}", r.describe());
    }
    let g = lora(args!["--device", "auto", "bench", "--mode", "gemm", "--sizes", "8", "--steps", "1", "--json"]).ok().json();
    let want = if lora_core::device::cuda_built() { g["device"].as_str().unwrap_or("?").to_string() } else { "cpu".into() };
    assert_eq!(g["device"], want.as_str(), "{g}");
    let dir = TempDir::new("device");
    let m = model_dir();
    let train = dir.file("train.csv", csv(&toy_rows(&["pos", "neg"], 4)));
    let out = dir.join("run");
    let mut a = args!["--device", "cpu"];
    a.extend(train_args(&m, &train, &out, &["--epochs", "1", "--json"]));
    let summary = lora(a).ok().json();
    assert_eq!(summary["device"], "cpu", "{summary}");
}
