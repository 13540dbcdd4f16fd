#!/usr/bin/env python3
"""All benchmarks, `lora` (Rust/candle) against PyTorch (+ PEFT, + transformers Trainer), in one command.

    python3 bench/run_all.py [--parts fixed,fixed-bf16,e2e,e2e-bf16,decoder,gemm] [--rounds 3] [--threads 2]
        [--steps 10] [--infer-reps 30] [--decoder-steps 10] [--decoder-warmup 2] [--decoder-batch 4] [--decoder-seq-len 128]
        [--gemm-sizes 1024,2048] [--gemm-steps 10]
        [--e2e-epochs 3] [--e2e-limit N] [--e2e-max-steps N]
        [--out bench/results] [--md bench/RESULTS.md] [--lora-bin target/release/lora]

(`python3 bench/compare.py` is the same command.) Needs the release binary
(`cargo build --release -p lora-cli`), the reference venv (scripts/reference/setup_venv.sh;
$LORA_REF_VENV, default ~/.cache/lora-rs/venv) and, for e2e and decoder, the cached assets
(scripts/fetch_assets.sh; $LORA_CACHE, default ~/.cache/lora-rs). Benchmark on an otherwise
idle machine: every run records the 1-minute load average at its start.

Parts (each round runs every selected part once per tool, ours then theirs, the order flipped
on every other round so that drift in machine load hits both alike; each tool runs in its own
process, so each peak RSS is its own; the tables show medians over the rounds):
  fixed    `lora bench --mode train|infer` vs bench/reference/peft_bench.py: MiniLM-L6 shape,
           random weights, batch 32 x 128, LoRA r=8 alpha=16 dropout 0.1 on query,value + 4-class
           head, AdamW; training: median of --steps steps after 2 warm-up steps; inference:
           --infer-reps rounds of the three variants (base, unmerged, merged) in turn, medians
           per variant and of the per-round time ratios (at 10 rounds the unmerged/merged ratio
           swung from 1.01 to 1.07 between runs of the same binary; at 30 it held at 1.006-1.009).
  e2e      the real job: `lora train` on all-MiniLM-L6-v2 and the VADER sentiment data with the
           main job's settings (scripts/demo.sh: 3 epochs, lr 5e-4, batch 32, max length 128,
           r=8 alpha=16 dropout 0.1 on query,value + classifier, seed 0), then `lora eval` on the
           test split; against bench/reference/e2e_trainer.py (transformers Trainer + PEFT, the
           same data files and settings). Wall time and peak RSS of each child process are
           measured here (os.wait4: wall from spawn to exit, ru_maxrss); ours sums train + eval
           wall and takes the larger peak RSS. --e2e-limit N uses the first N rows of each split
           (written to a temporary folder, read by both tools) and --e2e-max-steps N stops
           training after N steps: both for smoke tests only.
  fixed-bf16, e2e-bf16
           the same two workloads at bf16 precision: ours with `--matmul-precision bf16` (frozen-weight
           GEMMs on AMX tiles, bf16 inputs, f32 sums), PyTorch with bf16 autocast (peft_bench.py --bf16;
           e2e_trainer.py --bf16 = TrainingArguments(bf16=True)). Their tables add rows comparing ours
           in bf16 with PyTorch in f32 (from the f32 parts). Need a CPU with AMX-BF16.
  decoder  `lora bench --mode decoder` (SmolLM2-135M Q4_1 GGUF through the `lora train --task
           causal-lm` loader, 4-bit base) vs bench/reference/decoder_bench.py (the same GGUF
           dequantized to f32 by transformers): LoRA r=16 alpha=32 dropout 0.05 on
           q,k,v,o,gate,up,down, random tokens B x T, full step incl. clipping and AdamW.
  gemm     f32 GEMM GFLOP/s on N x N squares: `lora bench --mode gemm` (candle matmul and the
           frozen-linear op over the gemm crate) vs bench/reference/gemm_bench.py (torch matmul
           and F.linear, MKL). The machine's GEMM peak = the best median measured by either.

Analytic FLOPs (GEMM/BMM only, what transformers + PEFT compute for a frozen-base LoRA step;
ours computes ~14% less on this workload: with the pooler head the last layer runs its query,
attention, output projection and feed-forward for [CLS] alone, so our GFLOP/s and share are
effective, i.e. the same count divided by our time): forward
= every linear layer + attention QK^T and PV (full T x T) + LoRA A/B + head; training adds
the input-gradient GEMMs of the frozen linears (none of the first layer's q/k/v, whose input
needs no gradient), twice the attention BMMs (minus dK in the first layer), and LoRA's
backward (4 GEMMs per adapted module); no weight gradients of frozen weights. Achieved
GFLOP/s = FLOPs / median step time; share = achieved / machine GEMM peak (from this run's gemm
part, else from the gemm part kept in latest.json).

Writes --out/latest.json: per part the raw per-round numbers of both tools, their medians, the
settings, date, CPU model, threads, git commit and load averages; parts not run this time are
kept from the previous latest.json. Then writes --md (default bench/RESULTS.md): one table per
part with ours, theirs, ratio and the issue's target (met / not met). Smoke tests: point
--out and --md somewhere else (e.g. /tmp) so the committed results stay.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("fixed", "fixed-bf16", "e2e", "e2e-bf16", "decoder", "gemm")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def git_commit():
    r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return r.stdout.strip() + ("+dirty" if dirty else "")


class Child:
    """Popen that is reaped with os.wait4, so each child's own ru_maxrss is known."""

    @staticmethod
    def run(cmd):
        t0 = time.perf_counter()
        with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
            p = subprocess.Popen([str(c) for c in cmd], stdout=fo, stderr=fe, text=True)
            _, status, ru = os.wait4(p.pid, 0)
            p.returncode = os.waitstatus_to_exitcode(status)
            wall = time.perf_counter() - t0
            fo.seek(0)
            fe.seek(0)
            out, err = fo.read(), fe.read()
        if p.returncode != 0:
            sys.exit(f"failed ({p.returncode}): {' '.join(map(str, cmd))}\n{err[-3000:]}")
        return out, wall, ru.ru_maxrss / 1024.0


