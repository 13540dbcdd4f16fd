#!/usr/bin/env python3
"""Side-by-side fixed-shape benchmark: `lora bench` (Rust/candle) vs PyTorch + PEFT.

    python3 bench/compare.py [--rounds 3] [--steps 10] [--threads 2] [--out bench/results]

Runs both tools alternately (train and infer in separate processes, so each peak
RSS is its own), --rounds times each, and prints a Markdown table of medians and
the ratio ours/theirs. Writes bench/results/latest.json and bench/RESULTS.md.
Needs the release binary (cargo build --release) and the reference venv
(scripts/reference/setup_venv.sh; path from $LORA_REF_VENV, default
~/.cache/lora-rs/venv). Workload: MiniLM-L6 shape, batch 32 x 128 tokens,
LoRA r=8 alpha=16 dropout 0.1 on query,value + 4-class head, AdamW.
Benchmark on an otherwise idle machine.
"""
import argparse, datetime, json, os, platform, statistics, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(cmd, env=None):
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def cpu_model():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lora-bin", default=str(ROOT / "target/release/lora"))
    ap.add_argument("--out", default=str(ROOT / "bench/results"))
    a = ap.parse_args()
    venv = Path(os.environ.get("LORA_REF_VENV", Path.home() / ".cache/lora-rs/venv"))
    py = str(venv / "bin/python")
    ours, theirs = {}, {}
    for i in range(a.rounds):
        for mode in ("train", "infer"):
            print(f"round {i + 1}/{a.rounds} {mode}: lora", file=sys.stderr, flush=True)
            r = run([a.lora_bin, "--threads", str(a.threads), "bench", "--mode", mode, "--steps", str(a.steps), "--json"])
            for k, v in r.items():
                if isinstance(v, (int, float)):
                    ours.setdefault(k, []).append(v)
            print(f"round {i + 1}/{a.rounds} {mode}: pytorch+peft", file=sys.stderr, flush=True)
            r = run([py, str(ROOT / "bench/reference/peft_bench.py"), "--mode", mode, "--threads", str(a.threads), "--steps", str(a.steps)])
            for k, v in r.items():
                if isinstance(v, (int, float)):
                    theirs.setdefault(k, []).append(v)
    med = lambda d, k: statistics.median(d[k]) if k in d and d[k] else float("nan")
    rows = [
        ("train samples/s", med(ours, "train_samples_per_s"), med(theirs, "train_samples_per_s")),
        ("infer samples/s (base)", med(ours, "infer_samples_per_s_base"), med(theirs, "infer_samples_per_s_base")),
        ("infer samples/s (unmerged)", med(ours, "infer_samples_per_s_unmerged"), med(theirs, "infer_samples_per_s_unmerged")),
        ("infer samples/s (merged)", med(ours, "infer_samples_per_s_merged"), med(theirs, "infer_samples_per_s_merged")),
        ("peak RSS MB (train)", med(ours, "peak_rss_mb_train"), med(theirs, "peak_rss_mb_train") if "peak_rss_mb_train" in theirs else med(theirs, "peak_rss_mb")),
        ("peak RSS MB (infer)", med(ours, "peak_rss_mb_infer"), med(theirs, "peak_rss_mb_infer")),
    ]
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    head = f"Fixed-shape benchmark, {now}, {cpu_model()}, {a.threads} threads, medians of {a.rounds} rounds x {a.steps} steps\n\n"
    table = "| metric | lora (candle) | PyTorch + PEFT | ratio ours/theirs |\n|---|---|---|---|\n"
    for name, o, t in rows:
        table += f"| {name} | {o:.1f} | {t:.1f} | {o / t:.2f}x |\n"
    print(head + table)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps({"date": now, "cpu": cpu_model(), "threads": a.threads, "ours": ours, "theirs": theirs}, indent=1))
    (ROOT / "bench/RESULTS.md").write_text("# Benchmark results\n\nMade by `python3 bench/compare.py`.\n\n" + head + table)


if __name__ == "__main__":
    main()
