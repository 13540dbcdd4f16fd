//! GFLOP/s of candle's f32 matmul on the MiniLM workload's shapes.
use candle_core::{Device, Tensor};
use std::time::Instant;
fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    // Rows of the activation matrix (batch x tokens); GEMM_M=896 is 32 x 28.
    let m0: usize = std::env::var("GEMM_M").ok().and_then(|v| v.parse().ok()).unwrap_or(4096);
    for &(m, k, n, tr) in &[(m0, 384usize, 384usize, true), (m0, 384, 1536, true), (m0, 1536, 384, true), (m0, 384, 384, false), (2048, 2048, 2048, false)] {
        let a = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let b = if tr { Tensor::randn(0f32, 1.0, (n, k), &dev)?.t()? } else { Tensor::randn(0f32, 1.0, (k, n), &dev)? };
        let mut best = f64::MAX;
        for _ in 0..8 {
            let t = Instant::now();
            let c = a.matmul(&b)?;
            let _ = c.dims();
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!("{m}x{k} @ {k}x{n} (rhs transposed: {tr}): {:.1} GFLOP/s", 2.0 * (m * k * n) as f64 / best / 1e9);
    }
    Ok(())
}
