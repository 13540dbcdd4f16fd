//! BERT-family encoder (BERT, MiniLM, ...), matching Hugging Face
//! `transformers`' `BertModel` and `BertForSequenceClassification`.
//!
//! Module paths mirror transformers' module tree (`bert.encoder.layer.0.
//! attention.self.query`), so adapter keys agree with PEFT's. Checkpoints with
//! or without the `bert.` prefix load alike. The model never mentions LoRA: it
//! asks the [`ModelBuilder`] for its linear layers.

use crate::error::{ModelError, Result};
use candle_core::{DType, Tensor, D};
use lora_core::{ops, Linear, ModelBuilder};
use serde::Deserialize;
use std::path::Path;

fn d_layer_norm_eps() -> f64 {
    1e-12
}
fn d_dropout() -> f64 {
    0.1
}
fn d_act() -> String {
    "gelu".into()
}
fn d_type_vocab() -> usize {
    2
}
fn d_max_pos() -> usize {
    512
}
fn d_pos_type() -> String {
    "absolute".into()
}
fn d_init_range() -> f64 {
    0.02
}

/// The fields of transformers' `BertConfig` that the model uses.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_dropout")]
    pub hidden_dropout_prob: f64,
    #[serde(default = "d_dropout")]
    pub attention_probs_dropout_prob: f64,
    #[serde(default = "d_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "d_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_pos_type")]
    pub position_embedding_type: String,
    #[serde(default = "d_init_range")]
    pub initializer_range: f64,
    #[serde(default)]
    pub classifier_dropout: Option<f64>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
    #[serde(default)]
    pub id2label: Option<std::collections::BTreeMap<String, String>>,
    /// Written by `lora merge` for a mean-pooling head (transformers ignores it).
    #[serde(default)]
    pub lora_head: Option<String>,
}

