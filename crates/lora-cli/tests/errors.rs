//! Bad input to the `lora` binary: every case must fail with a non-zero exit
//! and exactly one stderr line `error: ...` that names the offending file,
//! key or value, without a panic or backtrace.

mod common;

use common::*;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// `lora train` on `model`/`train` into `out`, quiet (--json), 1 epoch
/// of batches of 8, max length 32 (unless `extra` says otherwise).
fn train(model: &Path, train: &Path, out: &Path, extra: &[&str]) -> Run {
    let mut a = args!["train", "--model", model, "--train", train, "--out", out, "--json"];
    // Defaults unless `extra` sets them.
    for (k, v) in [("--epochs", "1"), ("--batch-size", "8"), ("--max-len", "32")] {
        if !extra.iter().any(|e| e.split('=').next() == Some(k)) {
            a.extend(args![k, v]);
        }
    }
    a.extend(extra.iter().map(OsString::from));
    lora(a)
}

/// A folder with a good training file.
fn setup(name: &str) -> (TempDir, PathBuf) {
    let dir = TempDir::new(name);
    let t = dir.file("train.csv", csv(&toy_rows(&["pos", "neg", "neu"], 14)));
    (dir, t)
}

/// A copy of the tiny model in `dir/name`.
fn model_copy(dir: &TempDir, name: &str) -> PathBuf {
    let m = dir.join(name);
    copy_dir(&model_dir(), &m);
    m
}

