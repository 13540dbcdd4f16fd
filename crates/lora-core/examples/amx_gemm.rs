//! f32 GEMM (gemm crate) against the bf16 AMX tiles on the MiniLM shapes:
//! `cargo run --release -p lora-core --example amx_gemm`.
use lora_core::amx::{self, PackedBf16};
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() -> candle_core::Result<()> {
    if !amx::available() {
        println!("no AMX-BF16 on this machine");
        return Ok(());
    }
    let dev = candle_core::Device::Cpu;
    println!("{:>22} {:>10} {:>10} {:>7}", "m x k -> n", "f32 GF/s", "bf16 GF/s", "ratio");
    for &(m, k, n) in &[(4096, 384, 384), (4096, 384, 1536), (4096, 1536, 384), (896, 384, 384), (896, 384, 1536), (896, 1536, 384), (512, 576, 1536)] {
        let x = candle_core::Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let w = candle_core::Tensor::randn(0f32, 1.0, (n, k), &dev)?;
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let ws = w.flatten_all()?.to_vec1::<f32>()?;
        let packed = PackedBf16::pack_transposed(&ws, n, k);
        let flops = 2.0 * (m * n * k) as f64;
        let reps = 15;
        let mut tf = vec![];
        let mut tb = vec![];
        let mut out = vec![0f32; m * n];
        for _ in 0..reps {
            let t = Instant::now();
            let y = lora_core::ops::frozen_linear(&x, &w, None)?;
            drop(y);
            tf.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            amx::gemm_bf16(m, &xs, k, &packed, &mut out, amx::Epilogue::default(), None);
            tb.push(t.elapsed().as_secs_f64());
        }
        let (f, b) = (flops / median(tf) / 1e9, flops / median(tb) / 1e9);
        println!("{:>22} {:>10.1} {:>10.1} {:>6.2}x", format!("{m} x {k} -> {n}"), f, b, b / f);
    }
    Ok(())
}
