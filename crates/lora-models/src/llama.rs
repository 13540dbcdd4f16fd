//! LLaMA-family decoder (LLaMA 2/3 layout, SmolLM2, TinyLlama, Mistral without
//! sliding window): RMSNorm, rotary embeddings (Hugging Face's half layout),
//! grouped-query attention, SwiGLU MLP, tied or separate LM head, KV cache.
//!
//! Module paths mirror Hugging Face's `LlamaForCausalLM`
//! (`model.layers.N.self_attn.q_proj`), so PEFT adapters and target names apply
//! unchanged. Linear layers come from the builder and may be dense f32 or
//! GGUF-quantized (QLoRA); the model never mentions LoRA.

use crate::error::{ModelError, Result};
use candle_core::{DType, Device, Tensor, D};
use lora_core::ops_decoder::{causal_softmax, rms_norm, rope, silu_mul};
use lora_core::{FrozenWeight, Linear, ModelBuilder};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Defaults to hidden_size / num_attention_heads.
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

impl LlamaConfig {
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Reads a Hugging Face `config.json` (`LlamaForCausalLM`, `MistralForCausalLM`).
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let bad = |msg: String| ModelError::Config { path: path.display().to_string(), msg };
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON ({e})")))?;
        let usize_of = |k: &str| -> Result<usize> {
            v.get(k).and_then(|x| x.as_u64()).map(|x| x as usize).ok_or_else(|| bad(format!("key {k} is missing or not an integer")))
        };
        let model_type = v.get("model_type").and_then(|x| x.as_str()).unwrap_or("");
        if !["llama", "mistral"].contains(&model_type) {
            return Err(bad(format!("model_type '{model_type}' is not a LLaMA-family decoder (supported: llama, mistral)")));
        }
        if let Some(act) = v.get("hidden_act").and_then(|x| x.as_str()) {
            if act != "silu" {
                return Err(bad(format!("hidden_act '{act}' is not supported (supported: silu)")));
            }
        }
        // transformers 5 writes rope_parameters {rope_theta, rope_type}; older
        // versions rope_theta and rope_scaling.
        let rope = v.get("rope_parameters").or_else(|| v.get("rope_scaling")).filter(|x| !x.is_null());
        if let Some(kind) = rope.and_then(|r| r.get("rope_type").or_else(|| r.get("type"))).and_then(|x| x.as_str()) {
            if kind != "default" {
                return Err(bad(format!("rope scaling '{kind}' is not supported (supported: default)")));
            }
        }
        let rope_theta = v
            .get("rope_theta")
            .and_then(|x| x.as_f64())
            .or_else(|| rope.and_then(|r| r.get("rope_theta")).and_then(|x| x.as_f64()))
            .unwrap_or(10_000.0);
        let heads = usize_of("num_attention_heads")?;
        let token = |k: &str| match v.get(k) {
            Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| x as u32),
            Some(serde_json::Value::Array(a)) => a.first().and_then(|x| x.as_u64()).map(|x| x as u32),
            _ => None,
        };
        let cfg = Self {
            hidden_size: usize_of("hidden_size")?,
            intermediate_size: usize_of("intermediate_size")?,
            num_hidden_layers: usize_of("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: usize_of("num_key_value_heads").unwrap_or(heads),
            head_dim: v.get("head_dim").and_then(|x| x.as_u64()).map(|x| x as usize),
            rms_norm_eps: v.get("rms_norm_eps").and_then(|x| x.as_f64()).unwrap_or(1e-6),
            rope_theta,
            vocab_size: usize_of("vocab_size")?,
            max_position_embeddings: usize_of("max_position_embeddings").unwrap_or(2048),
            tie_word_embeddings: v.get("tie_word_embeddings").and_then(|x| x.as_bool()).unwrap_or(false),
            bos_token_id: token("bos_token_id"),
            eos_token_id: token("eos_token_id"),
        };
        cfg.validate().map_err(bad)?;
        Ok(cfg)
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        let nz = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("vocab_size", self.vocab_size),
        ];
        if let Some((k, _)) = nz.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{k} must be positive"));
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(format!(
                "num_attention_heads={} is not a multiple of num_key_value_heads={}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim() % 2 != 0 {
            return Err(format!("head_dim={} must be even for rotary embeddings", self.head_dim()));
        }
        Ok(())
    }
}