/// A quickly trained adapter in `dir/name`.
fn trained(dir: &TempDir, train_csv: &Path, name: &str) -> PathBuf {
    let out = dir.join(name);
    train(&model_dir(), train_csv, &out, &[]).ok();
    out
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

// ---- model folder ----

#[test]
fn missing_model_dir() {
    let (dir, t) = setup("nomodel");
    let m = dir.join("no_such_model");
    let r = train(&m, &t, &dir.join("out"), &[]);
    r.clean_error(&[&s(&m), "not found"]);
    assert!(!dir.join("out").exists(), "nothing is written for a failed start");
    // The same for eval, predict, merge and inspect.
    lora(args!["eval", "--model", &m, "--data", &t]).clean_error(&[&s(&m)]);
    lora(args!["predict", "--model", &m, "--data", &t]).clean_error(&[&s(&m)]);
    lora(args!["inspect", &m]).clean_error(&[&s(&m)]);
    let a = trained(&dir, &t, "adapter");
    lora(args!["merge", "--model", &m, "--adapter", &a, "--out", dir.join("merged")]).clean_error(&[&s(&m)]);
}

#[test]
fn model_dir_without_config() {
    let (dir, t) = setup("noconfig");
    let m = model_copy(&dir, "model");
    std::fs::remove_file(m.join("config.json")).unwrap();
    train(&m, &t, &dir.join("out"), &[]).clean_error(&[&s(&m.join("config.json")), "not found"]);
}

#[test]
fn model_config_not_json() {
    let (dir, t) = setup("badconfig");
    let m = model_copy(&dir, "model");
    std::fs::write(m.join("config.json"), "{\"hidden_size\": 32,").unwrap();
    train(&m, &t, &dir.join("out"), &[]).clean_error(&[&s(&m.join("config.json"))]);
}

#[test]
fn corrupt_model_weights() {
    let (dir, t) = setup("corrupt");
    let m = model_copy(&dir, "model");
    let w = m.join("model.safetensors");
    // Garbage.
    std::fs::write(&w, b"this is not a safetensors file at all, just some text bytes").unwrap();
    let e = train(&m, &t, &dir.join("out"), &[]).clean_error(&[&s(&w), "safetensors"]);
    assert!(!e.contains("tensor ''"), "{e}");
    lora(args!["inspect", &m, "--json"]).clean_error(&[&s(&w)]);
    // Truncated: a valid header whose data runs past the end of the file.
    let full = std::fs::read(model_dir().join("model.safetensors")).unwrap();
    std::fs::write(&w, &full[..full.len() / 2]).unwrap();
    train(&m, &t, &dir.join("out"), &[]).clean_error(&[&s(&w), "safetensors"]);
    // Empty.
    std::fs::write(&w, b"").unwrap();
    train(&m, &t, &dir.join("out"), &[]).clean_error(&[&s(&w)]);
}

#[test]
fn model_weights_disagree_with_config() {
    let (dir, t) = setup("shapes");
    for (field, from, to, key) in [
        ("intermediate_size", "\"intermediate_size\": 64", "\"intermediate_size\": 48", "intermediate.dense.weight"),
        ("hidden_size", "\"hidden_size\": 32", "\"hidden_size\": 16", "embeddings"),
    ] {
        let m = model_copy(&dir, field);
        let cfg = m.join("config.json");
        let text = std::fs::read_to_string(&cfg).unwrap();
        assert!(text.contains(from), "fixture config.json changed: no {from}");
        std::fs::write(&cfg, text.replace(from, to)).unwrap();
        train(&m, &t, &dir.join("out"), &[]).clean_error(&[&s(&m.join("model.safetensors")), key, "shape"]);
    }
}

/// A 2-label task on a base model whose classifier has 3 outputs: like
/// transformers with ignore_mismatched_sizes, training starts from a new head
/// and says so.
#[test]
fn label_count_differs_from_base_head() {
    let dir = TempDir::new("headsize");
    let t = dir.file("train.csv", csv(&toy_rows(&["pos", "neg"], 20)));
    let r = train(&model_dir(), &t, &dir.join("out"), &["--epochs", "1"]).ok();
    assert!(r.stderr.contains("starting from a new head"), "{}", r.describe());
    let labels = read_json(&dir.join("out").join("labels.json"));
    assert_eq!(labels, serde_json::json!(["neg", "pos"]));
}

// ---- LoRA settings ----

#[test]
fn unknown_target_module() {
    let (dir, t) = setup("targets");
    train(&model_dir(), &t, &dir.join("out"), &["--targets", "foo"]).clean_error(&["'foo'", "query"]);
    let e = train(&model_dir(), &t, &dir.join("out2"), &["--targets", "re:(["]).clean_error(&["(["]);
    assert!(e.contains("unclosed"), "the regex error says why: {e}");
}

#[test]
fn rank_zero() {
    let (dir, t) = setup("rank0");
    train(&model_dir(), &t, &dir.join("out"), &["--rank", "0"]).clean_error(&["r=0"]);
}

#[test]
fn rank_larger_than_layer() {
    let (dir, t) = setup("rank100");
    train(&model_dir(), &t, &dir.join("out"), &["--rank", "100"]).clean_error(&["100", "32"]);
}

#[test]
fn bad_numeric_options() {
    let (dir, t) = setup("options");
    let m = model_dir();
    for (i, (opt, val)) in [
        ("--lr", "nan"),
        ("--lr", "inf"),
        ("--lr", "0"),
        ("--lr=-1e-3", "-1e-3"),
        ("--epochs", "0"),
        ("--batch-size", "0"),
        ("--max-len", "1"),
        ("--warmup-ratio", "1.5"),
        ("--dropout", "1.5"),
        ("--valid-fraction", "1.5"),
        ("--metric", "bleu"),
        ("--schedule", "sawtooth"),
        ("--init", "zeros"),
        ("--head", "max"),
        ("--task", "translate"),
    ]
    .into_iter()
    .enumerate()
    {
        let out = dir.join(&format!("out{i}"));
        let args: Vec<&str> = if opt.contains('=') { vec![opt] } else { vec![opt, val] };
        let e = train(&m, &t, &out, &args).clean_error(&[]);
        let opt = opt.split('=').next().unwrap();
        assert!(
            e.contains(opt) || e.to_lowercase().contains(&val.to_lowercase()),
            "{opt} {val}: error names neither the option nor the value: {e}"
        );
    }
}

#[test]
fn threads_zero() {
    lora(args!["--threads", "0", "inspect", model_dir()]).clean_error(&["--threads"]);
    let (dir, t) = setup("threads");
    train(&model_dir(), &t, &dir.join("out"), &["--threads", "0"]).clean_error(&["--threads"]);
    // A positive count works.
    lora(args!["--threads", "1", "inspect", model_dir(), "--json"]).ok();
}

// ---- data files ----

#[test]
fn empty_csv() {
    let dir = TempDir::new("empty");
    let f = dir.file("empty.csv", "");
    train(&model_dir(), &f, &dir.join("out"), &[]).clean_error(&[&s(&f), "empty"]);
    let f = dir.file("header_only.csv", "text,label\n");
    train(&model_dir(), &f, &dir.join("out"), &[]).clean_error(&[&s(&f), "no data rows"]);
}

#[test]
fn ragged_csv_row() {
    let dir = TempDir::new("ragged");
    let mut text = csv(&toy_rows(&["pos", "neg", "neu"], 5));
    text.push_str("\"one more\",pos,surplus\n");
    let f = dir.file("ragged.csv", text);
    train(&model_dir(), &f, &dir.join("out"), &[]).clean_error(&[&s(&f), "line 17", "3 fields"]);
}

#[test]
fn missing_text_column() {
    let dir = TempDir::new("notext");
    let f = dir.file("t.csv", csv(&toy_rows(&["pos", "neg"], 5)).replacen("text,label", "sentence,label", 1));
    train(&model_dir(), &f, &dir.join("out"), &[]).clean_error(&[&s(&f), "'text'", "sentence"]);
    // --text-column names it.
    let e = train(&model_dir(), &f, &dir.join("out"), &["--text-column", "review"]).clean_error(&[&s(&f)]);
    assert!(e.contains("'review'"), "{e}");
}

#[test]
fn missing_label_column() {
    let dir = TempDir::new("nolabel");
    let f = dir.file("t.csv", csv(&toy_rows(&["pos", "neg"], 5)).replacen("text,label", "text,sentiment", 1));
    train(&model_dir(), &f, &dir.join("out"), &[]).clean_error(&[&s(&f), "'label'", "sentiment"]);
}

#[test]
fn non_utf8_csv() {
    let dir = TempDir::new("latin1");
    let mut bytes = b"text,label\nthe movie was good,pos\n".to_vec();
    bytes.extend_from_slice(b"caf\xe9 food was bad,neg\n");
    let f = dir.file("latin1.csv", bytes);
    train(&model_dir(), &f, &dir.join("out"), &[]).clean_error(&[&s(&f), "line 3", "UTF-8"]);
}

#[test]
fn only_one_label() {
    let dir = TempDir::new("onelabel");
    let f = dir.file("one.csv", csv(&toy_rows(&["pos"], 20)));
    train(&model_dir(), &f, &dir.join("out"), &[]).clean_error(&[&s(&f), "only one label", "pos"]);
}

#[test]
fn unknown_data_extension() {
    let dir = TempDir::new("ext");
    let f = dir.file("data.parquet", "x");
    train(&model_dir(), &f, &dir.join("out"), &[]).clean_error(&[&s(&f), ".parquet"]);
}

#[test]
fn eval_label_unseen_in_training() {
    let (dir, t) = setup("unseen");
    let a = trained(&dir, &t, "adapter");
    let mut text = csv(&toy_rows(&["pos", "neg"], 3));
    text.push_str("\"so so\",meh\n");
    let f = dir.file("eval.csv", text);
    lora(args!["eval", "--model", model_dir(), "--adapter", &a, "--data", &f]).clean_error(&[&s(&f), "'meh'", "line 8"]);
    // A --valid file with an unseen label is refused before training.
    train(&model_dir(), &t, &dir.join("out2"), &["--valid", &s(&f)]).clean_error(&[&s(&f), "'meh'"]);
}

// ---- adapters ----

#[test]
fn missing_adapter_dir() {
    let (dir, t) = setup("noadapter");
    let a = dir.join("no_such_adapter");
    lora(args!["eval", "--model", model_dir(), "--adapter", &a, "--data", &t]).clean_error(&[&s(&a), "not found"]);
    lora(args!["predict", "--model", model_dir(), "--adapter", &a, "--data", &t]).clean_error(&[&s(&a)]);
    lora(args!["merge", "--model", model_dir(), "--adapter", &a, "--out", dir.join("m")]).clean_error(&[&s(&a)]);
    // A folder without adapter_config.json.
    let empty = dir.join("empty_adapter");
    std::fs::create_dir_all(&empty).unwrap();
    lora(args!["eval", "--model", model_dir(), "--adapter", &empty, "--data", &t]).clean_error(&["adapter_config.json"]);
}

#[test]
fn adapter_with_dora() {
    let (dir, t) = setup("dora");
    let a = trained(&dir, &t, "adapter");
    let cfg = a.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains("\"use_dora\": false"));
    std::fs::write(&cfg, text.replace("\"use_dora\": false", "\"use_dora\": true")).unwrap();
    for cmd in ["eval", "predict"] {
        lora(args![cmd, "--model", model_dir(), "--adapter", &a, "--data", &t]).clean_error(&["use_dora"]);
    }
    lora(args!["merge", "--model", model_dir(), "--adapter", &a, "--out", dir.join("m")]).clean_error(&["use_dora"]);
    lora(args!["inspect", &a]).clean_error(&["use_dora"]);
}