impl BertConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let c: BertConfig = serde_json::from_str(&text).map_err(|e| ModelError::Config {
            path: path.display().to_string(),
            msg: e.to_string(),
        })?;
        c.validate(path)?;
        Ok(c)
    }

    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |msg: String| ModelError::Config {
            path: path.display().to_string(),
            msg,
        };
        if let Some(t) = &self.model_type {
            let ok = ["bert", "roberta", "xlm-roberta", "distilbert", "camembert", "electra"];
            if t != "bert" && ok.contains(&t.as_str()) {
                return Err(bad(format!("model_type={t} is not supported yet (only bert)")));
            }
            if !ok.contains(&t.as_str()) {
                return Err(bad(format!("model_type={t} is not a BERT-family encoder")));
            }
        }
        if self.hidden_size == 0 || self.num_attention_heads == 0 {
            return Err(bad("hidden_size and num_attention_heads must be positive".into()));
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(bad(format!(
                "hidden_size={} is not divisible by num_attention_heads={}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if self.position_embedding_type != "absolute" {
            return Err(bad(format!(
                "position_embedding_type={} is not supported (only absolute)",
                self.position_embedding_type
            )));
        }
        Activation::parse(&self.hidden_act).map_err(bad)?;
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
enum Activation {
    GeluErf,
    GeluTanh,
    Relu,
}

impl Activation {
    fn parse(s: &str) -> std::result::Result<Self, String> {
        match s {
            "gelu" => Ok(Self::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Self::GeluTanh),
            "relu" => Ok(Self::Relu),
            other => Err(format!("hidden_act={other} is not supported (gelu, gelu_new, relu)")),
        }
    }

    fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::GeluErf => ops::gelu_erf(x),
            Self::GeluTanh => x.gelu(),
            Self::Relu => x.relu(),
        }
    }
}

fn full_last_layer() -> bool {
    static R: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *R.get_or_init(|| std::env::var_os("LORA_FULL_LAST_LAYER").is_some_and(|v| v != "0"))
}

fn reference_attention() -> bool {
    static R: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *R.get_or_init(|| std::env::var_os("LORA_REFERENCE_ATTENTION").is_some_and(|v| v != "0"))
}

fn dropout(x: &Tensor, p: f64, train: bool) -> candle_core::Result<Tensor> {
    if train && p > 0.0 {
        ops::dropout(x, p as f32)
    } else {
        Ok(x.clone())
    }
}

/// LayerNorm with frozen parameters (`weight`/`bias`, or old `gamma`/`beta`).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    gamma: Tensor,
    beta: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn load(vb: &ModelBuilder, size: usize, eps: f64) -> Result<Self> {
        let (g, b) = if vb.contains("weight") || !vb.contains("gamma") {
            ("weight", "bias")
        } else {
            ("gamma", "beta")
        };
        Ok(Self {
            gamma: vb.tensor(g, &[size])?,
            beta: vb.tensor(b, &[size])?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        ops::layer_norm(x, &self.gamma, &self.beta, self.eps)
    }

    /// `LayerNorm(dropout(y) + residual)` in one op (the end of a sub-layer).
    pub fn add_dropout_forward(&self, y: &Tensor, residual: &Tensor, p: f64, train: bool) -> candle_core::Result<Tensor> {
        lora_core::residual_norm::add_dropout_layer_norm(y, residual, &self.gamma, &self.beta, self.eps, p as f32, train)
    }
}

struct Embeddings {
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    norm: LayerNorm,
    dropout: f64,
}

impl Embeddings {
    fn load(vb: &ModelBuilder, c: &BertConfig) -> Result<Self> {
        let h = c.hidden_size;
        Ok(Self {
            word: vb.pp("word_embeddings").tensor("weight", &[c.vocab_size, h])?,
            position: vb.pp("position_embeddings").tensor("weight", &[c.max_position_embeddings, h])?,
            token_type: vb.pp("token_type_embeddings").tensor("weight", &[c.type_vocab_size, h])?,
            norm: LayerNorm::load(&vb.pp("LayerNorm"), h, c.layer_norm_eps)?,
            dropout: c.hidden_dropout_prob,
        })
    }

    /// ids, types: (B, T) u32 -> (B, T, H)
    fn forward(&self, ids: &Tensor, types: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        if let Some(x) = ops::embeddings_sum(&self.word, &self.token_type, &self.position, ids, types)? {
            return dropout(&self.norm.forward(&x)?, self.dropout, train);
        }
        let (b, t) = ids.dims2()?;
        let h = self.word.dim(1)?;
        let w = self.word.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, h))?;
        let ty = self.token_type.index_select(&types.flatten_all()?, 0)?.reshape((b, t, h))?;
        let pos = self.position.narrow(0, 0, t)?; // (T, H)
        let x = (w + ty)?.broadcast_add(&pos)?;
        dropout(&self.norm.forward(&x)?, self.dropout, train)
    }
}

struct SelfAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    out: Linear,
    norm: LayerNorm,
    heads: usize,
    attn_dropout: f64,
    hidden_dropout: f64,
}

impl SelfAttention {
    fn load(vb: &ModelBuilder, c: &BertConfig) -> Result<Self> {
        let h = c.hidden_size;
        let s = vb.pp("self");
        let o = vb.pp("output");
        Ok(Self {
            query: s.pp("query").linear(h, h, true)?,
            key: s.pp("key").linear(h, h, true)?,
            value: s.pp("value").linear(h, h, true)?,
            out: o.pp("dense").linear(h, h, true)?,
            norm: LayerNorm::load(&o.pp("LayerNorm"), h, c.layer_norm_eps)?,
            heads: c.num_attention_heads,
            attn_dropout: c.attention_probs_dropout_prob,
            hidden_dropout: c.hidden_dropout_prob,
        })
    }

    /// x: (B, T, H); mask_bias: (B, T) additive. Returns (B, T, H), or with
    /// `first_only` the output at the first position alone, (B, 1, H): keys and
    /// values from every position, the query, attention row, output projection
    /// and norm for position 0 only (what a [CLS] head reads from the last layer).
    fn forward(&self, x: &Tensor, mask_bias: &Tensor, train: bool, first_only: bool) -> candle_core::Result<Tensor> {
        let xq = if first_only { x.narrow(1, 0, 1)?.contiguous()? } else { x.clone() };
        let q = self.query.forward(&xq, train)?;
        let k = self.key.forward(x, train)?;
        let v = self.value.forward(x, train)?;
        // Fused: (B, T, H) in and out, no head-split copies (lora_core::attention;
        // the last layer's single query position too).
        // LORA_REFERENCE_ATTENTION=1 selects the unfused path (benchmark A/B).
        let attn = if reference_attention() { lora_core::attention::attention_reference } else { lora_core::attention::attention };
        let ctx = attn(&q, &k, &v, mask_bias, self.heads, self.attn_dropout as f32, train)?;
        self.norm.add_dropout_forward(&self.out.forward(&ctx, train)?, &xq, self.hidden_dropout, train)
    }
}

