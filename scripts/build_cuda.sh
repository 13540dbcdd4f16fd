#!/usr/bin/env bash
# Builds the `lora` binary with `--features cuda` on a machine with no CUDA
# toolkit and no GPU, using NVIDIA's CUDA 13.0 wheels from PyPI (nvcc, cudart,
# CCCL headers, cuBLAS, cuRAND, NVRTC) in a cached virtual environment. Idempotent: the
# second run reuses the environment and cargo's incremental state.
#
#   scripts/build_cuda.sh                 # release build of lora-cli
#   scripts/build_cuda.sh check           # cargo check of the workspace instead
#   scripts/build_cuda.sh -- test -p lora-core --release   # any cargo command
#   source "$(scripts/build_cuda.sh env)" # only set up; prints the env file
#
# Environment (all optional):
#   LORA_CUDA_VENV    the cached venv (default ~/.cache/lora-rs/cuda-venv)
#   CUDA_COMPUTE_CAP  target GPU (default 90: H100/H200; 80: A100; 89: L4/4090)
#   CARGO_TARGET_DIR  default target/cuda, so the CPU build's artifacts survive
#
# What the wheels lack is filled in here: unversioned libX.so links for the
# linker, and a link-time stub libcuda.so (the driver API; NVIDIA's toolkit
# ships the same kind of stub in lib/stubs). At run time the real driver's
# libcuda.so.1 is used; the binary needs LD_LIBRARY_PATH from the env file for
# cuBLAS/cuRAND/NVRTC, and a driver of release 580 or newer (CUDA 13.0).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV="${LORA_CUDA_VENV:-$HOME/.cache/lora-rs/cuda-venv}"
# One consistent CUDA release (13.0): nvcc, its front end (crt) and NVVM must
# match. The -cu12 nvcc wheels ship only ptxas, not nvcc. cudarc 0.19 knows
# CUDA up to 13.4, so newer nvcc releases would fail its version check.
PINS=(
  "nvidia-cuda-nvcc==13.0.88"
  "nvidia-cuda-crt==13.0.88"
  "nvidia-nvvm==13.0.88"
  "nvidia-cuda-runtime==13.0.96"
  "nvidia-cuda-cccl==13.0.85"
  "nvidia-cuda-nvrtc==13.0.88"
  "nvidia-cublas==13.1.0.3"
  "nvidia-curand==10.4.0.35"
)
STAMP="$VENV/.lora-pins-$(printf '%s\n' "${PINS[@]}" | cksum | cut -d' ' -f1)"

log() { echo "build_cuda: $*" >&2; }

if [[ ! -f "$STAMP" ]]; then
  log "installing CUDA 13.0 wheels into $VENV"
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PINS[@]}"
fi

NV="$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')"
[[ -x "$NV/bin/nvcc" ]] || { log "no nvcc at $NV/bin/nvcc"; exit 1; }

if [[ ! -f "$STAMP" ]]; then
  # Unversioned names for the linker (cudarc links these dynamically).
  for so in "$NV"/lib/lib*.so.*; do
    base="${so##*/}"; plain="${base%%.so.*}.so"
    [[ -e "$NV/lib/$plain" ]] || ln -s "$base" "$NV/lib/$plain"
  done
  # Link-time stub of the driver API: every cu* function cudarc binds, as an
  # empty symbol, with the real library's soname so the binary loads the
  # driver's libcuda.so.1 at run time.
  bindings="$(cargo metadata --format-version 1 2>/dev/null |
    "$VENV/bin/python" -c 'import json,sys,os
m=json.load(sys.stdin)
p=[p for p in m["packages"] if p["name"]=="cudarc"]
print(os.path.join(os.path.dirname(p[0]["manifest_path"]),"src/driver/sys/mod.rs") if p else "")')"
  [[ -f "$bindings" ]] || { cargo fetch >/dev/null; bindings="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs | tail -1)"; }
  mkdir -p "$NV/lib/stubs"
  grep -oE 'pub unsafe fn cu[A-Za-z0-9_]+' "$bindings" | awk '{print "void " $4 "(void) {}"}' | sort -u >"$NV/lib/stubs/cuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$NV/lib/stubs/libcuda.so" "$NV/lib/stubs/cuda_stub.c"
fi

ENVFILE="$VENV/env.sh"
cat >"$ENVFILE" <<EOF
export CUDA_HOME="$NV" CUDA_PATH="$NV" CUDA_ROOT="$NV"
export NVCC="$NV/bin/nvcc"
export PATH="$NV/bin:\$PATH"
export LD_LIBRARY_PATH="$NV/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-90}"
EOF
touch "$STAMP"
# shellcheck disable=SC1090
source "$ENVFILE"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/cuda}"

case "${1:-build}" in
  env) echo "$ENVFILE" ;;
  check) shift; cargo check --workspace --features lora-cli/cuda "$@" ;;
  build) shift || true; cargo build --release -p lora-cli --features cuda "$@"
         log "built $CARGO_TARGET_DIR/release/lora (run it after: source $ENVFILE)" ;;
  --) shift; cargo "$@" ;;
  *) log "unknown command $1 (build | check | env | -- CARGO-ARGS)"; exit 2 ;;
esac
