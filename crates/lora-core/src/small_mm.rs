//! Single-threaded GEMMs for attention's per-(batch, head) products.
//!
//! The blocks are small (T×T×d with d = 32 and T = 28 on the sentiment
//! job's short sequences, 128 at the benchmark's fixed shape), and the gemm
//! crate spends a good part of such a call on dispatch, a fresh packing
//! workspace and packing the left operand. Here the product runs straight
//! from the operands: a register tile of up to 16 vectors (8 rows × 32 columns or
//! 4 rows × 64), the left
//! element broadcast, the right rows loaded as (masked) 16-lane vectors. A
//! right operand that is not row-contiguous (`Kᵀ`, `Vᵀ`) is transposed once
//! per call into a per-thread scratch with 16×16 in-register transposes.
//!
//! Without AVX-512 every call goes to the gemm crate; `tests` checks both
//! against a plain triple loop.

use crate::simd::{self, Level};
use std::cell::RefCell;

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `dst (m×n, row stride dst_rs) = scale · lhs · rhs`, single-threaded,
/// without reading `dst`. `lhs` element `(i, p)` is at `lhs[i·lhs_rs +
/// p·lhs_cs]`, `rhs` element `(p, j)` at `rhs[p·rhs_rs + j·rhs_cs]`.
///
/// # Safety
/// The pointers with their strides must address valid memory for the
/// shapes, and `dst` must not overlap the operands.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn mm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    lhs: *const f32,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const f32,
    rhs_rs: usize,
    rhs_cs: usize,
    scale: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if k > 0 && simd::level() == Level::Avx512 && (rhs_cs == 1 || rhs_rs == 1) {
        if rhs_cs == 1 {
            avx512::mm(m, n, k, dst, dst_rs, lhs, lhs_rs, lhs_cs, rhs, rhs_rs, scale);
            return;
        }
        // rhs is (k×n) with unit row stride: its transpose (n×k, row stride
        // rhs_cs) is row-contiguous. Copy it transposed into k×n.
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < k * n {
                s.resize(k * n, 0.0);
            }
            avx512::transpose(n, k, rhs, rhs_cs, s.as_mut_ptr(), n);
            avx512::mm(m, n, k, dst, dst_rs, lhs, lhs_rs, lhs_cs, s.as_ptr(), n, scale);
        });
        return;
    }
    mm_gemm(m, n, k, dst, dst_rs, lhs, lhs_rs, lhs_cs, rhs, rhs_rs, rhs_cs, scale)
}

