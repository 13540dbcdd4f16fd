//! adapter_config.json: round trips of what PEFT writes, refusals with their
//! exact messages, and PEFT's rank/alpha pattern rules.

use lora_peft::{AdapterConfig, InitLoraWeights, PeftError, TargetModules, TaskType};
use std::path::PathBuf;

/// What PEFT 0.21.2 writes for
/// `get_peft_model(AutoModelForSequenceClassification("prajjwal1/bert-tiny"),
///  LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1,
///  target_modules=["query", "value"])).save_pretrained(dir)`: every dataclass
/// field of `LoraConfig` + `PeftConfig` (peft/tuners/lora/config.py,
/// peft/config.py at v0.21.2) minus the popped `runtime_config`,
/// `inference_mode` forced to true, `modules_to_save` extended with
/// ["classifier", "score"] by `PeftModelForSequenceClassification`, the
/// `target_modules` set written as a list, and
/// `json.dumps(..., indent=2, sort_keys=True)` without a trailing newline.
const PEFT_0_21_SEQ_CLS: &str = r#"{
  "alora_invocation_tokens": null,
  "alpha_pattern": {},
  "arrow_config": null,
  "auto_mapping": null,
  "base_model_name_or_path": "prajjwal1/bert-tiny",
  "bias": "none",
  "corda_config": null,
  "ensure_weight_tying": false,
  "eva_config": null,
  "exclude_modules": null,
  "fan_in_fan_out": false,
  "inference_mode": true,
  "init_lora_weights": true,
  "kasa_config": null,
  "layer_replication": null,
  "layers_pattern": null,
  "layers_to_transform": null,
  "loftq_config": {},
  "lora_alpha": 16,
  "lora_bias": false,
  "lora_dropout": 0.1,
  "lora_ga_config": null,
  "megatron_config": null,
  "megatron_core": "megatron.core",
  "modules_to_save": [
    "classifier",
    "score"
  ],
  "monteclora_config": null,
  "peft_type": "LORA",
  "peft_version": "0.21.2",
  "qalora_group_size": 16,
  "r": 8,
  "rank_pattern": {},
  "revision": null,
  "target_modules": [
    "value",
    "query"
  ],
  "target_parameters": null,
  "task_type": "SEQ_CLS",
  "trainable_token_indices": null,
  "use_bdlora": null,
  "use_dora": false,
  "use_qalora": false,
  "use_rslora": false,
  "velora_config": null
}"#;

/// The same for PEFT 0.17 (no peft_version yet; fewer fields).
const PEFT_0_17_SEQ_CLS: &str = r#"{
  "alpha_pattern": {},
  "auto_mapping": null,
  "base_model_name_or_path": "bert-base-uncased",
  "bias": "none",
  "corda_config": null,
  "eva_config": null,
  "exclude_modules": null,
  "fan_in_fan_out": false,
  "inference_mode": true,
  "init_lora_weights": true,
  "layer_replication": null,
  "layers_pattern": null,
  "layers_to_transform": null,
  "loftq_config": {},
  "lora_alpha": 32,
  "lora_bias": false,
  "lora_dropout": 0.0,
  "megatron_config": null,
  "megatron_core": "megatron.core",
  "modules_to_save": [
    "classifier",
    "score"
  ],
  "peft_type": "LORA",
  "qalora_group_size": 16,
  "r": 8,
  "rank_pattern": {},
  "revision": null,
  "target_modules": [
    "query",
    "value"
  ],
  "target_parameters": null,
  "task_type": "SEQ_CLS",
  "trainable_token_indices": null,
  "use_dora": false,
  "use_qalora": false,
  "use_rslora": false
}"#;

#[test]
fn peft_0_21_config_round_trips_byte_exact() {
    let c = AdapterConfig::from_json(PEFT_0_21_SEQ_CLS).unwrap();
    c.validate().unwrap();
    assert_eq!(c.task_type, Some(TaskType::SeqCls));
    assert_eq!(c.r, 8);
    assert_eq!(c.lora_alpha, 16.0);
    assert_eq!(c.lora_dropout, 0.1);
    assert_eq!(c.peft_version.as_deref(), Some("0.21.2"));
    assert_eq!(
        c.target_modules,
        Some(TargetModules::Names(vec!["value".into(), "query".into()]))
    );
    assert_eq!(
        c.modules_to_save,
        Some(vec!["classifier".into(), "score".into()])
    );
    assert_eq!(c.init_lora_weights, InitLoraWeights::Default);
    assert_eq!(
        c.scaling_for("bert.encoder.layer.0.attention.self.query"),
        2.0
    );
    assert!(c.extra.contains_key("megatron_core"));
    assert_eq!(c.to_json(), PEFT_0_21_SEQ_CLS);
}

