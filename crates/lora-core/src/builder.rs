//! Builds models from a weight source and attaches adapters from outside.
//!
//! Model code asks the builder for its layers by path (`vb.pp("attention")`
//! works like `cd`, as in candle); the builder decides once, from a typed
//! [`TargetSpec`], whether that path gets a LoRA adapter. Model code never
//! mentions LoRA. When the model is built, [`ModelBuilder::finish`] returns the
//! [`AdapterSet`]: every adapted layer and trainable head, for the optimizer,
//! for merging and for saving.

use crate::error::{CoreError, Result};
use crate::lora::{scaling, FrozenWeight, Linear, LoraConfig, LoraInit, LoraWeights};
use crate::target::{name_matches, TargetModules, TargetSpec};
use crate::weights::WeightSource;
use candle_core::{Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

/// What to attach: the adapter hyper-parameters and where.
#[derive(Debug, Clone)]
pub struct AdapterPlan {
    pub config: LoraConfig,
    pub targets: TargetSpec,
    /// PEFT `rank_pattern`: per-module rank overrides.
    pub rank_pattern: Vec<(String, usize)>,
    /// PEFT `alpha_pattern`: per-module alpha overrides.
    pub alpha_pattern: Vec<(String, f64)>,
    /// Seed for initialising A/B (each module gets its own stream).
    pub seed: u64,
    /// Initial A/B computed from the frozen weight (PiSSA, OLoRA), which
    /// then also replaces that weight by the residual; None: `config.init`.
    pub weight_init: Option<WeightInitHook>,
}

/// `(path, W (out, in), r, scaling) -> (A (r, in), B (out, r), W − s·B·A)`.
pub type WeightInitFn = dyn Fn(&str, &Tensor, usize, f64) -> Result<(Tensor, Tensor, Tensor)> + Send + Sync;

/// A weight-derived initialisation, supplied from outside the core (the
/// linear algebra lives in lora-lowrank).
#[derive(Clone)]
pub struct WeightInitHook {
    /// For messages and saved configs (e.g. `pissa`).
    pub name: String,
    pub init: Arc<WeightInitFn>,
}

impl std::fmt::Debug for WeightInitHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WeightInitHook({})", self.name)
    }
}

impl AdapterPlan {
    pub fn new(config: LoraConfig, targets: TargetSpec, seed: u64) -> Self {
        Self {
            config,
            targets,
            rank_pattern: vec![],
            alpha_pattern: vec![],
            seed,
            weight_init: None,
        }
    }

    pub fn rank_for(&self, path: &str) -> usize {
        pattern_value(&self.rank_pattern, path).unwrap_or(self.config.r)
    }

    pub fn alpha_for(&self, path: &str) -> f64 {
        pattern_value(&self.alpha_pattern, path).unwrap_or(self.config.alpha)
    }
}

/// PEFT's `get_pattern_key`: the first key `k` with `re.match(r"(.*\.)?(k)$", path)`.
fn pattern_value<T: Copy>(patterns: &[(String, T)], path: &str) -> Option<T> {
    patterns.iter().find_map(|(k, v)| {
        let re = regex::Regex::new(&format!(r"^(.*\.)?({k})$")).ok()?;
        re.is_match(path).then_some(*v)
    })
}

/// Adapter weights read from disk, keyed by module path.
#[derive(Default, Clone)]
pub struct Preloaded {
    /// path -> (A (r, in), B (out, r))
    pub lora: HashMap<String, (Tensor, Tensor)>,
    /// path -> (weight, bias) of a saved module (`modules_to_save`).
    pub modules: HashMap<String, (Tensor, Option<Tensor>)>,
}

#[derive(Default)]
struct State {
    lora_layers: Vec<Linear>,
    heads: Vec<Linear>,
    linear_paths: Vec<String>,
    frozen_params: usize,
    used_preloaded: Vec<String>,
    notes: Vec<String>,
}

struct Shared {
    source: Box<dyn WeightSource>,
    aliases: Vec<String>,
    device: Device,
    plan: Option<AdapterPlan>,
    modules_to_save: Vec<String>,
    preloaded: Preloaded,
    /// Heads not found anywhere get a fresh N(0, 0.02) init (transformers' default).
    init_missing_heads: bool,
    state: Mutex<State>,
}