def last_json(out):
    return json.loads(out.strip().splitlines()[-1])


def collect(store, r, prefix=""):
    for k, v in r.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            store.setdefault(prefix + k, []).append(v)


def med(d, k):
    v = d.get(k) or []
    v = [x for x in v if x is not None]
    return statistics.median(v) if v else None


# ---------------------------------------------------------------- analytic FLOPs

def lora_flops(n, fin, fout, r, needs_dx):
    fwd = 2 * n * r * (fin + fout)
    # g·B (grad of the low-rank activation), dB, dA, and dx through A when the input needs it.
    bwd = 2 * n * fout * r * 2 + 2 * n * r * fin * (2 if needs_dx else 1)
    return fwd, bwd


def layer_stack_flops(b, t, h, layers, lin, first_inputs, targets, r):
    """GEMM FLOPs of `layers` transformer layers with linear layers `lin` (name -> (in, out)),
    LoRA on `targets`, full T x T attention: (fwd, bwd, lora_fwd, lora_bwd). The first layer's
    `first_inputs` projections read the embeddings, whose gradient is never needed."""
    n = b * t
    fwd = bwd = lora_f = lora_b = 0
    attn = 2 * (2 * b * t * t * h)
    for i in range(layers):
        for name, (fi, fo) in lin.items():
            fwd += 2 * n * fi * fo
            first_in = i == 0 and name in first_inputs
            if not first_in:
                bwd += 2 * n * fi * fo
            if name in targets:
                a, c = lora_flops(n, fi, fo, r, not first_in)
                lora_f += a
                lora_b += c
        fwd += attn
        bwd += 2 * attn - (2 * b * t * t * h if i == 0 else 0)
    return fwd, bwd, lora_f, lora_b


def encoder_flops(b=32, t=128, h=384, f=1536, layers=6, r=8, labels=4, targets=("query", "value")):
    """GEMM FLOPs of the fixed workload: dict(forward_base, forward_lora, train)."""
    lin = {"query": (h, h), "key": (h, h), "value": (h, h), "attention.output.dense": (h, h),
           "intermediate.dense": (h, f), "output.dense": (f, h)}
    fwd, bwd, lora_f, lora_b = layer_stack_flops(b, t, h, layers, lin, ("query", "key", "value"), targets, r)
    head = 2 * b * h * h + 2 * b * h * labels  # pooler, classifier
    fwd += head
    bwd += 2 * b * h * h + 2 * 2 * b * h * labels
    return {"forward_base": fwd, "forward_lora": fwd + lora_f, "train": fwd + lora_f + bwd + lora_b}


def decoder_flops(b=4, t=128, h=576, f=1536, layers=30, heads=9, kv_heads=3, vocab=49152, r=16):
    kv = h // heads * kv_heads
    lin = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
           "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}
    fwd, bwd, lora_f, lora_b = layer_stack_flops(b, t, h, layers, lin, ("q_proj", "k_proj", "v_proj"), tuple(lin), r)
    nh = b * (t - 1)  # positions with a next-token target go through the tied LM head
    fwd += 2 * nh * h * vocab
    bwd += 2 * nh * h * vocab
    return {"forward": fwd + lora_f, "train": fwd + lora_f + bwd + lora_b}


# ---------------------------------------------------------------- parts

def run_fixed(a, py, rnd, ours, theirs, bf16=False):
    for mode in ("train", "infer"):
        def o():
            log(f"  fixed {mode}: lora{' bf16' if bf16 else ''}")
            steps = a.steps if mode == "train" else a.infer_reps
            collect(ours, last_json(Child.run([a.lora_bin, "--threads", a.threads, "bench", "--mode", mode,
                                               "--steps", steps, "--json"]
                                              + (["--matmul-precision", "bf16"] if bf16 else []))[0]))

        def t():
            log(f"  fixed {mode}: pytorch+peft{' bf16 autocast' if bf16 else ''}")
            collect(theirs, last_json(Child.run([py, ROOT / "bench/reference/peft_bench.py", "--mode", mode,
                                                 "--threads", a.threads, "--steps", a.steps,
                                                 "--infer-reps", a.infer_reps] + (["--bf16"] if bf16 else []))[0]))
        for f in ((o, t) if rnd % 2 == 0 else (t, o)):
            f()


