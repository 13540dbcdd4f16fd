#!/usr/bin/env bash
# The main job, both task families on real models and data:
#  1. classify: fine-tune a LoRA sentiment classifier on the real
#     all-MiniLM-L6-v2 encoder and the VADER movie-review sentences, then
#     evaluate it on the held-out test split;
#  2. lm: QLoRA on SmolLM2-135M-Instruct (4-bit GGUF) over Jane Austen's
#     novels, held-out perplexity before/after, samples (scripts/demo_lm.sh).
# Fetches and caches models and data first (scripts/fetch_assets.sh), builds
# the release binary.
#
# Usage: scripts/demo.sh [classify|lm|all] [extra `lora train` flags, e.g. --epochs 1]
# Output: runs/sentiment-minilm/ (adapter in PEFT format, metrics.jsonl,
#         training.svg, confusion_valid.svg, confusion_test.svg, test_report.json)
#         and runs/austen-smollm2/ (see scripts/demo_lm.sh)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PART=all
case "${1:-}" in
  classify|lm|all) PART=$1; shift ;;
esac
if [ "$PART" = lm ]; then exec scripts/demo_lm.sh "$@"; fi
CACHE=${LORA_CACHE:-$HOME/.cache/lora-rs}
OUT=${OUT:-runs/sentiment-minilm}

scripts/fetch_assets.sh minilm vader
echo "[demo] building the release binary (cargo build --release)"
cargo build --release --quiet -p lora-cli
LORA=target/release/lora
MODEL=$CACHE/models/all-MiniLM-L6-v2
DATA=$CACHE/data/sentiment

echo "[demo] training: LoRA r=8 on query,value + classifier head, 3 epochs"
$LORA train --task classify --model "$MODEL" \
  --train "$DATA/train.csv" --valid "$DATA/valid.csv" \
  --text-column text --label-column label --head pooler \
  --rank 8 --alpha 16 --dropout 0.1 --targets query,value \
  --epochs 3 --lr 5e-4 --batch-size 32 --max-len 128 --seed 0 \
  --out "$OUT" --overwrite "$@"

echo "[demo] evaluating the best checkpoint on the test split"
$LORA eval --model "$MODEL" --adapter "$OUT" --data "$DATA/test.csv" --plot "$OUT/confusion_test.svg"
$LORA eval --model "$MODEL" --adapter "$OUT" --data "$DATA/test.csv" --json > "$OUT/test_report.json"
$LORA inspect "$OUT"
echo "[demo] done: adapter, metrics and plots in $OUT"
if [ "$PART" = all ]; then scripts/demo_lm.sh; fi