/// Per-layer key/value cache for incremental decoding.
pub struct KvCache {
    layers: Vec<candle_nn::kv_cache::KvCache>,
}

impl KvCache {
    pub fn new(cfg: &LlamaConfig, max_len: usize) -> Self {
        let layers = (0..cfg.num_hidden_layers).map(|_| candle_nn::kv_cache::KvCache::new(2, max_len)).collect();
        Self { layers }
    }

    /// Tokens already cached.
    pub fn len(&self) -> usize {
        self.layers.first().map(|c| c.current_seq_len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(|c| c.reset());
    }
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    n_head: usize,
    n_kv: usize,
    hd: usize,
}

struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

struct Block {
    input_norm: Tensor,
    post_norm: Tensor,
    attn: Attention,
    mlp: Mlp,
}

pub struct Llama {
    pub config: LlamaConfig,
    /// (vocab, hidden), quantized when the source is.
    pub embed: FrozenWeight,
    blocks: Vec<Block>,
    norm: Tensor,
    /// (vocab, hidden); the embedding when tied. Never a LoRA target.
    pub lm_head: Linear,
    /// (max_pos, hd/2)
    cos: Tensor,
    sin: Tensor,
}

impl Attention {
    fn load(vb: &ModelBuilder, c: &LlamaConfig) -> lora_core::Result<Self> {
        let (h, hd) = (c.hidden_size, c.head_dim());
        Ok(Self {
            q: vb.pp("q_proj").linear(h, c.num_attention_heads * hd, false)?,
            k: vb.pp("k_proj").linear(h, c.num_key_value_heads * hd, false)?,
            v: vb.pp("v_proj").linear(h, c.num_key_value_heads * hd, false)?,
            o: vb.pp("o_proj").linear(c.num_attention_heads * hd, h, false)?,
            n_head: c.num_attention_heads,
            n_kv: c.num_key_value_heads,
            hd,
        })
    }

    /// x (B, T, C) at positions offset..offset+T -> (B, T, C)
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        cache: Option<&mut candle_nn::kv_cache::KvCache>,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.n_head, self.n_kv, self.hd);
        let rep = nh / nkv;
        let q = rope(&self.q.forward(x, train)?.reshape((b, t, nh, hd))?, cos, sin)?; // (B, T, nh, hd)
        let k = rope(&self.k.forward(x, train)?.reshape((b, t, nkv, hd))?, cos, sin)?; // (B, T, nkv, hd)
        let v = self.v.forward(x, train)?.reshape((b, t, nkv, hd))?;
        let q = (q.transpose(1, 2)? * (1.0 / (hd as f64).sqrt()))?.contiguous()?; // (B, nh, T, hd)
        let k = k.transpose(1, 2)?.contiguous()?; // (B, nkv, T, hd)
        let v = v.transpose(1, 2)?.contiguous()?;
        let (k, v, offset) = match cache {
            Some(c) => {
                let offset = c.current_seq_len();
                let (k, v) = c.append(&k, &v)?;
                (k, v, offset)
            }
            None => (k, v, 0),
        };
        let tk = k.dim(2)?;
        // Grouped-query attention without copying K/V: the `rep` query heads of
        // one KV head are stacked along the row axis.
        let qg = q.reshape((b, nkv, rep * t, hd))?;
        let scores = lora_core::ops::device_matmul(&qg, &k.t()?)?.reshape((b, nh, t, tk))?; // (B, nh, T, Tk)
        let p = causal_softmax(&scores, offset)?.reshape((b, nkv, rep * t, tk))?;
        let y = lora_core::ops::device_matmul(&p, &v)?.reshape((b, nh, t, hd))?; // (B, nh, T, hd)
        let y = y.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        self.o.forward(&y, train)
    }
}

impl Mlp {
    fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let h = silu_mul(&self.gate.forward(x, train)?, &self.up.forward(x, train)?)?;
        self.down.forward(&h, train)
    }
}

impl Llama {
    /// The device the model computes on.
    pub fn device(&self) -> &Device {
        self.cos.device()
    }