def e2e_data(a, tmp):
    data = Path(a.e2e_data)
    if not a.e2e_limit:
        return data
    sub = Path(tmp) / "e2e_subset"
    sub.mkdir(exist_ok=True)
    for s in ("train", "valid", "test"):
        import csv
        with open(data / f"{s}.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        with open(sub / f"{s}.csv", "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows(rows[: a.e2e_limit + 1])
    return sub


def run_e2e(a, py, rnd, ours, theirs, data, tmp, bf16=False):
    model = a.e2e_model
    prec = ["--matmul-precision", "bf16"] if bf16 else []

    def o():
        log(f"  e2e: lora train + lora eval{' (bf16 matmuls)' if bf16 else ''}")
        out_dir = Path(tmp) / f"e2e_lora_{rnd}"
        cmd = [a.lora_bin, "--threads", a.threads] + prec + ["train", "--task", "classify", "--model", model,
               "--train", data / "train.csv", "--valid", data / "valid.csv",
               "--text-column", "text", "--label-column", "label", "--head", "pooler",
               "--rank", "8", "--alpha", "16", "--dropout", "0.1", "--targets", "query,value",
               "--epochs", a.e2e_epochs, "--lr", "5e-4", "--batch-size", "32", "--max-len", "128",
               "--seed", "0", "--out", out_dir, "--overwrite", "--json"]
        if a.e2e_max_steps:
            cmd += ["--max-steps", a.e2e_max_steps]
        out, w1, m1 = Child.run(cmd)
        tr = last_json(out)
        out, w2, m2 = Child.run([a.lora_bin, "--threads", a.threads] + prec + ["eval", "--model", model,
                                 "--adapter", out_dir, "--data", data / "test.csv", "--json"])
        ev = last_json(out)
        n_train = sum(1 for _ in open(data / "train.csv", encoding="utf-8")) - 1
        samples = min(tr["steps"] * 32, n_train * int(a.e2e_epochs)) if a.e2e_max_steps else n_train * int(a.e2e_epochs)
        collect(ours, {"wall_s": w1 + w2, "train_wall_s": w1, "test_eval_wall_s": w2, "peak_rss_mb": max(m1, m2),
                       "peak_rss_mb_train": m1, "peak_rss_mb_eval": m2,
                       "test_accuracy": ev["accuracy"], "test_macro_f1": ev["macro_f1"],
                       "steps": tr["steps"], "best_valid_macro_f1": tr["best_metric"]["value"],
                       "train_samples_per_s": samples / tr["train_seconds"]})

    def t():
        log(f"  e2e: transformers Trainer + PEFT{' (bf16=True)' if bf16 else ''}")
        cmd = [py, ROOT / "bench/reference/e2e_trainer.py", "--model", model, "--data", data,
               "--threads", a.threads, "--epochs", a.e2e_epochs] + (["--bf16"] if bf16 else [])
        if a.e2e_max_steps:
            cmd += ["--max-steps", a.e2e_max_steps]
        out, w, m = Child.run(cmd)
        r = last_json(out)
        r["wall_s_inner"] = r.pop("wall_s")
        r["peak_rss_mb_inner"] = r.pop("peak_rss_mb")
        collect(theirs, {**r, "wall_s": w, "peak_rss_mb": m})
    for f in ((o, t) if rnd % 2 == 0 else (t, o)):
        f()


def run_decoder(a, py, rnd, ours, theirs):
    common = ["--steps", a.decoder_steps, "--warmup", a.decoder_warmup, "--seq-len", a.decoder_seq_len]

    def o():
        log("  decoder: lora")
        collect(ours, last_json(Child.run([a.lora_bin, "--threads", a.threads, "bench", "--mode", "decoder",
                                           "--model", a.decoder_model, "--batch-size", a.decoder_batch,
                                           "--json"] + common)[0]))

    def t():
        log("  decoder: pytorch+peft")
        collect(theirs, last_json(Child.run([py, ROOT / "bench/reference/decoder_bench.py", "--gguf", a.decoder_model,
                                             "--threads", a.threads, "--batch", a.decoder_batch] + common)[0]))
    for f in ((o, t) if rnd % 2 == 0 else (t, o)):
        f()


def run_gemm(a, py, rnd, ours, theirs):
    def o():
        log("  gemm: lora")
        collect(ours, last_json(Child.run([a.lora_bin, "--threads", a.threads, "bench", "--mode", "gemm",
                                           "--sizes", a.gemm_sizes, "--steps", a.gemm_steps, "--json"])[0]))

    def t():
        log("  gemm: torch")
        collect(theirs, last_json(Child.run([py, ROOT / "bench/reference/gemm_bench.py", "--threads", a.threads,
                                             "--sizes", a.gemm_sizes, "--steps", a.gemm_steps])[0]))
    for f in ((o, t) if rnd % 2 == 0 else (t, o)):
        f()


# ---------------------------------------------------------------- tables

def fmt(v, nd=1):
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    return f"{v:.{nd}f}"


def verdict(ok):
    return "–" if ok is None else ("met" if ok else "not met")


def table(rows):
    s = "| metric | lora (candle) | PyTorch | ratio | target | |\n|---|---|---|---|---|---|\n"
    for name, o, t, ratio, target, ok, nd in rows:
        s += f"| {name} | {fmt(o, nd)} | {fmt(t, nd)} | {ratio or '–'} | {target or ''} | {verdict(ok)} |\n"
    return s


def div(x, y):
    return None if x is None or y is None or y == 0 else x / y


def ratio_str(r, pct=False):
    if r is None:
        return None
    return f"{100 * r:.0f}%" if pct else f"{r:.2f}x"


def header(p, what):
    return (f"### {what}\n\n{p.get('date', '?')}, {p.get('cpu', '?')}, {p.get('threads', '?')} threads, "
            f"commit {p.get('git_commit', '?')}, medians of {p.get('rounds', '?')} rounds"
            f"{', ' + p['note'] if p.get('note') else ''}; load average at start "
            f"{fmt(p.get('loadavg_start'), 2)}.\n\n")


def cross_ok(p, f32):
    """Whether rows comparing part `p` (bf16) with the f32 part `f32` are fair: both ran on the same CPU."""
    return f32 is not None and f32.get("cpu") == p.get("cpu") and bool(f32.get("medians", {}).get("theirs"))


def cross_skipped(p, f32):
    return (f"\nbf16: rows comparing ours in bf16 with PyTorch in f32 are left out: the f32 part last ran on "
            f"{f32.get('cpu', '?')} ({f32.get('date', '?')}), this one on {p.get('cpu', '?')}.\n")


def md_fixed(p, peak, f32=None):
    """`f32`: the f32 fixed part, when `p` is the bf16 one (adds rows against PyTorch f32)."""
    O, T = p["medians"]["ours"], p["medians"]["theirs"]
    bf16 = f32 is not None
    g = lambda d, k: d.get(k)
    fl = encoder_flops()
    rows = []
    tr_o, tr_t = g(O, "train_samples_per_s"), g(T, "train_samples_per_s")
    r = div(tr_o, tr_t)
    rows.append(("train samples/s", tr_o, tr_t, ratio_str(r), ">= 1.1x", None if r is None else r >= 1.1, 1))
    gf = lambda sps, fl_per_batch: None if sps is None else sps / 32 * fl_per_batch / 1e9
    go, gt = gf(tr_o, fl["train"]), gf(tr_t, fl["train"])
    rows.append(("train GFLOP/s (analytic)", go, gt, ratio_str(div(go, gt)), "", None, 1))
    so, st = div(go, peak), div(gt, peak)
    if not bf16:
        rows.append(("train share of GEMM peak", ratio_str(so, True), ratio_str(st, True), None, "ours >= 70%",
                     None if so is None else so >= 0.7, 1))
    for v in ("base", "unmerged", "merged"):
        a, b = g(O, f"infer_samples_per_s_{v}"), g(T, f"infer_samples_per_s_{v}")
        r = div(a, b)
        rows.append((f"infer samples/s ({v})", a, b, ratio_str(r), ">= 1.3x", None if r is None else r >= 1.3, 1))
    ib_o, ib_t = gf(g(O, "infer_samples_per_s_base"), fl["forward_base"]), gf(g(T, "infer_samples_per_s_base"), fl["forward_base"])
    rows.append(("infer GFLOP/s (base, analytic)", ib_o, ib_t, ratio_str(div(ib_o, ib_t)), "", None, 1))
    if not bf16:
        rows.append(("infer share of GEMM peak (base)", ratio_str(div(ib_o, peak), True), ratio_str(div(ib_t, peak), True),
                     None, "", None, 1))
    # Costs within each tool: time per batch relative to the base model.
    # Both tools time the three variants round-robin and report the median of
    # the per-round time ratios; older result files only have the rates.
    def paired(R, key, fast, slow):
        return g(R, key) if g(R, key) is not None else div(g(R, fast), g(R, slow))
    mb_o = paired(O, "infer_merged_over_base_time", "infer_samples_per_s_base", "infer_samples_per_s_merged")
    mb_t = paired(T, "infer_merged_over_base_time", "infer_samples_per_s_base", "infer_samples_per_s_merged")
    rows.append(("merged / base inference time", mb_o, mb_t, None, "<= 1.05 (merging is free)",
                 None if mb_o is None else mb_o <= 1.05, 3))
    um_o = paired(O, "infer_unmerged_over_merged_time", "infer_samples_per_s_merged", "infer_samples_per_s_unmerged")
    um_t = paired(T, "infer_unmerged_over_merged_time", "infer_samples_per_s_merged", "infer_samples_per_s_unmerged")
    rows.append(("unmerged / merged inference time", um_o, um_t, None, "<= 1.05", None if um_o is None else um_o <= 1.05, 3))
    for k, name in (("peak_rss_mb_train", "peak RSS MB (train)"), ("peak_rss_mb_infer", "peak RSS MB (infer)")):
        a, b = g(O, k), g(T, k)
        rows.append((name, a, b, ratio_str(div(a, b)), "", None, 0))
    cross = bf16 and cross_ok(p, f32)
    if cross:
        F = f32["medians"]["theirs"]
        for k, name in (("train_samples_per_s", "train"), ("infer_samples_per_s_base", "infer (base)"),
                        ("infer_samples_per_s_unmerged", "infer (unmerged)"), ("infer_samples_per_s_merged", "infer (merged)")):
            a, b = g(O, k), g(F, k)
            rows.append((f"{name} samples/s: ours bf16 vs PyTorch f32", a, b, ratio_str(div(a, b)), "", None, 1))
    note = (f"\nWorkload: MiniLM-L6 shape, batch 32 x 128, LoRA r=8 on query,value + head. Analytic GEMM FLOPs: "
            f"{fl['train'] / 1e9:.1f} GFLOP per training step, {fl['forward_base'] / 1e9:.1f} GFLOP per base "
            f"inference pass (as transformers computes them; ours runs the last layer for [CLS] alone, ~14% "
            f"fewer, so our GFLOP/s and share are effective). GEMM peak {fmt(peak)} GFLOP/s (gemm part, f32). "
            f"Each run: training, the median of {p.get('settings', {}).get('steps', '?')} steps; inference, "
            f"{p.get('settings', {}).get('infer_reps', p.get('settings', {}).get('steps', '?'))} rounds of the three "
            f"variants in turn. Ratios are ours/theirs.\n")
    if bf16:
        note += ("\nbf16: ours `--matmul-precision bf16` (frozen-weight GEMMs with bf16 inputs and f32 sums on AMX "
                 "tiles; LoRA, attention, norms and the optimizer in f32); PyTorch `torch.autocast('cpu', "
                 "dtype=torch.bfloat16)` around the forward pass, as `Trainer(bf16=True)` does (linears and attention "
                 "matmuls in bf16 through oneDNN).")
        note += (f" The last rows compare ours in bf16 with PyTorch in f32 (the fixed part, {f32.get('date', '?')}).\n"
                 if cross else "\n" + cross_skipped(p, f32))
        return header(p, "Fixed-shape encoder step in bf16 (`lora bench --matmul-precision bf16` vs peft_bench.py --bf16)") + table(rows) + note
    return header(p, "Fixed-shape encoder step (`lora bench` vs peft_bench.py)") + table(rows) + note


def md_e2e(p, f32=None):
    """`f32`: the f32 e2e part, when `p` is the bf16 one (adds rows against PyTorch f32)."""
    O, T = p["medians"]["ours"], p["medians"]["theirs"]
    bf16 = f32 is not None
    rows = []
    wo, wt = O.get("wall_s"), T.get("wall_s")
    sp = div(wt, wo)
    ao, at = O.get("test_accuracy"), T.get("test_accuracy")
    acc_ok = None if ao is None or at is None else abs(ao - at) * 100 <= 0.5
    rows.append(("wall s (train + test eval)", wo, wt, None if sp is None else f"{sp:.2f}x speed-up",
                 ">= 2x at equal accuracy", None if sp is None else (sp >= 2.0 and bool(acc_ok)), 1))
    rows.append(("training s (ours: `lora train` process; theirs: trainer.train())", O.get("train_wall_s"), T.get("train_s"), None, "", None, 1))
    rows.append(("train samples/s (incl. per-epoch eval)", O.get("train_samples_per_s"), T.get("train_samples_per_s"),
                 ratio_str(div(O.get("train_samples_per_s"), T.get("train_samples_per_s"))), "", None, 1))
    ro, rt = O.get("peak_rss_mb"), T.get("peak_rss_mb")
    rr = div(ro, rt)
    rows.append(("peak RSS MB", ro, rt, ratio_str(rr), "<= 0.5x", None if rr is None else rr <= 0.5, 0))
    pts = None if acc_ok is None else f"{100 * (ao - at):+.2f} points"
    rows.append(("test accuracy %", None if ao is None else 100 * ao, None if at is None else 100 * at, pts,
                 "within ±0.5 points", acc_ok, 2))
    rows.append(("test macro F1 %", None if O.get("test_macro_f1") is None else 100 * O["test_macro_f1"],
                 None if T.get("test_macro_f1") is None else 100 * T["test_macro_f1"], None, "", None, 2))
    s = p.get("settings", {})
    note = (f"\nData {s.get('data', '?')} ({s.get('limit') or 'all'} rows per split), {s.get('epochs', '?')} epochs"
            f"{', max ' + str(s['max_steps']) + ' steps' if s.get('max_steps') else ''}, lr 5e-4, batch 32, max length 128, "
            "LoRA r=8 alpha=16 dropout 0.1 on query,value + classifier, best epoch by validation macro F1, then the "
            "test split. Wall and peak RSS measured from outside each process (ours: `lora train` + `lora eval`).\n")
    cross = bf16 and cross_ok(p, f32)
    if cross:
        F = f32["medians"]["theirs"]
        wf = F.get("wall_s")
        spf = div(wf, wo)
        af = F.get("test_accuracy")
        acc_f = None if ao is None or af is None else abs(ao - af) * 100 <= 0.5
        rows.append(("wall s: ours bf16 vs PyTorch f32", wo, wf, None if spf is None else f"{spf:.2f}x speed-up",
                     ">= 2x at equal accuracy", None if spf is None else (spf >= 2.0 and bool(acc_f)), 1))
        rows.append(("test accuracy %: ours bf16 vs PyTorch f32", None if ao is None else 100 * ao,
                     None if af is None else 100 * af, None if acc_f is None else f"{100 * (ao - af):+.2f} points",
                     "within ±0.5 points", acc_f, 2))
        rr_f = div(ro, F.get("peak_rss_mb"))
        rows.append(("peak RSS MB: ours bf16 vs PyTorch f32", ro, F.get("peak_rss_mb"), ratio_str(rr_f), "<= 0.5x",
                     None if rr_f is None else rr_f <= 0.5, 0))
    if bf16:
        note += ("\nbf16: ours `--matmul-precision bf16` for `lora train` and `lora eval` (frozen-weight GEMMs in "
                 "bf16 with f32 sums on AMX tiles; the adapter, attention, norms and AdamW in f32); PyTorch "
                 "`TrainingArguments(bf16=True)` (autocast to bf16 on the CPU for training and evaluation).")
        note += (f" The last rows compare ours in bf16 with PyTorch in f32 (the e2e part, {f32.get('date', '?')}).\n"
                 if cross else "\n" + cross_skipped(p, f32))
        return header(p, "End to end in bf16: sentiment fine-tuning to test accuracy (`--matmul-precision bf16` vs Trainer bf16=True)") + table(rows) + note
    return header(p, "End to end: sentiment fine-tuning to test accuracy (`lora train` + `lora eval` vs transformers Trainer + PEFT)") + table(rows) + note


def md_decoder(p, peak):
    O, T = p["medians"]["ours"], p["medians"]["theirs"]
    s = p.get("settings", {})
    b, t = int(s.get("batch", 4)), int(s.get("seq_len", 128))
    fl = decoder_flops(b=b, t=t)
    rows = []
    a, c = O.get("decoder_tokens_per_s"), T.get("decoder_tokens_per_s")
    r = div(a, c)
    rows.append(("train tokens/s", a, c, ratio_str(r), ">= 1.0x", None if r is None else r >= 1.0, 1))
    rows.append(("step s", O.get("decoder_step_s"), T.get("decoder_step_s"), ratio_str(div(T.get("decoder_step_s"), O.get("decoder_step_s"))), "", None, 2))
    go = None if O.get("decoder_step_s") is None else fl["train"] / O["decoder_step_s"] / 1e9
    gt = None if T.get("decoder_step_s") is None else fl["train"] / T["decoder_step_s"] / 1e9
    rows.append(("GFLOP/s (analytic)", go, gt, ratio_str(div(go, gt)), "", None, 1))
    rows.append(("share of GEMM peak", ratio_str(div(go, peak), True), ratio_str(div(gt, peak), True), None, "", None, 1))
    a, c = O.get("peak_rss_mb_decoder"), T.get("peak_rss_mb_decoder")
    rows.append(("peak RSS MB", a, c, ratio_str(div(a, c)), "", None, 0))
    note = (f"\nSmolLM2-135M-Instruct: ours trains over the Q4_1 GGUF weights as stored (QLoRA), PyTorch over the "
            f"same file dequantized to f32 by transformers. Batch {b} x {t} random tokens, LoRA r=16 alpha=32 "
            f"dropout 0.05 on q,k,v,o,gate,up,down, grad clip 1.0, AdamW; median of {s.get('steps', '?')} steps after "
            f"{s.get('warmup', '?')} warm-up steps. Analytic GEMM FLOPs {fl['train'] / 1e9:.1f} GFLOP per step "
            f"(full T x T attention, tied LM head over {b} x {t - 1} positions).\n")
    return header(p, "Decoder QLoRA training step (`lora bench --mode decoder` vs decoder_bench.py)") + table(rows) + note


def md_gemm(p):
    O, T = p["medians"]["ours"], p["medians"]["theirs"]
    rows = []
    sizes = p.get("settings", {}).get("sizes", [])
    for n in sizes:
        for kind, label in (("matmul", "A·B"), ("linear", "X·Wᵀ (linear)")):
            k = f"gemm_gflops_{kind}_{n}"
            a, b = O.get(k), T.get(k)
            rows.append((f"{label} {n}³ GFLOP/s", a, b, ratio_str(div(a, b)), "", None, 1))
    a, b = O.get("gemm_peak_gflops"), T.get("gemm_peak_gflops")
    rows.append(("best GFLOP/s", a, b, ratio_str(div(a, b)), "", None, 1))
    note = (f"\nMachine GEMM peak (best measured, either tool): {fmt(machine_peak(p))} GFLOP/s. Ours: candle's matmul "
            "and the frozen-linear op (gemm crate); PyTorch: torch.matmul and F.linear (MKL).\n")
    return header(p, "f32 GEMM (`lora bench --mode gemm` vs gemm_bench.py)") + table(rows) + note


def md_gpu(path):
    """The GPU section: the last bench/gpu_bench.py run kept in results/gpu.json (measured
    where a GPU was lent; this script does not run it, it only keeps the section)."""
    if not path.exists():
        return None
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_bench
    d = json.loads(path.read_text())
    return ("### On a GPU: fixed-shape step and CUDA tests (`bench/gpu_bench.py` vs peft_bench.py --device cuda)\n\n"
            + gpu_bench.markdown(d.get("run", d)) + "\n" + d.get("summary", "") + "\n")


def machine_peak(p):
    if not p:
        return None
    vals = [p["medians"][s].get("gemm_peak_gflops") for s in ("ours", "theirs")]
    vals = [v for v in vals if v is not None]
    return max(vals) if vals else None


def main():
    cache = Path(os.environ.get("LORA_CACHE", Path.home() / ".cache/lora-rs"))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated: " + ", ".join(PARTS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10, help="fixed: timed training steps per run")
    ap.add_argument("--infer-reps", type=int, default=30, help="fixed: timed inference rounds per run (each tool)")
    ap.add_argument("--decoder-steps", type=int, default=10)
    ap.add_argument("--decoder-warmup", type=int, default=2)
    ap.add_argument("--decoder-batch", type=int, default=4)
    ap.add_argument("--decoder-seq-len", type=int, default=128)
    ap.add_argument("--decoder-model", default=str(cache / "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--gemm-sizes", default="1024,2048")
    ap.add_argument("--gemm-steps", type=int, default=10)
    ap.add_argument("--e2e-model", default=str(cache / "models/all-MiniLM-L6-v2"))
    ap.add_argument("--e2e-data", default=str(cache / "data/sentiment"))
    ap.add_argument("--e2e-epochs", type=int, default=3)
    ap.add_argument("--e2e-limit", type=int, default=0, help="smoke tests: first N rows of each split")
    ap.add_argument("--e2e-max-steps", type=int, default=0, help="smoke tests: stop training after N steps")
    ap.add_argument("--lora-bin", default=str(ROOT / "target/release/lora"))
    ap.add_argument("--out", default=str(ROOT / "bench/results"))
    ap.add_argument("--md", default=str(ROOT / "bench/RESULTS.md"))
    ap.add_argument("--md-only", action="store_true", help="run nothing: rewrite --md from --out's latest.json")
    a = ap.parse_args()
    if a.md_only:
        a.parts, a.rounds = "", 0
    parts = [p.strip() for p in a.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad or not (parts or a.md_only):
        sys.exit(f"--parts: unknown {bad}; choose from {', '.join(PARTS)}")
    if a.rounds < 1 and not a.md_only:
        sys.exit("--rounds must be at least 1")
    if not Path(a.lora_bin).is_file():
        sys.exit(f"{a.lora_bin} not found: cargo build --release -p lora-cli")
    venv = Path(os.environ.get("LORA_REF_VENV", Path.home() / ".cache/lora-rs/venv"))
    py = venv / "bin/python"
    if not py.exists():
        sys.exit(f"{py} not found: scripts/reference/setup_venv.sh")
    out_dir = Path(a.out)
    prev_path = out_dir / "latest.json"
    prev = {}
    if prev_path.exists():
        try:
            prev = json.loads(prev_path.read_text())
        except ValueError:
            prev = {}
    if "parts" not in prev:  # the first format: the fixed part only
        prev = {"parts": {"fixed": {**{k: prev[k] for k in ("date", "cpu", "threads") if k in prev},
                                    "ours": prev["ours"], "theirs": prev["theirs"],
                                    "medians": {s: {k: med(prev[s], k) for k in prev[s]} for s in ("ours", "theirs")},
                                    "note": "from the earlier compare.py (2 rounds x 6 steps)"}}} if "ours" in prev else {"parts": {}}
    a.threads, a.steps, a.infer_reps = str(a.threads), str(a.steps), str(a.infer_reps)
    for k in ("decoder_steps", "decoder_warmup", "decoder_batch", "decoder_seq_len", "gemm_steps", "e2e_epochs", "e2e_max_steps"):
        setattr(a, k, str(getattr(a, k)))
    a.e2e_max_steps = a.e2e_max_steps if a.e2e_max_steps != "0" else None
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    base = {"date": now, "cpu": cpu_model(), "threads": int(a.threads), "git_commit": git_commit(),
            "rounds": a.rounds, "loadavg_start": os.getloadavg()[0]}
    res = {p: {"ours": {}, "theirs": {}, "loadavg": []} for p in parts}
    with tempfile.TemporaryDirectory(prefix="lora_bench_") as tmp:
        data = e2e_data(a, tmp) if ("e2e" in parts or "e2e-bf16" in parts) else None
        for rnd in range(a.rounds):
            for p in parts:
                log(f"round {rnd + 1}/{a.rounds}: {p} (load average {os.getloadavg()[0]:.2f})")
                res[p]["loadavg"].append(os.getloadavg()[0])
                R = res[p]
                if p in ("fixed", "fixed-bf16"):
                    run_fixed(a, py, rnd, R["ours"], R["theirs"], bf16=p.endswith("bf16"))
                elif p in ("e2e", "e2e-bf16"):
                    run_e2e(a, py, rnd, R["ours"], R["theirs"], data, tmp, bf16=p.endswith("bf16"))
                elif p == "decoder":
                    run_decoder(a, py, rnd, R["ours"], R["theirs"])
                else:
                    run_gemm(a, py, rnd, R["ours"], R["theirs"])
    settings = {
        "fixed": {"steps": int(a.steps), "infer_reps": int(a.infer_reps), "batch": 32, "seq_len": 128},
        "fixed-bf16": {"steps": int(a.steps), "infer_reps": int(a.infer_reps), "batch": 32, "seq_len": 128, "precision": "bf16"},
        "e2e": {"data": a.e2e_data, "model": a.e2e_model, "epochs": int(a.e2e_epochs), "limit": a.e2e_limit,
                "max_steps": int(a.e2e_max_steps) if a.e2e_max_steps else None},
        "e2e-bf16": {"data": a.e2e_data, "model": a.e2e_model, "epochs": int(a.e2e_epochs), "limit": a.e2e_limit,
                     "max_steps": int(a.e2e_max_steps) if a.e2e_max_steps else None, "precision": "bf16"},
        "decoder": {"model": a.decoder_model, "batch": int(a.decoder_batch), "seq_len": int(a.decoder_seq_len),
                    "steps": int(a.decoder_steps), "warmup": int(a.decoder_warmup)},
        "gemm": {"sizes": [int(s) for s in a.gemm_sizes.split(",") if s.strip()], "steps": int(a.gemm_steps)},
    }
    all_parts = dict(prev.get("parts", {}))
    for p in parts:
        R = res[p]
        all_parts[p] = {**base, "loadavg_start": R["loadavg"][0], "loadavg": R["loadavg"], "settings": settings[p],
                        "ours": R["ours"], "theirs": R["theirs"],
                        "medians": {s: {k: med(R[s], k) for k in R[s]} for s in ("ours", "theirs")}}
        if p in ("e2e", "e2e-bf16") and (a.e2e_limit or a.e2e_max_steps):
            all_parts[p]["note"] = "SMOKE TEST (subset / step limit), not a result"
    peak = machine_peak(all_parts.get("gemm"))
    for p, v in all_parts.items():
        if p in ("fixed", "fixed-bf16"):
            fl = encoder_flops()
            v["flops"] = fl
        elif p == "decoder":
            s = v.get("settings", {})
            v["flops"] = decoder_flops(b=s.get("batch", 4), t=s.get("seq_len", 128))
    doc = {"machine": {"cpu": cpu_model(), "cpus": os.cpu_count()}, "gemm_peak_gflops": peak, "parts": all_parts}
    out_dir.mkdir(parents=True, exist_ok=True)
    prev_path.write_text(json.dumps(doc, indent=1))
    md = ["# Benchmark results\n", "Made by `python3 bench/run_all.py` (bench/compare.py is the same command); "
          f"raw numbers in {os.path.relpath(prev_path, ROOT) if str(prev_path.resolve()).startswith(str(ROOT)) else prev_path}. "
          "Targets are those of the benchmark issue.\n"]
    for p in PARTS:
        v = all_parts.get(p)
        if not v:
            continue
        if p == "fixed":
            md.append(md_fixed(v, peak))
        elif p == "fixed-bf16":
            md.append(md_fixed(v, peak, f32=all_parts.get("fixed") or {"medians": {"theirs": {}}}))
        elif p == "e2e":
            md.append(md_e2e(v))
        elif p == "e2e-bf16":
            md.append(md_e2e(v, f32=all_parts.get("e2e") or {"medians": {"theirs": {}}}))
        elif p == "decoder":
            md.append(md_decoder(v, peak))
        else:
            md.append(md_gemm(v))
    gpu = md_gpu(out_dir / "gpu.json")
    if gpu:
        md.append(gpu)
    text = "\n".join(md)
    Path(a.md).write_text(text)
    print(text)
    log(f"wrote {prev_path} and {a.md}")


if __name__ == "__main__":
    main()
