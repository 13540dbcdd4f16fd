//! `AdapterConfig`: a serde mirror of PEFT's `adapter_config.json` for LoRA
//! (`peft/tuners/lora/config.py::LoraConfig` plus the `PeftConfig` base
//! fields), with the same JSON names and defaults.
//!
//! Fields PEFT added that this toolkit has no use for land in `extra` and are
//! written back unchanged. `validate()` refuses anything that would make the
//! loaded adapter compute something other than what PEFT computes.

use crate::error::{first_line, PeftError, Result};
use crate::fields::{Bias, InitLoraWeights, OneOrMany, PeftType, TargetModules, TaskType};
use crate::pyjson::{py_float_repr, to_python_json};
use regex::Regex;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;
use std::collections::BTreeMap;

/// PEFT's `adapter_config.json` for a LoRA adapter.
///
/// `Default` is PEFT's `LoraConfig()` defaults (r=8, lora_alpha=8, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    /// Required, as in PEFT (`MIN_EXPECTED_CONFIG_KEYS`).
    pub peft_type: PeftType,
    #[serde(default)]
    pub task_type: Option<TaskType>,
    /// Written by PEFT when `task_type` is None (`{"base_model_class", "parent_library"}`).
    #[serde(default)]
    pub auto_mapping: Option<Value>,
    /// The version of PEFT that wrote the file (PEFT >= 0.18; e.g. `"0.18.1"`
    /// or `"0.19.0.dev0@<commit>"`). None is written as null, which PEFT fills in.
    #[serde(default)]
    pub peft_version: Option<String>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub revision: Option<String>,
    /// PEFT writes `true` on every `save_pretrained`.
    #[serde(default)]
    pub inference_mode: bool,

    #[serde(default = "default_r")]
    pub r: usize,
    /// PEFT types it `int` but accepts floats; written as an integer when integral.
    #[serde(default = "default_alpha", serialize_with = "ser_num")]
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    #[serde(default)]
    pub exclude_modules: Option<TargetModules>,
    /// Scaling `alpha / sqrt(r)` instead of `alpha / r`.
    #[serde(default)]
    pub use_rslora: bool,
    /// Modules trained in full and saved whole (e.g. `["classifier", "score"]`;
    /// PEFT appends both for `SEQ_CLS`, whatever the architecture).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub bias: Bias,
    #[serde(default)]
    pub init_lora_weights: InitLoraWeights,
    #[serde(default)]
    pub layers_to_transform: Option<OneOrMany<usize>>,
    #[serde(default)]
    pub layers_pattern: Option<OneOrMany<String>>,
    /// Per-module rank overrides: key = regex matched against the end of the
    /// module path (see [`AdapterConfig::rank_for`]).
    #[serde(default, deserialize_with = "null_as_default")]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alpha overrides, same matching as `rank_pattern`.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        serialize_with = "ser_num_map"
    )]
    pub alpha_pattern: BTreeMap<String, f64>,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub layer_replication: Option<Value>,
    #[serde(default)]
    pub lora_bias: bool,
    #[serde(default)]
    pub megatron_config: Option<Value>,
    /// PEFT's default is `{}` (not null).
    #[serde(default = "empty_object")]
    pub loftq_config: Value,
    #[serde(default)]
    pub eva_config: Option<Value>,
    #[serde(default)]
    pub corda_config: Option<Value>,
    #[serde(default)]
    pub trainable_token_indices: Option<Value>,

    /// Every other field, kept so that it round-trips (`megatron_core`,
    /// `use_qalora`, `target_parameters`, fields of future PEFT versions...).
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}
fn empty_object() -> Value {
    Value::Object(Default::default())
}

fn null_as_default<'de, D, T>(d: D) -> std::result::Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A number as PEFT would have it: integral values as JSON integers.
fn num_value(x: f64) -> Value {
    if x.is_finite() && x.fract() == 0.0 && x.abs() < 9.007_199_254_740_992e15 {
        Value::from(x as i64)
    } else {
        Value::from(x)
    }
}

fn ser_num<S: Serializer>(x: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    num_value(*x).serialize(s)
}

fn ser_num_map<S: Serializer>(
    m: &BTreeMap<String, f64>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    let m: BTreeMap<&String, Value> = m.iter().map(|(k, v)| (k, num_value(*v))).collect();
    m.serialize(s)
}

impl Default for AdapterConfig {
    fn default() -> Self {
        Self {
            peft_type: PeftType::Lora,
            task_type: None,
            auto_mapping: None,
            peft_version: None,
            base_model_name_or_path: None,
            revision: None,
            inference_mode: false,
            r: default_r(),
            lora_alpha: default_alpha(),
            lora_dropout: 0.0,
            target_modules: None,
            exclude_modules: None,
            use_rslora: false,
            modules_to_save: None,
            fan_in_fan_out: false,
            bias: Bias::None,
            init_lora_weights: InitLoraWeights::Default,
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            use_dora: false,
            layer_replication: None,
            lora_bias: false,
            megatron_config: None,
            loftq_config: empty_object(),
            eva_config: None,
            corda_config: None,
            trainable_token_indices: None,
            extra: BTreeMap::new(),
        }
    }
}

