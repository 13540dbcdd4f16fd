#!/usr/bin/env bash
# Create (or update) the Python reference virtual environment used by the fixture
# generators under tests/fixtures/*/make_*.py, scripts/reference/check_peft_interop.py
# and bench/reference/peft_bench.py. The Rust test suite does not need it.
#
#   scripts/reference/setup_venv.sh            # venv at ${LORA_REF_VENV:-$HOME/.cache/lora-rs/venv}
#   LORA_REF_VENV=/some/dir scripts/reference/setup_venv.sh
#   PYTHON=python3.11 scripts/reference/setup_venv.sh
#
# Idempotent: if the venv already holds exactly these requirements (a stamp file keyed on
# requirements.txt), it does nothing. Installs from the Python package index with plain
# pip; torch is the default wheel (its CUDA libraries come along, ~5 GB; ~2 min to install).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
req="$here/requirements.txt"
venv="${LORA_REF_VENV:-$HOME/.cache/lora-rs/venv}"
python="${PYTHON:-python3}"
stamp="$venv/.lora-ref-requirements.sha256"
want="$(sha256sum "$req" | cut -d' ' -f1)"

if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "reference venv up to date: $venv"
  exit 0
fi

if [[ ! -x "$venv/bin/python" ]]; then
  echo "creating reference venv at $venv (with $python)"
  mkdir -p "$(dirname "$venv")"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
fi

echo "installing $req into $venv (torch is large: this can take a few minutes)"
"$venv/bin/python" -m pip install --requirement "$req"
"$venv/bin/python" -c "import torch, transformers, peft, safetensors, tokenizers, sklearn, numpy; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
echo "$want" > "$stamp"
echo "reference venv ready: $venv  (use $venv/bin/python)"
