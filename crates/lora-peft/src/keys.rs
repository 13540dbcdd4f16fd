//! PEFT's tensor key scheme in `adapter_model.safetensors`.
//!
//! `get_peft_model_state_dict` (peft/utils/save_and_load.py) saves keys of
//! the `PeftModel`, whose base model sits at `base_model.model`, with the
//! adapter name removed (`_remove_adapter_name_from_state_dict_key`):
//!
//! | what                       | key                                            |
//! |----------------------------|------------------------------------------------|
//! | LoRA on a Linear           | `base_model.model.{path}.lora_A.weight`, `lora_B.weight` |
//! | LoRA on an Embedding       | `base_model.model.{path}.lora_embedding_A` (no `.weight`) |
//! | DoRA magnitude             | `base_model.model.{path}.lora_magnitude_vector` |
//! | `lora_bias=True`           | `base_model.model.{path}.lora_B.bias`          |
//! | `modules_to_save` module   | `base_model.model.{module}.{param}`, e.g. `base_model.model.classifier.weight` |
//!
//! Inside a live `PeftModel` the same tensors carry the adapter name
//! (`lora_A.default.weight`); such keys are accepted too.

use crate::error::{PeftError, Result};

/// Every key PEFT saves for a LoRA adapter starts with this.
pub const KEY_PREFIX: &str = "base_model.model.";

/// Which factor of `delta_W = B @ A`: A is (r, in_features), B is (out_features, r).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LoraPart {
    A,
    B,
}

impl LoraPart {
    fn segment(self) -> &'static str {
        match self {
            LoraPart::A => "lora_A",
            LoraPart::B => "lora_B",
        }
    }
}

/// `base_model.model.{module_path}.lora_A.weight` (or `lora_B`).
pub fn lora_key(module_path: &str, part: LoraPart) -> String {
    format!("{KEY_PREFIX}{module_path}.{}.weight", part.segment())
}

/// The inverse of [`lora_key`]; also accepts an adapter-name segment
/// (`...lora_A.default.weight`). None for anything else (including LoRA on
/// embeddings: see [`classify_key`] for why a key was refused).
pub fn parse_lora_key(key: &str) -> Option<(String, LoraPart)> {
    let rest = key.strip_prefix(KEY_PREFIX)?.strip_suffix(".weight")?;
    for part in [LoraPart::A, LoraPart::B] {
        let seg = format!(".{}", part.segment());
        if let Some(path) = rest.strip_suffix(&seg) {
            return non_empty(path).map(|p| (p, part));
        }
        // `{path}.lora_A.{adapter}`: the adapter name is one segment.
        if let Some((head, adapter)) = rest.rsplit_once('.') {
            if let Some(path) = head.strip_suffix(&seg) {
                if !adapter.is_empty() {
                    return non_empty(path).map(|p| (p, part));
                }
            }
        }
    }
    None
}

fn non_empty(path: &str) -> Option<String> {
    (!path.is_empty()).then(|| path.to_string())
}

/// The key of parameter `param` (e.g. `weight`, `dense.bias`) of a
/// `modules_to_save` module: `base_model.model.{module_path}.{param}`.
pub fn saved_module_key(module_path: &str, param: &str) -> String {
    format!("{KEY_PREFIX}{module_path}.{param}")
}

/// The inverse of [`saved_module_key`]: `(module_path, param)` where
/// `module_path` is the shortest prefix that names one of `modules_to_save`.
/// PEFT's `_set_trainable` picks modules whose path ends with the name
/// (`key.endswith(name)`, no dot required), so that is the rule here too.
pub fn parse_saved_module_key(key: &str, modules_to_save: &[String]) -> Option<(String, String)> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    for (i, _) in rest.match_indices('.') {
        let (module, param) = (&rest[..i], &rest[i + 1..]);
        if !param.is_empty()
            && modules_to_save
                .iter()
                .any(|m| !m.is_empty() && module.ends_with(m.as_str()))
        {
            return Some((module.to_string(), param.to_string()));
        }
    }
    None
}

/// What a tensor in an adapter file is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdapterKey {
    Lora { module_path: String, part: LoraPart },
    Saved { module_path: String, param: String },
}

impl AdapterKey {
    /// The key as PEFT saves it (adapter name removed).
    pub fn canonical(&self) -> String {
        match self {
            AdapterKey::Lora { module_path, part } => lora_key(module_path, *part),
            AdapterKey::Saved { module_path, param } => saved_module_key(module_path, param),
        }
    }
}

