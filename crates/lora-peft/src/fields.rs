//! Typed values of `adapter_config.json` fields: enums instead of PEFT's
//! strings. Each one reads every value PEFT can write; values this toolkit
//! does not know are kept (`Other`/`Unknown`) so that `validate()` can name
//! them instead of a parse error hiding which field was wrong.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// `peft_type`. Only `LORA` is supported; anything else is refused by `validate()`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum PeftType {
    Lora,
    Other(String),
}

impl From<String> for PeftType {
    fn from(s: String) -> Self {
        if s == "LORA" {
            PeftType::Lora
        } else {
            PeftType::Other(s)
        }
    }
}

impl From<PeftType> for String {
    fn from(t: PeftType) -> Self {
        match t {
            PeftType::Lora => "LORA".into(),
            PeftType::Other(s) => s,
        }
    }
}

/// `task_type` (PEFT's `TaskType`), written as PEFT's strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum TaskType {
    /// `SEQ_CLS`: text classification.
    SeqCls,
    /// `SEQ_2_SEQ_LM`.
    Seq2SeqLm,
    /// `CAUSAL_LM`.
    CausalLm,
    /// `TOKEN_CLS`: token classification.
    TokenCls,
    /// `QUESTION_ANS`.
    QuestionAns,
    /// `FEATURE_EXTRACTION`: embeddings / hidden states.
    FeatureExtraction,
    /// Not one of PEFT's task types; refused by `validate()`.
    Other(String),
}

impl TaskType {
    pub fn as_str(&self) -> &str {
        match self {
            TaskType::SeqCls => "SEQ_CLS",
            TaskType::Seq2SeqLm => "SEQ_2_SEQ_LM",
            TaskType::CausalLm => "CAUSAL_LM",
            TaskType::TokenCls => "TOKEN_CLS",
            TaskType::QuestionAns => "QUESTION_ANS",
            TaskType::FeatureExtraction => "FEATURE_EXTRACTION",
            TaskType::Other(s) => s,
        }
    }
}

impl From<String> for TaskType {
    fn from(s: String) -> Self {
        match s.as_str() {
            "SEQ_CLS" => TaskType::SeqCls,
            "SEQ_2_SEQ_LM" => TaskType::Seq2SeqLm,
            "CAUSAL_LM" => TaskType::CausalLm,
            "TOKEN_CLS" => TaskType::TokenCls,
            "QUESTION_ANS" => TaskType::QuestionAns,
            "FEATURE_EXTRACTION" => TaskType::FeatureExtraction,
            _ => TaskType::Other(s),
        }
    }
}

impl From<TaskType> for String {
    fn from(t: TaskType) -> Self {
        t.as_str().to_string()
    }
}

/// `bias`: which biases were trained. Only `None` is supported.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum Bias {
    /// `"none"`
    #[default]
    None,
    /// `"all"`
    All,
    /// `"lora_only"`
    LoraOnly,
    Other(String),
}

impl From<String> for Bias {
    fn from(s: String) -> Self {
        match s.as_str() {
            "none" => Bias::None,
            "all" => Bias::All,
            "lora_only" => Bias::LoraOnly,
            _ => Bias::Other(s),
        }
    }
}

impl From<Bias> for String {
    fn from(b: Bias) -> Self {
        match b {
            Bias::None => "none".into(),
            Bias::All => "all".into(),
            Bias::LoraOnly => "lora_only".into(),
            Bias::Other(s) => s,
        }
    }
}

/// `target_modules` / `exclude_modules`: a list of module-name suffixes, or
/// one regex that must match the whole module path (`re.fullmatch`), or
/// PEFT's `"all-linear"` shorthand.
///
/// PEFT keeps a list as a Python `set` and writes it back as a list in set
/// iteration order (which varies between runs); the order is kept as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetModules {
    Names(Vec<String>),
    Regex(String),
    AllLinear,
}

impl Serialize for TargetModules {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            TargetModules::Names(v) => v.serialize(s),
            TargetModules::Regex(r) => s.serialize_str(r),
            TargetModules::AllLinear => s.serialize_str("all-linear"),
        }
    }
}

impl<'de> Deserialize<'de> for TargetModules {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) if s == "all-linear" => Ok(TargetModules::AllLinear),
            Value::String(s) => Ok(TargetModules::Regex(s)),
            Value::Array(items) => items
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    other => Err(D::Error::custom(format!(
                        "module names must be strings, got {other}"
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(TargetModules::Names),
            other => Err(D::Error::custom(format!(
                "expected a list of module names or a regex string, got {other}"
            ))),
        }
    }
}

