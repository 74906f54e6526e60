#!/usr/bin/env bash
# The test suite: sets up libtorch on first use (scripts/env.sh), then runs every test, the
# doctests and builds the examples, and checks the workspace with clippy and rustdoc (both with
# warnings as errors). CUDA tests print "SKIP: no CUDA device" without a GPU;
# with OFFLOAD_REQUIRE_CUDA=1 they fail instead.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/env.sh
cargo build --quiet --all-targets
cargo test --all-targets -- --nocapture 2>&1
cargo test --doc
cargo clippy --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps
