#!/usr/bin/env bash
# The whole test suite: fetches the real MiniLM model the integration tests
# need (cached), then runs every crate's unit and integration tests with an
# optimized test profile (see Cargo.toml).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/fetch_assets.sh minilm smollm2
cargo test --workspace --no-fail-fast "$@"
