//! bf16 matrix multiplies on Intel AMX tiles for the frozen weights: an
//! opt-in precision mode, like PyTorch's `torch.set_float32_matmul_precision`
//! ("medium" lets f32 matmuls run in bf16).
//!
//! With [`MatmulPrecision::Bf16`], a frozen linear layer computes
//! `x·Wᵀ + b` (and, in training, `dx = g·W`) with `x`/`g` and `W` rounded to
//! bf16 (round to nearest even) and products summed in f32 by the AMX unit
//! (`TDPBF16PS`). Everything else stays f32: the LoRA branch and its
//! gradients, attention, norms, the optimizer. The default is
//! [`MatmulPrecision::F32`], which never changes a number.
//!
//! A frozen weight is packed once into the tile layout ([`PackedBf16`]) and
//! kept beside the layer ([`Packs`]); merging or unmerging drops the packs.
//!
//! Error: each product `x·w` carries the two bf16 roundings (relative 2⁻⁸
//! each at worst), so a K-long dot product is within about
//! `2⁻⁷·Σ|xᵢ·wᵢ|` of the f32 result; the sums themselves are f32. Inputs that
//! are already bf16 values give the f32 result up to f32 summation order
//! (tested below).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

use crate::ops::SendPtr;
use rayon::prelude::*;

/// How frozen-weight matmuls are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulPrecision {
    /// f32 products and sums (the default; the reference tests run here).
    F32,
    /// bf16 products, f32 sums, on AMX tiles. Needs [`available`].
    Bf16,
}

impl std::str::FromStr for MatmulPrecision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "highest" => Ok(Self::F32),
            "bf16" | "medium" => Ok(Self::Bf16),
            other => Err(format!("unknown matmul precision {other:?} (expected f32 or bf16)")),
        }
    }
}

impl std::fmt::Display for MatmulPrecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        })
    }
}

static PRECISION: AtomicU8 = AtomicU8::new(0);

/// Sets the precision of frozen-weight matmuls for the whole process.
/// Errors when bf16 is asked for on a CPU (or kernel) without AMX-BF16.
pub fn set_matmul_precision(p: MatmulPrecision) -> Result<(), String> {
    check(p)?;
    PRECISION.store(p as u8 + 1, Ordering::Relaxed);
    Ok(())
}

/// Sets the precision for a run on a GPU, where bf16 is cuBLAS's (no AMX
/// needed): frozen-weight matmuls and attention products then round their
/// inputs to bf16 ([`crate::ops::device_matmul`]). CPU kernels that run in
/// the same process (none do on a GPU run) would take the AMX path, so call
/// this only once the model's device is known to be a GPU.
pub fn set_gpu_matmul_precision(p: MatmulPrecision) {
    PRECISION.store(p as u8 + 1, Ordering::Relaxed);
}

/// Whether `p` can run here (bf16 needs [`available`]).
fn check(p: MatmulPrecision) -> Result<(), String> {
    match (p, enabled()) {
        (MatmulPrecision::Bf16, Err(e)) => Err(format!("bf16 matmuls need a CPU with AMX-BF16 (Intel Xeon 4th generation or later) and a Linux kernel that grants it; {e}")),
        _ => Ok(()),
    }
}