struct Layer {
    attention: SelfAttention,
    intermediate: Linear,
    output: Linear,
    norm: LayerNorm,
    act: Activation,
    dropout: f64,
}

impl Layer {
    fn load(vb: &ModelBuilder, c: &BertConfig) -> Result<Self> {
        let (h, f) = (c.hidden_size, c.intermediate_size);
        Ok(Self {
            attention: SelfAttention::load(&vb.pp("attention"), c)?,
            intermediate: vb.pp("intermediate").pp("dense").linear(h, f, true)?,
            output: vb.pp("output").pp("dense").linear(f, h, true)?,
            norm: LayerNorm::load(&vb.pp("output").pp("LayerNorm"), h, c.layer_norm_eps)?,
            act: Activation::parse(&c.hidden_act).map_err(|m| ModelError::Config {
                path: "config.json".into(),
                msg: m,
            })?,
            dropout: c.hidden_dropout_prob,
        })
    }

    /// (B, T, H) -> (B, T, H), or (B, 1, H) for the first position alone.
    fn forward(&self, x: &Tensor, mask_bias: &Tensor, train: bool, first_only: bool) -> candle_core::Result<Tensor> {
        let a = self.attention.forward(x, mask_bias, train, first_only)?; // (B, T or 1, H)
        let i = match self.act {
            // One pass on the bf16 tiles at bf16 matmul precision.
            Activation::GeluErf => self.intermediate.forward_gelu(&a, train)?,
            act => act.apply(&self.intermediate.forward(&a, train)?)?,
        }; // (B, T, F)
        self.norm.add_dropout_forward(&self.output.forward(&i, train)?, &a, self.dropout, train)
    }
}

/// transformers' `BertModel`: embeddings, encoder and (optional) pooler.
pub struct BertModel {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    pooler: Option<Linear>,
    pub config: BertConfig,
}

/// Inputs of one batch: all (B, T), u32 ids, f32 mask of 0/1.
pub struct BertInput {
    pub input_ids: Tensor,
    pub token_type_ids: Tensor,
    pub attention_mask: Tensor,
}

impl BertModel {
    /// `vb` points at the model root (`bert` in a classification model).
    pub fn load(vb: &ModelBuilder, c: &BertConfig, with_pooler: bool) -> Result<Self> {
        let embeddings = Embeddings::load(&vb.pp("embeddings"), c)?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| Layer::load(&vb.pp("encoder").pp("layer").pp(i), c))
            .collect::<Result<Vec<_>>>()?;
        let pooler = if with_pooler {
            Some(vb.pp("pooler").pp("dense").linear(c.hidden_size, c.hidden_size, true)?)
        } else {
            None
        };
        Ok(Self {
            embeddings,
            layers,
            pooler,
            config: c.clone(),
        })
    }

    /// Last hidden state (B, T, H).
    pub fn forward(&self, input: &BertInput, train: bool) -> candle_core::Result<Tensor> {
        self.encode(input, train, false)
    }

    /// The last hidden state at the first position ([CLS]) alone, (B, 1, H):
    /// what the pooler reads. Equal to `forward(..)[:, :1]`, but the last layer
    /// computes its query, attention, output projection and feed-forward for
    /// that one position (its keys and values still see every token), which
    /// skips ~1/L of the encoder's work (~14% for MiniLM-L6), in training too.
    pub fn forward_cls(&self, input: &BertInput, train: bool) -> candle_core::Result<Tensor> {
        self.encode(input, train, true)
    }

    fn encode(&self, input: &BertInput, train: bool, cls_only: bool) -> candle_core::Result<Tensor> {
        let (_, t) = input.input_ids.dims2()?;
        if t > self.config.max_position_embeddings {
            candle_core::bail!(
                "sequence length {t} exceeds max_position_embeddings={}",
                self.config.max_position_embeddings
            )
        }
        // (B, T) 1/0 -> (B, T) additive bias: 0 or f32::MIN, as transformers.
        let mask = input.attention_mask.to_dtype(DType::F32)?;
        let bias = ((1.0 - mask)? * f32::MIN as f64)?;
        let mut x = self.embeddings.forward(&input.input_ids, &input.token_type_ids, train)?;
        let n = self.layers.len();
        for (i, l) in self.layers.iter().enumerate() {
            x = l.forward(&x, &bias, train, cls_only && i + 1 == n)?;
        }
        Ok(x)
    }

    /// `tanh(dense(h[:, 0]))`, transformers' `BertPooler`.
    pub fn pool(&self, hidden: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let cls = hidden.narrow(1, 0, 1)?.squeeze(1)?; // (B, H)
        match &self.pooler {
            Some(p) => p.forward(&cls, train)?.tanh(),
            None => candle_core::bail!("this model was loaded without its pooler"),
        }
    }
}

