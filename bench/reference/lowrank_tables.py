#!/usr/bin/env python3
"""Extraction accuracy and compression trade-off on the real sentiment task.

    python3 bench/reference/lowrank_tables.py FULLFT_DIR [--lora target/release/lora] [--work /tmp/lowrank-tables]

FULLFT_DIR: all-MiniLM-L6-v2 fully fine-tuned on the sentiment data (bench/reference/full_finetune.py).

Extraction: `lora extract --base all-MiniLM-L6-v2 --tuned FULLFT_DIR` over every linear layer of the encoder
(query, key, value, attention.output.dense, intermediate.dense, output.dense, pooler.dense), the classifier copied
whole (modules_to_save), at several ranks / energies; test accuracy of base + extracted adapter
(`lora eval --adapter`) against the fully tuned model.

Compression: `lora compress --model FULLFT_DIR --targets all-linear` at several ranks / energies; test accuracy
of the compressed classifier (`lora eval --model OUT`) against the uncompressed one.

Writes bench/LOWRANK_RESULTS.md and bench/compression.svg (accuracy vs compression ratio).
"""
import argparse
import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE = os.path.expanduser(os.environ.get("LORA_CACHE", "~/.cache/lora-rs"))
BASE = os.path.join(CACHE, "models", "all-MiniLM-L6-v2")
TEST = os.path.join(CACHE, "data", "sentiment", "test.csv")


def run(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def accuracy(lora, model, adapter=None):
    cmd = [lora, "eval", "--model", model, "--data", TEST, "--json"]
    if adapter:
        cmd += ["--adapter", adapter]
    return run(cmd)["accuracy"]


def svg(points, path):
    """A small dependency-free SVG: accuracy vs compression ratio."""
    w, h, m = 640, 400, 60
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    x0, x1 = 1.0, max(xs) * 1.05
    y0, y1 = min(0.5, min(ys)), 1.0
    sx = lambda x: m + (x - x0) / (x1 - x0) * (w - 2 * m)
    sy = lambda y: h - m - (y - y0) / (y1 - y0) * (h - 2 * m)
    pts = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y, _ in sorted(points))
    labels = "".join(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3"/><text x="{sx(x) + 5:.1f}" y="{sy(y) - 5:.1f}" font-size="10">{l}</text>' for x, y, l in points)
    axes = (f'<line x1="{m}" y1="{h - m}" x2="{w - m}" y2="{h - m}" stroke="black"/>'
            f'<line x1="{m}" y1="{m}" x2="{m}" y2="{h - m}" stroke="black"/>'
            f'<text x="{w / 2}" y="{h - 20}" text-anchor="middle" font-size="12">compression ratio (parameters before / after)</text>'
            f'<text x="15" y="{h / 2}" transform="rotate(-90 15 {h / 2})" text-anchor="middle" font-size="12">test accuracy</text>'
            + "".join(f'<text x="{m - 5}" y="{sy(v):.1f}" text-anchor="end" font-size="10">{v:.2f}</text>' for v in [y0, (y0 + y1) / 2, y1])
            + "".join(f'<text x="{sx(v):.1f}" y="{h - m + 15}" text-anchor="middle" font-size="10">{v:.1f}</text>' for v in [x0, (x0 + x1) / 2, x1]))
    body = f'<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{pts}"/>{labels}'
    open(path, "w").write(f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif">'
                          f'<rect width="{w}" height="{h}" fill="white"/><text x="{w / 2}" y="25" text-anchor="middle">'
                          f'compressing the fully fine-tuned MiniLM sentiment classifier</text>{axes}{body}</svg>')


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("fullft")
    ap.add_argument("--lora", default=os.path.join(ROOT, "target", "release", "lora"))
    ap.add_argument("--work", default="/tmp/lowrank-tables")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    lines = ["# Low-rank tools on the sentiment task (bench/reference/lowrank_tables.py)", ""]
    full_acc = accuracy(args.lora, args.fullft)
    lines += [f"Fully fine-tuned all-MiniLM-L6-v2 (bench/reference/full_finetune.py): test accuracy {full_acc:.4f}.", "",
              "## Extraction: base + extracted adapter vs the fully tuned model", "",
              "| rank rule | LoRA params | retained energy (all modules) | test accuracy | vs full fine-tune |",
              "|---|---|---|---|---|"]
    for name, flag in [("r=1", ["--rank", "1"]), ("r=4", ["--rank", "4"]), ("r=16", ["--rank", "16"]), ("r=64", ["--rank", "64"]),
                       ("r=384 (all of dW)", ["--rank", "384"]), ("energy 0.9", ["--energy", "0.9"])]:
        out = os.path.join(args.work, "extract-" + name.split()[0].replace("=", ""))
        rep = run([args.lora, "extract", "--base", BASE, "--tuned", args.fullft, "--out", out, "--json"] + flag)
        num = sum(m["energy"] * m["delta_norm"] ** 2 for m in rep["modules"])
        den = sum(m["delta_norm"] ** 2 for m in rep["modules"])
        acc = accuracy(args.lora, BASE, out)
        lines.append(f"| {name} | {rep['lora_params']:,} | {num / den:.4f} | {acc:.4f} | {acc - full_acc:+.4f} |")
        print(lines[-1], flush=True)
    lines += ["", "Not captured by a LoRA adapter (reported by `lora extract`): the fine-tuned biases, LayerNorm and embeddings.", "",
              "## Compression of the fully fine-tuned classifier (all encoder linear layers + pooler)", "",
              "| rank rule | parameters | ratio | lowrank.safetensors | test accuracy | change |", "|---|---|---|---|---|---|"]
    points = [(1.0, full_acc, "dense")]
    for name, flag in [("r=128", ["--rank", "128"]), ("r=64", ["--rank", "64"]),
                       ("r=32", ["--rank", "32"]), ("r=16", ["--rank", "16"]), ("energy 0.95", ["--energy", "0.95"]),
                       ("energy 0.9", ["--energy", "0.9"])]:
        out = os.path.join(args.work, "compress-" + name.replace(" ", "").replace("=", ""))
        rep = run([args.lora, "compress", "--model", args.fullft, "--out", out, "--json"] + flag)
        acc = accuracy(args.lora, out)
        ratio = rep["compression_ratio"]
        points.append((ratio, acc, name))
        lines.append(f"| {name} | {rep['params_before']:,} -> {rep['params_after']:,} | {ratio:.2f}x | "
                     f"{rep['bytes_before'] / 1e6:.1f} -> {rep['bytes_after'] / 1e6:.1f} MB | {acc:.4f} | {acc - full_acc:+.4f} |")
        print(lines[-1], flush=True)
    svg(points, os.path.join(ROOT, "bench", "compression.svg"))
    text = "\n".join(lines) + "\n"
    open(os.path.join(ROOT, "bench", "LOWRANK_RESULTS.md"), "w").write(text)
    print(text)


if __name__ == "__main__":
    main()
