#!/usr/bin/env python3
"""The fixed-shape LoRA benchmark on an NVIDIA GPU, side by side with PyTorch + PEFT,
and the CUDA test binaries, in one run (for a machine lent for a few minutes).

Where the GPU is, with python3 holding torch, transformers and peft, and a `lora`
binary built with --features cuda (scripts/build_cuda.sh; docs/cuda.md):

    python3 bench/gpu_bench.py --lora target/cuda/release/lora --out OUT \\
        [--test-bin cuda_ops=PATH --test-bin cuda_reference=PATH] \\
        [--batches 32,128] [--rounds 2] [--steps 20] [--budget-s 420]

What it runs, in this order:
  1. the GPU (nvidia-smi) and the CUDA libraries the binary links (cuBLAS 13, cuRAND 10:
     a system toolkit or PyTorch's nvidia-* wheels), put on LD_LIBRARY_PATH;
  2. each --test-bin (cuda_ops: the custom ops' GPU paths against the CPU kernels;
     cuda_reference: the models and adapters on the GPU against the transformers/PEFT
     fixtures, run from the repository root so that tests/fixtures is found);
  3. the GEMM peak: `lora --device cuda bench --mode gemm` (candle -> cuBLAS, f32) and
     torch.matmul at the same sizes (f32 without TF32, and bf16);
  4. for each batch size, precision (f32, bf16) and round, alternating which tool goes
     first: `lora --device cuda [--matmul-precision bf16] bench --mode train|infer` and
     `peft_bench.py --device cuda [--bf16] --mode train|infer` (MiniLM-L6 shape, 128
     tokens, LoRA r=8 on query,value + head; the workload of the CPU benchmark). Each
     measurement is its own process; its peak GPU memory is sampled through NVML
     (device memory in use above the level before it started: CUDA context, caching
     allocators and tensors alike, the same way for both tools).
Results: OUT/gpu.json (everything, raw) and OUT/gpu.md (tables: medians over rounds,
ratios ours/theirs), rewritten after every measurement so that a run cut short still
leaves what it measured; logs in OUT/tests.log and OUT/bench.log. No new run starts
after --budget-s seconds.
"""

import argparse
import glob
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
T0 = time.time()
# Analytic GEMM FLOPs of the workload at batch 32 x 128 (bench/run_all.py's encoder_flops,
# as transformers computes them); they scale with the batch.
TRAIN_GFLOP_B32, INFER_GFLOP_B32 = 186.2, 91.8


def log(out, *a):
    msg = " ".join(str(x) for x in a)
    print(f"[{time.time() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)
    with open(os.path.join(out, "bench.log"), "a") as f:
        f.write(msg + "\n")


def cuda_lib_dirs():
    """Folders holding the CUDA libraries the lora binary links dynamically."""
    want = ["libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10"]
    roots = []
    try:
        import nvidia  # PyTorch's CUDA wheels
        for p in nvidia.__path__:
            roots += glob.glob(os.path.join(p, "*", "lib")) + glob.glob(os.path.join(p, "*", "*", "lib"))
    except ImportError:
        pass
    roots += glob.glob("/usr/local/cuda*/lib64") + glob.glob("/usr/local/cuda*/targets/*/lib") + ["/usr/lib/x86_64-linux-gnu"]
    dirs, missing = [], []
    for w in want:
        hit = next((r for r in roots if glob.glob(os.path.join(r, w + "*"))), None)
        if hit is None:
            missing.append(w)
        elif hit not in dirs:
            dirs.append(hit)
    return dirs, missing


class GpuMem:
    """Samples the device's memory in use (NVML) while a process runs."""

    def __init__(self):
        try:
            import pynvml
            pynvml.nvmlInit()
            self.nv, self.h = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # no NVML: nvidia-smi, slower
            self.nv = None

    def used_mb(self):
        if self.nv:
            return self.nv.nvmlDeviceGetMemoryInfo(self.h).used / 2**20
        r = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                           stdout=subprocess.PIPE, text=True)
        return float(r.stdout.split()[0])

    def run(self, cmd, env, timeout):
        """Runs cmd; returns (returncode, stdout, stderr, peak MB above the starting level)."""
        base = self.used_mb()
        peak = [base]
        done = threading.Event()

        def sample():
            while not done.wait(0.02 if self.nv else 0.2):
                peak[0] = max(peak[0], self.used_mb())
        th = threading.Thread(target=sample, daemon=True)
        th.start()
        try:
            p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)
            rc, so, se = p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired as e:
            rc, so, se = 124, e.stdout or "", (e.stderr or "") + f"\ntimed out after {timeout}s"
            so = so.decode() if isinstance(so, bytes) else so
            se = se.decode() if isinstance(se, bytes) else se
        done.set()
        th.join()
        return rc, so, se, peak[0] - base


def last_json(text):
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in the output")


def med(xs):
    xs = [x for x in xs if isinstance(x, (int, float))]
    return statistics.median(xs) if xs else None


def fmt(v, nd=1):
    if v is None:
        return "–"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "–"


