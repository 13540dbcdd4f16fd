#!/usr/bin/env python3
"""f32 GEMM GFLOP/s with torch (its CPU BLAS: MKL on x86 wheels): the reference for
`lora bench --mode gemm`.

    VENV=${LORA_REF_VENV:-$HOME/.cache/lora-rs/venv}
    $VENV/bin/python bench/reference/gemm_bench.py [--threads 2] [--sizes 1024,2048] [--warmup 2] [--steps 10]

For each N: C = A @ B with A, B random N x N float32 (contiguous), and the linear-layer form
X @ W.T (torch.nn.functional.linear, what nn.Linear runs); --warmup untimed calls, then the
median of --steps timed calls; GFLOP/s = 2 N^3 / median seconds / 1e9. Prints ONE JSON object:
gemm_gflops_matmul_<N>, gemm_gflops_linear_<N>, gemm_peak_gflops (best of those medians),
the BLAS torch was built with, threads.
"""
import argparse
import json
import statistics
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", default="1024,2048")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    out = {"tool": "pytorch", "mode": "gemm", "torch": torch.__version__, "threads": args.threads,
           "sizes": sizes, "warmup": args.warmup, "steps": args.steps,
           "blas": "mkl" if torch.backends.mkl.is_available() else "other",
           "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    peak = 0.0
    with torch.inference_mode():
        for n in sizes:
            a = torch.randn(n, n, dtype=torch.float32)
            b = torch.randn(n, n, dtype=torch.float32)
            for name, f in (("matmul", lambda: torch.matmul(a, b)),
                            ("linear", lambda: torch.nn.functional.linear(a, b))):
                for _ in range(max(1, args.warmup)):
                    f()
                ts = []
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    f()
                    ts.append(time.perf_counter() - t0)
                g = 2.0 * n ** 3 / statistics.median(ts) / 1e9
                out[f"gemm_gflops_{name}_{n}"] = g
                peak = max(peak, g)
    out["gemm_peak_gflops"] = peak
    print(json.dumps(out))


if __name__ == "__main__":
    main()
