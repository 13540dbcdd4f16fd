//! Data parallelism over the cores: a batch split into shards, one per core,
//! each shard's forward and backward run start to finish on its own thread
//! with single-threaded kernels, and the shards' gradients summed.
//!
//! Short sequences make small GEMMs (32 sentences × 28 tokens = 896 rows):
//! splitting every op over the cores then costs a hand-off and a barrier per
//! op (~300 per training step) and runs each op on activations the other
//! core wrote. A shard per core has neither: its ops run back to back on
//! data in its own cache, as PyTorch's DistributedDataParallel does with one
//! process per core.
//!
//! Inside a shard every kernel sees a one-thread rayon pool, so the ops
//! written for the global pool run sequentially without knowing it. Dropout
//! draws each shard's masks from its own stream (seeded from the step's seed
//! and the shard index), so a run is reproducible for a given shard count.

use std::sync::OnceLock;

thread_local! {
    static SHARD_DROPOUT: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// The dropout stream of this thread's shard, if it runs one (see `ops::next_dropout_seed`).
pub(crate) fn shard_dropout_next() -> Option<u64> {
    SHARD_DROPOUT.with(|c| {
        let s = c.get()?;
        c.set(Some(s.wrapping_add(1)));
        Some(s)
    })
}

fn pools() -> &'static Vec<rayon::ThreadPool> {
    static P: OnceLock<Vec<rayon::ThreadPool>> = OnceLock::new();
    P.get_or_init(|| {
        (0..rayon::current_num_threads().max(1))
            .map(|i| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .thread_name(move |_| format!("lora-shard-{i}"))
                    .build()
                    .expect("a one-thread pool")
            })
            .collect()
    })
}

/// How many shards a batch of `n` examples is split into: one per worker
/// thread of the global pool, at most `n`; 1 turns data parallelism off.
/// `LORA_DATA_PARALLEL=0` turns it off (kernels then split each op instead).
pub fn shards_for(n: usize) -> usize {
    static ON: OnceLock<bool> = OnceLock::new();
    let on = *ON.get_or_init(|| std::env::var_os("LORA_DATA_PARALLEL").is_none_or(|v| v != "0"));
    if !on {
        return 1;
    }
    // bf16 on AMX tiles: two half-batch shards ran the 128-token training
    // step slower (43 vs 46-52 samples/s; the tile kernel took 23% more
    // samples), so bf16 keeps splitting each op.
    if crate::amx::matmul_precision() == crate::amx::MatmulPrecision::Bf16 {
        return 1;
    }
    rayon::current_num_threads().min(n).max(1)
}

/// [`shards_for`] on `device`: one shard (the whole batch in one stream)
/// anywhere but the CPU.
pub fn shards_on(device: &candle_core::Device, n: usize) -> usize {
    if device.is_cpu() {
        shards_for(n)
    } else {
        1
    }
}

/// `items` in [`split_ranges`]' contiguous parts, copied.
pub fn split<T: Clone>(items: &[T], shards: usize) -> Vec<Vec<T>> {
    split_ranges(items.len(), shards).into_iter().map(|r| items[r].to_vec()).collect()
}

/// The contiguous ranges `n` examples split into for `shards` shards (sizes
/// differ by at most one, larger first).
pub fn split_ranges(n: usize, shards: usize) -> Vec<std::ops::Range<usize>> {
    let shards = shards.clamp(1, n.max(1));
    let (q, r) = (n / shards, n % shards);
    let mut start = 0;
    (0..shards)
        .map(|i| {
            let len = q + usize::from(i < r);
            let range = start..start + len;
            start += len;
            range
        })
        .collect()
}

/// Tokens of padded length at which a sequence's attention (the T×T
/// scores, softmax and dropout, per layer) costs as much as its T-linear
/// work (projections, MLP, norms) in the cost model of [`split_by_length`].
/// For MiniLM (hidden 384, MLP 1536) the linear GEMMs are 3.5 MFLOP per
/// token and layer against ~1.5 kFLOP per token and key for the two
/// attention products, plus the memory-bound softmax and dropout over 12
/// heads: about 1k tokens.
pub const ATTENTION_BREAK_EVEN_TOKENS: f64 = 1024.0;

/// Splits a batch of sequences with these `lengths` into at most `shards`
/// parts (positions into `lengths`) whose padded costs are as even as they
/// can be: each part is padded to its own longest sequence, and a part of
/// `n` sequences padded to `t` costs `n·t·(1 + t/1024)`
/// ([`ATTENTION_BREAK_EVEN_TOKENS`]).
///
/// The shards of a step run side by side and the step waits for the
/// slowest, so equal counts ([`split_ranges`]) waste the difference: with a
/// length-sorted batch the shard of the longest half ran 1-8% longer than
/// the other (sentiment data, 60 steps, four runs; 0-2.5% with this split).
/// The length grouping leaves little spread inside a batch, so the wall-time
/// gain there is within this machine's noise; batches of mixed lengths gain
/// more. Parts are contiguous runs of the sequences sorted by length
/// (longest first, ties in batch order), which is where an optimal split
/// lies; each part is non-empty.
pub fn split_by_length(lengths: &[usize], shards: usize) -> Vec<Vec<usize>> {
    let n = lengths.len();
    let shards = shards.clamp(1, n.max(1));
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    if shards == 1 {
        return vec![order];
    }
    // cost of the run order[j..i]: padded to its first (longest) member.
    let cost = |j: usize, i: usize| {
        let t = lengths[order[j]].max(1) as f64;
        (i - j) as f64 * t * (1.0 + t / ATTENTION_BREAK_EVEN_TOKENS)
    };
    // best[s][i]: the least largest part cost covering order[..i] with s+1
    // parts; cut[s][i] where the last of them starts.
    let mut best = vec![vec![f64::INFINITY; n + 1]; shards];
    let mut cut = vec![vec![0usize; n + 1]; shards];
    for (i, b) in best[0].iter_mut().enumerate().skip(1) {
        *b = cost(0, i);
    }
    for s in 1..shards {
        for i in s + 1..=n {
            for j in s..i {
                let c = best[s - 1][j].max(cost(j, i));
                if c < best[s][i] {
                    best[s][i] = c;
                    cut[s][i] = j;
                }
            }
        }
    }
    let mut parts = Vec::with_capacity(shards);
    let mut end = n;
    for s in (1..shards).rev() {
        let j = cut[s][end];
        parts.push(order[j..end].to_vec());
        end = j;
    }
    parts.push(order[..end].to_vec());
    parts.reverse();
    parts
}

