//! The gemm crate's own parallel split against splitting the rows over the
//! threads ourselves (one single-threaded GEMM per thread), on the MiniLM
//! workload's shapes. `GEMM_M` sets the rows (default 896 = 32 x 28 tokens).
use std::time::Instant;

#[allow(clippy::too_many_arguments)]
fn gemm_call(m: usize, n: usize, k: usize, dst: *mut f32, lhs: *const f32, rhs: *const f32, rhs_t: bool, par: gemm::Parallelism) {
    // lhs (m×k) row-major; rhs either (k×n) row-major or its transpose (n×k).
    let (rcs, rrs) = if rhs_t { (k as isize, 1) } else { (1, n as isize) };
    unsafe { gemm::gemm(m, n, k, dst, 1, n as isize, false, lhs, 1, k as isize, rhs, rcs, rrs, 0.0, 1.0, false, false, false, par) }
}

struct P(*mut f32);
unsafe impl Send for P {}
unsafe impl Sync for P {}

fn main() {
    let threads = rayon::current_num_threads();
    let m0: usize = std::env::var("GEMM_M").ok().and_then(|v| v.parse().ok()).unwrap_or(896);
    for &(m, k, n, tr) in &[(m0, 384usize, 8usize, true), (m0, 8, 384, false), (m0, 384usize, 384usize, true), (m0, 384, 1536, true), (m0, 1536, 384, true), (m0, 384, 384, false), (m0, 1536, 384, false), (m0, 384, 1536, false)] {
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5).collect();
        let mut c = vec![0f32; m * n];
        let flops = 2.0 * (m * k * n) as f64;
        let mut run = |mode: usize| {
            let mut best = f64::MAX;
            for _ in 0..20 {
                let t = Instant::now();
                match mode {
                    0 => gemm_call(m, n, k, c.as_mut_ptr(), a.as_ptr(), b.as_ptr(), tr, gemm::Parallelism::Rayon(threads)),
                    1 => gemm_call(m, n, k, c.as_mut_ptr(), a.as_ptr(), b.as_ptr(), tr, gemm::Parallelism::None),
                    _ => {
                        // rows split into `threads` contiguous chunks
                        let per = m.div_ceil(threads);
                        let cp = P(c.as_mut_ptr());
                        let cp = &cp;
                        let (ap, bp) = (a.as_ptr() as usize, b.as_ptr() as usize);
                        rayon::scope(|s| {
                            for t in 0..threads {
                                let r0 = t * per;
                                let rows = per.min(m.saturating_sub(r0));
                                if rows == 0 {
                                    continue;
                                }
                                s.spawn(move |_| {
                                    let d = unsafe { cp.0.add(r0 * n) };
                                    let l = (ap as *const f32).wrapping_add(r0 * k);
                                    gemm_call(rows, n, k, d, l, bp as *const f32, tr, gemm::Parallelism::None)
                                });
                            }
                        });
                    }
                }
                best = best.min(t.elapsed().as_secs_f64());
            }
            flops / best / 1e9
        };
        let (par, one, split) = (run(0), run(1), run(2));
        println!("{m}x{k} -> {n} (rhs^T {tr}): gemm-rayon {par:.0}  single {one:.0}  row-split {split:.0} GFLOP/s");
    }
}