def write(out, res):
    with open(os.path.join(out, "gpu.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(out, "gpu.md"), "w") as f:
        f.write(markdown(res))


def markdown(res):
    m = res["machine"]
    lines = [f"GPU: {m.get('gpu', '?')} (driver {m.get('driver', '?')}), host {m.get('cpu', '?')}; "
             f"torch {m.get('torch', '?')}, transformers {m.get('transformers', '?')}, peft {m.get('peft', '?')}; "
             f"lora commit {res.get('commit', '?')}; {res['date']}.", ""]
    if res.get("tests"):
        lines += ["| test binary | result |", "|---|---|"]
        for name, t in res["tests"].items():
            lines.append(f"| {name} | {t.get('summary', t.get('error', '?'))} |")
        lines.append("")
    g = res.get("gemm", {})
    if g:
        lines += ["| GEMM (square) | lora (candle, cuBLAS) f32 | torch f32 | torch bf16 |", "|---|---|---|---|"]
        for n in sorted({int(k) for k in g.get("ours", {})} | {int(k) for k in g.get("torch_f32", {})}):
            lines.append(f"| {n} | {fmt(g.get('ours', {}).get(str(n)), 0)} GFLOP/s | "
                         f"{fmt(g.get('torch_f32', {}).get(str(n)), 0)} GFLOP/s | {fmt(g.get('torch_bf16', {}).get(str(n)), 0)} GFLOP/s |")
        lines.append("")
    for key, cell in res["cells"].items():
        b, prec = cell["batch"], cell["precision"]
        ours, theirs = cell["ours"], cell["theirs"]
        lines += [f"**batch {b} x 128, {prec}** ({len(ours.get('train_samples_per_s', []))} rounds; medians)", "",
                  "| metric | lora (candle) | PyTorch + PEFT | ours/theirs |", "|---|---|---|---|"]
        for k, label in [("train_samples_per_s", "train samples/s"),
                         ("infer_samples_per_s_base", "infer samples/s (base)"),
                         ("infer_samples_per_s_unmerged", "infer samples/s (unmerged)"),
                         ("infer_samples_per_s_merged", "infer samples/s (merged)")]:
            a, t = med(ours.get(k, [])), med(theirs.get(k, []))
            lines.append(f"| {label} | {fmt(a)} | {fmt(t)} | {ratio(a, t)} |")
        for k, label in [("infer_merged_over_base_time", "merged / base time"),
                         ("infer_unmerged_over_merged_time", "unmerged / merged time")]:
            lines.append(f"| {label} | {fmt(med(ours.get(k, [])), 3)} | {fmt(med(theirs.get(k, [])), 3)} | |")
        for k, label in [("gpu_mb_train", "peak GPU memory MB, train (NVML, above idle)"),
                         ("gpu_mb_infer", "peak GPU memory MB, infer (3 models)")]:
            a, t = med(ours.get(k, [])), med(theirs.get(k, []))
            lines.append(f"| {label} | {fmt(a, 0)} | {fmt(t, 0)} | {ratio(a, t)} |")
        a = med(ours.get("train_samples_per_s", []))
        t = med(theirs.get("train_samples_per_s", []))
        if a and t:
            gf = TRAIN_GFLOP_B32 / 32
            lines.append(f"| train TFLOP/s (analytic) | {a * gf / 1000:.1f} | {t * gf / 1000:.1f} | |")
        errs = cell.get("errors", [])
        if errs:
            lines += ["", "Errors: " + "; ".join(errs[:4])]
        lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lora", required=True, help="the lora binary built with --features cuda")
    ap.add_argument("--out", required=True)
    ap.add_argument("--test-bin", action="append", default=[], help="NAME=PATH of a CUDA test binary (repeatable)")
    ap.add_argument("--batches", default="32,128")
    ap.add_argument("--precisions", default="f32,bf16")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--gemm-sizes", default="2048,4096,8192")
    ap.add_argument("--budget-s", type=float, default=420)
    ap.add_argument("--commit", default=os.environ.get("LORA_COMMIT", "?"))
    ap.add_argument("--skip-theirs", action="store_true", help="run only ours (e.g. to re-measure a change of ours)")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    out = a.out

    env = dict(os.environ)
    dirs, missing = cuda_lib_dirs()
    env["LD_LIBRARY_PATH"] = ":".join(dirs + [env.get("LD_LIBRARY_PATH", "")]).strip(":")
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": a.commit,
           "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
           "cuda_lib_dirs": dirs, "cuda_libs_missing": missing, "tests": {}, "gemm": {}, "cells": {},
           "settings": vars(a)}
    q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                       stdout=subprocess.PIPE, text=True)
    parts = [p.strip() for p in q.stdout.strip().split(",")]
    if len(parts) == 3:
        res["machine"].update(gpu=parts[0], driver=parts[1], gpu_memory=parts[2])
    try:
        with open("/proc/cpuinfo") as f:
            res["machine"]["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except Exception:
        pass
    import peft
    import torch
    import transformers
    res["machine"].update(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__)
    log(out, f"GPU {res['machine'].get('gpu')}; CUDA libraries from {dirs}; missing {missing}")
    write(out, res)

    # 2. test binaries
    with open(os.path.join(out, "tests.log"), "w") as tl:
        for spec in a.test_bin:
            name, path = spec.split("=", 1)
            t = time.time()
            p = subprocess.run([path, "--test-threads", "1"], env={**env, "LORA_FIXTURES": os.path.abspath("tests/fixtures")},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            tl.write(f"==== {name} (exit {p.returncode}, {time.time() - t:.1f}s)\n{p.stdout}\n")
            m = re.findall(r"test result: .*", p.stdout)
            res["tests"][name] = {"exit": p.returncode, "summary": m[-1] if m else f"exit {p.returncode}, no summary",
                                  "seconds": round(time.time() - t, 1)}
            log(out, f"test {name}: {res['tests'][name]['summary']}")
            write(out, res)

    # 3. GEMM peaks
    rc, so, se, _ = GpuMem().run([a.lora, "--device", "cuda", "bench", "--mode", "gemm", "--json", "--steps", "5",
                                  "--sizes", a.gemm_sizes], env, 180)
    try:
        j = last_json(so)
        res["gemm"]["ours_raw"] = j
        res["gemm"]["ours"] = {str(n): max(j.get(f"gemm_gflops_matmul_{n}", 0), j.get(f"gemm_gflops_linear_{n}", 0))
                               for n in j.get("sizes", [])}
    except Exception as e:
        res["gemm"]["ours_error"] = f"exit {rc}: {e}: {se[-300:]}"
    for dt, key in [(torch.float32, "torch_f32"), (torch.bfloat16, "torch_bf16")]:
        torch.backends.cuda.matmul.allow_tf32 = False
        res["gemm"][key] = {}
        for n in [int(s) for s in a.gemm_sizes.split(",")]:
            x = torch.randn(n, n, device="cuda", dtype=dt)
            y = torch.randn(n, n, device="cuda", dtype=dt)
            for _ in range(3):
                x @ y
            torch.cuda.synchronize()
            ts = []
            for _ in range(5):
                t = time.perf_counter()
                x @ y
                torch.cuda.synchronize()
                ts.append(time.perf_counter() - t)
            res["gemm"][key][str(n)] = 2 * n**3 / statistics.median(ts) / 1e9
            del x, y
    torch.cuda.empty_cache()
    log(out, f"gemm: {json.dumps({k: v for k, v in res['gemm'].items() if k != 'ours_raw'})}")
    write(out, res)

    # 4. the fixed-shape workload
    mem = GpuMem()
    ref = os.path.join(HERE, "reference", "peft_bench.py")
    budget_hit = False
    for b in [int(x) for x in a.batches.split(",")]:
        for prec in a.precisions.split(","):
            key = f"b{b}-{prec}"
            cell = res["cells"].setdefault(key, {"batch": b, "precision": prec, "ours": {}, "theirs": {}, "errors": []})
            for rnd in range(a.rounds):
                order = ["ours", "theirs"] if rnd % 2 == 0 else ["theirs", "ours"]
                for who in [w for w in order if not (a.skip_theirs and w == "theirs")]:
                    for mode in ["train", "infer"]:
                        if time.time() - T0 > a.budget_s:
                            budget_hit = True
                            break
                        if who == "ours":
                            cmd = [a.lora, "--device", "cuda"] + (["--matmul-precision", "bf16"] if prec == "bf16" else []) + \
                                  ["bench", "--mode", mode, "--json", "--steps", str(a.steps), "--warmup", str(a.warmup),
                                   "--batch-size", str(b)]
                        else:
                            cmd = [sys.executable, ref, "--device", "cuda", "--mode", mode, "--steps", str(a.steps),
                                   "--infer-reps", str(a.steps), "--batch", str(b)] + (["--bf16"] if prec == "bf16" else [])
                        t = time.time()
                        rc, so, se, peak = mem.run(cmd, env, 240)
                        try:
                            j = last_json(so)
                        except Exception as e:
                            msg = f"{who} {mode} round {rnd}: exit {rc}: {e}: {se.strip()[-400:]}"
                            cell["errors"].append(msg)
                            log(out, "FAILED", msg)
                            continue
                        d = cell[who]
                        for k, v in j.items():
                            if isinstance(v, (int, float)) and not isinstance(v, bool):
                                d.setdefault(k, []).append(v)
                        d.setdefault(f"gpu_mb_{mode}", []).append(round(peak, 1))
                        shown = {k: round(v, 3) for k, v in j.items() if "samples_per_s" in k or "_over_" in k}
                        log(out, f"{key} round {rnd} {who} {mode} ({time.time() - t:.1f}s, GPU +{peak:.0f} MB): {shown}")
                        write(out, res)
    res["budget_hit"] = budget_hit
    res["seconds"] = round(time.time() - T0, 1)
    write(out, res)
    log(out, f"done in {res['seconds']}s{' (budget reached: some runs skipped)' if budget_hit else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
