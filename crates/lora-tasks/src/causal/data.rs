//! Data for causal-LM fine-tuning.
//!
//! - Plain text (`.txt`): tokenized whole, concatenated, cut into
//!   non-overlapping blocks of `block_size` tokens (the remainder is dropped);
//!   every token is a target.
//! - Prompt/response JSON Lines (`.jsonl`): each line `{"prompt", "response"}`
//!   or `{"messages": [{"role", "content"}, …]}`, rendered through the model's
//!   chat template; only assistant tokens (with the end-of-turn token the
//!   template adds) are targets, the rest get label −100.
//!
//! Labels are aligned with the ids (not shifted); the loss shifts them as
//! transformers does.

use crate::error::{Result, TaskError};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Label of a position that is not trained on (PyTorch's ignore_index).
pub const IGNORE: i64 = -100;

/// One training sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct LmExample {
    pub ids: Vec<u32>,
    /// Same length as `ids`; `IGNORE` where no loss is taken.
    pub labels: Vec<i64>,
}

impl LmExample {
    pub fn targets(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l >= 0).count()
    }
}

/// The kind of a data file, from its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LmFormat {
    Text,
    Chat,
}

impl LmFormat {
    pub fn of(path: &Path) -> Result<Self> {
        match path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).as_deref() {
            Some("txt") | Some("text") | Some("md") => Ok(Self::Text),
            Some("jsonl") | Some("json") => Ok(Self::Chat),
            _ => Err(TaskError::Input(format!(
                "{}: unknown data format; use .txt (plain text) or .jsonl (prompt/response or messages)",
                path.display()
            ))),
        }
    }
}

fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| TaskError::Input(format!("{}: {}", path.display(), io_msg(&e))))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        TaskError::Input(format!("{}: not valid UTF-8 text (byte {})", path.display(), e.utf8_error().valid_up_to()))
    })?;
    if text.trim().is_empty() {
        return Err(TaskError::Input(format!("{}: the file is empty", path.display())));
    }
    Ok(text)
}

fn io_msg(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "file not found".into(),
        _ => e.to_string(),
    }
}

/// Tokenizes a long text in line-aligned chunks (in parallel) and concatenates.
pub fn tokenize_long(tok: &tokenizers::Tokenizer, text: &str) -> Result<Vec<u32>> {
    let mut chunks: Vec<&str> = vec![];
    let mut start = 0;
    const CHUNK: usize = 16 * 1024;
    while start < text.len() {
        let mut end = (start + CHUNK).min(text.len());
        while end < text.len() && !text.is_char_boundary(end) {
            end += 1;
        }
        if end < text.len() {
            if let Some(nl) = text[end..].find('\n') {
                end += nl + 1;
            } else {
                end = text.len();
            }
        }
        chunks.push(&text[start..end]);
        start = end;
    }
    let enc = tok
        .encode_batch(chunks, false)
        .map_err(|e| TaskError::Input(format!("tokenizer failed: {e}")))?;
    Ok(enc.iter().flat_map(|e| e.get_ids().iter().copied()).collect())
}

/// Non-overlapping blocks of `block_size` tokens from a text file.
pub fn text_blocks(tok: &tokenizers::Tokenizer, path: &Path, block_size: usize) -> Result<Vec<LmExample>> {
    let ids = tokenize_long(tok, &read_text(path)?)?;
    if ids.len() < block_size.max(2) {
        return Err(TaskError::Input(format!(
            "{}: {} tokens, fewer than one block of {block_size}",
            path.display(),
            ids.len()
        )));
    }
    Ok(ids
        .chunks_exact(block_size)
        .map(|c| LmExample { ids: c.to_vec(), labels: c.iter().map(|&i| i as i64).collect() })
        .collect())
}

