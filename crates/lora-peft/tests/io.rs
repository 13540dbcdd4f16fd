//! Adapter directories: save -> load round trips, damaged files, and the
//! adapters written by real PEFT under tests/fixtures/tiny-bert-peft.

use candle_core::{DType, Device, Tensor};
use lora_peft::{
    check_pair, load_adapter, lora_key, save_adapter, saved_module_key, summarize, AdapterConfig,
    LoraPart, PeftError, TargetModules, TaskType,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A fresh empty directory under the system temp dir (no tempfile crate needed).
fn scratch_root(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("lora-peft-test-{}-{name}", std::process::id()))
}

fn scratch(name: &str) -> PathBuf {
    let dir = scratch_root(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn ramp(shape: &[usize], offset: f32) -> Tensor {
    let n: usize = shape.iter().product();
    // Values with full mantissas, so a lossy round trip would show.
    let v: Vec<f32> = (0..n)
        .map(|i| offset + (i as f32) * 0.123_456_79 - 1.0 / 3.0)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

const Q: &str = "bert.encoder.layer.0.attention.self.query";
const V: &str = "bert.encoder.layer.0.attention.self.value";

fn tiny() -> (AdapterConfig, Vec<(String, Tensor)>) {
    let mut c = AdapterConfig::new(
        2,
        4.0,
        TargetModules::Names(vec!["query".into(), "value".into()]),
    );
    c.task_type = Some(TaskType::SeqCls);
    c.inference_mode = true;
    c.modules_to_save = Some(vec!["classifier".into(), "score".into()]);
    let tensors = vec![
        (lora_key(Q, LoraPart::A), ramp(&[2, 8], 0.0)),
        (lora_key(Q, LoraPart::B), ramp(&[8, 2], 1.0)),
        (lora_key(V, LoraPart::A), ramp(&[2, 8], 2.0)),
        (lora_key(V, LoraPart::B), ramp(&[8, 2], 3.0)),
        (saved_module_key("classifier", "weight"), ramp(&[3, 8], 4.0)),
        (saved_module_key("classifier", "bias"), ramp(&[3], 5.0)),
    ];
    (c, tensors)
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

#[test]
fn save_then_load_is_bit_exact() {
    let dir = scratch("roundtrip").join("nested/adapter");
    let (c, tensors) = tiny();
    save_adapter(
        &dir,
        &c,
        &tensors,
        &[("labels.json", b"[\"neg\", \"neu\", \"pos\"]".to_vec())],
    )
    .unwrap();

    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "adapter_config.json",
            "adapter_model.safetensors",
            "labels.json"
        ],
        "no temp files left"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("adapter_config.json")).unwrap(),
        c.to_json()
    );

    // PEFT/transformers metadata.
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let want: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    assert_eq!(meta.metadata().as_ref(), Some(&want));

    let loaded = load_adapter(&dir, &Device::Cpu).unwrap();
    assert_eq!(loaded.config, c);
    assert_eq!(loaded.tensors.len(), tensors.len());
    for (k, t) in &tensors {
        let got = &loaded.tensors[k];
        assert_eq!(got.dtype(), DType::F32);
        assert_eq!(got.dims(), t.dims(), "{k}");
        assert_eq!(bits(got), bits(t), "{k}");
    }
    assert_eq!(loaded.lora_modules(), [Q, V]);
    let heads = loaded.saved_modules();
    assert_eq!(
        heads["classifier"].keys().collect::<Vec<_>>(),
        ["bias", "weight"]
    );

    let s = summarize(&loaded);
    assert_eq!(s.targets, [Q, V]);
    assert_eq!(s.ranks[Q], 2);
    assert_eq!(s.modules[V].in_features, 8);
    assert_eq!(s.modules[V].out_features, 8);
    assert_eq!(s.modules[V].scaling, 2.0);
    assert_eq!(s.lora_params, 4 * 16);
    assert_eq!(s.head_params, 24 + 3);
    assert_eq!(
        s.saved_modules["classifier"],
        [
            ("bias".to_string(), vec![3]),
            ("weight".to_string(), vec![3, 8])
        ]
    );

    // Saving again over the same files replaces them atomically.
    save_adapter(&dir, &c, &tensors, &[]).unwrap();
    load_adapter(&dir, &Device::Cpu).unwrap();
    let _ = std::fs::remove_dir_all(scratch_root("roundtrip"));
}

/// (key, dtype, shape, little-endian bytes) of one tensor written by hand.
type RawTensor<'a> = (&'a str, safetensors::Dtype, Vec<usize>, Vec<u8>);

