//! lora-lowrank against numpy / PyTorch / PEFT 0.21 references dumped by
//! tests/fixtures/lowrank/make_lowrank.py.

use candle_core::{Device, Tensor};
use lora_lowrank::svd::{randomized_svd, singular_values, tensor_to_mat, RsvdParams};
use lora_lowrank::{combine, CombineMethod, MajoritySign, Weighted};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/lowrank")
}

fn load(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(name), &Device::Cpu).unwrap()
}

fn adapter(rel: &str) -> lora_peft::LoadedAdapter {
    lora_peft::load_adapter(&fixtures().join(rel), &Device::Cpu).unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

#[test]
fn singular_values_match_numpy() {
    // numpy.linalg.svd(float64(X)); ours in f32. Relative 1e-4 on every value
    // at least 1e-3 of the largest; below that, absolute 1e-7 of the largest
    // (f32 cannot resolve a relative 1e-4 of values under ~1e-3·σ₁).
    let t = load("svd.safetensors");
    for name in ["m0", "m1", "m2", "rs"] {
        let x = tensor_to_mat(&t[name]).unwrap();
        let ours = singular_values(name, x.as_ref()).unwrap();
        let want: Vec<f32> = t[&format!("{name}_s")].to_vec1().unwrap();
        assert_eq!(ours.len(), want.len());
        let top = want[0];
        for (i, (o, w)) in ours.iter().zip(&want).enumerate() {
            if *w >= 1e-3 * top {
                assert!(((o - w) / w).abs() <= 1e-4, "{name} s[{i}]: {o} vs {w}");
            } else {
                assert!((o - w).abs() <= 1e-7 * top, "{name} s[{i}]: {o} vs {w}");
            }
        }
    }
}

#[test]
fn randomized_svd_is_near_optimal() {
    // Optimal rank-16 error sqrt(Σ_{i≥16} σᵢ²) from numpy; ours within 1.05x
    // with 10 oversampling columns and 2 power iterations, for 5 seeds.
    let t = load("svd.safetensors");
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("svd.json")).unwrap()).unwrap();
    let r = meta["rs_rank"].as_u64().unwrap() as usize;
    let opt = meta["rs_optimal_error"].as_f64().unwrap();
    let x = tensor_to_mat(&t["rs"]).unwrap();
    for seed in 0..5 {
        let s = randomized_svd("rs", x.as_ref(), r, RsvdParams { oversample: 10, power_iters: 2, seed }).unwrap();
        let err = lora_lowrank::svd::frob_diff(s.reconstruct().as_ref(), x.as_ref());
        assert!(err <= 1.05 * opt, "seed {seed}: {err} vs optimal {opt}");
    }
}

/// Each factor pair equal to PEFT's up to a joint sign flip of component i.
fn assert_pairs_up_to_sign(a: &Tensor, b: &Tensor, ra: &Tensor, rb: &Tensor, tol: f32) {
    let r = a.dim(0).unwrap();
    for i in 0..r {
        let (ai, rai) = (a.get(i).unwrap(), ra.get(i).unwrap());
        let (bi, rbi) = (b.narrow(1, i, 1).unwrap(), rb.narrow(1, i, 1).unwrap());
        let same = max_abs(&ai, &rai).max(max_abs(&bi, &rbi));
        let flip = max_abs(&ai, &rai.neg().unwrap()).max(max_abs(&bi, &rbi.neg().unwrap()));
        assert!(same.min(flip) <= tol, "component {i}: {same} / {flip}");
    }
}