/// One chat message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A JSONL record: prompt/response or a message list.
pub fn read_conversations(path: &Path) -> Result<Vec<Vec<Message>>> {
    let text = read_text(path)?;
    let mut out = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| TaskError::Input(format!("{}: not valid JSON ({e})", at())))?;
        let conv = if let Some(msgs) = v.get("messages") {
            let msgs: Vec<Message> = serde_json::from_value(msgs.clone())
                .map_err(|e| TaskError::Input(format!("{}: messages: {e}", at())))?;
            if !msgs.iter().any(|m| m.role == "assistant") {
                return Err(TaskError::Input(format!("{}: no assistant message to learn from", at())));
            }
            msgs
        } else {
            let field = |k: &str| {
                v.get(k).and_then(|x| x.as_str()).map(str::to_string).ok_or_else(|| {
                    TaskError::Input(format!("{}: expected \"prompt\" and \"response\" strings (or \"messages\"); \"{k}\" is missing", at()))
                })
            };
            vec![
                Message { role: "user".into(), content: field("prompt")? },
                Message { role: "assistant".into(), content: field("response")? },
            ]
        };
        out.push(conv);
    }
    if out.is_empty() {
        return Err(TaskError::Input(format!("{}: no records", path.display())));
    }
    Ok(out)
}

/// A chat template (Jinja, as in `tokenizer_config.json` / GGUF metadata).
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    pub fn new(source: &str, bos: Option<String>, eos: Option<String>) -> Result<Self> {
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| TaskError::Input(format!("chat template: {e}")))?;
        Ok(Self { env, bos: bos.unwrap_or_default(), eos: eos.unwrap_or_default() })
    }

    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let t = self.env.get_template("chat").map_err(|e| TaskError::Input(format!("chat template: {e}")))?;
        t.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos,
            eos_token => self.eos,
        })
        .map_err(|e| TaskError::Input(format!("chat template: {e}")))
    }
}

/// Renders and tokenizes a conversation; labels mark the assistant turns.
pub fn encode_conversation(
    tok: &tokenizers::Tokenizer,
    tpl: &ChatTemplate,
    msgs: &[Message],
    max_len: usize,
) -> Result<LmExample> {
    let full = tpl.render(msgs, false)?;
    // Byte spans of the assistant turns: from the end of the prompt that asks
    // for the turn to the end of the conversation rendered up to that turn.
    let mut spans = vec![];
    for (i, m) in msgs.iter().enumerate() {
        if m.role == "assistant" {
            let start = tpl.render(&msgs[..i], true)?.len();
            let end = tpl.render(&msgs[..=i], false)?.len();
            spans.push((start, end));
        }
    }
    let enc = tok.encode(full.as_str(), false).map_err(|e| TaskError::Input(format!("tokenizer failed: {e}")))?;
    let mut ids = enc.get_ids().to_vec();
    let mut labels: Vec<i64> = enc
        .get_offsets()
        .iter()
        .zip(&ids)
        .map(|(&(s, _), &id)| if spans.iter().any(|&(a, b)| s >= a && s < b) { id as i64 } else { IGNORE })
        .collect();
    ids.truncate(max_len);
    labels.truncate(max_len);
    Ok(LmExample { ids, labels })
}

/// Conversations from a JSONL file as training sequences.
pub fn chat_examples(
    tok: &tokenizers::Tokenizer,
    tpl: &ChatTemplate,
    path: &Path,
    max_len: usize,
) -> Result<(Vec<LmExample>, usize)> {
    let convs = read_conversations(path)?;
    let mut out = vec![];
    let mut dropped = 0;
    for c in &convs {
        let ex = encode_conversation(tok, tpl, c, max_len)?;
        if ex.targets() == 0 {
            dropped += 1;
        } else {
            out.push(ex);
        }
    }
    if out.is_empty() {
        return Err(TaskError::Input(format!(
            "{}: no conversation keeps an assistant token within --max-len {max_len}",
            path.display()
        )));
    }
    Ok((out, dropped))
}

/// Right-padded batch: ids (B, T) u32 and the shifted targets (B·(T−1)):
/// target of position t is the label of t+1, −100 on padding.
pub fn to_batch(examples: &[&LmExample], pad_id: u32, device: &Device) -> candle_core::Result<(Tensor, Vec<i64>)> {
    let b = examples.len();
    let t = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0).max(2);
    let mut ids = vec![pad_id; b * t];
    let mut targets = vec![IGNORE; b * (t - 1)];
    for (i, e) in examples.iter().enumerate() {
        ids[i * t..i * t + e.ids.len()].copy_from_slice(&e.ids);
        for p in 0..e.labels.len().saturating_sub(1) {
            targets[i * (t - 1) + p] = e.labels[p + 1];
        }
    }
    Ok((Tensor::from_vec(ids, (b, t), device)?, targets))
}