    /// Builds the model; `vb` is at the root (paths `model.…`, `lm_head`).
    pub fn load(vb: &ModelBuilder, config: &LlamaConfig) -> Result<Self> {
        config.validate().map_err(|msg| ModelError::Config { path: "config".into(), msg })?;
        let c = config;
        let m = vb.pp("model");
        let embed = m.pp("embed_tokens").frozen_weight("weight", &[c.vocab_size, c.hidden_size])?;
        let mut blocks = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let l = m.pp("layers").pp(i);
            blocks.push(Block {
                input_norm: l.pp("input_layernorm").tensor("weight", &[c.hidden_size])?,
                post_norm: l.pp("post_attention_layernorm").tensor("weight", &[c.hidden_size])?,
                attn: Attention::load(&l.pp("self_attn"), c)?,
                mlp: Mlp {
                    gate: l.pp("mlp").pp("gate_proj").linear(c.hidden_size, c.intermediate_size, false)?,
                    up: l.pp("mlp").pp("up_proj").linear(c.hidden_size, c.intermediate_size, false)?,
                    down: l.pp("mlp").pp("down_proj").linear(c.intermediate_size, c.hidden_size, false)?,
                },
            });
        }
        let norm = m.pp("norm").tensor("weight", &[c.hidden_size])?;
        let head_w = if c.tie_word_embeddings || !vb.pp("lm_head").contains("weight") {
            embed.clone()
        } else {
            vb.pp("lm_head").frozen_weight("weight", &[c.vocab_size, c.hidden_size])?
        };
        let lm_head = Linear::from_frozen("lm_head", head_w, None, None)?;
        let (cos, sin) = rope_tables(c, vb.device())?;
        Ok(Self { config: config.clone(), embed, blocks, norm, lm_head, cos, sin })
    }

    /// Hidden states after the final norm: ids (B, T) u32 at positions
    /// `cache.len()..` (or 0.. without a cache) -> (B, T, C).
    pub fn hidden(&self, ids: &Tensor, mut cache: Option<&mut KvCache>, train: bool) -> Result<Tensor> {
        let (_b, t) = ids.dims2()?;
        if t == 0 {
            return Err(ModelError::Config { path: "input".into(), msg: "no tokens to run the model on".into() });
        }
        let offset = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        let max = self.config.max_position_embeddings;
        if offset + t > max {
            return Err(ModelError::Config {
                path: "input".into(),
                msg: format!("{} tokens exceed the model's context of {max}", offset + t),
            });
        }
        let cos = self.cos.narrow(0, offset, t)?;
        let sin = self.sin.narrow(0, offset, t)?;
        let mut x = self.embed.embedding(ids)?; // (B, T, C)
        for (i, blk) in self.blocks.iter().enumerate() {
            let c = cache.as_mut().map(|c| &mut c.layers[i]);
            let h = rms_norm(&x, &blk.input_norm, self.config.rms_norm_eps)?;
            x = (x + blk.attn.forward(&h, &cos, &sin, c, train)?)?;
            let h = rms_norm(&x, &blk.post_norm, self.config.rms_norm_eps)?;
            x = (x + blk.mlp.forward(&h, train)?)?;
        }
        Ok(rms_norm(&x, &self.norm, self.config.rms_norm_eps)?)
    }

    /// Logits (B, T, V) for every position.
    pub fn forward(&self, ids: &Tensor, cache: Option<&mut KvCache>, train: bool) -> Result<Tensor> {
        let h = self.hidden(ids, cache, train)?;
        Ok(self.lm_head.forward(&h, train)?)
    }

    /// Logits (B, V) of the last position only (generation).
    pub fn forward_last(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let h = self.hidden(ids, cache, false)?;
        let t = h.dim(1)?;
        let last = h.narrow(1, t - 1, 1)?.squeeze(1)?.contiguous()?;
        Ok(self.lm_head.forward(&last, false)?)
    }

    /// Every linear layer, in model order (for inspection and export).
    pub fn linears(&self) -> Vec<Linear> {
        let mut v = vec![];
        for b in &self.blocks {
            let a = &b.attn;
            v.extend([&a.q, &a.k, &a.v, &a.o, &b.mlp.gate, &b.mlp.up, &b.mlp.down].into_iter().cloned());
        }
        v
    }

    /// Bytes of frozen weights held in memory (quantized size when quantized).
    pub fn weight_bytes(&self) -> usize {
        let lin: usize = self.linears().iter().filter_map(|l| l.frozen_weight()).map(|w| w.storage_bytes()).sum();
        let norms = self.blocks.len() * 2 * self.config.hidden_size * 4 + self.config.hidden_size * 4;
        let head = if self.config.tie_word_embeddings {
            0
        } else {
            self.lm_head.frozen_weight().map(|w| w.storage_bytes()).unwrap_or(0)
        };
        lin + norms + head + self.embed.storage_bytes()
    }
}