#[test]
fn pissa_and_olora_init_match_peft() {
    use lora_lowrank::init::init_tensors;
    use lora_lowrank::WeightInit;
    let t = load("init.safetensors");
    let scaling = 8.0 / 4.0;
    let (a, b, w) = init_tensors("lin", &t["w"], 4, scaling, WeightInit::Pissa).unwrap();
    assert_pairs_up_to_sign(&a, &b, &t["pissa_A"], &t["pissa_B"], 1e-4);
    assert!(max_abs(&w, &t["pissa_W"]) < 1e-5);
    let (a, b, w) = init_tensors("lin", &t["w"], 4, scaling, WeightInit::Olora).unwrap();
    assert_pairs_up_to_sign(&a, &b, &t["olora_A"], &t["olora_B"], 1e-4);
    assert!(max_abs(&w, &t["olora_W"]) < 1e-5);
    // pissa_niter_N: residual + s·B·A is W exactly; the top-4 part is close to PEFT's exact one.
    let (a, b, w) = init_tensors("lin", &t["w"], 4, scaling, WeightInit::PissaNiter { niter: 16, seed: 0 }).unwrap();
    let back = (&w + (b.matmul(&a).unwrap() * scaling).unwrap()).unwrap();
    assert!(max_abs(&back, &t["w"]) < 1e-5);
    // Its rank-4 error is near PEFT's exact PiSSA residual (a flat Gaussian
    // spectrum, no oversampling: within 1.1x).
    let norm = |x: &Tensor| x.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
    let (ours, best) = (norm(&w), norm(&t["pissa_W"]));
    assert!(ours <= 1.1 * best, "{ours} vs {best}");
}

#[test]
fn pissa_conversion_matches_peft_save_pretrained() {
    let (cfg, tensors) = lora_lowrank::convert_to_plain_lora(&adapter("pissa_initial"), &adapter("pissa_trained")).unwrap();
    let want = adapter("pissa_converted");
    assert_eq!(cfg.r, want.config.r);
    assert_eq!(cfg.lora_alpha, want.config.lora_alpha);
    assert_eq!(cfg.init_lora_weights, want.config.init_lora_weights);
    assert_eq!(tensors.len(), want.tensors.len());
    for (k, v) in &tensors {
        assert!(max_abs(v, &want.tensors[k]) == 0.0, "{k}");
    }
}

fn check_combination(name: &str, inputs: &[(&str, f64)], method: CombineMethod, product_only: bool) {
    let ads: Vec<(String, lora_peft::LoadedAdapter)> = inputs.iter().map(|(n, _)| (n.to_string(), adapter(&format!("adapters/{n}")))).collect();
    let w: Vec<Weighted> = ads.iter().zip(inputs).map(|((n, ad), (_, w))| Weighted { name: n.clone(), adapter: ad, weight: *w }).collect();
    let (cfg, tensors) = combine(&w, method).unwrap();
    let want = adapter(&format!("combined/{name}"));
    assert_eq!(cfg.r, want.config.r, "{name}: r");
    assert_eq!(cfg.lora_alpha, want.config.lora_alpha, "{name}: alpha");
    assert_eq!(cfg.target_modules, want.config.target_modules, "{name}: targets");
    let ours: HashMap<String, Tensor> = tensors.into_iter().collect();
    assert_eq!(ours.len(), want.tensors.len(), "{name}: tensor count");
    for m in want.lora_modules() {
        let (wa, wb) = want.lora_pair(&m).unwrap();
        let a = &ours[&lora_peft::lora_key(&m, lora_peft::LoraPart::A)];
        let b = &ours[&lora_peft::lora_key(&m, lora_peft::LoraPart::B)];
        if product_only {
            // SVD factors are unique up to signs: compare B·A.
            let d = max_abs(&b.matmul(a).unwrap(), &wb.matmul(wa).unwrap());
            assert!(d < 1e-5, "{name} {m}: B·A differs by {d}");
        } else {
            assert!(max_abs(a, wa) < 1e-6, "{name} {m}: A differs by {}", max_abs(a, wa));
            assert!(max_abs(b, wb) < 1e-6, "{name} {m}: B differs by {}", max_abs(b, wb));
        }
    }
}