/// [`mm`] on the gemm crate (the path without AVX-512).
///
/// # Safety
/// As [`mm`].
#[allow(clippy::too_many_arguments)]
unsafe fn mm_gemm(m: usize, n: usize, k: usize, dst: *mut f32, dst_rs: usize, lhs: *const f32, lhs_rs: usize, lhs_cs: usize, rhs: *const f32, rhs_rs: usize, rhs_cs: usize, scale: f32) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        false,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        0.0,
        scale,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// The register tile: `R` rows × `NV` 16-lane vectors; the last vector
    /// is masked to the block's width.
    #[target_feature(enable = "avx512f")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const R: usize, const NV: usize>(
        k: usize,
        dst: *mut f32,
        dst_rs: usize,
        a: *const f32,
        a_rs: usize,
        a_cs: usize,
        b: *const f32,
        b_rs: usize,
        scale: __m512,
        mask: __mmask16,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NV]; R];
        for p in 0..k {
            let bp = b.add(p * b_rs);
            let mut bv = [_mm512_setzero_ps(); NV];
            for (v, x) in bv.iter_mut().enumerate() {
                *x = if v + 1 == NV { _mm512_maskz_loadu_ps(mask, bp.add(v * 16)) } else { _mm512_loadu_ps(bp.add(v * 16)) };
            }
            let ap = a.add(p * a_cs);
            for (r, row) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*ap.add(r * a_rs));
                for (x, y) in row.iter_mut().zip(&bv) {
                    *x = _mm512_fmadd_ps(av, *y, *x);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (v, x) in row.iter().enumerate() {
                let o = _mm512_mul_ps(*x, scale);
                let d = dst.add(r * dst_rs + v * 16);
                if v + 1 == NV {
                    _mm512_mask_storeu_ps(d, mask, o)
                } else {
                    _mm512_storeu_ps(d, o)
                }
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn cols<const NV: usize>(m: usize, k: usize, dst: *mut f32, dst_rs: usize, a: *const f32, a_rs: usize, a_cs: usize, b: *const f32, b_rs: usize, scale: __m512, mask: __mmask16) {
        let mut i = 0;
        // Up to 16 accumulators: 8 rows for one or two vectors of columns.
        if NV <= 2 {
            while i + 8 <= m {
                tile::<8, NV>(k, dst.add(i * dst_rs), dst_rs, a.add(i * a_rs), a_rs, a_cs, b, b_rs, scale, mask);
                i += 8;
            }
        }
        while i + 4 <= m {
            tile::<4, NV>(k, dst.add(i * dst_rs), dst_rs, a.add(i * a_rs), a_rs, a_cs, b, b_rs, scale, mask);
            i += 4;
        }
        while i < m {
            tile::<1, NV>(k, dst.add(i * dst_rs), dst_rs, a.add(i * a_rs), a_rs, a_cs, b, b_rs, scale, mask);
            i += 1;
        }
    }

    /// [`super::mm`] with a row-contiguous `rhs` (row stride `b_rs`).
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn mm(m: usize, n: usize, k: usize, dst: *mut f32, dst_rs: usize, a: *const f32, a_rs: usize, a_cs: usize, b: *const f32, b_rs: usize, scale: f32) {
        let sc = _mm512_set1_ps(scale);
        let mut c0 = 0;
        while c0 < n {
            let w = (n - c0).min(64);
            let nv = w.div_ceil(16);
            let last = w - (nv - 1) * 16;
            let mask: __mmask16 = if last == 16 { u16::MAX } else { (1u16 << last) - 1 };
            let (d, bb) = (dst.add(c0), b.add(c0));
            match nv {
                1 => cols::<1>(m, k, d, dst_rs, a, a_rs, a_cs, bb, b_rs, sc, mask),
                2 => cols::<2>(m, k, d, dst_rs, a, a_rs, a_cs, bb, b_rs, sc, mask),
                3 => cols::<3>(m, k, d, dst_rs, a, a_rs, a_cs, bb, b_rs, sc, mask),
                _ => cols::<4>(m, k, d, dst_rs, a, a_rs, a_cs, bb, b_rs, sc, mask),
            }
            c0 += 64;
        }
    }

    /// `dst (cols×rows, row stride dst_rs) = srcᵀ` for `src` (rows×cols,
    /// row stride src_rs), in 16×16 register blocks (masked at the edges).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transpose(rows: usize, cols: usize, src: *const f32, src_rs: usize, dst: *mut f32, dst_rs: usize) {
        let mut r0 = 0;
        while r0 < rows {
            let h = (rows - r0).min(16);
            let hmask: __mmask16 = if h == 16 { u16::MAX } else { (1u16 << h) - 1 };
            let mut c0 = 0;
            while c0 < cols {
                let w = (cols - c0).min(16);
                let wmask: __mmask16 = if w == 16 { u16::MAX } else { (1u16 << w) - 1 };
                let mut r = [_mm512_setzero_ps(); 16];
                for (i, x) in r.iter_mut().enumerate().take(h) {
                    *x = _mm512_maskz_loadu_ps(wmask, src.add((r0 + i) * src_rs + c0));
                }
                let t = transpose16(r);
                for (j, x) in t.iter().enumerate().take(w) {
                    _mm512_mask_storeu_ps(dst.add((c0 + j) * dst_rs + r0), hmask, *x);
                }
                c0 += 16;
            }
            r0 += 16;
        }
    }

    /// The transpose of a 16×16 block held as 16 row vectors.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
        let lo = |a: __m512, b: __m512| _mm512_unpacklo_ps(a, b);
        let hi = |a: __m512, b: __m512| _mm512_unpackhi_ps(a, b);
        let mut t = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            t[2 * i] = lo(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = hi(r[2 * i], r[2 * i + 1]);
        }
        let lod = |a: __m512, b: __m512| _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
        let hid = |a: __m512, b: __m512| _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
        // u[4g + c]: rows 4g..4g+4, columns c, c+4, c+8, c+12 (one per 128-bit lane).
        let mut u = [_mm512_setzero_ps(); 16];
        for g in 0..4 {
            let (t0, t1, t2, t3) = (t[4 * g], t[4 * g + 1], t[4 * g + 2], t[4 * g + 3]);
            u[4 * g] = lod(t0, t2);
            u[4 * g + 1] = hid(t0, t2);
            u[4 * g + 2] = lod(t1, t3);
            u[4 * g + 3] = hid(t1, t3);
        }
        // v: lanes (c, c+8) of row groups (g, g+1) for g in {0, 2}.
        let mut v = [_mm512_setzero_ps(); 16];
        for h in 0..2 {
            for c in 0..4 {
                let (a, b) = (u[8 * h + c], u[8 * h + 4 + c]);
                v[8 * h + c] = _mm512_shuffle_f32x4::<0x88>(a, b);
                v[8 * h + 4 + c] = _mm512_shuffle_f32x4::<0xdd>(a, b);
            }
        }
        let mut o = [_mm512_setzero_ps(); 16];
        for c in 0..8 {
            o[c] = _mm512_shuffle_f32x4::<0x88>(v[c], v[8 + c]);
            o[8 + c] = _mm512_shuffle_f32x4::<0xdd>(v[c], v[8 + c]);
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn naive(m: usize, n: usize, k: usize, a: &[f32], a_rs: usize, a_cs: usize, b: &[f32], b_rs: usize, b_cs: usize, scale: f32) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k).map(|p| a[i * a_rs + p * a_cs] as f64 * b[p * b_rs + j * b_cs] as f64).sum();
                c[i * n + j] = (s * scale as f64) as f32;
            }
        }
        c
    }

    /// Every shape class the attention calls make (row-contiguous and
    /// transposed operands, masked column tails, 4-row tiles and their
    /// remainders, more than one 64-column block), on this machine's best
    /// path and on the gemm crate's, against a triple loop in f64. Tolerance 1e-5 absolute
    /// (sums of ≤ 130 products of values in [-0.5, 0.5]).
    #[test]
    fn small_products_match_a_triple_loop() {
        let shapes = [(1, 1, 1), (3, 5, 7), (28, 28, 32), (28, 32, 28), (4, 16, 16), (7, 17, 33), (128, 128, 32), (128, 32, 128), (5, 65, 3), (33, 130, 9)];
        for &(m, n, k) in &shapes {
            let pad = 3;
            // lhs plain (rs = k+pad) and transposed (cs = m+pad); rhs plain
            // (rs = n+pad) and transposed (cs = k+pad).
            let a_plain = lcg(1, m * (k + pad));
            let a_t = lcg(2, k * (m + pad));
            let b_plain = lcg(3, k * (n + pad));
            let b_t = lcg(4, n * (k + pad));
            for (a, a_rs, a_cs) in [(&a_plain, k + pad, 1), (&a_t, 1, m + pad)] {
                for (b, b_rs, b_cs) in [(&b_plain, n + pad, 1), (&b_t, 1, k + pad)] {
                    let want = naive(m, n, k, a, a_rs, a_cs, b, b_rs, b_cs, 0.7);
                    // dst with a row stride wider than n and a sentinel in the gap.
                    let dst_rs = n + 2;
                    for path in [mm as unsafe fn(usize, usize, usize, *mut f32, usize, *const f32, usize, usize, *const f32, usize, usize, f32), mm_gemm] {
                    let mut got = vec![9f32; m * dst_rs];
                    unsafe { path(m, n, k, got.as_mut_ptr(), dst_rs, a.as_ptr(), a_rs, a_cs, b.as_ptr(), b_rs, b_cs, 0.7) };
                    for i in 0..m {
                        for j in 0..n {
                            let (g, w) = (got[i * dst_rs + j], want[i * n + j]);
                            assert!((g - w).abs() < 1e-5, "({m},{n},{k}) a({a_rs},{a_cs}) b({b_rs},{b_cs}): [{i},{j}] {g} vs {w}");
                        }
                        assert_eq!(&got[i * dst_rs + n..i * dst_rs + dst_rs], &[9.0, 9.0], "({m},{n},{k}): wrote past the row");
                    }
                    }
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn transpose_matches_index_swap() {
        if simd::level() != Level::Avx512 {
            return;
        }
        for &(rows, cols) in &[(1, 1), (16, 16), (28, 32), (33, 17), (5, 40)] {
            let src = lcg(5, rows * (cols + 1));
            let mut dst = vec![7f32; cols * (rows + 2)];
            unsafe { avx512::transpose(rows, cols, src.as_ptr(), cols + 1, dst.as_mut_ptr(), rows + 2) };
            for i in 0..rows {
                for j in 0..cols {
                    assert_eq!(dst[j * (rows + 2) + i], src[i * (cols + 1) + j], "({rows},{cols}) [{i},{j}]");
                }
            }
            for j in 0..cols {
                assert_eq!(&dst[j * (rows + 2) + rows..(j + 1) * (rows + 2)], &[7.0, 7.0]);
            }
        }
    }
}
