//! Fused vs reference encoder attention, MiniLM shape (B=32, T=128, H=384, 12 heads).
use candle_core::{Device, Tensor, Var};
use lora_core::attention::{attention, attention_reference};
use std::time::Instant;
fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let (b, t, h) = (32, 128, 384);
    let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, h), &dev)?)?;
    let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, h), &dev)?)?;
    let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, h), &dev)?)?;
    let m = Tensor::zeros((b, t), candle_core::DType::F32, &dev)?;
    let only = std::env::args().nth(1).unwrap_or_default();
    for round in 0..3 {
        for (name, f) in [("fused", attention as fn(&Tensor, &Tensor, &Tensor, &Tensor, usize, f32, bool) -> candle_core::Result<Tensor>), ("reference", attention_reference)] {
            if !only.is_empty() && only != name {
                continue;
            }
            let mut fw = vec![];
            let mut bw = vec![];
            for _ in 0..5 {
                let t0 = Instant::now();
                let y = f(q.as_tensor(), k.as_tensor(), v.as_tensor(), &m, 12, 0.1, true)?;
                fw.push(t0.elapsed().as_secs_f64());
                let t1 = Instant::now();
                let _g = y.sum_all()?.backward()?;
                bw.push(t1.elapsed().as_secs_f64());
            }
            fw.sort_by(|a, b| a.partial_cmp(b).unwrap());
            bw.sort_by(|a, b| a.partial_cmp(b).unwrap());
            println!("round {round} {name:9}: forward {:.1} ms, backward {:.1} ms", fw[2] * 1e3, bw[2] * 1e3);
        }
    }
    Ok(())
}