#[test]
fn combinations_match_peft_add_weighted_adapter() {
    let ties = CombineMethod::Ties { density: 0.5, sign: MajoritySign::Total };
    check_combination("linear", &[("a1", 0.7), ("a2", 0.3)], CombineMethod::Linear, false);
    check_combination("linear_neg", &[("a1", 1.0), ("a2", -0.5)], CombineMethod::Linear, false);
    check_combination("cat", &[("a1", 0.7), ("a2", 0.3)], CombineMethod::Cat, false);
    check_combination("ties", &[("a1", 0.7), ("a2", 0.3)], ties, false);
    check_combination("cat_mixed", &[("a1", 0.6), ("a3", 0.4)], CombineMethod::Cat, false);
    check_combination("svd", &[("a1", 0.7), ("a2", 0.3)], CombineMethod::Svd { rank: None }, true);
    check_combination("svd_mixed", &[("a1", 0.6), ("a3", 0.4)], CombineMethod::Svd { rank: Some(4) }, true);
}

#[test]
fn combination_errors_are_one_line() {
    let (a1, a3) = (adapter("adapters/a1"), adapter("adapters/a3"));
    let w = |m| {
        let inputs = [Weighted { name: "a1".into(), adapter: &a1, weight: 0.5 }, Weighted { name: "a3".into(), adapter: &a3, weight: 0.5 }];
        combine(&inputs, m).unwrap_err().to_string()
    };
    assert_eq!(w(CombineMethod::Linear), "method linear needs adapters with the same rank: a1 r=4, a3 r=2");
    let e = w(CombineMethod::Ties { density: 0.0, sign: MajoritySign::Total });
    assert_eq!(e, "density 0 is out of range (must be in (0, 1])");
    let e = w(CombineMethod::Svd { rank: Some(99) });
    assert!(e.contains("rank 99 is out of range for a 32x32 matrix"), "{e}");
}

#[test]
fn converted_pissa_on_original_base_equals_trained_on_residual() {
    use lora_lowrank::init::init_tensors;
    use lora_lowrank::WeightInit;
    let t = load("init.safetensors");
    let (r, alpha) = (4usize, 8.0);
    let s = alpha / r as f64;
    for method in [WeightInit::Pissa, WeightInit::Olora, WeightInit::PissaNiter { niter: 2, seed: 1 }] {
        let (a0, b0, res) = init_tensors("lin", &t["w"], r, s, method).unwrap();
        // "Training": any change of A and B.
        let a = (&a0 + (Tensor::ones_like(&a0).unwrap() * 0.01).unwrap()).unwrap();
        let b = (&b0 * 1.1).unwrap();
        let mk = |a: &Tensor, b: &Tensor| {
            let mut cfg = lora_peft::AdapterConfig::new(r, alpha, lora_peft::TargetModules::Names(vec!["lin".into()]));
            cfg.init_lora_weights = method.peft_value();
            let mut tensors = std::collections::BTreeMap::new();
            tensors.insert(lora_peft::lora_key("lin", lora_peft::LoraPart::A), a.clone());
            tensors.insert(lora_peft::lora_key("lin", lora_peft::LoraPart::B), b.clone());
            lora_peft::LoadedAdapter { config: cfg, tensors }
        };
        let (cfg, tensors) = lora_lowrank::convert_to_plain_lora(&mk(&a0, &b0), &mk(&a, &b)).unwrap();
        let m: HashMap<String, Tensor> = tensors.into_iter().collect();
        let (a2, b2) = (&m[&lora_peft::lora_key("lin", lora_peft::LoraPart::A)], &m[&lora_peft::lora_key("lin", lora_peft::LoraPart::B)]);
        let s2 = cfg.lora_alpha / cfg.r as f64;
        let trained = (&res + (b.matmul(&a).unwrap() * s).unwrap()).unwrap();
        let converted = (&t["w"] + (b2.matmul(a2).unwrap() * s2).unwrap()).unwrap();
        assert!(max_abs(&trained, &converted) < 1e-5, "{method:?}: {}", max_abs(&trained, &converted));
    }
}