/// Classify a key of `adapter_model.safetensors`, refusing (with the key in
/// the message) LoRA flavours this toolkit does not run and tensors that are
/// neither LoRA factors nor part of `modules_to_save`.
pub fn classify_key(key: &str, modules_to_save: &[String]) -> Result<AdapterKey> {
    let refuse = |msg: &str| {
        Err(PeftError::Tensor {
            key: key.to_string(),
            msg: msg.to_string(),
        })
    };
    if !key.starts_with(KEY_PREFIX) {
        return refuse("not a PEFT adapter key (expected the prefix base_model.model.)");
    }
    if let Some((module_path, part)) = parse_lora_key(key) {
        return Ok(AdapterKey::Lora { module_path, part });
    }
    let segments: Vec<&str> = key.split('.').collect();
    if segments
        .iter()
        .any(|s| *s == "lora_embedding_A" || *s == "lora_embedding_B")
    {
        return refuse("LoRA on an embedding layer (lora_embedding_A/B) is not supported");
    }
    if segments.contains(&"lora_magnitude_vector") {
        return refuse("DoRA magnitude vectors are not supported");
    }
    if key.ends_with(".bias") && segments.contains(&"lora_B") {
        return refuse("a bias on lora_B (lora_bias=true) is not supported");
    }
    if let Some((module_path, param)) = parse_saved_module_key(key, modules_to_save) {
        return Ok(AdapterKey::Saved { module_path, param });
    }
    if segments.iter().any(|s| s.starts_with("lora_")) {
        return refuse("unknown LoRA tensor");
    }
    refuse("neither a lora_A/lora_B weight nor a parameter of a module in modules_to_save")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_keys_round_trip() {
        let p = "bert.encoder.layer.0.attention.self.query";
        let a = lora_key(p, LoraPart::A);
        assert_eq!(
            a,
            "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
        );
        assert_eq!(parse_lora_key(&a), Some((p.to_string(), LoraPart::A)));
        let named =
            "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.default.weight";
        assert_eq!(parse_lora_key(named), Some((p.to_string(), LoraPart::B)));
        assert_eq!(parse_lora_key("base_model.model.lora_A.weight"), None);
        assert_eq!(parse_lora_key("model.q.lora_A.weight"), None);
        assert_eq!(
            parse_lora_key("base_model.model.emb.lora_embedding_A"),
            None
        );
    }

    #[test]
    fn saved_module_keys() {
        let m = vec!["classifier".to_string(), "score".to_string()];
        assert_eq!(
            saved_module_key("classifier", "weight"),
            "base_model.model.classifier.weight"
        );
        assert_eq!(
            parse_saved_module_key("base_model.model.classifier.weight", &m),
            Some(("classifier".into(), "weight".into()))
        );
        // RoBERTa-style head: the module holds submodules.
        assert_eq!(
            parse_saved_module_key("base_model.model.classifier.out_proj.bias", &m),
            Some(("classifier".into(), "out_proj.bias".into()))
        );
        assert_eq!(
            parse_saved_module_key("base_model.model.bert.pooler.dense.weight", &m),
            None
        );
    }

    #[test]
    fn refused_keys_name_the_key() {
        let m: Vec<String> = vec![];
        for (key, msg) in [
            ("base_model.model.emb.lora_embedding_A", "base_model.model.emb.lora_embedding_A: LoRA on an embedding layer (lora_embedding_A/B) is not supported"),
            ("base_model.model.q.lora_magnitude_vector", "base_model.model.q.lora_magnitude_vector: DoRA magnitude vectors are not supported"),
            ("base_model.model.q.lora_B.bias", "base_model.model.q.lora_B.bias: a bias on lora_B (lora_bias=true) is not supported"),
            ("bert.q.lora_A.weight", "bert.q.lora_A.weight: not a PEFT adapter key (expected the prefix base_model.model.)"),
            ("base_model.model.bert.embeddings.word_embeddings.weight", "base_model.model.bert.embeddings.word_embeddings.weight: neither a lora_A/lora_B weight nor a parameter of a module in modules_to_save"),
        ] {
            assert_eq!(classify_key(key, &m).unwrap_err().to_string(), msg);
        }
    }
}