thread_local! {
    static SCOPED: std::cell::Cell<Option<MatmulPrecision>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with `p` as this thread's matmul precision (the thread that
/// runs the forward and backward passes decides; kernels' worker threads
/// follow it). Errors like [`set_matmul_precision`] when bf16 is unavailable.
pub fn with_matmul_precision<T>(p: MatmulPrecision, f: impl FnOnce() -> T) -> Result<T, String> {
    check(p)?;
    struct Restore(Option<MatmulPrecision>);
    impl Drop for Restore {
        fn drop(&mut self) {
            SCOPED.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(SCOPED.with(|c| c.replace(Some(p))));
    Ok(f())
}

/// The precision in use: a [`with_matmul_precision`] scope on this thread,
/// else [`set_matmul_precision`], else `LORA_MATMUL_PRECISION` (f32 | bf16)
/// when AMX is there, else f32 (with one warning on stderr when the variable
/// asks for what cannot be had).
pub fn matmul_precision() -> MatmulPrecision {
    if let Some(p) = SCOPED.with(|c| c.get()) {
        return p;
    }
    match PRECISION.load(Ordering::Relaxed) {
        1 => MatmulPrecision::F32,
        2 => MatmulPrecision::Bf16,
        _ => {
            let p = match std::env::var("LORA_MATMUL_PRECISION").ok().map(|v| v.parse::<MatmulPrecision>().and_then(|p| check(p).map(|()| p))) {
                Some(Ok(p)) => p,
                Some(Err(e)) => {
                    eprintln!("warning: LORA_MATMUL_PRECISION ignored, matmuls stay f32: {e}");
                    MatmulPrecision::F32
                }
                None => MatmulPrecision::F32,
            };
            PRECISION.store(p as u8 + 1, Ordering::Relaxed);
            p
        }
    }
}

/// Fewest rows for which the tile path is used (below, f32 GEMM: decoding).
pub const MIN_ROWS: usize = 16;

/// Whether a frozen matmul with `m` rows runs on the bf16 tiles.
pub fn use_bf16(m: usize) -> bool {
    m >= MIN_ROWS && matmul_precision() == MatmulPrecision::Bf16
}

/// Whether this CPU and kernel run AMX-BF16 (checked once; asks the kernel
/// for the tile-data permission the first time).
pub fn available() -> bool {
    enabled().is_ok()
}

/// The outcome of the one CPU check and permission request (why not, if not).
fn enabled() -> &'static Result<(), String> {
    static ENABLED: OnceLock<Result<(), String>> = OnceLock::new();
    ENABLED.get_or_init(sys::enable)
}

/// Rounds f32 to bf16 (nearest, ties to even; NaN stays NaN, quieted).
/// Branch-free, so loops over it vectorize ([`crate::simd::to_bf16_row`]).
#[inline(always)]
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    let quiet = ((b >> 16) as u16) | 0x40;
    if (b & 0x7fff_ffff) > 0x7f80_0000 {
        quiet
    } else {
        rounded
    }
}

#[inline(always)]
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// Tile geometry: 16 rows × 64 bytes (32 bf16 of K, or 16 f32 of N).
const TR: usize = 16;
const TK: usize = 32;

/// A `K×N` right-hand side in AMX's tile layout: for each 16-column tile
/// and each 32-deep K block, 16 rows of (k, k+1) pairs of 16 columns
/// ("VNNI" order), 1 KiB per tile; K and N are zero-padded.
pub struct PackedBf16 {
    k: usize,
    n: usize,
    kb: usize,
    nt: usize,
    data: Vec<u16>,
}

impl PackedBf16 {
    /// Packs `B[k][n] = src[k·rs + n·cs]`.
    pub fn pack(src: &[f32], k: usize, n: usize, rs: usize, cs: usize) -> Self {
        assert!(k == 0 || n == 0 || src.len() > (k - 1) * rs + (n - 1) * cs, "PackedBf16: source too short");
        let kb = k.div_ceil(TK);
        let nt = n.div_ceil(TR);
        let tile = TR * TK;
        let mut data = vec![0u16; nt * kb * tile];
        data.par_chunks_mut(kb * tile).enumerate().for_each(|(j, panel)| {
            for (b, t) in panel.chunks_mut(tile).enumerate() {
                for p in 0..TR {
                    for e in 0..2 {
                        let kk = b * TK + 2 * p + e;
                        if kk >= k {
                            continue;
                        }
                        for c in 0..TR {
                            let nn = j * TR + c;
                            if nn < n {
                                t[p * TK + 2 * c + e] = to_bf16(src[kk * rs + nn * cs]);
                            }
                        }
                    }
                }
            }
        });
        Self { k, n, kb, nt, data }
    }

    /// `B = Wᵀ` for a row-major `W (n×k)`: the forward `x·Wᵀ`.
    pub fn pack_transposed(w: &[f32], n: usize, k: usize) -> Self {
        Self::pack(w, k, n, 1, k)
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn bytes(&self) -> usize {
        self.data.len() * 2
    }

    fn tile(&self, j: usize, b: usize) -> *const u16 {
        debug_assert!(j < self.nt && b < self.kb);
        self.data[(j * self.kb + b) * TR * TK..].as_ptr()
    }
}

/// The packed forms of one frozen weight, made on first use.
#[derive(Default)]
pub struct Packs {
    /// `Wᵀ` (in×out): the forward `x·Wᵀ`.
    fwd: OnceLock<Arc<PackedBf16>>,
    /// `W` (out×in): the input gradient `g·W`.
    bwd: OnceLock<Arc<PackedBf16>>,
    /// `Wᵀ` (in×out) in column panels ([`crate::ops::Panels`]): the f32
    /// forward, read in place by the gemm crate.
    f32p_fwd: OnceLock<Arc<crate::ops::Panels>>,
    /// `W` (out×in) in column panels: the f32 input gradient.
    f32p_bwd: OnceLock<Arc<crate::ops::Panels>>,
}

impl Packs {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// `Wᵀ` packed, for `w` (out×in) row-major.
    pub fn forward(&self, w: &[f32], out_f: usize, in_f: usize) -> Arc<PackedBf16> {
        self.fwd.get_or_init(|| Arc::new(PackedBf16::pack_transposed(w, out_f, in_f))).clone()
    }

    /// `W` packed (K = out, N = in), for `w` (out×in) row-major.
    pub fn backward(&self, w: &[f32], out_f: usize, in_f: usize) -> Arc<PackedBf16> {
        self.bwd.get_or_init(|| Arc::new(PackedBf16::pack(w, out_f, in_f, in_f, 1))).clone()
    }

    /// `Wᵀ` (in×out) in column panels, for `w` (out×in) row-major.
    pub(crate) fn forward_panels(&self, w: &[f32], out_f: usize, in_f: usize) -> Arc<crate::ops::Panels> {
        self.f32p_fwd
            .get_or_init(|| Arc::new(crate::ops::Panels::pack(in_f, out_f, &crate::ops::transpose_par(w, out_f, in_f), out_f)))
            .clone()
    }

    /// `W` (out×in) in column panels, made on the first backward.
    pub(crate) fn backward_panels(&self, w: &[f32], out_f: usize, in_f: usize) -> Arc<crate::ops::Panels> {
        self.f32p_bwd.get_or_init(|| Arc::new(crate::ops::Panels::pack(out_f, in_f, w, in_f))).clone()
    }

    /// Bytes held by the bf16 tile packs.
    pub fn bytes(&self) -> usize {
        self.fwd.get().map_or(0, |p| p.bytes()) + self.bwd.get().map_or(0, |p| p.bytes())
    }

    /// Bytes held by the f32 panels (one copy of `W` each).
    pub fn f32_bytes(&self) -> usize {
        self.f32p_fwd.get().map_or(0, |p| p.bytes()) + self.f32p_bwd.get().map_or(0, |p| p.bytes())
    }
}

/// Rows per parallel task (a multiple of 32).
const MC: usize = 64;

/// What happens to each 32×32 block of `A·B` on its way to memory.
#[derive(Clone, Copy, Default)]
pub struct Epilogue<'a> {
    /// Add to the destination's current values (else overwrite it).
    pub accumulate: bool,
    /// Add this row vector (length n).
    pub bias: Option<&'a [f32]>,
    /// Store `gelu(v)` (erf form) instead of `v`.
    pub gelu: bool,
}

/// `dst (m×n, row stride n) = epilogue(A·B)` with `A[i][p] = a[i·lda + p]`
/// (f32, rounded to bf16 here) and `B` packed. See [`Epilogue`]; with
/// `pre`, the values before GELU are stored there too (m×n).
/// Panics without [`available`].
pub fn gemm_bf16(m: usize, a: &[f32], lda: usize, b: &PackedBf16, dst: &mut [f32], ep: Epilogue, pre: Option<&mut [f32]>) {
    assert!(dst.len() >= m * b.n, "gemm_bf16: destination too short");
    if let Some(p) = &pre {
        assert!(p.len() >= m * b.n, "gemm_bf16: pre-activation buffer too short");
    }
    // SAFETY: both outputs hold m·n initialised elements (checked above).
    unsafe { gemm_bf16_raw(m, a, lda, b, dst.as_mut_ptr(), pre.map_or(std::ptr::null_mut(), |p| p.as_mut_ptr()), ep) }
}

/// `epilogue(A·B)` (m×n) in a new buffer (not zero-filled first), and the
/// values before GELU when `keep_pre` (for the backward pass).
pub fn gemm_bf16_new(m: usize, a: &[f32], lda: usize, b: &PackedBf16, ep: Epilogue, keep_pre: bool) -> (Vec<f32>, Option<Vec<f32>>) {
    assert!(!ep.accumulate, "gemm_bf16_new: nothing to accumulate onto");
    let len = m * b.n;
    let mut dst: Vec<f32> = Vec::with_capacity(len);
    let mut pre: Option<Vec<f32>> = keep_pre.then(|| Vec::with_capacity(len));
    // SAFETY: capacity len each; without `accumulate` every one of the m·n
    // elements of each output is written (never read) before the length
    // is set.
    unsafe {
        gemm_bf16_raw(m, a, lda, b, dst.as_mut_ptr(), pre.as_mut().map_or(std::ptr::null_mut(), |p| p.as_mut_ptr()), ep);
        dst.set_len(len);
        if let Some(p) = pre.as_mut() {
            p.set_len(len);
        }
    }
    (dst, pre)
}

thread_local! {
    /// Each worker's bf16 copy of its rows of A, and one row being
    /// converted (both reused across calls).
    static ABUF: std::cell::RefCell<(Vec<u16>, Vec<u16>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// # Safety
/// `dst` (and `pre` unless null) must be valid for m·n writes, and for
/// reads when `ep.accumulate`.
unsafe fn gemm_bf16_raw(m: usize, a: &[f32], lda: usize, b: &PackedBf16, dst: *mut f32, pre: *mut f32, ep: Epilogue) {
    let (k, n) = (b.k, b.n);
    assert!(available(), "gemm_bf16: AMX-BF16 is not available");
    assert!(m == 0 || k == 0 || a.len() >= (m - 1) * lda + k, "gemm_bf16: lhs too short");
    if let Some(bias) = ep.bias {
        assert_eq!(bias.len(), n, "gemm_bf16: bias length");
    }
    if m == 0 || n == 0 {
        return;
    }
    let kp = b.kb * TK;
    let (dst, pre) = (SendPtr(dst), SendPtr(pre));
    let run = |ci: usize| {
        let r0 = ci * MC;
        let rows = (m - r0).min(MC);
        let rp = rows.div_ceil(2 * TR) * 2 * TR;
        ABUF.with(|cell| {
            let (abuf, row) = &mut *cell.borrow_mut();
            if abuf.len() < rp * kp {
                abuf.resize(rp * kp, 0);
            }
            if row.len() < kp {
                row.resize(kp, 0);
            }
            // This task's rows of A in bf16, tile-major: for each group of
            // 16 rows and each 32-deep K block, one contiguous 1 KiB tile
            // (sequential tile loads). The padding (K beyond k, rows beyond
            // `rows`) is zeroed, as the buffer is reused.
            let kbs = b.kb;
            for i in 0..rp {
                let (g, ri) = (i / TR, i % TR);
                if i < rows {
                    crate::simd::to_bf16_row(&a[(r0 + i) * lda..(r0 + i) * lda + k], &mut row[..k]);
                    row[k..kp].fill(0);
                } else {
                    row[..kp].fill(0);
                }
                for kb in 0..kbs {
                    let t = ((g * kbs + kb) * TR + ri) * TK;
                    abuf[t..t + TK].copy_from_slice(&row[kb * TK..kb * TK + TK]);
                }
            }
            // SAFETY: this task's rows r0..r0+rows of each output: valid for
            // rows·n elements (the caller's contract), initialised when read
            // (`accumulate`) and disjoint from every other task's.
            let dtask = unsafe { std::slice::from_raw_parts_mut(dst.get().add(r0 * n), rows * n) };
            let mut ptask = (!pre.get().is_null()).then(|| unsafe { std::slice::from_raw_parts_mut(pre.get().add(r0 * n), rows * n) });
            let mut scratch = [0f32; 2 * TR * 2 * TR];
            let mut activated = [0f32; 2 * TR * 2 * TR];
            sys::with_tiles(|| {
                for j in (0..b.nt).step_by(2) {
                    let two_n = j + 1 < b.nt;
                    let c0 = j * TR;
                    let cols = (n - c0).min(2 * TR);
                    for mb in (0..rp).step_by(2 * TR) {
                        // SAFETY: tiles are configured (with_tiles); abuf
                        // holds rp·kp bf16, each packed tile 1 KiB, scratch
                        // 32×32 f32.
                        unsafe {
                            sys::zero4();
                            for kb in 0..b.kb {
                                let a0 = abuf.as_ptr().add(((mb / TR) * kbs + kb) * TR * TK);
                                let a1 = abuf.as_ptr().add(((mb / TR + 1) * kbs + kb) * TR * TK);
                                let b0 = b.tile(j, kb);
                                let b1 = if two_n { b.tile(j + 1, kb) } else { b0 };
                                sys::step(a0, a1, 64, b0, b1);
                            }
                            sys::store4(scratch.as_mut_ptr());
                        }
                        let nrows = rows.saturating_sub(mb).min(2 * TR);
                        crate::simd::amx_block_out(&mut scratch, 2 * TR, &mut activated, nrows, cols, dtask, mb * n + c0, n, ptask.as_deref_mut(), ep.bias.map(|b| &b[c0..c0 + cols]), ep.accumulate, ep.gelu);
                    }
                }
            });
        });
    };
    let tasks = m.div_ceil(MC);
    if tasks > 1 && rayon::current_num_threads() > 1 {
        (0..tasks).into_par_iter().for_each(run);
    } else {
        (0..tasks).for_each(run);
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod sys {
    use std::arch::asm;

    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    const ARCH_REQ_XCOMP_PERM: libc::c_ulong = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_ulong = 18;

    pub(super) fn enable() -> Result<(), String> {
        // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
        // Leaf 0 gives the highest leaf.
        let max = std::arch::x86_64::__cpuid(0).eax;
        if max < 7 {
            return Err("this CPU reports no AMX".into());
        }
        let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
        if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 {
            return Err("this CPU has no AMX-BF16".into());
        }
        // SAFETY: a plain syscall with integer arguments.
        let r = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) };
        if r != 0 {
            return Err(format!("the kernel refused AMX tile data (arch_prctl: {})", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Runs `f` with all 8 tiles configured as 16 rows × 64 bytes, then
    /// releases them.
    pub(super) fn with_tiles(f: impl FnOnce()) {
        let mut cfg = TileConfig { palette: 1, start_row: 0, reserved: [0; 14], colsb: [0; 16], rows: [0; 16] };
        for i in 0..8 {
            cfg.rows[i] = 16;
            cfg.colsb[i] = 64;
        }
        // SAFETY: AMX was enabled (callers assert `available`); the config
        // is a valid palette-1 layout.
        unsafe { asm!("ldtilecfg [{}]", in(reg) &cfg as *const TileConfig, options(nostack, readonly)) };
        f();
        // SAFETY: releases the configuration loaded above.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }

    /// Zeroes the four accumulators tmm0..tmm3.
    #[inline(always)]
    pub(super) unsafe fn zero4() {
        asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
    }

    /// One 32-deep K step of a 32×32 block: rows from `a0`/`a1` (stride
    /// `sa` bytes), column tiles `b0`/`b1` (1 KiB each, stride 64).
    #[inline(always)]
    pub(super) unsafe fn step(a0: *const u16, a1: *const u16, sa: usize, b0: *const u16, b1: *const u16) {
        asm!(
            "tileloadd tmm6, [{b0} + {sb}*1]",
            "tileloadd tmm4, [{a0} + {sa}*1]",
            "tileloadd tmm7, [{b1} + {sb}*1]",
            "tileloadd tmm5, [{a1} + {sa}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            a0 = in(reg) a0, a1 = in(reg) a1, sa = in(reg) sa,
            b0 = in(reg) b0, b1 = in(reg) b1, sb = in(reg) 64usize,
            options(nostack, readonly),
        );
    }

    /// Stores the 32×32 f32 block (tmm0 tmm1 / tmm2 tmm3) row-major, 128 bytes a row.
    #[inline(always)]
    pub(super) unsafe fn store4(c: *mut f32) {
        asm!(
            "tilestored [{c0} + {s}*1], tmm0",
            "tilestored [{c1} + {s}*1], tmm1",
            "tilestored [{c2} + {s}*1], tmm2",
            "tilestored [{c3} + {s}*1], tmm3",
            c0 = in(reg) c, c1 = in(reg) c.add(16), c2 = in(reg) c.add(16 * 32), c3 = in(reg) c.add(16 * 32 + 16),
            s = in(reg) 128usize,
            options(nostack),
        );
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
mod sys {
    pub(super) fn enable() -> Result<(), String> {
        Err("AMX needs x86-64 Linux".into())
    }
    pub(super) fn with_tiles(_f: impl FnOnce()) {
        unreachable!("gemm_bf16 asserts availability")
    }
    pub(super) unsafe fn zero4() {}
    pub(super) unsafe fn step(_a0: *const u16, _a1: *const u16, _sa: usize, _b0: *const u16, _b1: *const u16) {}
    pub(super) unsafe fn store4(_c: *mut f32) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn round(v: &[f32]) -> Vec<f32> {
        v.iter().map(|&x| from_bf16(to_bf16(x))).collect()
    }

    /// f64 reference of `A·Bᵀ` for `B` (n×k).
    fn reference(m: usize, n: usize, k: usize, a: &[f32], w: &[f32]) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] as f64 * w[j * k + p] as f64).sum();
            }
        }
        c
    }

    #[test]
    fn rounding_is_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is a tie between 1 and 1 + 2^-7: even (1.0) wins.
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // Just above the tie rounds up.
        assert_eq!(to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
        // 1 + 3·2^-8 ties between odd 0x3f81 and even 0x3f82.
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert!(from_bf16(to_bf16(f32::from_bits(0x7f80_0001))).is_nan());
        assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
        assert_eq!(from_bf16(to_bf16(-0.0)).to_bits(), (-0.0f32).to_bits());
        let mut row = [0u16; 37];
        let src = lcg(3, 37);
        crate::simd::to_bf16_row(&src, &mut row);
        for (h, x) in row.iter().zip(&src) {
            assert_eq!(*h, to_bf16(*x));
        }
    }

    /// Inputs that are bf16 values: the products are exact, so the tile
    /// result equals the f64 sum up to f32 summation (1e-5 relative to Σ|x·w|).
    /// Odd sizes cover the zero-padded edges of M, N and K.
    #[test]
    fn exact_on_bf16_inputs_with_ragged_edges() {
        if !available() {
            eprintln!("skipped: no AMX-BF16 here");
            return;
        }
        // k = 4100: rows deeper than the usual sizes (the row buffer grows).
        for &(m, n, k) in &[(1, 1, 1), (17, 33, 45), (64, 16, 32), (100, 70, 130), (200, 48, 384), (33, 17, 1), (19, 5, 4100)] {
            let a = round(&lcg(m as u64 * 7 + 1, m * k));
            let w = round(&lcg(n as u64 * 13 + 2, n * k));
            let packed = PackedBf16::pack_transposed(&w, n, k);
            let got = gemm_bf16_new(m, &a, k, &packed, Epilogue::default(), false).0;
            let want = reference(m, n, k, &a, &w);
            for i in 0..m {
                for j in 0..n {
                    let mag: f64 = (0..k).map(|p| (a[i * k + p] as f64 * w[j * k + p] as f64).abs()).sum();
                    let e = (got[i * n + j] as f64 - want[i * n + j]).abs();
                    assert!(e <= 1e-5 * mag.max(1e-30), "({m},{n},{k}) at ({i},{j}): {} vs {}", got[i * n + j], want[i * n + j]);
                }
            }
        }
    }

    /// f32 inputs: within the stated bound 2⁻⁷·Σ|x·w| of the f64 result;
    /// bias and accumulate modes; strided lhs; the backward packing.
    #[test]
    fn f32_inputs_within_bf16_bound_all_modes() {
        if !available() {
            eprintln!("skipped: no AMX-BF16 here");
            return;
        }
        let (m, n, k, lda) = (150, 40, 70, 75);
        let a_full = lcg(5, m * lda);
        let a: Vec<f32> = (0..m).flat_map(|i| a_full[i * lda..i * lda + k].to_vec()).collect();
        let w = lcg(6, n * k);
        let bias = lcg(7, n);
        let want = reference(m, n, k, &a, &w);
        let bound = |i: usize, j: usize| (0..k).map(|p| (a[i * k + p] * w[j * k + p]).abs() as f64).sum::<f64>() / 128.0;
        let packed = PackedBf16::pack_transposed(&w, n, k);
        let mut with_bias = vec![f32::NAN; m * n];
        gemm_bf16(m, &a_full, lda, &packed, &mut with_bias, Epilogue { bias: Some(&bias), ..Default::default() }, None);
        let mut acc = vec![1.0f32; m * n];
        gemm_bf16(m, &a_full, lda, &packed, &mut acc, Epilogue { accumulate: true, ..Default::default() }, None);
        // GELU epilogue: the values before GELU equal the bias mode's, and
        // the output is exactly GELU of them.
        let mut pre = vec![0f32; m * n];
        let mut act = vec![0f32; m * n];
        gemm_bf16(m, &a_full, lda, &packed, &mut act, Epilogue { bias: Some(&bias), gelu: true, ..Default::default() }, Some(&mut pre));
        assert_eq!(pre, with_bias);
        let mut want_act = vec![0f32; m * n];
        crate::simd::gelu_fwd(&with_bias, &mut want_act);
        assert_eq!(act, want_act);
        let mut max_rel = 0f64;
        for i in 0..m {
            for j in 0..n {
                let b = bound(i, j);
                let x = want[i * n + j];
                assert!((with_bias[i * n + j] as f64 - bias[j] as f64 - x).abs() <= b + 1e-6, "bias mode at ({i},{j})");
                assert!((acc[i * n + j] as f64 - 1.0 - x).abs() <= b + 1e-6, "accumulate mode at ({i},{j})");
                max_rel = max_rel.max((acc[i * n + j] as f64 - 1.0 - x).abs() / (b * 128.0));
            }
        }
        // The bound is loose; typical errors are far smaller, but not zero.
        assert!(max_rel > 0.0 && max_rel < 2.0 / 128.0, "max error relative to Σ|x·w|: {max_rel}");
        // Backward packing: g (m×n) · W (n×k) against f64.
        let g = lcg(8, m * n);
        let wt: Vec<f32> = (0..k).flat_map(|p| (0..n).map(move |j| (p, j))).map(|(p, j)| w[j * k + p]).collect();
        let bwd = PackedBf16::pack(&w, n, k, k, 1);
        let dx = gemm_bf16_new(m, &g, n, &bwd, Epilogue::default(), false).0;
        let want = reference(m, k, n, &g, &wt);
        for i in 0..m {
            for p in 0..k {
                let b: f64 = (0..n).map(|j| (g[i * n + j] * w[j * k + p]).abs() as f64).sum::<f64>() / 128.0;
                assert!((dx[i * k + p] as f64 - want[i * k + p]).abs() <= b + 1e-6, "backward at ({i},{p})");
            }
        }
    }

    #[test]
    fn precision_parses() {
        assert_eq!("bf16".parse::<MatmulPrecision>().unwrap(), MatmulPrecision::Bf16);
        assert_eq!("F32".parse::<MatmulPrecision>().unwrap(), MatmulPrecision::F32);
        assert!("fp8".parse::<MatmulPrecision>().unwrap_err().contains("fp8"));
    }
}
