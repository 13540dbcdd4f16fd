#!/usr/bin/env bash
# The generation main job: QLoRA fine-tuning of SmolLM2-135M-Instruct (4-bit
# Q4_1 GGUF, frozen and kept quantized) on Jane Austen's novels, then held-out
# perplexity of the base model and the adapter side by side, samples before
# and after, and the adapter exported for llama.cpp. Fetches and caches the
# model and data first (scripts/fetch_assets.sh), builds the release binary.
#
# Usage: scripts/demo_lm.sh [extra `lora train` flags, e.g. --max-steps 50]
# Output: runs/austen-smollm2/ (adapter in PEFT format, metrics.jsonl,
#         training.svg, eval.json, samples.txt, adapter.gguf)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CACHE=${LORA_CACHE:-$HOME/.cache/lora-rs}
OUT=${OUT:-runs/austen-smollm2}

scripts/fetch_assets.sh smollm2 austen
echo "[demo-lm] building the release binary (cargo build --release)"
cargo build --release --quiet -p lora-cli
LORA=target/release/lora
MODEL=$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf
DATA=$CACHE/data/austen
PROMPT="It was a fine morning at Longbourn, and Elizabeth"

mkdir -p "$OUT"
# Validation during training on the first ~60 blocks of the held-out novel
# text (quick); the full held-out file is scored at the end.
head -n 600 "$DATA/valid.txt" > "$OUT/valid_head.txt"
echo "[demo-lm] sample from the base model"
$LORA generate --model "$MODEL" --prompt "$PROMPT" --max-new-tokens 48 | tee "$OUT/sample_before.txt"

echo "[demo-lm] training: QLoRA r=16 on all linear layers, 200 steps of 4 x 128 tokens"
$LORA train --task causal-lm --model "$MODEL" \
  --train "$DATA/train.txt" --valid "$OUT/valid_head.txt" \
  --rank 16 --alpha 32 --dropout 0.05 --targets all-linear \
  --block-size 128 --batch-size 4 --lr 3e-4 --max-steps 200 --epochs 1 \
  --eval-every 50 --eval-batch-size 8 --seed 0 \
  --out "$OUT" --overwrite "$@"

echo "[demo-lm] held-out perplexity, base vs adapter"
$LORA eval --task causal-lm --model "$MODEL" --adapter "$OUT" --data "$DATA/valid.txt" --block-size 128
$LORA eval --task causal-lm --model "$MODEL" --adapter "$OUT" --data "$DATA/valid.txt" --block-size 128 --json > "$OUT/eval.json"

echo "[demo-lm] sample from the adapter"
$LORA generate --model "$MODEL" --adapter "$OUT" --prompt "$PROMPT" --max-new-tokens 48 | tee "$OUT/sample_after.txt"
$LORA export --model "$MODEL" --adapter "$OUT" --out "$OUT/adapter.gguf"
echo "[demo-lm] done: adapter, metrics, samples and adapter.gguf in $OUT"