/// Fields of newer PEFT versions that are fine whatever their value: they
/// only matter for training-time machinery or when another field enables them.
const HARMLESS_EXTRA: &[&str] = &[
    "megatron_core",
    "qalora_group_size",
    "lora_ga_config",
    "ensure_weight_tying",
    "runtime_config",
];

/// Fields that switch on a LoRA variant computing something else: refused
/// when set (anything but null/false/empty).
const REFUSED_EXTRA: &[(&str, &str)] = &[
    ("use_qalora", "QALoRA"),
    ("alora_invocation_tokens", "aLoRA"),
    ("velora_config", "VeLoRA"),
    ("monteclora_config", "MonteCLoRA"),
    ("use_bdlora", "BD-LoRA"),
    ("arrow_config", "Arrow routing"),
    ("kasa_config", "KaSA"),
    ("target_parameters", "LoRA on nn.Parameter targets"),
];

impl AdapterConfig {
    /// PEFT defaults with the given rank, alpha and targets.
    pub fn new(r: usize, lora_alpha: f64, target_modules: TargetModules) -> Self {
        Self {
            r,
            lora_alpha,
            target_modules: Some(target_modules),
            ..Self::default()
        }
    }

    /// Parse `adapter_config.json` text. Does not validate.
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| PeftError::Json {
            path: "adapter_config.json".into(),
            msg: first_line(&e.to_string()),
        })
    }

    /// The JSON exactly as PEFT writes it:
    /// `json.dumps(config.to_dict(), indent=2, sort_keys=True)`.
    pub fn to_json(&self) -> String {
        match serde_json::to_value(self) {
            Ok(v) => to_python_json(&v),
            // Unreachable: every field serializes to JSON (maps have string keys).
            Err(_) => String::new(),
        }
    }

    /// The rank of the adapter on `module_path` (the path inside the base
    /// model, e.g. `bert.encoder.layer.0.attention.self.query`).
    ///
    /// PEFT (`utils/other.py::get_pattern_key`): the first key of
    /// `rank_pattern` (in file order, which PEFT writes sorted) for which
    /// `re.match(rf"(.*\.)?({key})$", module_path)` succeeds, else `r`.
    pub fn rank_for(&self, module_path: &str) -> usize {
        pattern_value(&self.rank_pattern, module_path).unwrap_or(self.r)
    }

    /// The alpha of the adapter on `module_path`: `alpha_pattern`, matched
    /// like [`AdapterConfig::rank_for`], else `lora_alpha`.
    pub fn alpha_for(&self, module_path: &str) -> f64 {
        pattern_value(&self.alpha_pattern, module_path).unwrap_or(self.lora_alpha)
    }

    /// `alpha / r`, or `alpha / sqrt(r)` with `use_rslora`, per module.
    pub fn scaling_for(&self, module_path: &str) -> f64 {
        let r = self.rank_for(module_path) as f64;
        let alpha = self.alpha_for(module_path);
        if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }

    /// Refuse what this toolkit does not implement, and values PEFT itself
    /// would reject. The first problem found is returned.
    pub fn validate(&self) -> Result<()> {
        if let PeftType::Other(t) = &self.peft_type {
            return unsupported("peft_type", show_str(t), "only LORA adapters");
        }
        if let Some(TaskType::Other(t)) = &self.task_type {
            return unsupported("task_type", show_str(t), "unknown task type");
        }
        if self.r == 0 {
            return invalid("r", "0".into(), "the rank must be at least 1");
        }
        check_alpha("lora_alpha", self.lora_alpha)?;
        let p = self.lora_dropout;
        if !(p.is_finite() && (0.0..1.0).contains(&p)) {
            return invalid("lora_dropout", py_float_repr(p), "must be in [0, 1)");
        }
        if self.use_dora {
            return unsupported("use_dora", "true".into(), "DoRA");
        }
        if self.fan_in_fan_out {
            return unsupported(
                "fan_in_fan_out",
                "true".into(),
                "Conv1D-style (in, out) weights",
            );
        }
        if self.bias != Bias::None {
            let b: String = self.bias.clone().into();
            return unsupported("bias", show_str(&b), "trained biases; only \"none\"");
        }
        if self.lora_bias {
            return unsupported("lora_bias", "true".into(), "bias on lora_B");
        }
        for (field, value, reason) in [
            (
                "layer_replication",
                self.layer_replication.as_ref(),
                "layer replication",
            ),
            (
                "megatron_config",
                self.megatron_config.as_ref(),
                "Megatron parallel layers",
            ),
            ("loftq_config", Some(&self.loftq_config), "LoftQ"),
            (
                "trainable_token_indices",
                self.trainable_token_indices.as_ref(),
                "trainable tokens",
            ),
        ] {
            if let Some(v) = value.filter(|v| truthy(v)) {
                return unsupported(field, show_value(v), reason);
            }
        }
        match &self.init_lora_weights {
            InitLoraWeights::Unknown(s) => {
                return unsupported("init_lora_weights", show_str(s), "unknown initialization");
            }
            InitLoraWeights::Loftq => {
                return unsupported("init_lora_weights", show_str("loftq"), "LoftQ");
            }
            _ => {}
        }
        self.validate_patterns()?;
        self.validate_targets()?;
        self.validate_extra()
    }

    fn validate_patterns(&self) -> Result<()> {
        for (key, r) in &self.rank_pattern {
            pattern_regex(key).map_err(|why| invalid_err("rank_pattern", show_str(key), &why))?;
            if *r == 0 {
                return invalid(
                    &format!("rank_pattern[{key:?}]"),
                    "0".into(),
                    "the rank must be at least 1",
                );
            }
        }
        for (key, a) in &self.alpha_pattern {
            pattern_regex(key).map_err(|why| invalid_err("alpha_pattern", show_str(key), &why))?;
            check_alpha(&format!("alpha_pattern[{key:?}]"), *a)?;
        }
        Ok(())
    }

    /// PEFT's `LoraConfig.__post_init__` checks on targets and layer selection.
    fn validate_targets(&self) -> Result<()> {
        for (field, t) in [
            ("target_modules", &self.target_modules),
            ("exclude_modules", &self.exclude_modules),
        ] {
            if let Some(TargetModules::Regex(re)) = t {
                Regex::new(&format!("^(?:{re})$"))
                    .map_err(|e| invalid_err(field, show_str(re), &regex_reason(&e)))?;
            }
        }
        let regex_targets = matches!(self.target_modules, Some(TargetModules::Regex(_)));
        if let Some(l) = &self.layers_to_transform {
            if regex_targets {
                let v = show_value(&serde_json::to_value(l).unwrap_or(Value::Null));
                return invalid(
                    "layers_to_transform",
                    v,
                    "cannot be used when target_modules is a regex string",
                );
            }
        }
        if let Some(p) = &self.layers_pattern {
            let v = show_value(&serde_json::to_value(p).unwrap_or(Value::Null));
            if regex_targets {
                return invalid(
                    "layers_pattern",
                    v,
                    "cannot be used when target_modules is a regex string",
                );
            }
            if !p.to_vec().is_empty() && self.layers_to_transform.is_none() {
                return invalid("layers_pattern", v, "needs layers_to_transform");
            }
        }
        Ok(())
    }

    fn validate_extra(&self) -> Result<()> {
        for (key, value) in &self.extra {
            if HARMLESS_EXTRA.contains(&key.as_str()) || !truthy(value) {
                continue;
            }
            let reason = REFUSED_EXTRA
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, r)| *r)
                .unwrap_or("unknown field");
            return unsupported(key, show_value(value), reason);
        }
        Ok(())
    }
}