/// A cursor into the module tree plus the shared loading state.
#[derive(Clone)]
pub struct ModelBuilder {
    shared: Arc<Shared>,
    path: String,
}

impl ModelBuilder {
    pub fn new(source: Box<dyn WeightSource>, device: Device) -> Self {
        Self {
            shared: Arc::new(Shared {
                source,
                aliases: vec![],
                device,
                plan: None,
                modules_to_save: vec![],
                preloaded: Preloaded::default(),
                init_missing_heads: false,
                state: Mutex::new(State::default()),
            }),
            path: String::new(),
        }
    }

    fn shared_mut(&mut self) -> &mut Shared {
        Arc::get_mut(&mut self.shared).expect("configure the builder before cloning it")
    }

    /// Module-path prefixes that a checkpoint may omit (e.g. `bert.`).
    pub fn with_optional_prefixes(mut self, prefixes: &[&str]) -> Self {
        self.shared_mut().aliases = prefixes.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn with_adapter(mut self, plan: Option<AdapterPlan>) -> Self {
        self.shared_mut().plan = plan;
        self
    }

    /// Modules trained in full and saved with the adapter (e.g. `classifier`).
    pub fn with_modules_to_save(mut self, names: &[String]) -> Self {
        self.shared_mut().modules_to_save = names.to_vec();
        self
    }

    pub fn with_preloaded(mut self, p: Preloaded) -> Self {
        self.shared_mut().preloaded = p;
        self
    }

    pub fn init_missing_heads(mut self, yes: bool) -> Self {
        self.shared_mut().init_missing_heads = yes;
        self
    }

    pub fn device(&self) -> &Device {
        &self.shared.device
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// Descends into a child module (`cd`).
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let path = if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.path, name)
        };
        Self {
            shared: self.shared.clone(),
            path,
        }
    }

    fn key(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.path, name)
        }
    }

    /// The checkpoint key for a module-path key, trying the optional prefixes.
    fn resolve(&self, key: &str) -> Option<String> {
        let src = &self.shared.source;
        if src.contains(key) {
            return Some(key.to_string());
        }
        for p in &self.shared.aliases {
            if let Some(rest) = key.strip_prefix(p.as_str()) {
                if src.contains(rest) {
                    return Some(rest.to_string());
                }
            }
        }
        None
    }

    pub fn contains(&self, name: &str) -> bool {
        self.resolve(&self.key(name)).is_some()
    }

    fn load(&self, key: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        let Some(ck) = self.resolve(key) else { return Ok(None) };
        let src = &self.shared.source;
        if let Some(s) = src.shape(&ck) {
            if s != shape {
                return Err(CoreError::ShapeMismatch {
                    source_name: src.name(),
                    key: ck,
                    expected: shape.to_vec(),
                    got: s,
                });
            }
        }
        let t = src.get(&ck, &self.shared.device)?;
        if let Some(t) = &t {
            if t.dims() != shape {
                return Err(CoreError::ShapeMismatch {
                    source_name: src.name(),
                    key: ck,
                    expected: shape.to_vec(),
                    got: t.dims().to_vec(),
                });
            }
        }
        Ok(t)
    }

    /// A frozen tensor `name` under the current path, with the given shape.
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let key = self.key(name);
        match self.load(&key, shape)? {
            Some(t) => {
                self.state().frozen_params += t.elem_count();
                Ok(t)
            }
            None => Err(CoreError::MissingTensor {
                source_name: self.shared.source.name(),
                key,
            }),
        }
    }

    /// A frozen matrix `name` under the current path, kept in its stored
    /// block-quantized form when the source has one (GGUF), else dense f32.
    pub fn frozen_weight(&self, name: &str, shape: &[usize]) -> Result<FrozenWeight> {
        let key = self.key(name);
        if let Some(ck) = self.resolve(&key) {
            let src = &self.shared.source;
            if let Some(q) = src.get_quantized(&ck, &self.shared.device)? {
                if q.shape().dims() != shape {
                    return Err(CoreError::ShapeMismatch {
                        source_name: src.name(),
                        key: ck,
                        expected: shape.to_vec(),
                        got: q.shape().dims().to_vec(),
                    });
                }
                self.state().frozen_params += q.shape().elem_count();
                return Ok(FrozenWeight::Quantized(q));
            }
        }
        Ok(FrozenWeight::Dense(self.tensor(name, shape)?))
    }

    /// Like [`Self::tensor`] but `None` when absent.
    pub fn tensor_opt(&self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        let t = self.load(&self.key(name), shape)?;
        if let Some(t) = &t {
            self.state().frozen_params += t.elem_count();
        }
        Ok(t)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_saved_module(&self) -> bool {
        self.shared
            .modules_to_save
            .iter()
            .any(|n| name_matches(n, &self.path))
    }

    /// The linear layer at the current path (`weight` (out, in), optional `bias`).
    /// Gets a LoRA adapter when the target spec selects it; is trainable when
    /// it is listed in `modules_to_save`.
    pub fn linear(&self, in_f: usize, out_f: usize, bias: bool) -> Result<Linear> {
        self.linear_impl(in_f, out_f, bias, false)
    }

    /// A task head (e.g. `classifier`): never a LoRA target under `all-linear`;
    /// may be absent from the base checkpoint.
    pub fn head_linear(&self, in_f: usize, out_f: usize, bias: bool) -> Result<Linear> {
        self.linear_impl(in_f, out_f, bias, true)
    }

    fn linear_impl(&self, in_f: usize, out_f: usize, bias: bool, is_head: bool) -> Result<Linear> {
        let path = self.path.clone();
        if self.is_saved_module() {
            return self.saved_module(in_f, out_f, bias);
        }
        let mut w = self.frozen_weight("weight", &[out_f, in_f])?;
        let b = if bias { Some(self.tensor("bias", &[out_f])?) } else { None };
        self.state().linear_paths.push(path.clone());
        let Some(plan) = &self.shared.plan else {
            return Linear::from_frozen(path, w, b, None);
        };
        if !plan.targets.matches(&path, is_head) {
            return Linear::from_frozen(path, w, b, None);
        }
        let lora = match self.shared.preloaded.lora.get(&path) {
            Some((a, bm)) => {
                let r = a.dim(0)?;
                check_pair(&path, a, bm, in_f, out_f)?;
                self.state().used_preloaded.push(path.clone());
                LoraWeights {
                    a: Var::from_tensor(a)?,
                    b: Var::from_tensor(bm)?,
                    scaling: scaling(plan.alpha_for(&path), r, plan.config.use_rslora),
                    dropout: plan.config.dropout,
                }
            }
            None => {
                let r = plan.rank_for(&path);
                let max = in_f.min(out_f);
                if r == 0 || r > max {
                    return Err(CoreError::BadRank {
                        path,
                        r,
                        out_features: out_f,
                        in_features: in_f,
                        max,
                    });
                }
                let s = scaling(plan.alpha_for(&path), r, plan.config.use_rslora);
                let (a, bm) = match &plan.weight_init {
                    Some(h) => {
                        let (a, bm, residual) = (h.init)(&path, &w.dense()?, r, s)?;
                        w = FrozenWeight::Dense(residual);
                        (a, bm)
                    }
                    None => init_pair(plan.config.init, r, in_f, out_f, plan.seed, &path, &self.shared.device)?,
                };
                LoraWeights {
                    a: Var::from_tensor(&a)?,
                    b: Var::from_tensor(&bm)?,
                    scaling: scaling(plan.alpha_for(&path), r, plan.config.use_rslora),
                    dropout: plan.config.dropout,
                }
            }
        };
        let layer = Linear::from_frozen(path, w, b, Some(lora))?;
        self.state().lora_layers.push(layer.clone());
        Ok(layer)
    }

    fn saved_module(&self, in_f: usize, out_f: usize, bias: bool) -> Result<Linear> {
        let path = self.path.clone();
        let (w, b) = if let Some((w, b)) = self.shared.preloaded.modules.get(&path) {
            if w.dims() != [out_f, in_f] {
                return Err(CoreError::ShapeMismatch {
                    source_name: "adapter".into(),
                    key: format!("{path}.weight"),
                    expected: vec![out_f, in_f],
                    got: w.dims().to_vec(),
                });
            }
            if bias && b.is_none() {
                return Err(CoreError::MissingTensor {
                    source_name: "adapter".into(),
                    key: format!("{path}.bias"),
                });
            }
            self.state().used_preloaded.push(path.clone());
            (w.clone(), if bias { b.clone() } else { None })
        } else {
            // A base head of another size (e.g. a different label count) is
            // replaced by a fresh one, as transformers' ignore_mismatched_sizes.
            let found = self.resolve(&self.key("weight")).and_then(|k| self.shared.source.shape(&k));
            let mismatched = matches!(&found, Some(s) if s != &[out_f, in_f]);
            if mismatched && self.shared.init_missing_heads {
                self.state().notes.push(format!(
                    "{path}: the base checkpoint's head has shape {:?}, this task needs [{out_f}, {in_f}]; starting from a new head",
                    found.unwrap_or_default()
                ));
            }
            let (w, b) = if mismatched && self.shared.init_missing_heads {
                (None, None)
            } else {
                let w = self.load(&self.key("weight"), &[out_f, in_f])?;
                let b = if bias { self.load(&self.key("bias"), &[out_f])? } else { None };
                (w, b)
            };
            match (w, b) {
                (Some(w), b) if !bias || b.is_some() => (w, b),
                _ if self.shared.init_missing_heads => {
                    let mut rng = module_rng(self.plan_seed(), &path);
                    let w: Vec<f32> = (0..out_f * in_f).map(|_| normal(&mut rng) * 0.02).collect();
                    let w = Tensor::from_vec(w, (out_f, in_f), &self.shared.device)?;
                    let b = bias.then(|| Tensor::zeros(out_f, candle_core::DType::F32, &self.shared.device)).transpose()?;
                    (w, b)
                }
                _ => {
                    return Err(CoreError::MissingTensor {
                        source_name: format!("{} (and the adapter)", self.shared.source.name()),
                        key: format!("{path}.weight"),
                    })
                }
            }
        };
        let layer = Linear::trainable(path, Var::from_tensor(&w)?, b.map(|b| Var::from_tensor(&b)).transpose()?);
        self.state().heads.push(layer.clone());
        Ok(layer)
    }

    fn plan_seed(&self) -> u64 {
        self.shared.plan.as_ref().map(|p| p.seed).unwrap_or(0)
    }

    /// Ends building: checks that every target name matched a layer and every
    /// preloaded tensor was used, and hands over the adapter set.
    pub fn finish(self) -> Result<AdapterSet> {
        let st = std::mem::take(&mut *self.state());
        if let Some(plan) = &self.shared.plan {
            if let TargetModules::Names(names) = &plan.targets.modules {
                for n in names {
                    if !st.lora_layers.iter().any(|l| name_matches(n, &l.path())) {
                        let mut avail: Vec<String> = st
                            .linear_paths
                            .iter()
                            .map(|p| p.rsplit('.').next().unwrap_or(p).to_string())
                            .collect();
                        avail.sort();
                        avail.dedup();
                        return Err(CoreError::UnmatchedTarget {
                            name: n.clone(),
                            available: avail.join(", "),
                        });
                    }
                }
            }
            if st.lora_layers.is_empty() {
                return Err(CoreError::UnmatchedTarget {
                    name: format!("{:?}", plan.targets.modules),
                    available: st.linear_paths.join(", "),
                });
            }
        }
        let pre = &self.shared.preloaded;
        for p in pre.lora.keys().chain(pre.modules.keys()) {
            if !st.used_preloaded.contains(p) {
                return Err(CoreError::State(format!(
                    "adapter holds weights for '{p}', which is not a target layer of this model"
                )));
            }
        }
        Ok(AdapterSet {
            plan: self.shared.plan.clone(),
            lora_layers: st.lora_layers,
            heads: st.heads,
            linear_paths: st.linear_paths,
            frozen_params: st.frozen_params,
            notes: st.notes,
        })
    }
}

