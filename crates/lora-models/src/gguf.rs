//! GGUF files (llama.cpp's format) as a weight source with Hugging Face names.
//!
//! A [`GgufSource`] presents a GGUF llama model as if it were a Hugging Face
//! checkpoint: `blk.3.attn_q.weight` is served as
//! `model.layers.3.self_attn.q_proj.weight`, and Q/K rows are un-permuted from
//! llama.cpp's rope layout (interleaved pairs) to Hugging Face's (halves), so one
//! copy of the model code and of every LoRA adapter works for both formats.
//! Quantized matrices stay quantized (the row permutation moves whole quantized
//! rows). The tokenizer and the chat template come from the metadata.

use crate::error::{ModelError, Result};
use crate::llama::LlamaConfig;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use lora_core::{CoreError, WeightSource};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Architectures whose tensor layout this reader knows.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama"];

/// An open GGUF file: its metadata and tensor index (data is read on demand).
pub struct GgufFile {
    pub path: PathBuf,
    pub content: Content,
    file: Mutex<File>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        let content = Content::read(&mut file).map_err(|e| ModelError::Io {
            path: path.display().to_string(),
            msg: format!("not a readable GGUF file ({})", one_line(&e.to_string())),
        })?;
        let len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
        // Every tensor must lie inside the file: a truncated download fails here,
        // naming the tensor, not later in the middle of a forward pass.
        for (name, info) in &content.tensor_infos {
            let bytes = info.shape.elem_count() / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
            let end = content.tensor_data_offset + info.offset + bytes as u64;
            if end > len {
                return Err(ModelError::Io {
                    path: path.display().to_string(),
                    msg: format!("truncated GGUF file: tensor {name} ends at byte {end}, the file has {len}"),
                });
            }
        }
        Ok(Self { path: path.to_path_buf(), content, file: Mutex::new(file) })
    }

    fn bad(&self, msg: impl Into<String>) -> ModelError {
        ModelError::Config { path: self.path.display().to_string(), msg: msg.into() }
    }

    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    pub fn meta_str(&self, key: &str) -> Result<&str> {
        match self.meta(key) {
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(self.bad(format!("metadata {key} is not a string"))),
            None => Err(self.bad(format!("metadata {key} is missing"))),
        }
    }

    pub fn meta_usize(&self, key: &str) -> Result<usize> {
        let v = self.meta(key).ok_or_else(|| self.bad(format!("metadata {key} is missing")))?;
        v.to_u64()
            .or_else(|_| v.to_u32().map(u64::from))
            .or_else(|_| v.to_i32().map(|x| x.max(0) as u64))
            .map(|x| x as usize)
            .map_err(|_| self.bad(format!("metadata {key} is not an integer")))
    }

    pub fn meta_f64(&self, key: &str) -> Result<f64> {
        let v = self.meta(key).ok_or_else(|| self.bad(format!("metadata {key} is missing")))?;
        v.to_f32()
            .map(f64::from)
            .or_else(|_| v.to_f64())
            .map_err(|_| self.bad(format!("metadata {key} is not a number")))
    }

    pub fn architecture(&self) -> Result<String> {
        let arch = self.meta_str("general.architecture")?.to_string();
        if !SUPPORTED_ARCHITECTURES.contains(&arch.as_str()) {
            return Err(self.bad(format!(
                "architecture '{arch}' is not supported (supported: {})",
                SUPPORTED_ARCHITECTURES.join(", ")
            )));
        }
        Ok(arch)
    }

    /// The model hyper-parameters from `llama.*` metadata.
    pub fn llama_config(&self) -> Result<LlamaConfig> {
        let arch = self.architecture()?;
        let k = |s: &str| format!("{arch}.{s}");
        let hidden = self.meta_usize(&k("embedding_length"))?;
        let heads = self.meta_usize(&k("attention.head_count"))?;
        let kv = self.meta_usize(&k("attention.head_count_kv")).unwrap_or(heads);
        let vocab = match self.content.tensor_infos.get("token_embd.weight") {
            Some(info) => info.shape.dims()[0],
            None => return Err(self.bad("tensor token_embd.weight is missing")),
        };
        let head_dim = self.meta_usize(&k("rope.dimension_count")).unwrap_or(hidden / heads.max(1));
        let cfg = LlamaConfig {
            hidden_size: hidden,
            intermediate_size: self.meta_usize(&k("feed_forward_length"))?,
            num_hidden_layers: self.meta_usize(&k("block_count"))?,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim: Some(head_dim),
            rms_norm_eps: self.meta_f64(&k("attention.layer_norm_rms_epsilon"))?,
            rope_theta: self.meta_f64(&k("rope.freq_base")).unwrap_or(10_000.0),
            vocab_size: vocab,
            max_position_embeddings: self.meta_usize(&k("context_length")).unwrap_or(4096),
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            bos_token_id: self.meta_usize("tokenizer.ggml.bos_token_id").ok().map(|v| v as u32),
            eos_token_id: self.meta_usize("tokenizer.ggml.eos_token_id").ok().map(|v| v as u32),
        };
        cfg.validate().map_err(|m| self.bad(m))?;
        Ok(cfg)
    }

    /// Reads tensor `name` (GGUF naming) as stored.
    pub fn qtensor(&self, name: &str) -> Result<QTensor> {
        let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        self.content.tensor(&mut *f, name, &Device::Cpu).map_err(|e| ModelError::Io {
            path: self.path.display().to_string(),
            msg: format!("tensor {name}: {}", one_line(&e.to_string())),
        })
    }

    /// The chat template (Jinja) from `tokenizer.chat_template`, if any.
    pub fn chat_template(&self) -> Option<String> {
        self.meta_str("tokenizer.chat_template").ok().map(str::to_string)
    }

    /// Count of tensors per GGML type, for `inspect`.
    pub fn tensor_types(&self) -> Vec<(String, usize)> {
        let mut m: HashMap<String, usize> = HashMap::new();
        for info in self.content.tensor_infos.values() {
            *m.entry(format!("{:?}", info.ggml_dtype)).or_default() += 1;
        }
        let mut v: Vec<_> = m.into_iter().collect();
        v.sort();
        v
    }

    /// Builds the tokenizer as transformers does from GGUF metadata (GPT-2
    /// byte-level BPE: vocabulary and merges in file order, control tokens as
    /// special added tokens, no BOS/EOS added by `encode`).
    pub fn tokenizer(&self) -> Result<tokenizers::Tokenizer> {
        use tokenizers::models::bpe::BPE;
        use tokenizers::pre_tokenizers::byte_level::ByteLevel;
        let model = self.meta_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(self.bad(format!(
                "tokenizer.ggml.model '{model}' is not supported (supported: gpt2 byte-level BPE)"
            )));
        }
        let strings = |key: &str| -> Result<Vec<String>> {
            match self.meta(key) {
                Some(Value::Array(v)) => v
                    .iter()
                    .map(|x| x.to_string().cloned().map_err(|_| self.bad(format!("{key} holds a non-string"))))
                    .collect(),
                _ => Err(self.bad(format!("metadata {key} is missing or not an array"))),
            }
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges: Vec<(String, String)> = strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| match m.split_once(' ') {
                Some((a, b)) => Ok((a.to_string(), b.to_string())),
                None => Err(self.bad(format!("tokenizer.ggml.merges: entry '{m}' has no space"))),
            })
            .collect::<Result<_>>()?;
        let types: Vec<i64> = match self.meta("tokenizer.ggml.token_type") {
            Some(Value::Array(v)) => v.iter().map(|x| x.to_i32().map(i64::from).unwrap_or(1)).collect(),
            _ => vec![1; tokens.len()],
        };
        let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| self.bad(format!("cannot build the BPE tokenizer: {e}")))?;
        let mut tok = tokenizers::Tokenizer::new(bpe);
        tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        tok.with_decoder(Some(ByteLevel::new(true, true, true)));
        let added: Vec<tokenizers::AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == 3 || t == 4)
            .map(|(s, &t)| tokenizers::AddedToken::from(s.clone(), t == 3).normalized(false))
            .collect();
        tok.add_special_tokens(added).map_err(|e| self.bad(format!("cannot add special tokens: {e}")))?;
        Ok(tok)
    }
}

