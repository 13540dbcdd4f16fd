//! Extraction, compression and analysis on the tiny BERT fixture with known
//! low-rank updates, and the bad-input errors.

use candle_core::{Device, Tensor};
use lora_core::TargetSpec;
use lora_lowrank::analyze::{analyze_adapter, subspace_similarity};
use lora_lowrank::compress::compress_model;
use lora_lowrank::extract::to_adapter;
use lora_lowrank::{extract, ModelWeights, RankRule, SvdSolver};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-bert/model")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lora-lowrank-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn randn(shape: (usize, usize), seed: u64) -> Tensor {
    let m = lora_lowrank::svd::gaussian(shape.0, shape.1, seed);
    lora_lowrank::svd::mat_to_tensor(m.as_ref(), &Device::Cpu).unwrap()
}

/// A copy of tiny-bert where `updates` (key -> rank) get a random update of that rank.
fn tuned_copy(name: &str, updates: &[(&str, usize)]) -> (PathBuf, HashMap<String, Tensor>) {
    let dir = tmp(name);
    for f in ["config.json", "tokenizer.json", "vocab.txt"] {
        std::fs::copy(tiny().join(f), dir.join(f)).unwrap();
    }
    let mut t = candle_core::safetensors::load(tiny().join("model.safetensors"), &Device::Cpu).unwrap();
    let mut deltas = HashMap::new();
    for (i, (k, r)) in updates.iter().enumerate() {
        let w = t[*k].clone();
        let (o, n) = w.dims2().unwrap();
        let d = (randn((o, *r), 10 + i as u64).matmul(&randn((*r, n), 50 + i as u64)).unwrap() * 0.01).unwrap();
        t.insert(k.to_string(), (&w + &d).unwrap());
        deltas.insert(k.trim_end_matches(".weight").to_string(), d);
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    (dir, deltas)
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

const Q0: &str = "bert.encoder.layer.0.attention.self.query.weight";
const V1: &str = "bert.encoder.layer.1.attention.self.value.weight";

#[test]
fn extraction_recovers_known_low_rank_updates() {
    let (dir, deltas) = tuned_copy("extract", &[(Q0, 3), (V1, 5)]);
    let base = ModelWeights::open(&tiny()).unwrap();
    let tuned = ModelWeights::open(&dir).unwrap();
    let spec = TargetSpec::parse("query,value").unwrap();
    let heads = vec!["classifier".to_string()];
    // Energy 1.0: each module gets exactly its true rank (0-updates get rank 1).
    let rep = extract(&base, &tuned, &spec, &heads, RankRule::Energy(0.999999), SvdSolver::Exact).unwrap();
    let by: HashMap<_, _> = rep.modules.iter().map(|m| (m.module.clone(), m)).collect();
    assert_eq!(by["bert.encoder.layer.0.attention.self.query"].rank, 3);
    assert_eq!(by["bert.encoder.layer.1.attention.self.value"].rank, 5);
    let (cfg, tensors) = to_adapter(&rep, "tiny");
    let out = dir.join("adapter");
    lora_peft::save_adapter(&out, &cfg, &tensors, &[]).unwrap();
    let ad = lora_peft::load_adapter(&out, &Device::Cpu).unwrap();
    for (m, d) in &deltas {
        let (a, b) = ad.lora_pair(m).unwrap();
        let got = (b.matmul(a).unwrap() * ad.config.scaling_for(m)).unwrap();
        assert!(max_abs(&got, d) < 1e-5, "{m}: {}", max_abs(&got, d));
    }
    assert_eq!(cfg.rank_pattern.len(), 2, "ranks 3 and 5 differ from the common rank 1");
    // A fixed rank below the true rank keeps less than all the energy.
    let rep = extract(&base, &tuned, &spec, &heads, RankRule::Fixed(2), SvdSolver::Exact).unwrap();
    let m = rep.modules.iter().find(|m| m.module.ends_with("layer.1.attention.self.value")).unwrap();
    assert!(m.energy < 0.99 && m.energy > 0.2, "{}", m.energy);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_inputs_are_one_line_errors() {
    let base = ModelWeights::open(&tiny()).unwrap();
    let heads = vec!["classifier".to_string()];
    let spec = TargetSpec::parse("query").unwrap();
    let e = extract(&base, &base, &spec, &heads, RankRule::Fixed(0), SvdSolver::Exact).unwrap_err().to_string();
    assert_eq!(e, "rank 0 is out of range (must be at least 1)");
    let e = extract(&base, &base, &spec, &heads, RankRule::Fixed(33), SvdSolver::Exact).unwrap_err().to_string();
    assert_eq!(e, "bert.encoder.layer.0.attention.self.query: rank 33 is out of range for a 32x32 matrix (must be 1..=32)");
    for bad in [0.0, 1.5, f64::NAN] {
        assert!(extract(&base, &base, &spec, &heads, RankRule::Energy(bad), SvdSolver::Exact).unwrap_err().to_string().starts_with("energy"));
    }
    // A tuned model whose query has another shape.
    let dir = tmp("shape");
    for f in ["config.json", "tokenizer.json", "vocab.txt"] {
        std::fs::copy(tiny().join(f), dir.join(f)).unwrap();
    }
    let mut t = candle_core::safetensors::load(tiny().join("model.safetensors"), &Device::Cpu).unwrap();
    t.insert(Q0.into(), randn((16, 32), 1));
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    let tuned = ModelWeights::open(&dir).unwrap();
    let e = extract(&base, &tuned, &spec, &heads, RankRule::Fixed(2), SvdSolver::Exact).unwrap_err().to_string();
    assert_eq!(e, "bert.encoder.layer.0.attention.self.query: base has shape [32, 32] but tuned has shape [16, 32]");
    // A tuned model without one of the base's tensors.
    t.remove(Q0);
    t.insert(Q0.replace("query", "querx"), randn((32, 32), 1));
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    let tuned = ModelWeights::open(&dir).unwrap();
    let e = extract(&base, &tuned, &spec, &heads, RankRule::Fixed(2), SvdSolver::Exact).unwrap_err().to_string();
    assert!(e.starts_with(&format!("{Q0}: present in ")), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn compression_reports_sizes_and_errors() {
    let model = ModelWeights::open(&tiny()).unwrap();
    let out = tmp("compress");
    let rep = compress_model(&model, &TargetSpec::parse("all-linear").unwrap(), &["classifier".into()], RankRule::Fixed(4), SvdSolver::Exact, &out).unwrap();
    assert!(rep.modules.iter().all(|m| m.factored && m.rank == 4));
    assert!(rep.params_after < rep.params_before);
    assert!(rep.bytes_after > 0 && rep.bytes_after < rep.bytes_before);
    for m in &rep.modules {
        // ‖W − W_r‖_F / ‖W‖_F = sqrt(1 − retained energy) (Eckart–Young).
        assert!((m.relative_error - (1.0 - m.energy).sqrt()).abs() < 1e-4, "{}", m.module);
    }
    // The dense output loads as a model folder with the same keys.
    let back = ModelWeights::open(&out).unwrap();
    assert_eq!(back.keys(), model.keys());
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn analysis_spectrum_and_similarity() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/lowrank/adapters/a1");
    let ad = lora_peft::load_adapter(&dir, &Device::Cpu).unwrap();
    let spectra = analyze_adapter(&ad).unwrap();
    for s in &spectra {
        let (a, b) = ad.lora_pair(&s.module).unwrap();
        let d = (b.matmul(a).unwrap() * s.scaling).unwrap();
        let want = lora_lowrank::svd::singular_values("d", lora_lowrank::svd::tensor_to_mat(&d).unwrap().as_ref()).unwrap();
        for (x, y) in s.singular_values.iter().zip(&want) {
            assert!((x - y).abs() <= 1e-4 * want[0], "{}: {x} vs {y}", s.module);
        }
        assert!(s.entropy_rank >= 1.0 && s.entropy_rank <= s.rank as f64 + 1e-9);
        assert!(s.rank90 >= 1 && s.rank90 <= s.rank);
    }
    let (a, _) = ad.lora_pair(&spectra[0].module).unwrap();
    let same = subspace_similarity("m", a, a).unwrap();
    for k in 0..same.r1 {
        assert!((same.phi[k][k] - 1.0).abs() < 1e-5);
    }
    let other = randn((4, 32), 99);
    let sim = subspace_similarity("m", a, &other).unwrap();
    // Random 4-dim subspaces of R^32 overlap by about 4/32 on average.
    assert!(sim.phi[3][3] < 0.6 && sim.phi[3][3] >= 0.0);
}