fn check_pair(path: &str, a: &Tensor, b: &Tensor, in_f: usize, out_f: usize) -> Result<()> {
    let (r, a_in) = a.dims2()?;
    let (b_out, b_r) = b.dims2()?;
    if a_in != in_f || b_out != out_f || b_r != r || r == 0 {
        return Err(CoreError::State(format!(
            "adapter tensors for {path} do not fit the model: lora_A {:?}, lora_B {:?}, layer is {out_f}x{in_f}",
            a.dims(),
            b.dims()
        )));
    }
    Ok(())
}

fn module_rng(seed: u64, path: &str) -> rand::rngs::StdRng {
    // FNV-1a of the path: each module has its own stream, independent of order.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in path.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    rand::rngs::StdRng::seed_from_u64(seed ^ h)
}

fn normal(rng: &mut impl Rng) -> f32 {
    // Box-Muller.
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// A (r, in) and B (out, r) for a fresh adapter.
pub fn init_pair(
    init: LoraInit,
    r: usize,
    in_f: usize,
    out_f: usize,
    seed: u64,
    path: &str,
    dev: &Device,
) -> Result<(Tensor, Tensor)> {
    let mut rng = module_rng(seed, path);
    let a: Vec<f32> = match init {
        LoraInit::KaimingUniform | LoraInit::Random => {
            let bound = 1.0 / (in_f as f32).sqrt();
            (0..r * in_f).map(|_| rng.random_range(-bound..bound)).collect()
        }
        LoraInit::Gaussian => (0..r * in_f).map(|_| normal(&mut rng) / r as f32).collect(),
    };
    let b: Vec<f32> = match init {
        LoraInit::Random => {
            let bound = 1.0 / (r as f32).sqrt();
            (0..out_f * r).map(|_| rng.random_range(-bound..bound)).collect()
        }
        _ => vec![0.0; out_f * r],
    };
    Ok((Tensor::from_vec(a, (r, in_f), dev)?, Tensor::from_vec(b, (out_f, r), dev)?))
}

/// Everything trainable in a built model: adapted layers and saved modules.
pub struct AdapterSet {
    pub plan: Option<AdapterPlan>,
    pub lora_layers: Vec<Linear>,
    pub heads: Vec<Linear>,
    /// Paths of every linear layer in the model (for `inspect`, errors).
    pub linear_paths: Vec<String>,
    /// Parameters in frozen tensors loaded from the base.
    pub frozen_params: usize,
    /// Things the user should know about how the model was built.
    pub notes: Vec<String>,
}

/// A trainable tensor with the name it is saved under (without PEFT's
/// `base_model.model.` prefix) and whether weight decay applies.
#[derive(Clone)]
pub struct NamedVar {
    pub name: String,
    pub var: Var,
    pub decay: bool,
}

impl AdapterSet {
    pub fn trainable(&self) -> Vec<NamedVar> {
        let mut out = vec![];
        for l in &self.lora_layers {
            if let Some(w) = l.lora() {
                let p = l.path();
                out.push(NamedVar { name: format!("{p}.lora_A.weight"), var: w.a, decay: true });
                out.push(NamedVar { name: format!("{p}.lora_B.weight"), var: w.b, decay: true });
            }
        }
        for h in &self.heads {
            if let Some((w, b)) = h.trainable_params() {
                let p = h.path();
                out.push(NamedVar { name: format!("{p}.weight"), var: w, decay: true });
                if let Some(b) = b {
                    out.push(NamedVar { name: format!("{p}.bias"), var: b, decay: false });
                }
            }
        }
        out
    }

    pub fn trainable_params(&self) -> usize {
        self.trainable().iter().map(|v| v.var.elem_count()).sum()
    }

    /// Base parameters that stay frozen (the head replaced by a trainable copy is not counted).
    pub fn total_params(&self) -> usize {
        self.frozen_params + self.trainable_params()
    }

    /// `(path, A, B, scaling)` of every adapted layer.
    pub fn lora_tensors(&self) -> Vec<(String, Tensor, Tensor, f64)> {
        self.lora_layers
            .iter()
            .filter_map(|l| {
                l.lora().map(|w| (l.path(), w.a.as_tensor().clone(), w.b.as_tensor().clone(), w.scaling))
            })
            .collect()
    }

    /// Like [`Self::lora_tensors`], but copies: the optimizer updates the
    /// variables in place, so a plain clone would follow the training.
    pub fn lora_tensors_snapshot(&self) -> Result<Vec<(String, Tensor, Tensor, f64)>> {
        self.lora_tensors().into_iter().map(|(p, a, b, s)| Ok((p, a.copy()?, b.copy()?, s))).collect()
    }

    pub fn ranks(&self) -> BTreeMap<String, usize> {
        self.lora_layers
            .iter()
            .filter_map(|l| l.lora().map(|w| (l.path(), w.a.as_tensor().dims()[0])))
            .collect()
    }

    pub fn merge_all(&self) -> Result<()> {
        self.lora_layers.iter().try_for_each(|l| l.merge())
    }

    pub fn unmerge_all(&self) -> Result<()> {
        self.lora_layers.iter().try_for_each(|l| l.unmerge())
    }
}
