//! Which linear layers get an adapter: a typed target spec, matched once at
//! load time with exactly PEFT's rules (`check_target_module_exists`), so an
//! adapter config written here selects the same modules when PEFT reads it.

use crate::error::{CoreError, Result};
use regex::Regex;

/// The module selection, as in PEFT's `target_modules`.
#[derive(Debug, Clone)]
pub enum TargetModules {
    /// Module names: a path matches when it equals a name or ends with `.name`.
    Names(Vec<String>),
    /// A regex that must match the whole module path (`re.fullmatch`).
    Regex(String),
    /// Every linear layer except the task head (`all-linear` in PEFT).
    AllLinear,
}

/// Module selection plus an optional layer selection (`layers_to_transform`).
#[derive(Debug, Clone)]
pub struct TargetSpec {
    pub modules: TargetModules,
    /// Only these layer indices (the `N` in `...layer.N.`), when set.
    pub layers: Option<Vec<usize>>,
    /// The path component before the layer index (`layers_pattern`), e.g. `layer`.
    pub layers_pattern: Option<Vec<String>>,
    /// Module names never adapted (`exclude_modules`).
    pub exclude: Vec<String>,
}

impl TargetSpec {
    pub fn names<S: AsRef<str>>(names: &[S]) -> Self {
        Self::new(TargetModules::Names(
            names.iter().map(|s| s.as_ref().to_string()).collect(),
        ))
    }

    pub fn new(modules: TargetModules) -> Self {
        Self {
            modules,
            layers: None,
            layers_pattern: None,
            exclude: vec![],
        }
    }

    /// Parses the command-line form: `all-linear`, `re:<regex>`, or `a,b,c`.
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        if s.is_empty() {
            return Err(CoreError::InvalidConfig("--targets is empty".into()));
        }
        if s == "all-linear" {
            return Ok(Self::new(TargetModules::AllLinear));
        }
        if let Some(re) = s.strip_prefix("re:") {
            compile_full(re)?;
            return Ok(Self::new(TargetModules::Regex(re.to_string())));
        }
        let names: Vec<String> = s
            .split(',')
            .map(|x| x.trim().to_string())
            .filter(|x| !x.is_empty())
            .collect();
        if names.is_empty() {
            return Err(CoreError::InvalidConfig(format!("--targets '{s}' names no module")));
        }
        Ok(Self::new(TargetModules::Names(names)))
    }

    pub fn with_layers(mut self, layers: Option<Vec<usize>>) -> Self {
        self.layers = layers;
        self
    }

    pub fn validate(&self) -> Result<()> {
        if let TargetModules::Regex(r) = &self.modules {
            compile_full(r)?;
        }
        Ok(())
    }

    /// Whether the module at `path` gets an adapter. `is_head` marks task heads,
    /// which `all-linear` skips.
    pub fn matches(&self, path: &str, is_head: bool) -> bool {
        if self.exclude.iter().any(|e| name_matches(e, path)) {
            return false;
        }
        let found = match &self.modules {
            TargetModules::Names(names) => names.iter().any(|n| name_matches(n, path)),
            TargetModules::Regex(r) => compile_full(r).map(|re| re.is_match(path)).unwrap_or(false),
            TargetModules::AllLinear => !is_head,
        };
        if !found {
            return false;
        }
        match &self.layers {
            None => true,
            Some(layers) => match layer_index(path, self.layers_pattern.as_deref()) {
                Some(i) => layers.contains(&i),
                None => false,
            },
        }
    }

    /// The names a saved adapter_config.json lists. `all-linear` is expanded to
    /// the last path components of the adapted modules, as PEFT does.
    pub fn names_for_config(&self, adapted_paths: &[String]) -> TargetModules {
        match &self.modules {
            TargetModules::AllLinear => {
                let mut names: Vec<String> = adapted_paths
                    .iter()
                    .map(|p| p.rsplit('.').next().unwrap_or(p).to_string())
                    .collect();
                names.sort();
                names.dedup();
                TargetModules::Names(names)
            }
            other => other.clone(),
        }
    }
}

/// PEFT: `key == name or key.endswith("." + name)`.
pub fn name_matches(name: &str, path: &str) -> bool {
    path == name || (path.len() > name.len() && path.ends_with(name) && path.as_bytes()[path.len() - name.len() - 1] == b'.')
}

fn compile_full(re: &str) -> Result<Regex> {
    Regex::new(&format!("^(?:{re})$")).map_err(|e| CoreError::BadRegex {
        pattern: re.to_string(),
        // regex's syntax errors are multi-line drawings; the last line says why.
        msg: e
            .to_string()
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(|l| l.trim_start_matches("error:").trim().to_string())
            .unwrap_or_default(),
    })
}

/// The layer index in a module path, with PEFT's rule: the last `.<p>.<N>.`
/// where `<p>` is any component (no pattern) or one of `patterns`.
pub fn layer_index(path: &str, patterns: Option<&[String]>) -> Option<usize> {
    let parts: Vec<&str> = path.split('.').collect();
    // A component followed by a number followed by at least one more component.
    for i in (1..parts.len().saturating_sub(1)).rev() {
        if let Ok(n) = parts[i].parse::<usize>() {
            let ok = match patterns {
                None => true,
                Some(ps) if ps.is_empty() => true,
                Some(ps) => ps.iter().any(|p| p == parts[i - 1]),
            };
            if ok {
                return Some(n);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_name_rule() {
        let s = TargetSpec::parse("query,value").unwrap();
        assert!(s.matches("bert.encoder.layer.0.attention.self.query", false));
        assert!(s.matches("value", false));
        assert!(!s.matches("bert.encoder.layer.0.attention.self.key", false));
        assert!(!s.matches("bert.encoder.layer.0.attention.self.myquery", false));
    }

    #[test]
    fn regex_is_full_match() {
        let s = TargetSpec::parse(r"re:.*layer\.[01]\..*\.(query|value)").unwrap();
        assert!(s.matches("bert.encoder.layer.1.attention.self.value", false));
        assert!(!s.matches("bert.encoder.layer.2.attention.self.value", false));
        assert!(TargetSpec::parse("re:(").is_err());
    }

    #[test]
    fn all_linear_skips_heads_and_layers_select() {
        let s = TargetSpec::parse("all-linear").unwrap();
        assert!(s.matches("bert.pooler.dense", false));
        assert!(!s.matches("classifier", true));
        let s = TargetSpec::parse("query").unwrap().with_layers(Some(vec![1]));
        assert!(s.matches("bert.encoder.layer.1.attention.self.query", false));
        assert!(!s.matches("bert.encoder.layer.0.attention.self.query", false));
        assert_eq!(layer_index("model.layers.12.self_attn.q_proj", None), Some(12));
        assert_eq!(layer_index("classifier", None), None);
    }
}