fn write_raw(dir: &Path, config: &str, tensors: Vec<RawTensor<'_>>) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), config).unwrap();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(k, d, s, b)| {
            (
                k.to_string(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("adapter_model.safetensors")).unwrap();
}

#[test]
fn half_precision_and_adapter_name_keys_load_as_f32() {
    let dir = scratch("halves");
    let c = AdapterConfig::new(1, 1.0, TargetModules::Names(vec!["q".into()]));
    let f16: Vec<u8> = [1.5f32, -2.0]
        .iter()
        .flat_map(|x| half_bits_f16(*x).to_le_bytes())
        .collect();
    let bf16: Vec<u8> = [0.25f32, 3.0]
        .iter()
        .flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes())
        .collect();
    write_raw(
        &dir,
        &c.to_json(),
        vec![
            // As inside a live PeftModel: with the adapter name.
            (
                "base_model.model.m.q.lora_A.default.weight",
                safetensors::Dtype::F16,
                vec![1, 2],
                f16,
            ),
            (
                "base_model.model.m.q.lora_B.default.weight",
                safetensors::Dtype::BF16,
                vec![2, 1],
                bf16,
            ),
        ],
    );
    let a = load_adapter(&dir, &Device::Cpu).unwrap();
    let (la, lb) = a.lora_pair("m.q").unwrap();
    assert_eq!(la.to_vec2::<f32>().unwrap(), [[1.5, -2.0]]);
    assert_eq!(lb.to_vec2::<f32>().unwrap(), [[0.25], [3.0]]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// f16 bits of a value exactly representable in f16 (sign, exponent, 10-bit mantissa).
fn half_bits_f16(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = (((b >> 23) & 0xff) as i32 - 127 + 15) as u16;
    let mant = ((b >> 13) & 0x3ff) as u16;
    sign | (exp << 10) | mant
}

#[test]
fn damaged_or_missing_files_are_errors_naming_the_file() {
    let root = scratch("damaged");
    let (c, tensors) = tiny();
    let dir = root.join("a");
    save_adapter(&dir, &c, &tensors, &[]).unwrap();
    let weights = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();

    // Truncated: the header promises more bytes than there are.
    std::fs::write(&weights, &bytes[..bytes.len() - 7]).unwrap();
    let e = load_adapter(&dir, &Device::Cpu).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!(
            "{}: not a valid safetensors file (",
            weights.display()
        )),
        "{e}"
    );
    // Header cut in half.
    std::fs::write(&weights, &bytes[..20]).unwrap();
    let e = load_adapter(&dir, &Device::Cpu).unwrap_err().to_string();
    assert!(
        e.contains("adapter_model.safetensors: not a valid safetensors file"),
        "{e}"
    );
    // Empty file.
    std::fs::write(&weights, b"").unwrap();
    assert!(matches!(
        load_adapter(&dir, &Device::Cpu),
        Err(PeftError::Safetensors { .. })
    ));

    std::fs::remove_file(&weights).unwrap();
    let e = load_adapter(&dir, &Device::Cpu).unwrap_err().to_string();
    assert_eq!(
        e,
        format!("{}: adapter weights not found", weights.display())
    );

    std::fs::write(
        dir.join("adapter_config.json"),
        "{\n  \"peft_type\": \"LORA\",\n  \"r\": 4,\n",
    )
    .unwrap();
    let e = load_adapter(&dir, &Device::Cpu).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "{}: EOF while parsing a value at line 4 column 0",
            dir.join("adapter_config.json").display()
        )
    );

    std::fs::remove_file(dir.join("adapter_config.json")).unwrap();
    let e = load_adapter(&dir, &Device::Cpu).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "{}: adapter config not found",
            dir.join("adapter_config.json").display()
        )
    );

    let e = load_adapter(&root.join("nope"), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        format!(
            "{}: adapter directory not found",
            root.join("nope").display()
        )
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn refused_configs_and_tensors() {
    let root = scratch("refused");
    let (c, tensors) = tiny();

    // save_adapter refuses to write what load_adapter would refuse.
    let dora = AdapterConfig {
        use_dora: true,
        ..c.clone()
    };
    let e = save_adapter(&root.join("dora"), &dora, &tensors, &[]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "adapter_config.json: use_dora=true is not supported (DoRA)"
    );
    assert!(!root.join("dora").exists());

    // A DoRA config written by someone else is refused on load.
    let dir = root.join("dora2");
    save_adapter(&dir, &c, &tensors, &[]).unwrap();
    std::fs::write(dir.join("adapter_config.json"), dora.to_json()).unwrap();
    let e = load_adapter(&dir, &Device::Cpu).unwrap_err();
    assert_eq!(
        e.to_string(),
        "adapter_config.json: use_dora=true is not supported (DoRA)"
    );

    let f32s = |n: usize| vec![0u8; 4 * n];
    let cfg = AdapterConfig::new(1, 1.0, TargetModules::Names(vec!["q".into()])).to_json();
    let cases: Vec<(&str, Vec<RawTensor<'_>>, &str)> = vec![
        (
            "int",
            vec![("base_model.model.q.lora_A.weight", safetensors::Dtype::I64, vec![1, 2], vec![0; 16]),
                 ("base_model.model.q.lora_B.weight", safetensors::Dtype::F32, vec![2, 1], f32s(2))],
            "base_model.model.q.lora_A.weight: dtype I64 is not supported (expected F32, F16, BF16 or F64)",
        ),
        (
            "embedding",
            vec![("base_model.model.emb.lora_embedding_A", safetensors::Dtype::F32, vec![1, 2], f32s(2))],
            "base_model.model.emb.lora_embedding_A: LoRA on an embedding layer (lora_embedding_A/B) is not supported",
        ),
        (
            "orphan",
            vec![("base_model.model.q.lora_A.weight", safetensors::Dtype::F32, vec![1, 2], f32s(2))],
            "base_model.model.q.lora_A.weight: has no partner base_model.model.q.lora_B.weight",
        ),
        (
            "rank",
            vec![("base_model.model.q.lora_A.weight", safetensors::Dtype::F32, vec![2, 2], f32s(4)),
                 ("base_model.model.q.lora_B.weight", safetensors::Dtype::F32, vec![2, 2], f32s(4))],
            "base_model.model.q.lora_A.weight: shape [2, 2] and lora_B shape [2, 2] do not fit rank 1 (expected A [1, in] and B [out, 1])",
        ),
        (
            "stray",
            vec![("base_model.model.bert.embeddings.word_embeddings.weight", safetensors::Dtype::F32, vec![2], f32s(2))],
            "base_model.model.bert.embeddings.word_embeddings.weight: neither a lora_A/lora_B weight nor a parameter of a module in modules_to_save",
        ),
    ];
    for (name, ts, want) in cases {
        let dir = root.join(name);
        write_raw(&dir, &cfg, ts);
        assert_eq!(
            load_adapter(&dir, &Device::Cpu).unwrap_err().to_string(),
            want,
            "{name}"
        );
    }

    let e = save_adapter(&root.join("x"), &c, &tensors, &[("../evil", vec![])]).unwrap_err();
    assert_eq!(e.to_string(), "save_adapter: extra file name \"../evil\" must be a plain file name other than adapter_config.json and adapter_model.safetensors");
    let twice = vec![tensors[0].clone(), tensors[0].clone()];
    let e = save_adapter(&root.join("y"), &c, &twice, &[]).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("save_adapter: tensor {} is given twice", tensors[0].0)
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn check_pair_names_key_and_shapes() {
    let a = Tensor::zeros((4, 32), DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::zeros((32, 4), DType::F32, &Device::Cpu).unwrap();
    check_pair("bert.q", &a, &b, 32, 32, 4).unwrap();
    let e = check_pair("bert.q", &a, &b, 32, 64, 4)
        .unwrap_err()
        .to_string();
    assert_eq!(e, "base_model.model.bert.q.lora_A.weight: lora_A [4, 32] / lora_B [32, 4] do not fit a 32 -> 64 layer with r=4 (expected lora_A [4, 32], lora_B [64, 4])");
}

/// Adapters saved by real PEFT (0.21.2) by tests/fixtures/tiny-bert-peft/make_peft_adapter.py.
#[test]
fn real_peft_fixture_adapters_load() {
    let root =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-bert-peft");
    let Ok(meta) = std::fs::read_to_string(root.join("expected.json")) else {
        eprintln!("skipped: {} not present", root.display());
        return;
    };
    let meta: serde_json::Value = serde_json::from_str(&meta).unwrap();
    for (name, rslora) in [("adapter", false), ("adapter_rslora", true)] {
        let dir = root.join(name);
        let a = load_adapter(&dir, &Device::Cpu).unwrap();
        let m = &meta["adapters"][name];
        assert_eq!(a.config.use_rslora, rslora);
        // Every saved key, with PEFT's shapes.
        let saved = m["saved_tensors"].as_object().unwrap();
        assert_eq!(a.tensors.len(), saved.len(), "{name}");
        for (k, v) in saved {
            let shape: Vec<usize> = serde_json::from_value(v[0].clone()).unwrap();
            assert_eq!(a.tensors[k].dims(), shape.as_slice(), "{name} {k}");
        }
        // The module paths PEFT adapted.
        let matched: Vec<String> = m["matched_modules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                s.as_str()
                    .unwrap()
                    .strip_prefix("base_model.model.")
                    .unwrap()
                    .to_string()
            })
            .collect();
        let s = summarize(&a);
        assert_eq!(s.targets, matched, "{name}");
        assert_eq!(s.saved_modules.keys().collect::<Vec<_>>(), ["classifier"]);
        let want_scaling = if rslora { 8.0 / 2.0 } else { 8.0 / 4.0 };
        assert!(
            s.modules
                .values()
                .all(|t| t.r == 4 && t.scaling == want_scaling),
            "{name}"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("labels.json"))
                .unwrap()
                .trim(),
            "[\"neg\", \"neu\", \"pos\"]"
        );

        // Re-saving what we loaded gives a file PEFT's loader sees identically:
        // same keys, same values (f32 bits), same config text.
        let out = scratch(&format!("resave-{name}"));
        let tensors: Vec<(String, Tensor)> = a
            .tensors
            .iter()
            .map(|(k, t)| (k.clone(), t.clone()))
            .collect();
        save_adapter(&out, &a.config, &tensors, &[]).unwrap();
        let b = load_adapter(&out, &Device::Cpu).unwrap();
        assert_eq!(b.config, a.config);
        for (k, t) in &a.tensors {
            assert_eq!(bits(&b.tensors[k]), bits(t), "{k}");
        }
        let _ = std::fs::remove_dir_all(&out);
    }
}
