use candle_core::{Device, Tensor};
use std::time::Instant;
fn main() -> candle_core::Result<()> {
    let d = Device::Cpu;
    let x = Tensor::randn(0f32, 1., (4096, 384), &d)?;
    let a = Tensor::randn(0f32, 1., (8, 384), &d)?;
    let b = Tensor::randn(0f32, 1., (384, 8), &d)?;
    let w = Tensor::randn(0f32, 1., (384, 384), &d)?;
    for name in ["x·aT", "x·aT(contig)", "h·bT", "h·bT(contig)", "frozen x·wT", "matmul x·wT(contig)"] {
        let at = a.t()?.contiguous()?;
        let bt = b.t()?.contiguous()?;
        let wt = w.t()?.contiguous()?;
        let h = x.matmul(&at)?;
        let t = Instant::now();
        for _ in 0..10 {
            let _ = match name {
                "x·aT" => x.matmul(&a.t()?)?,
                "x·aT(contig)" => x.matmul(&at)?,
                "h·bT" => h.matmul(&b.t()?)?,
                "h·bT(contig)" => h.matmul(&bt)?,
                "frozen x·wT" => lora_core::ops::frozen_linear(&x, &w, None)?,
                _ => x.matmul(&wt)?,
            };
        }
        println!("{name}: {:.2} ms", t.elapsed().as_secs_f64() * 100.0);
    }
    Ok(())
}
