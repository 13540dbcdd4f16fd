#!/usr/bin/env python3
"""PiSSA vs PEFT-default init on the real sentiment task, same seed and steps.

    python3 bench/reference/pissa_vs_default.py [--lora target/release/lora] [--steps 60]

all-MiniLM-L6-v2, LoRA r=8 alpha=16 on query,value, lr 5e-4, batch 32, max-len 64, seed 0, linear
decay with 10% warm-up, validation on valid.csv at the end. Reports the training loss (logged every
5 steps, as `lora train` writes it to metrics.jsonl) and the final validation accuracy/loss per init.
"""
import argparse
import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE = os.path.expanduser(os.environ.get("LORA_CACHE", "~/.cache/lora-rs"))
BASE = os.path.join(CACHE, "models", "all-MiniLM-L6-v2")
DATA = os.path.join(CACHE, "data", "sentiment")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lora", default=os.path.join(ROOT, "target", "release", "lora"))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--work", default="/tmp/pissa-vs-default")
    ap.add_argument("--inits", default="kaiming,pissa")
    args = ap.parse_args()
    rows = {}
    for init in args.inits.split(","):
        out = os.path.join(args.work, init)
        subprocess.run([args.lora, "train", "--task", "classify", "--model", BASE, "--train", os.path.join(DATA, "train.csv"),
                        "--valid", os.path.join(DATA, "valid.csv"), "--rank", "8", "--alpha", "16", "--targets", "query,value",
                        "--lr", "5e-4", "--batch-size", "32", "--max-len", "64", "--seed", "0", "--max-steps", str(args.steps),
                        "--eval-every", str(args.steps), "--log-every", "5", "--init", init, "--out", out, "--overwrite", "--json"],
                       check=True, capture_output=True)
        recs = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
        train = [(r["step"], r["loss"]) for r in recs if r["kind"] == "train"]
        ev = [r for r in recs if r["kind"] == "eval"][-1]
        rows[init] = (train, ev)
    steps = [s for s, _ in rows[args.inits.split(",")[0]][0]]
    print("| step | " + " | ".join(f"{i} train loss" for i in rows) + " |")
    print("|---" * (len(rows) + 1) + "|")
    for k, s in enumerate(steps):
        print(f"| {s} | " + " | ".join(f"{rows[i][0][k][1]:.4f}" for i in rows) + " |")
    for i, (train, ev) in rows.items():
        last = [l for _, l in train[-4:]]
        print(f"{i}: mean train loss over the last 20 steps {sum(last) / len(last):.4f}; "
              f"valid accuracy {ev['accuracy']:.4f}, valid loss {ev['loss']:.4f} at step {ev['step']}")


if __name__ == "__main__":
    main()