#[test]
fn peft_0_17_config_round_trips_and_gains_only_defaults() {
    let c = AdapterConfig::from_json(PEFT_0_17_SEQ_CLS).unwrap();
    c.validate().unwrap();
    assert_eq!(c.peft_version, None);
    // Every field of the old file comes back unchanged; typed fields the old
    // PEFT did not write are added with PEFT's defaults.
    let old: serde_json::Value = serde_json::from_str(PEFT_0_17_SEQ_CLS).unwrap();
    let new: serde_json::Value = serde_json::from_str(&c.to_json()).unwrap();
    for (k, v) in old.as_object().unwrap() {
        assert_eq!(&new[k], v, "{k}");
    }
    let added: Vec<&String> = new
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| !old.as_object().unwrap().contains_key(*k))
        .collect();
    assert_eq!(added, ["peft_version"]);
}

#[test]
fn default_config_is_peft_default() {
    let c = AdapterConfig::new(4, 8.0, TargetModules::Names(vec!["query".into()]));
    c.validate().unwrap();
    let json = c.to_json();
    assert!(
        json.starts_with("{\n  \"alpha_pattern\": {},\n  \"auto_mapping\": null,\n"),
        "{json}"
    );
    assert!(json.contains("\n  \"init_lora_weights\": true,\n"));
    assert!(json.contains("\n  \"loftq_config\": {},\n"));
    assert!(json.contains("\n  \"lora_alpha\": 8,\n"));
    assert!(json.contains("\n  \"lora_dropout\": 0.0,\n"));
    assert!(json.contains("\n  \"r\": 4,\n"));
    assert!(json.ends_with("\n  \"use_rslora\": false\n}"));
    assert_eq!(AdapterConfig::from_json(&json).unwrap(), c);
}

fn with(field: &str, value: &str) -> AdapterConfig {
    let mut v: serde_json::Value = serde_json::from_str(PEFT_0_21_SEQ_CLS).unwrap();
    v[field] = serde_json::from_str(value).unwrap();
    AdapterConfig::from_json(&v.to_string()).unwrap()
}

fn refusal(field: &str, value: &str) -> String {
    with(field, value).validate().unwrap_err().to_string()
}