/// How the classifier sees a sentence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// [CLS] → pooler dense + tanh → dropout → classifier (`BertForSequenceClassification`).
    Pooler,
    /// Mean over the attention mask → dropout → classifier (sentence-transformers style).
    Mean,
}

impl Head {
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s {
            "pooler" => Ok(Self::Pooler),
            "mean" => Ok(Self::Mean),
            o => Err(format!("--head {o}: expected pooler or mean")),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pooler => "pooler",
            Self::Mean => "mean",
        }
    }
}

/// `BertForSequenceClassification` (pooler head) or a mean-pooling variant.
pub struct BertClassifier {
    pub bert: BertModel,
    pub classifier: Linear,
    pub head: Head,
    dropout: f64,
}

impl BertClassifier {
    /// `vb` is the root; the encoder lives under `bert`, the head at `classifier`.
    pub fn load(vb: &ModelBuilder, c: &BertConfig, num_labels: usize, head: Head) -> Result<Self> {
        let bert = BertModel::load(&vb.pp("bert"), c, head == Head::Pooler)?;
        let classifier = vb.pp("classifier").head_linear(c.hidden_size, num_labels, true)?;
        Ok(Self {
            bert,
            classifier,
            head,
            dropout: c.classifier_dropout.unwrap_or(c.hidden_dropout_prob),
        })
    }

    /// Logits (B, num_labels). With the pooler head the last layer runs for
    /// [CLS] alone ([`BertModel::forward_cls`]; `LORA_FULL_LAST_LAYER=1` turns
    /// that off, for A/B measurements).
    pub fn forward(&self, input: &BertInput, train: bool) -> candle_core::Result<Tensor> {
        self.forward_with(input, train, !full_last_layer())
    }

    /// [`Self::forward`], choosing whether a pooler head's last layer runs for
    /// [CLS] alone (`cls_only`) or for every position (as transformers does).
    pub fn forward_with(&self, input: &BertInput, train: bool, cls_only: bool) -> candle_core::Result<Tensor> {
        let pooled = match self.head {
            Head::Pooler => self.bert.pool(&self.bert.encode(input, train, cls_only)?, train)?,
            Head::Mean => {
                let h = self.bert.forward(input, train)?;
                let m = input.attention_mask.to_dtype(DType::F32)?.unsqueeze(2)?; // (B, T, 1)
                let sum = h.broadcast_mul(&m)?.sum(1)?; // (B, H)
                let n = m.sum(1)?.clamp(1e-9, f64::INFINITY)?; // (B, 1)
                sum.broadcast_div(&n)?
            }
        };
        self.classifier.forward(&dropout(&pooled, self.dropout, train)?, train)
    }
}

/// Mean of `h` over the positions where `mask` is 1: (B, T, H), (B, T) -> (B, H).
pub fn mean_pool(h: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    let m = mask.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?;
    h.broadcast_mul(&m)?.sum(1)?.broadcast_div(&m.sum(1)?.clamp(1e-9, f64::INFINITY)?)
}
