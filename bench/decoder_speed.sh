#!/usr/bin/env bash
# Decode and prefill speed of SmolLM2-135M-Instruct Q4_1, ours vs llama.cpp,
# on the same GGUF, the same thread count, with and without a LoRA adapter
# (unmerged; llama.cpp applies `--lora` unmerged too). Alternates the tools,
# R rounds each, prints medians and ratios (ours / llama.cpp).
#
# Needs: target/release/lora (cargo build --release -p lora-cli), llama.cpp's
# llama-completion (scripts/reference/build_llama_cpp.sh), an adapter trained
# on this GGUF (e.g. runs/austen-smollm2 from scripts/demo_lm.sh).
# Usage: bench/decoder_speed.sh [ADAPTER_DIR] [ROUNDS]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CACHE=${LORA_CACHE:-$HOME/.cache/lora-rs}
MODEL=$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf
ADAPTER=${1:-runs/austen-smollm2}
R=${2:-3}
T=${THREADS:-2}
LLAMA=${LLAMA_BIN:-$CACHE/llama.cpp/bin}/llama-completion
LORA=target/release/lora
N=64
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
$LORA export --model "$MODEL" --adapter "$ADAPTER" --out "$TMP/adapter.gguf" 2>/dev/null
# A prompt of about 128 tokens.
PROMPT=$(head -c 560 "$CACHE/data/austen/valid.txt" | tr '\n' ' ')

ours() { # $1 = adapter flag or empty -> "prefill decode"
  $LORA --threads "$T" generate --model "$MODEL" $1 --prompt "$PROMPT" --max-new-tokens $N --json \
    | python3 -c 'import json,sys; j=json.load(sys.stdin); print(j["prefill_tokens_per_s"], j["decode_tokens_per_s"], j["prompt_tokens"])'
}
theirs() {
  $LLAMA -m "$MODEL" $1 -t "$T" -p "$PROMPT" -n $N --temp 0 -no-cnv --ignore-eos 2>&1 >/dev/null \
    | python3 -c '
import re,sys
t=sys.stdin.read()
p=re.search(r"prompt eval time =.*?([0-9.]+) tokens per second", t)
e=re.search(r"(?<!prompt) eval time =.*?([0-9.]+) tokens per second", t)
print(p.group(1) if p else "nan", e.group(1) if e else "nan")'
}
for i in $(seq "$R"); do
  echo "ours base $(ours '')" >> "$TMP/log"
  echo "llama base $(theirs '')" >> "$TMP/log"
  echo "ours lora $(ours "--adapter $ADAPTER")" >> "$TMP/log"
  echo "llama lora $(theirs "--lora $TMP/adapter.gguf")" >> "$TMP/log"
done
python3 - "$TMP/log" "$T" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
def med(tool, kind, col):
    v = [float(r[2 + col]) for r in rows if r[0] == tool and r[1] == kind]
    return statistics.median(v)
print(f"SmolLM2-135M Q4_1, {sys.argv[2]} threads, medians of {len(rows)//4} rounds (tokens/s)")
print(f"{'':22}{'lora':>10}{'llama.cpp':>12}{'ratio':>8}")
for kind in ("base", "lora"):
    for col, name in ((0, "prefill"), (1, "decode")):
        a, b = med("ours", kind, col), med("llama", kind, col)
        print(f"{name + (' + adapter' if kind == 'lora' else ''):22}{a:10.1f}{b:12.1f}{a / b:8.2f}x")
PY
