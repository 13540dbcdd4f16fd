use super::*;
use crate::ops::tests::{check, randn};
use candle_core::{Device, Var};

#[test]
fn rms_norm_matches_reference() {
    let g = randn(&[16], 6);
    check(|x| rms_norm(x, &g, 1e-5), |x| rms_norm_reference(x, &g, 1e-5), &[3, 4, 16], 1e-4);
}

#[test]
fn rope_matches_reference_and_inverts() {
    let (t, d) = (5, 8);
    let ang = randn(&[t, d / 2], 9);
    let (c, s) = (ang.cos().unwrap(), ang.sin().unwrap());
    check(|x| rope(x, &c, &s), |x| rope_reference(x, &c, &s), &[2, t, 3, d], 1e-5);
}

#[test]
fn causal_softmax_matches_reference() {
    check(|x| causal_softmax(x, 0), |x| causal_softmax_reference(x, 0), &[2, 3, 6, 6], 1e-5);
    check(|x| causal_softmax(x, 4), |x| causal_softmax_reference(x, 4), &[1, 2, 3, 7], 1e-5);
    assert!(causal_softmax(&randn(&[1, 1, 3, 2], 1), 0).is_err());
}

#[test]
fn silu_mul_matches_reference() {
    let u = Var::from_tensor(&randn(&[4, 10], 3)).unwrap();
    check(|g| silu_mul(g, u.as_tensor()), |g| silu_mul_reference(g, u.as_tensor()), &[4, 10], 1e-5);
    check(|x| silu_mul(&randn(&[4, 10], 3), x), |x| silu_mul_reference(&randn(&[4, 10], 3), x), &[4, 10], 1e-5);
}

#[test]
fn token_cross_entropy_matches_reference_and_ignores() {
    let targets = [3i64, -100, 0, 6, -100];
    check(
        |x| Ok(token_cross_entropy(x, &targets)?.0),
        |x| token_cross_entropy_reference(x, &targets),
        &[5, 7],
        1e-5,
    );
    let (_, n) = token_cross_entropy(&randn(&[5, 7], 1), &targets).unwrap();
    assert_eq!(n, 3);
    assert!(token_cross_entropy(&randn(&[5, 7], 1), &[7, 0, 0, 0, 0]).is_err());
}

#[test]
fn frozen_qlinear_matches_dequantized_matmul() {
    use candle_core::quantized::GgmlDType;
    let w = randn(&[24, 64], 4);
    let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q4_1).unwrap());
    let wd = q.dequantize(&Device::Cpu).unwrap();
    // Large batch: dequantized GEMM, exact to f32 rounding.
    check(|x| frozen_qlinear(x, &q), |x| crate::ops::linear_reference(x, &wd, None), &[2, 10, 64], 1e-4);
    // One row (decoding): f32 activations against dequantized blocks, exact too.
    check(|x| frozen_qlinear(x, &q), |x| crate::ops::linear_reference(x, &wd, None), &[1, 64], 1e-4);
}