#[test]
fn refused_fields_have_exact_messages() {
    let cases = [
        ("use_dora", "true", "adapter_config.json: use_dora=true is not supported (DoRA)"),
        ("fan_in_fan_out", "true", "adapter_config.json: fan_in_fan_out=true is not supported (Conv1D-style (in, out) weights)"),
        ("bias", "\"all\"", "adapter_config.json: bias=\"all\" is not supported (trained biases; only \"none\")"),
        ("bias", "\"lora_only\"", "adapter_config.json: bias=\"lora_only\" is not supported (trained biases; only \"none\")"),
        ("lora_bias", "true", "adapter_config.json: lora_bias=true is not supported (bias on lora_B)"),
        ("layer_replication", "[[0, 4], [2, 5]]", "adapter_config.json: layer_replication=[[0,4],[2,5]] is not supported (layer replication)"),
        ("megatron_config", "{\"tensor_model_parallel_size\": 2}", "adapter_config.json: megatron_config={\"tensor_model_parallel_size\":2} is not supported (Megatron parallel layers)"),
        ("loftq_config", "{\"loftq_bits\": 4, \"loftq_iter\": 1}", "adapter_config.json: loftq_config={\"loftq_bits\":4,\"loftq_iter\":1} is not supported (LoftQ)"),
        ("peft_type", "\"ADALORA\"", "adapter_config.json: peft_type=\"ADALORA\" is not supported (only LORA adapters)"),
        ("task_type", "\"SPEECH\"", "adapter_config.json: task_type=\"SPEECH\" is not supported (unknown task type)"),
        ("r", "0", "adapter_config.json: r=0 is invalid (the rank must be at least 1)"),
        ("lora_alpha", "0", "adapter_config.json: lora_alpha=0 is invalid (must be a finite number > 0)"),
        ("lora_alpha", "-8.5", "adapter_config.json: lora_alpha=-8.5 is invalid (must be a finite number > 0)"),
        ("lora_dropout", "1.0", "adapter_config.json: lora_dropout=1.0 is invalid (must be in [0, 1))"),
        ("lora_dropout", "-0.1", "adapter_config.json: lora_dropout=-0.1 is invalid (must be in [0, 1))"),
        ("init_lora_weights", "\"pissa_niter_x\"", "adapter_config.json: init_lora_weights=\"pissa_niter_x\" is not supported (unknown initialization)"),
        ("init_lora_weights", "\"loftq\"", "adapter_config.json: init_lora_weights=\"loftq\" is not supported (LoftQ)"),
        ("trainable_token_indices", "[0, 1]", "adapter_config.json: trainable_token_indices=[0,1] is not supported (trainable tokens)"),
        ("use_qalora", "true", "adapter_config.json: use_qalora=true is not supported (QALoRA)"),
        ("alora_invocation_tokens", "[5, 6]", "adapter_config.json: alora_invocation_tokens=[5,6] is not supported (aLoRA)"),
        ("target_parameters", "[\"experts.down_proj\"]", "adapter_config.json: target_parameters=[\"experts.down_proj\"] is not supported (LoRA on nn.Parameter targets)"),
        ("some_future_flag", "true", "adapter_config.json: some_future_flag=true is not supported (unknown field)"),
        ("rank_pattern", "{\"query\": 0}", "adapter_config.json: rank_pattern[\"query\"]=0 is invalid (the rank must be at least 1)"),
        ("alpha_pattern", "{\"query\": -1}", "adapter_config.json: alpha_pattern[\"query\"]=-1 is invalid (must be a finite number > 0)"),
        ("rank_pattern", "{\"(query\": 4}", "adapter_config.json: rank_pattern=\"(query\" is invalid (not a valid regular expression: error: unclosed group)"),
        ("layers_pattern", "\"layer\"", "adapter_config.json: layers_pattern=\"layer\" is invalid (needs layers_to_transform)"),
    ];
    for (field, value, want) in cases {
        assert_eq!(refusal(field, value), want, "{field}={value}");
    }
    // Falsy values of refused or unknown fields are fine (PEFT's defaults).
    for (field, value) in [
        ("loftq_config", "{}"),
        ("megatron_config", "null"),
        ("layer_replication", "null"),
        ("some_future_flag", "false"),
        ("some_future_list", "[]"),
        ("use_bdlora", "null"),
    ] {
        with(field, value).validate().unwrap();
    }
}

#[test]
fn regex_targets_refuse_layer_selection() {
    let mut c = with("target_modules", "\".*\\\\.(query|value)\"");
    assert_eq!(
        c.target_modules,
        Some(TargetModules::Regex(".*\\.(query|value)".into()))
    );
    c.validate().unwrap();
    c.layers_to_transform = Some(lora_peft::OneOrMany::One(0));
    assert_eq!(
        c.validate().unwrap_err().to_string(),
        "adapter_config.json: layers_to_transform=0 is invalid (cannot be used when target_modules is a regex string)"
    );
    let c = with("target_modules", "\"all-linear\"");
    assert_eq!(c.target_modules, Some(TargetModules::AllLinear));
    assert!(c.to_json().contains("\"target_modules\": \"all-linear\","));
}

#[test]
fn accepted_inits_parse_into_the_enum() {
    for (json, want, mutates) in [
        ("true", InitLoraWeights::Default, false),
        ("false", InitLoraWeights::Random, false),
        ("\"gaussian\"", InitLoraWeights::Gaussian, false),
        ("\"eva\"", InitLoraWeights::Eva, false),
        ("\"orthogonal\"", InitLoraWeights::Orthogonal, false),
        ("\"mica\"", InitLoraWeights::Mica, false),
        ("\"pissa\"", InitLoraWeights::Pissa { niter: None }, true),
        (
            "\"pissa_niter_16\"",
            InitLoraWeights::Pissa { niter: Some(16) },
            true,
        ),
        ("\"olora\"", InitLoraWeights::Olora, true),
        ("\"corda\"", InitLoraWeights::Corda, true),
        ("\"lora_ga\"", InitLoraWeights::LoraGa, true),
    ] {
        let c = with("init_lora_weights", json);
        assert_eq!(c.init_lora_weights, want, "{json}");
        assert_eq!(
            c.init_lora_weights.mutates_base_weights(),
            mutates,
            "{json}"
        );
        c.validate().unwrap();
        let back: serde_json::Value = serde_json::from_str(&c.to_json()).unwrap();
        assert_eq!(back["init_lora_weights"].to_string(), json);
    }
}

