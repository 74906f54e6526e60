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
# The optional `tracing` feature: its spans recorded by a test subscriber, and the library with
# the feature on passes clippy too.
cargo test -p layerwise-offload --features tracing --test tracing_spans -- --nocapture 2>&1
cargo clippy -p layerwise-offload --all-targets --features tracing -- -D warnings
cargo clippy --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps
# The library alone, without the `testing` feature its own tests turn on: what users build.
cargo clippy -p layerwise-offload --lib -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc -p layerwise-offload --no-deps
# The docs.rs path: no libtorch at all (tch's and torch-sys's doc-only features; build.rs skips
# the shim), in its own target dir so that the main build's artifacts stay valid.
env -u LIBTORCH -u LIBTORCH_USE_PYTORCH -u LIBTORCH_BYPASS_VERSION_CHECK DOCS_RS=1 \
  CARGO_TARGET_DIR=target/doc-only RUSTDOCFLAGS="-D warnings" \
  cargo doc -p layerwise-offload --no-deps --features doc-only