#[test]
fn adapter_with_corrupt_weights() {
    let (dir, t) = setup("badadapter");
    let a = trained(&dir, &t, "adapter");
    let w = a.join("adapter_model.safetensors");
    let full = std::fs::read(&w).unwrap();
    std::fs::write(&w, &full[..full.len() - 16]).unwrap();
    lora(args!["eval", "--model", model_dir(), "--adapter", &a, "--data", &t]).clean_error(&[&s(&w)]);
    let cfg = a.join("adapter_config.json");
    std::fs::write(&cfg, "{ not json").unwrap();
    lora(args!["eval", "--model", model_dir(), "--adapter", &a, "--data", &t]).clean_error(&[&s(&cfg)]);
}

// ---- training runs ----

/// A huge learning rate makes the loss NaN: a clean error that mentions the
/// loss, and the best adapter saved before stays usable.
#[test]
fn loss_becomes_nan() {
    let (dir, t) = setup("nan");
    let out = dir.join("out");
    // Step 0 is warm-up (lr 0), evaluated and saved at step 1; step 1 uses
    // lr 1e30 and the weights blow up.
    let r = train(&model_dir(), &t, &out, &["--lr", "1e30", "--eval-every", "1"]);
    let e = r.clean_error(&["loss"]);
    assert!(e.contains("NaN") || e.contains("inf"), "{e}");
    for f in ["adapter_config.json", "adapter_model.safetensors", "labels.json", "lora_task.json", "run_config.json"] {
        assert!(out.join(f).is_file(), "{f} missing after the NaN stop");
    }
    assert!(out.join("checkpoint/trainer_state.json").is_file());
    let ev = lora(args!["eval", "--model", model_dir(), "--adapter", &out, "--data", &t, "--json"]).ok().json();
    assert!(ev["loss"].as_f64().is_some_and(f64::is_finite), "the kept adapter is the last good one: {ev}");
    // The metrics log is still readable; a NaN is written as null.
    let _ = jsonl(&out.join("metrics.jsonl"));
}

#[test]
fn train_twice_into_same_out() {
    let (dir, t) = setup("twice");
    let out = dir.join("run");
    train(&model_dir(), &t, &out, &[]).ok();
    let before = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    train(&model_dir(), &t, &out, &["--seed", "5"]).clean_error(&[&s(&out), "--overwrite", "--resume"]);
    assert_eq!(before, std::fs::read(out.join("adapter_model.safetensors")).unwrap(), "refused run wrote nothing");
    // --overwrite replaces it.
    train(&model_dir(), &t, &out, &["--seed", "5", "--overwrite"]).ok();
    assert_ne!(before, std::fs::read(out.join("adapter_model.safetensors")).unwrap());
}

#[test]
fn resume_without_run() {
    let dir = TempDir::new("noresume");
    let d = dir.join("nothing");
    std::fs::create_dir_all(&d).unwrap();
    lora(args!["train", "--resume", &d]).clean_error(&[&s(&d.join("run_config.json"))]);
}

#[test]
fn inspect_unknown_folder() {
    let dir = TempDir::new("inspect");
    lora(args!["inspect", dir.path()]).clean_error(&[&s(dir.path()), "config.json"]);
}