#[test]
fn rank_and_alpha_patterns_follow_peft() {
    let c = with(
        "rank_pattern",
        r#"{"^bert.encoder.layer.0.attention.self.query": 16, "value": 2, "layer\\.1\\..*key": 6}"#,
    );
    let c = AdapterConfig {
        alpha_pattern: [("value".to_string(), 3.0)].into(),
        ..c
    };
    c.validate().unwrap();
    let q0 = "bert.encoder.layer.0.attention.self.query";
    let q1 = "bert.encoder.layer.1.attention.self.query";
    // The key may match the whole path (anchored with ^)...
    assert_eq!(c.rank_for(q0), 16);
    assert_eq!(c.rank_for(q1), 8);
    // ... or a suffix starting at a dot: "value" matches "...self.value".
    assert_eq!(c.rank_for("bert.encoder.layer.3.attention.self.value"), 2);
    // Not a suffix that starts mid-name.
    assert_eq!(c.rank_for("bert.encoder.layer.3.attention.self.myvalue"), 8);
    // A regex spanning dots.
    assert_eq!(c.rank_for("bert.encoder.layer.1.attention.self.key"), 6);
    assert_eq!(c.rank_for("bert.encoder.layer.2.attention.self.key"), 8);
    assert_eq!(
        c.alpha_for("bert.encoder.layer.3.attention.self.value"),
        3.0
    );
    assert_eq!(c.alpha_for(q0), 16.0);
    assert_eq!(
        c.scaling_for("bert.encoder.layer.3.attention.self.value"),
        1.5
    );
    assert_eq!(c.scaling_for(q0), 1.0);
    let rs = AdapterConfig {
        use_rslora: true,
        ..c.clone()
    };
    assert_eq!(rs.scaling_for(q0), 4.0);
    assert_eq!(rs.scaling_for(q1), 16.0 / 8f64.sqrt());
    // Non-integral alphas are written as floats, integral ones as integers.
    let json = c.to_json();
    assert!(
        json.contains("\"alpha_pattern\": {\n    \"value\": 3\n  },"),
        "{json}"
    );
    let half = AdapterConfig {
        lora_alpha: 22.627416997969522,
        ..c
    };
    assert!(half
        .to_json()
        .contains("\"lora_alpha\": 22.627416997969522,"));
}

#[test]
fn json_errors_name_file_line_and_column() {
    let err = AdapterConfig::from_json("{\n  \"peft_type\": \"LORA\",\n  \"r\": \n}").unwrap_err();
    assert_eq!(
        err.to_string(),
        "adapter_config.json: expected value at line 4 column 1"
    );
    let err = AdapterConfig::from_json("{\"r\": 8}").unwrap_err();
    assert!(
        err.to_string()
            .starts_with("adapter_config.json: missing field `peft_type`"),
        "{err}"
    );
    assert!(matches!(err, PeftError::Json { .. }));
}

/// The config written by real PEFT for the tiny BERT fixture, when present.
#[test]
fn real_peft_fixture_config_round_trips() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/tiny-bert-peft/adapter/adapter_config.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        eprintln!("skipped: {} not present", path.display());
        return;
    };
    let c = lora_peft::read_config(&path).unwrap();
    c.validate().unwrap();
    assert_eq!(c.peft_type, lora_peft::PeftType::Lora);
    // The fixture script re-dumps PEFT's file with sorted lists and a final
    // newline (PEFT writes none); otherwise the bytes are PEFT's.
    assert_eq!(
        c.to_json(),
        text.trim_end_matches('\n'),
        "PEFT's bytes must come back unchanged"
    );
}
