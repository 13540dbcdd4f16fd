//! Matrix-vector products of GGML block-quantized weights with f32
//! activations, for decoding (a few rows of `x`).
//!
//! llama.cpp and candle quantize the activations to 8-bit blocks before the dot
//! products; that moves SmolLM2's logits by up to ~0.3 and flips near-tied greedy
//! choices against the f32 reference. Here the weights are dequantized block by
//! block inside the dot product and the activations stay f32, so the result
//! equals `x·dequant(W)ᵀ` to f32 rounding at about the same memory traffic.
//! Supported: Q4_0, Q4_1, Q8_0 (others return `None` and the caller falls back).

use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;
use rayon::prelude::*;

const QK: usize = 32;

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Sums of every 32-wide block of `x`.
fn block_sums(x: &[f32]) -> Vec<f32> {
    x.chunks(QK).map(|c| c.iter().sum()).collect()
}

/// Dot product of one quantized row with `x`. Per-lane accumulators (no
/// sequential float sum) so that the loops vectorize.
#[inline(always)]
fn dot_row(dtype: GgmlDType, row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    let nb = x.len() / QK;
    let mut lanes = [0f32; 16];
    let mut extra = 0f32;
    match dtype {
        GgmlDType::Q8_0 => {
            for b in 0..nb {
                let blk = &row[b * 34..(b + 1) * 34];
                let xs = &x[b * QK..(b + 1) * QK];
                let d = f16_at(blk, 0);
                let q = &blk[2..34];
                for j in 0..16 {
                    lanes[j] += d * ((q[j] as i8) as f32 * xs[j] + (q[j + 16] as i8) as f32 * xs[j + 16]);
                }
            }
        }
        GgmlDType::Q4_1 => {
            for b in 0..nb {
                let blk = &row[b * 20..(b + 1) * 20];
                let xs = &x[b * QK..(b + 1) * QK];
                let d = f16_at(blk, 0);
                let q = &blk[4..20];
                for j in 0..16 {
                    lanes[j] += d * ((q[j] & 0x0f) as f32 * xs[j] + (q[j] >> 4) as f32 * xs[j + 16]);
                }
                extra += f16_at(blk, 2) * xsum[b];
            }
        }
        GgmlDType::Q4_0 => {
            for b in 0..nb {
                let blk = &row[b * 18..(b + 1) * 18];
                let xs = &x[b * QK..(b + 1) * QK];
                let d = f16_at(blk, 0);
                let q = &blk[2..18];
                for j in 0..16 {
                    lanes[j] += d * ((q[j] & 0x0f) as f32 * xs[j] + (q[j] >> 4) as f32 * xs[j + 16]);
                }
                extra -= 8.0 * d * xsum[b];
            }
        }
        _ => {}
    }
    lanes.iter().sum::<f32>() + extra
}

/// Output features `lo..hi` for every row of `x`: `out[(o - lo) * m + r]`.
#[inline(always)]
fn chunk(dtype: GgmlDType, w: &[u8], row_bytes: usize, x: &[f32], sums: &[Vec<f32>], k: usize, lo: usize, hi: usize, out: &mut [f32]) {
    let m = sums.len();
    for o in lo..hi {
        let row = &w[o * row_bytes..(o + 1) * row_bytes];
        for r in 0..m {
            out[(o - lo) * m + r] = dot_row(dtype, row, &x[r * k..(r + 1) * k], &sums[r]);
        }
    }
}

/// The same, compiled for AVX2 + FMA + F16C (the caller checks the CPU).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn chunk_avx2(dtype: GgmlDType, w: &[u8], row_bytes: usize, x: &[f32], sums: &[Vec<f32>], k: usize, lo: usize, hi: usize, out: &mut [f32]) {
    chunk(dtype, w, row_bytes, x, sums, k, lo, hi, out)
}

/// The same, compiled for AVX-512 (one 16-lane register holds the accumulators).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn chunk_avx512(dtype: GgmlDType, w: &[u8], row_bytes: usize, x: &[f32], sums: &[Vec<f32>], k: usize, lo: usize, hi: usize, out: &mut [f32]) {
    chunk(dtype, w, row_bytes, x, sums, k, lo, hi, out)
}

fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        has_avx2() && is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn run(dtype: GgmlDType, w: &[u8], row_bytes: usize, x: &[f32], k: usize, n: usize, dst: &mut [f32]) {
    let m = x.len() / k;
    let sums: Vec<Vec<f32>> = (0..m).map(|r| block_sums(&x[r * k..(r + 1) * k])).collect();
    let avx2 = has_avx2();
    // Opt-in until measured faster than AVX2 on a quiet machine.
    let avx512 = has_avx512() && std::env::var_os("LORA_QGEMV_AVX512").is_some();
    // dst is (m, n); work is split over output features.
    const CHUNK: usize = 64;
    let cols: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| {
            let lo = c * CHUNK;
            let hi = n.min(lo + CHUNK);
            let mut out = vec![0f32; (hi - lo) * m];
            #[cfg(target_arch = "x86_64")]
            if avx512 {
                // SAFETY: the CPU supports the enabled features (checked in has_avx512).
                unsafe { chunk_avx512(dtype, w, row_bytes, x, &sums, k, lo, hi, &mut out) };
                return (lo, out);
            }
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: the CPU supports the enabled features (checked in has_avx2).
                unsafe { chunk_avx2(dtype, w, row_bytes, x, &sums, k, lo, hi, &mut out) };
                return (lo, out);
            }
            let _ = (avx2, avx512);
            chunk(dtype, w, row_bytes, x, &sums, k, lo, hi, &mut out);
            (lo, out)
        })
        .collect();
    for (lo, out) in cols {
        let width = out.len() / m.max(1);
        for j in 0..width {
            for r in 0..m {
                dst[r * n + lo + j] = out[j * m + r];
            }
        }
    }
}

