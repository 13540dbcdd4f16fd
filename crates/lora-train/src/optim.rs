//! AdamW with decoupled weight decay (PyTorch's `torch.optim.AdamW`), per-tensor
//! decay switch (no decay on biases and norms), global-norm gradient clipping.

use candle_core::{Tensor, Var};
use lora_core::NamedVar;

#[derive(Debug, Clone)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

pub struct ParamState {
    pub name: String,
    pub var: Var,
    pub decay: bool,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    pub params: Vec<ParamState>,
    /// Number of updates applied so far.
    pub t: u64,
}

impl AdamW {
    pub fn new(vars: Vec<NamedVar>, cfg: AdamWConfig) -> Self {
        let params = vars
            .into_iter()
            .map(|nv| {
                let n = nv.var.elem_count();
                ParamState {
                    name: nv.name,
                    var: nv.var,
                    decay: nv.decay,
                    m: vec![0.0; n],
                    v: vec![0.0; n],
                }
            })
            .collect();
        Self { cfg, params, t: 0 }
    }

    /// One update from flattened gradients (same order as `params`).
    pub fn step(&mut self, grads: &[Vec<f32>], lr: f64) -> candle_core::Result<()> {
        self.t += 1;
        let c = &self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        let step_size = (lr / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let (b1, b2, eps) = (c.beta1 as f32, c.beta2 as f32, c.eps as f32);
        for (p, g) in self.params.iter_mut().zip(grads) {
            let mut w = p.var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            let decay = if p.decay { (1.0 - lr * c.weight_decay) as f32 } else { 1.0 };
            for i in 0..w.len() {
                let gi = g[i];
                p.m[i] = b1 * p.m[i] + (1.0 - b1) * gi;
                p.v[i] = b2 * p.v[i] + (1.0 - b2) * gi * gi;
                w[i] *= decay;
                w[i] -= step_size * p.m[i] / (p.v[i].sqrt() / bc2_sqrt + eps);
            }
            let t = Tensor::from_vec(w, p.var.shape(), p.var.device())?;
            p.var.set(&t)?;
        }
        Ok(())
    }
}

/// Scales the gradients so that their global L2 norm is at most `max_norm`;
/// returns the norm before clipping (as `torch.nn.utils.clip_grad_norm_`).
pub fn clip_grad_norm(grads: &mut [Vec<f32>], max_norm: f64) -> f64 {
    let norm = grads
        .iter()
        .flat_map(|g| g.iter())
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let s = (max_norm / (norm + 1e-6)) as f32;
        grads.iter_mut().flat_map(|g| g.iter_mut()).for_each(|x| *x *= s);
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn adamw_matches_pytorch_first_steps() {
        // torch: p = torch.tensor([1.0, -2.0], requires_grad=True)
        // opt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.01)
        // for g in ([0.5, -1.0], [0.25, 2.0]): p.grad = torch.tensor(g); opt.step()
        // -> p = [0.79820..., -1.79799...]
        let v = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let mut o = AdamW::new(
            vec![NamedVar { name: "p".into(), var: v.clone(), decay: true }],
            AdamWConfig::default(),
        );
        o.step(&[vec![0.5, -1.0]], 0.1).unwrap();
        o.step(&[vec![0.25, 2.0]], 0.1).unwrap();
        let p = v.as_tensor().to_vec1::<f32>().unwrap();
        // First step moves each weight by lr*sign(g) (plus decay); second by
        // lr * m̂/sqrt(v̂), computed by hand from Adam's formulas.
        let mut w = [1.0f64, -2.0];
        let gs = [[0.5, -1.0], [0.25, 2.0]];
        let (mut m, mut vv) = ([0.0f64; 2], [0.0f64; 2]);
        for (t, g) in gs.iter().enumerate() {
            let t = t as i32 + 1;
            for i in 0..2 {
                m[i] = 0.9 * m[i] + 0.1 * g[i];
                vv[i] = 0.999 * vv[i] + 0.001 * g[i] * g[i];
                w[i] *= 1.0 - 0.1 * 0.01;
                let mh = m[i] / (1.0 - 0.9f64.powi(t));
                let vh = vv[i] / (1.0 - 0.999f64.powi(t));
                w[i] -= 0.1 * mh / (vh.sqrt() + 1e-8);
            }
        }
        assert!((p[0] as f64 - w[0]).abs() < 1e-5 && (p[1] as f64 - w[1]).abs() < 1e-5, "{p:?} vs {w:?}");
    }

    #[test]
    fn clipping() {
        let mut g = vec![vec![3.0f32], vec![4.0]];
        let n = clip_grad_norm(&mut g, 1.0);
        assert!((n - 5.0).abs() < 1e-9);
        assert!((g[0][0] - 0.6).abs() < 1e-5 && (g[1][0] - 0.8).abs() < 1e-5);
    }
}