/// `items` split as [`split_by_length`] splits their lengths `len(item)`,
/// copied: each part holds the items themselves, not positions.
pub fn split_by_length_of<T: Clone>(items: &[T], shards: usize, len: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let lengths: Vec<usize> = items.iter().map(len).collect();
    split_by_length(&lengths, shards).into_iter().map(|p| p.into_iter().map(|k| items[k].clone()).collect()).collect()
}

/// Runs `f(i)` for each shard `i < shards`, each on its own thread inside a
/// one-thread pool (kernels there run single-threaded), and returns the
/// results in shard order. `dropout_seed` seeds each shard's dropout stream;
/// the caller's `no_grad` state and matmul precision carry over. With one shard, `f(0)` runs
/// here, on the global pool.
pub fn run_shards<R: Send>(shards: usize, dropout_seed: u64, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
    if shards <= 1 {
        return vec![f(0)];
    }
    let pools = pools();
    let no_grad = !crate::lora::grad_enabled();
    let precision = crate::amx::matmul_precision();
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = (0..shards)
            .map(|i| {
                let pool = &pools[i % pools.len()];
                s.spawn(move || {
                    pool.install(|| {
                        let _g = no_grad.then(crate::lora::no_grad);
                        let seed = crate::ops::splitmix64(dropout_seed ^ (0xd1b5_4a32_d192_ed03u64.wrapping_mul(i as u64 + 1)));
                        SHARD_DROPOUT.with(|c| c.set(Some(seed)));
                        // This thread's precision (a scope, the setting or
                        // the environment) holds on the shard's thread too.
                        let r = crate::amx::with_matmul_precision(precision, || f(i)).expect("the caller's precision is available");
                        SHARD_DROPOUT.with(|c| c.set(None));
                        r
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_in_order() {
        assert_eq!(split_ranges(5, 2), vec![0..3, 3..5]);
        assert_eq!(split_ranges(1, 4), vec![0..1]);
        assert_eq!(split_ranges(8, 4), vec![0..2, 2..4, 4..6, 6..8]);
        assert_eq!(split_ranges(0, 2), vec![0..0]);
    }

    #[test]
    fn length_split_balances_padded_cost() {
        // Equal lengths: equal counts, batch order kept.
        assert_eq!(split_by_length(&[5, 5, 5, 5], 2), vec![vec![0, 1], vec![2, 3]]);
        assert_eq!(split_by_length(&[7, 3], 4), vec![vec![0], vec![1]]);
        assert_eq!(split_by_length(&[], 2), vec![Vec::<usize>::new()]);
        // One long sequence among short ones gets a shard nearly to itself.
        let parts = split_by_length(&[10, 10, 10, 100, 10, 10], 2);
        assert_eq!(parts, vec![vec![3], vec![0, 1, 2, 4, 5]]);
        // A sorted batch (as the length grouping makes them): the longest
        // shard holds fewer sequences, and the largest cost is no higher
        // than an equal-count split's.
        let lens: Vec<usize> = (0..32).map(|i| 60 - i).collect();
        let parts = split_by_length(&lens, 2);
        let cost = |p: &Vec<usize>| {
            let t = p.iter().map(|&i| lens[i]).max().unwrap() as f64;
            p.len() as f64 * t * (1.0 + t / ATTENTION_BREAK_EVEN_TOKENS)
        };
        assert!(parts[0].len() < parts[1].len(), "{parts:?}");
        let equal = [(0..16).collect::<Vec<_>>(), (16..32).collect()];
        let worst = parts.iter().map(cost).fold(0.0, f64::max);
        assert!(worst < equal.iter().map(cost).fold(0.0, f64::max));
        // The items themselves, split as their lengths are.
        let words = ["a", "bbbb", "cc"];
        assert_eq!(split_by_length_of(&words, 2, |w| w.len()), vec![vec!["bbbb"], vec!["cc", "a"]]);
        // Every position once, for any shard count.
        for shards in 1..6 {
            let parts = split_by_length(&lens, shards);
            assert_eq!(parts.len(), shards);
            let mut all: Vec<usize> = parts.concat();
            all.sort();
            assert_eq!(all, (0..32).collect::<Vec<_>>());
            assert!(parts.iter().all(|p| !p.is_empty()));
        }
    }

    #[test]
    fn shards_run_single_threaded_and_in_order() {
        let r = run_shards(3, 1, |i| (i, rayon::current_num_threads()));
        assert_eq!(r, vec![(0, 1), (1, 1), (2, 1)]);
    }
}
