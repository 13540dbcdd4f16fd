//! Times the exact and randomized truncated SVD on every 2-D tensor of a
//! safetensors file (optionally only keys containing a filter) and prints
//! one JSON line per matrix. Driven by bench/reference/svd_bench.py.
//!
//! `cargo run -p lora-lowrank --example svd_bench -- FILE RANK [FILTER] [--no-exact]`
//!
//! Randomized runs are repeated 3 times and the fastest is reported (the
//! machine is shared); the exact SVD runs once.

use candle_core::Device;
use lora_lowrank::svd::{exact_svd, frob, frob_diff, randomized_svd, tensor_to_mat, RsvdParams};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        return Err("usage: svd_bench FILE RANK [FILTER] [--no-exact]".into());
    }
    let rank: usize = args[2].parse()?;
    let filter = args.get(3).filter(|a| !a.starts_with("--")).cloned().unwrap_or_default();
    let exact = !args.iter().any(|a| a == "--no-exact");
    let tensors = candle_core::safetensors::load(&args[1], &Device::Cpu)?;
    let mut keys: Vec<&String> = tensors.keys().filter(|k| k.contains(&filter) && tensors[*k].rank() == 2).collect();
    keys.sort();
    for k in keys {
        let a = tensor_to_mat(&tensors[k])?;
        let norm = frob(a.as_ref());
        let mut row = serde_json::json!({"key": k, "shape": [a.nrows(), a.ncols()], "rank": rank});
        for (name, p) in [("rsvd_q2", RsvdParams { oversample: 10, power_iters: 2, seed: 0 }), ("rsvd_q4", RsvdParams { oversample: 10, power_iters: 4, seed: 0 })] {
            let mut secs = f64::INFINITY;
            let mut s = None;
            for _ in 0..3 {
                let t0 = Instant::now();
                s = Some(randomized_svd(k, a.as_ref(), rank, p)?);
                secs = secs.min(t0.elapsed().as_secs_f64());
            }
            let s = s.ok_or("no run")?;
            row[name] = serde_json::json!({"seconds": secs, "rel_error": frob_diff(s.reconstruct().as_ref(), a.as_ref()) / norm});
        }
        if exact {
            let t0 = Instant::now();
            let s = exact_svd(k, a.as_ref())?.truncate(rank);
            let secs = t0.elapsed().as_secs_f64();
            row["exact"] = serde_json::json!({"seconds": secs, "rel_error": frob_diff(s.reconstruct().as_ref(), a.as_ref()) / norm});
        }
        println!("{row}");
    }
    Ok(())
}