/// `x (m, k) · Wᵀ` for `W` (n, k) quantized; `None` for unsupported types.
pub fn qgemv(w: &QTensor, x: &[f32], k: usize) -> candle_core::Result<Option<Vec<f32>>> {
    let dtype = w.dtype();
    if !matches!(dtype, GgmlDType::Q8_0 | GgmlDType::Q4_1 | GgmlDType::Q4_0) || k % QK != 0 {
        return Ok(None);
    }
    let (n, wk) = w.shape().dims2()?;
    if wk != k {
        candle_core::bail!("qgemv: input has {k} features, weight expects {wk}")
    }
    let data = w.data()?;
    let row_bytes = k / QK * dtype.type_size();
    let m = x.len() / k;
    let mut dst = vec![0f32; m * n];
    run(dtype, &data, row_bytes, x, k, n, &mut dst);
    Ok(Some(dst))
}

#[inline(always)]
fn dequant_row(dtype: GgmlDType, row: &[u8], out: &mut [f32]) {
    let nb = out.len() / QK;
    for b in 0..nb {
        let o = &mut out[b * QK..(b + 1) * QK];
        match dtype {
            GgmlDType::Q8_0 => {
                let blk = &row[b * 34..(b + 1) * 34];
                let d = f16_at(blk, 0);
                for j in 0..QK {
                    o[j] = (blk[2 + j] as i8) as f32 * d;
                }
            }
            GgmlDType::Q4_1 => {
                let blk = &row[b * 20..(b + 1) * 20];
                let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
                for j in 0..16 {
                    let q = blk[4 + j];
                    o[j] = (q & 0x0f) as f32 * d + m;
                    o[j + 16] = (q >> 4) as f32 * d + m;
                }
            }
            GgmlDType::Q4_0 => {
                let blk = &row[b * 18..(b + 1) * 18];
                let d = f16_at(blk, 0);
                for j in 0..16 {
                    let q = blk[2 + j];
                    o[j] = ((q & 0x0f) as f32 - 8.0) * d;
                    o[j + 16] = ((q >> 4) as f32 - 8.0) * d;
                }
            }
            _ => {}
        }
    }
}

#[inline(always)]
fn dequant_rows(dtype: GgmlDType, rows: &[u8], row_bytes: usize, k: usize, out: &mut [f32]) {
    for (i, o) in out.chunks_mut(k).enumerate() {
        dequant_row(dtype, &rows[i * row_bytes..(i + 1) * row_bytes], o);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dequant_rows_avx2(dtype: GgmlDType, rows: &[u8], row_bytes: usize, k: usize, out: &mut [f32]) {
    dequant_rows(dtype, rows, row_bytes, k, out)
}

/// The whole matrix as f32 (n, k), rows dequantized in parallel; `None` for
/// unsupported block types. Values equal candle's `dequantize`.
pub fn dequantize(w: &QTensor) -> candle_core::Result<Option<Vec<f32>>> {
    let dtype = w.dtype();
    if !matches!(dtype, GgmlDType::Q8_0 | GgmlDType::Q4_1 | GgmlDType::Q4_0) {
        return Ok(None);
    }
    let (n, k) = w.shape().dims2()?;
    if k % QK != 0 {
        return Ok(None);
    }
    let data = w.data()?;
    let row_bytes = k / QK * dtype.type_size();
    let mut out = vec![0f32; n * k];
    let avx2 = has_avx2();
    out.par_chunks_mut(k * 16).enumerate().for_each(|(c, chunk)| {
        let rows = &data[c * 16 * row_bytes..];
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: the CPU supports the enabled features (checked in has_avx2).
            unsafe { dequant_rows_avx2(dtype, rows, row_bytes, k, chunk) };
            return;
        }
        let _ = avx2;
        dequant_rows(dtype, rows, row_bytes, k, chunk);
    });
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn parallel_dequantize_equals_candle() {
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_1, GgmlDType::Q4_0] {
            let w = Tensor::randn(0f32, 1.0, (37, 64), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&w, dtype).unwrap();
            let want = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(dequantize(&q).unwrap().unwrap(), want, "{dtype:?}");
        }
    }

    #[test]
    fn qgemv_equals_dequantized_matmul() {
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_1, GgmlDType::Q4_0] {
            let w = Tensor::randn(0f32, 1.0, (70, 96), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&w, dtype).unwrap();
            let wd = q.dequantize(&Device::Cpu).unwrap();
            let x = Tensor::randn(0f32, 1.0, (3, 96), &Device::Cpu).unwrap();
            let want = x.matmul(&wd.t().unwrap()).unwrap();
            let got = qgemv(&q, &x.flatten_all().unwrap().to_vec1::<f32>().unwrap(), 96).unwrap().unwrap();
            let got = Tensor::from_vec(got, (3, 70), &Device::Cpu).unwrap();
            let d: f32 = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            assert!(d < 1e-4, "{dtype:?}: {d}");
        }
    }
}