fn check_alpha(field: &str, a: f64) -> Result<()> {
    if a.is_finite() && a > 0.0 {
        Ok(())
    } else {
        let v = if a.is_finite() {
            show_value(&num_value(a))
        } else {
            py_float_repr(a)
        };
        invalid(field, v, "must be a finite number > 0")
    }
}

/// PEFT's pattern-key regex, anchored at both ends (Python's `re.match` anchors
/// only the start; the pattern itself ends in `$`).
fn pattern_regex(key: &str) -> std::result::Result<Regex, String> {
    Regex::new(&format!(r"^(?:.*\.)?(?:{key})$")).map_err(|e| regex_reason(&e))
}

fn regex_reason(e: &regex::Error) -> String {
    // regex's syntax errors are multi-line drawings; their last line says why.
    let last = e
        .to_string()
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(str::trim)
        .map(String::from);
    format!(
        "not a valid regular expression: {}",
        last.unwrap_or_default()
    )
}

fn pattern_value<V: Copy>(map: &BTreeMap<String, V>, module_path: &str) -> Option<V> {
    for (key, v) in map {
        if let Ok(re) = pattern_regex(key) {
            if re.is_match(module_path) {
                return Some(*v);
            }
        }
    }
    // PEFT falls back to `pattern.get(module_path)`: an exact key.
    map.get(module_path).copied()
}

/// Python truthiness of a JSON value: null, false, 0, "", [] and {} are false.
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|x| x != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// A value for an error message: compact JSON on one line, cut at 60 chars.
fn show_value(v: &Value) -> String {
    let s = match v {
        Value::Number(n) if n.is_f64() => n.as_f64().map(py_float_repr).unwrap_or_default(),
        _ => serde_json::to_string(v).unwrap_or_default(),
    };
    if s.chars().count() > 60 {
        let cut: String = s.chars().take(57).collect();
        format!("{cut}...")
    } else {
        s
    }
}

fn show_str(s: &str) -> String {
    show_value(&Value::String(s.to_string()))
}

fn unsupported(field: &str, value: String, reason: &str) -> Result<()> {
    Err(PeftError::Unsupported {
        field: field.to_string(),
        value,
        reason: reason.to_string(),
    })
}

fn invalid_err(field: &str, value: String, reason: &str) -> PeftError {
    PeftError::InvalidConfig {
        field: field.to_string(),
        value,
        reason: reason.to_string(),
    }
}

fn invalid(field: &str, value: String, reason: &str) -> Result<()> {
    Err(invalid_err(field, value, reason))
}
