//! The custom ops on a CUDA device (built only with `--features cuda`; needs a
//! GPU and its driver to run, see docs/cuda.md). On a non-CPU device every op
//! takes its candle-primitive reference path; these tests check that path
//! against the CPU kernels: forward values and input gradients, and that the
//! result stays on the GPU.
#![cfg(feature = "cuda")]

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Result, Tensor, Var};
use lora_core::{ops, ops_decoder};
use std::sync::Arc;

fn gpu() -> Device {
    Device::new_cuda(0).expect("lora-core cuda tests need CUDA device 0")
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    let b = b.to_device(&Device::Cpu).unwrap();
    (a.to_device(&Device::Cpu).unwrap() - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Runs `op` on the CPU and on the GPU (its tensor arguments moved there by
/// `op` itself through the device it is given) and compares the outputs and
/// the gradients of a random linear functional of the output.
fn check(op: impl Fn(&Tensor, &Device) -> Result<Tensor>, shape: &[usize], tol: f32) {
    let dev = gpu();
    let x0 = randn(shape, 1);
    let run = |d: &Device| {
        let x = Var::from_tensor(&x0.to_device(d).unwrap()).unwrap();
        let y = op(x.as_tensor(), d).unwrap();
        assert_eq!(y.device().location(), d.location(), "output left the device");
        let w = randn(y.dims(), 2).to_device(d).unwrap();
        let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gx = g.get(&x).expect("no gradient for the input").clone();
        assert_eq!(gx.device().location(), d.location(), "gradient left the device");
        (y, gx)
    };
    let (yc, gc) = run(&Device::Cpu);
    let (yg, gg) = run(&dev);
    assert!(max_abs(&yc, &yg) < tol, "forward differs: {}", max_abs(&yc, &yg));
    assert!(max_abs(&gc, &gg) < tol, "gradient differs: {}", max_abs(&gc, &gg));
}

fn on(t: &Tensor, d: &Device) -> Tensor {
    t.to_device(d).unwrap()
}

#[test]
fn frozen_linear() {
    let (w, b) = (randn(&[7, 5], 3), randn(&[7], 4));
    check(|x, d| ops::frozen_linear(x, &on(&w, d), Some(&on(&b, d))), &[2, 3, 5], 1e-4);
    check(|x, d| ops::frozen_linear(x, &on(&w, d), None), &[4, 5], 1e-4);
}

#[test]
fn layer_norm() {
    let (g, b) = (randn(&[16], 3), randn(&[16], 4));
    check(|x, d| ops::layer_norm(x, &on(&g, d), &on(&b, d), 1e-12), &[3, 4, 16], 1e-4);
}

#[test]
fn softmax_and_masked_softmax() {
    check(|x, _| ops::softmax_last_dim(x), &[2, 3, 4, 9], 1e-5);
    let mut bias = vec![0f32; 18];
    bias[4] = -1e9;
    bias[17] = -1e9;
    let bias = Tensor::from_vec(bias, (2, 9), &Device::Cpu).unwrap();
    check(|x, d| ops::masked_softmax(x, &on(&bias, d)), &[2, 3, 4, 9], 1e-5);
}

#[test]
fn gelu_erf() {
    check(|x, _| ops::gelu_erf(x), &[4, 33], 1e-4);
}

#[test]
fn dropout_keeps_or_scales() {
    // The GPU path draws its own mask (candle_nn's dropout), so only the
    // shape of the result is compared: each element is 0 or x/(1-p), and the
    // gradient follows the same mask.
    let dev = gpu();
    let x = Var::from_tensor(&randn(&[64, 64], 1).to_device(&dev).unwrap()).unwrap();
    let y = ops::dropout(x.as_tensor(), 0.25).unwrap();
    assert!(y.device().is_cuda());
    let g = y.sum_all().unwrap().backward().unwrap();
    let (x, y, g) = (
        x.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        g.get(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
    );
    let kept = y.iter().filter(|v| **v != 0.0).count() as f32 / y.len() as f32;
    assert!((kept - 0.75).abs() < 0.05, "kept fraction {kept}");
    for i in 0..y.len() {
        if y[i] == 0.0 {
            assert_eq!(g[i], 0.0);
        } else {
            assert!((y[i] - x[i] / 0.75).abs() < 1e-5 && (g[i] - 1.0 / 0.75).abs() < 1e-5);
        }
    }
}

#[test]
fn rms_norm() {
    let g = randn(&[16], 6);
    check(|x, d| ops_decoder::rms_norm(x, &on(&g, d), 1e-5), &[3, 4, 16], 1e-4);
}

#[test]
fn rope() {
    let (t, dim) = (5, 8);
    let ang = randn(&[t, dim / 2], 9);
    let (c, s) = (ang.cos().unwrap(), ang.sin().unwrap());
    check(|x, d| ops_decoder::rope(x, &on(&c, d), &on(&s, d)), &[2, t, 3, dim], 1e-5);
}

#[test]
fn causal_softmax() {
    check(|x, _| ops_decoder::causal_softmax(x, 0), &[2, 3, 6, 6], 1e-5);
    check(|x, _| ops_decoder::causal_softmax(x, 4), &[1, 2, 3, 7], 1e-5);
    assert!(ops_decoder::causal_softmax(&randn(&[1, 1, 3, 2], 1).to_device(&gpu()).unwrap(), 0).is_err());
}

#[test]
fn silu_mul() {
    let u = randn(&[4, 10], 3);
    check(|g, d| ops_decoder::silu_mul(g, &on(&u, d)), &[4, 10], 1e-5);
    check(|x, d| ops_decoder::silu_mul(&on(&u, d), x), &[4, 10], 1e-5);
}

#[test]
fn token_cross_entropy() {
    let targets = [3i64, -100, 0, 6, -100];
    check(|x, _| Ok(ops_decoder::token_cross_entropy(x, &targets)?.0), &[5, 7], 1e-5);
}

#[test]
fn frozen_qlinear() {
    // The quantized weight stays on the CPU, as the GGUF loader keeps it; the
    // GPU path dequantizes it onto the activations' device.
    let q = Arc::new(QTensor::quantize(&randn(&[24, 64], 4), GgmlDType::Q4_1).unwrap());
    check(|x, _| ops_decoder::frozen_qlinear(x, &q), &[2, 10, 64], 1e-3);
    check(|x, _| ops_decoder::frozen_qlinear(x, &q), &[1, 64], 1e-3);
}