/// cos/sin (max_pos, hd/2) computed in f32 as transformers does.
fn rope_tables(c: &LlamaConfig, dev: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let hd = c.head_dim();
    let inv: Vec<f32> = (0..hd / 2).map(|i| 1.0 / (c.rope_theta as f32).powf((2 * i) as f32 / hd as f32)).collect();
    let n = c.max_position_embeddings;
    let inv = Tensor::from_vec(inv, (1, hd / 2), dev)?;
    let pos = Tensor::arange(0u32, n as u32, dev)?.to_dtype(DType::F32)?.reshape((n, 1))?;
    let freqs = pos.broadcast_mul(&inv)?;
    Ok((freqs.cos()?, freqs.sin()?))
}

/// Index of the largest logit in every row of (…, V).
pub fn argmax_last(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?)
}

/// Where a decoder came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DecoderFormat {
    Gguf,
    HfFolder,
}

/// Everything needed to build a decoder: weights, config, tokenizer, template.
pub struct DecoderFiles {
    pub path: std::path::PathBuf,
    pub format: DecoderFormat,
    pub source: Box<dyn lora_core::WeightSource>,
    pub config: LlamaConfig,
    pub tokenizer: tokenizers::Tokenizer,
    /// Jinja chat template (GGUF `tokenizer.chat_template`, or the folder's
    /// `tokenizer_config.json` / `chat_template.jinja`).
    pub chat_template: Option<String>,
    /// Special tokens: (bos, eos) strings.
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// The open GGUF file (for export and merge), when the format is GGUF.
    pub gguf: Option<std::sync::Arc<crate::gguf::GgufFile>>,
}

impl DecoderFiles {
    /// Opens a `.gguf` file or a Hugging Face folder.
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            return Self::open_hf(path);
        }
        if !path.exists() {
            return Err(ModelError::Io { path: path.display().to_string(), msg: "model file or folder not found".into() });
        }
        let file = std::sync::Arc::new(crate::gguf::GgufFile::open(path)?);
        let config = file.llama_config()?;
        let tokenizer = file.tokenizer()?;
        let tok_str = |k: &str| {
            file.meta_usize(k).ok().and_then(|id| tokenizer.id_to_token(id as u32))
        };
        Ok(Self {
            path: path.to_path_buf(),
            format: DecoderFormat::Gguf,
            source: Box::new(crate::gguf::GgufSource::new(file.clone())?),
            chat_template: file.chat_template(),
            bos_token: tok_str("tokenizer.ggml.bos_token_id"),
            eos_token: tok_str("tokenizer.ggml.eos_token_id"),
            config,
            tokenizer,
            gguf: Some(file),
        })
    }

    fn open_hf(dir: &Path) -> Result<Self> {
        let folder = crate::hf::HfFolder::open(dir)?;
        let config = LlamaConfig::from_hf_file(&folder.config)?;
        let tokenizer = folder.load_tokenizer()?;
        let tc_path = dir.join("tokenizer_config.json");
        let tc: serde_json::Value = match std::fs::read_to_string(&tc_path) {
            Ok(t) => serde_json::from_str(&t)
                .map_err(|e| ModelError::Config { path: tc_path.display().to_string(), msg: format!("not valid JSON ({e})") })?,
            Err(_) => serde_json::Value::Null,
        };
        let token_str = |k: &str| match tc.get(k) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(v) => v.get("content").and_then(|c| c.as_str()).map(String::from),
            None => None,
        };
        let chat_template = tc
            .get("chat_template")
            .and_then(|t| t.as_str())
            .map(String::from)
            .or_else(|| std::fs::read_to_string(dir.join("chat_template.jinja")).ok());
        let by_id = |id: Option<u32>| id.and_then(|i| tokenizer.id_to_token(i));
        Ok(Self {
            path: dir.to_path_buf(),
            format: DecoderFormat::HfFolder,
            source: Box::new(folder.weight_source()?),
            bos_token: token_str("bos_token").or_else(|| by_id(config.bos_token_id)),
            eos_token: token_str("eos_token").or_else(|| by_id(config.eos_token_id)),
            chat_template,
            config,
            tokenizer,
            gguf: None,
        })
    }
}