fn one_line(s: &str) -> String {
    s.lines().next().unwrap_or("").to_string()
}

/// Hugging Face parameter name -> GGUF tensor name for llama models.
pub fn hf_to_gguf_name(name: &str) -> Option<String> {
    let fixed = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == name) {
        return Some(g.to_string());
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (n, rest) = rest.split_once('.')?;
    n.parse::<usize>().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let g = LAYER_NAMES.iter().find(|(h, _)| *h == module)?.1;
    Some(format!("blk.{n}.{g}.{suffix}"))
}

/// GGUF tensor name -> Hugging Face parameter name (inverse of [`hf_to_gguf_name`]).
pub fn gguf_to_hf_name(name: &str) -> Option<String> {
    let fixed = [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
    ];
    if let Some((_, h)) = fixed.iter().find(|(g, _)| *g == name) {
        return Some(h.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (n, rest) = rest.split_once('.')?;
    n.parse::<usize>().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let h = LAYER_NAMES.iter().find(|(_, g)| *g == module)?.0;
    Some(format!("model.layers.{n}.{h}.{suffix}"))
}

/// (Hugging Face module under `model.layers.N`, GGUF name under `blk.N`).
pub const LAYER_NAMES: &[(&str, &str)] = &[
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "ffn_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
];

/// For a Q (or K) weight with `rows = n_head·hd` rows: the source row of every
/// destination row. `to_hf`: from llama.cpp's interleaved rope layout to
/// Hugging Face's half layout, `hf[h·hd + i·hd/2 + j] = gguf[h·hd + 2j + i]`;
/// otherwise the inverse (as llama.cpp's converter permutes).
pub fn rope_row_permutation(rows: usize, n_head: usize, to_hf: bool) -> Vec<usize> {
    let hd = rows / n_head.max(1);
    let half = hd / 2;
    let mut src = vec![0; rows];
    for h in 0..n_head {
        for i in 0..2 {
            for j in 0..half {
                let hf = h * hd + i * half + j;
                let gg = h * hd + 2 * j + i;
                if to_hf {
                    src[hf] = gg;
                } else {
                    src[gg] = hf;
                }
            }
        }
    }
    src
}

/// Reorders the rows of a (possibly quantized) matrix: `out[r] = in[src[r]]`.
pub fn permute_rows(q: &QTensor, src: &[usize]) -> candle_core::Result<QTensor> {
    let (rows, cols) = q.shape().dims2()?;
    if src.len() != rows {
        candle_core::bail!("permute_rows: {} indices for {rows} rows", src.len())
    }
    let dtype = q.dtype();
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    let data = q.data()?;
    let mut out = Vec::with_capacity(data.len());
    for &s in src {
        out.extend_from_slice(&data[s * row_bytes..(s + 1) * row_bytes]);
    }
    candle_core::quantized::ggml_file::qtensor_from_ggml(dtype, &out, vec![rows, cols], &Device::Cpu)
}

/// Permutes the rows of a dense (rows, cols) tensor: `out[r] = in[src[r]]`.
pub fn permute_dense_rows(t: &Tensor, src: &[usize]) -> candle_core::Result<Tensor> {
    let idx: Vec<u32> = src.iter().map(|&s| s as u32).collect();
    t.index_select(&Tensor::new(idx.as_slice(), t.device())?, 0)
}

/// A GGUF llama model as a [`WeightSource`] with Hugging Face names and layout.
pub struct GgufSource {
    pub file: Arc<GgufFile>,
    n_head: usize,
    n_kv_head: usize,
}

impl GgufSource {
    pub fn new(file: Arc<GgufFile>) -> Result<Self> {
        let cfg = file.llama_config()?;
        Ok(Self { file, n_head: cfg.num_attention_heads, n_kv_head: cfg.num_key_value_heads })
    }

    fn heads_for(&self, hf_name: &str) -> Option<usize> {
        if hf_name.ends_with("self_attn.q_proj.weight") {
            Some(self.n_head)
        } else if hf_name.ends_with("self_attn.k_proj.weight") {
            Some(self.n_kv_head)
        } else {
            None
        }
    }

    /// The tensor under its Hugging Face name, rows un-permuted for Q/K.
    fn load(&self, key: &str) -> lora_core::Result<Option<QTensor>> {
        let Some(g) = hf_to_gguf_name(key) else { return Ok(None) };
        if !self.file.content.tensor_infos.contains_key(&g) {
            return Ok(None);
        }
        let q = self.file.qtensor(&g).map_err(|e| CoreError::BadFile {
            path: self.file.path.display().to_string(),
            msg: e.to_string(),
        })?;
        match self.heads_for(key) {
            Some(h) => {
                let rows = q.shape().dims2()?.0;
                Ok(Some(permute_rows(&q, &rope_row_permutation(rows, h, true))?))
            }
            None => Ok(Some(q)),
        }
    }
}

impl WeightSource for GgufSource {
    fn name(&self) -> String {
        self.file.path.display().to_string()
    }
    fn contains(&self, key: &str) -> bool {
        hf_to_gguf_name(key).is_some_and(|g| self.file.content.tensor_infos.contains_key(&g))
    }
    fn get(&self, key: &str, device: &Device) -> lora_core::Result<Option<Tensor>> {
        Ok(match self.load(key)? {
            Some(q) => Some(q.dequantize(device)?),
            None => None,
        })
    }
    fn get_quantized(&self, key: &str, device: &Device) -> lora_core::Result<Option<Arc<QTensor>>> {
        Ok(match self.load(key)? {
            Some(q) if !matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) => {
                if device.is_cpu() {
                    Some(Arc::new(q))
                } else {
                    // The file is read (and its rows permuted) on the host; the
                    // blocks then move to the device as they are, still quantized.
                    let dims = q.shape().dims().to_vec();
                    Some(Arc::new(candle_core::quantized::ggml_file::qtensor_from_ggml(q.dtype(), &q.data()?, dims, device)?))
                }
            }
            _ => None,
        })
    }
    fn keys(&self) -> Vec<String> {
        self.file.content.tensor_infos.keys().filter_map(|g| gguf_to_hf_name(g)).collect()
    }
    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        let g = hf_to_gguf_name(key)?;
        self.file.content.tensor_infos.get(&g).map(|i| i.shape.dims().to_vec())
    }
}