/// A field PEFT types as `Union[T, list[T]]` (`layers_to_transform`, `layers_pattern`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    pub fn to_vec(&self) -> Vec<T> {
        match self {
            OneOrMany::One(x) => vec![x.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// `init_lora_weights`: how the adapter was initialised before training.
///
/// JSON `true`/`false` or a string. Unknown strings are kept in `Unknown` and
/// refused by `validate()`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum InitLoraWeights {
    /// `true`: A Kaiming-uniform, B zero (the adapter starts as a no-op).
    #[default]
    Default,
    /// `false`: A and B both random (PEFT: "for debugging").
    Random,
    /// `"gaussian"`: A ~ N(0, 1/r), B zero.
    Gaussian,
    /// `"eva"`: data-driven init of A, B zero.
    Eva,
    /// `"orthogonal"`.
    Orthogonal,
    /// `"mica"`: B from the smallest singular vectors, A zero (base unchanged).
    Mica,
    /// `"pissa"` (`niter: None`) or `"pissa_niter_N"` (fast SVD, N iterations).
    Pissa { niter: Option<usize> },
    /// `"olora"`.
    Olora,
    /// `"corda"`.
    Corda,
    /// `"loftq"`.
    Loftq,
    /// `"lora_ga"`.
    LoraGa,
    /// Any other string, kept verbatim.
    Unknown(String),
}

impl InitLoraWeights {
    /// Whether PEFT, when it applies this init, also rewrites the *base*
    /// weights (`W <- W - scaling * B0 @ A0`, or quantizes them for LoftQ).
    ///
    /// PEFT re-runs the init on every `PeftModel.from_pretrained` unless the
    /// config says `true`, so an adapter saved with one of these only
    /// reproduces PEFT's outputs on PEFT's modified base model. PEFT's
    /// `save_pretrained(path_initial_model_for_weight_conversion=...)`
    /// converts such adapters to plain LoRA and writes `true`.
    pub fn mutates_base_weights(&self) -> bool {
        matches!(
            self,
            InitLoraWeights::Pissa { .. }
                | InitLoraWeights::Olora
                | InitLoraWeights::Corda
                | InitLoraWeights::Loftq
                | InitLoraWeights::LoraGa
        )
    }

    /// The JSON value PEFT writes for this init.
    pub fn to_value(&self) -> Value {
        let s = match self {
            InitLoraWeights::Default => return Value::Bool(true),
            InitLoraWeights::Random => return Value::Bool(false),
            InitLoraWeights::Gaussian => "gaussian".to_string(),
            InitLoraWeights::Eva => "eva".to_string(),
            InitLoraWeights::Orthogonal => "orthogonal".to_string(),
            InitLoraWeights::Mica => "mica".to_string(),
            InitLoraWeights::Pissa { niter: None } => "pissa".to_string(),
            InitLoraWeights::Pissa { niter: Some(n) } => format!("pissa_niter_{n}"),
            InitLoraWeights::Olora => "olora".to_string(),
            InitLoraWeights::Corda => "corda".to_string(),
            InitLoraWeights::Loftq => "loftq".to_string(),
            InitLoraWeights::LoraGa => "lora_ga".to_string(),
            InitLoraWeights::Unknown(s) => s.clone(),
        };
        Value::String(s)
    }

    /// Parse PEFT's string form. PEFT lower-cases `"gaussian"`, `"olora"`
    /// and `"mica"` before comparing; the others are compared exactly.
    pub fn parse(s: &str) -> Self {
        let lower = s.to_ascii_lowercase();
        match (s, lower.as_str()) {
            (_, "gaussian") => InitLoraWeights::Gaussian,
            (_, "olora") => InitLoraWeights::Olora,
            (_, "mica") => InitLoraWeights::Mica,
            ("eva", _) => InitLoraWeights::Eva,
            ("orthogonal", _) => InitLoraWeights::Orthogonal,
            ("pissa", _) => InitLoraWeights::Pissa { niter: None },
            ("corda", _) => InitLoraWeights::Corda,
            ("loftq", _) => InitLoraWeights::Loftq,
            ("lora_ga", _) => InitLoraWeights::LoraGa,
            _ => match s.strip_prefix("pissa_niter_").map(str::parse::<usize>) {
                Some(Ok(n)) => InitLoraWeights::Pissa { niter: Some(n) },
                _ => InitLoraWeights::Unknown(s.to_string()),
            },
        }
    }
}

impl Serialize for InitLoraWeights {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_value().serialize(s)
    }
}

impl<'de> Deserialize<'de> for InitLoraWeights {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::Bool(true) => Ok(InitLoraWeights::Default),
            Value::Bool(false) => Ok(InitLoraWeights::Random),
            Value::String(s) => Ok(InitLoraWeights::parse(&s)),
            other => Err(D::Error::custom(format!(
                "init_lora_weights must be true, false or a string, got {other}"
            ))),
        }
    }
}
