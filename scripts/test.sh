#!/usr/bin/env bash
# The test suite: checks the formatting (cargo fmt), sets up libtorch on first use (scripts/env.sh), then runs every test, the
# doctests and builds the examples, and checks the workspace with clippy and rustdoc (both with
# warnings as errors), all with tch 0.24 / libtorch 2.11.0 (Cargo.lock). Then the CPU tests
# against tch 0.26 / libtorch 2.13.0 (scripts/test-next.sh; OFFLOAD_SKIP_NEXT=1 leaves them out),
# and the library built with the oldest supported Rust, 1.88 (through rustup when there is one).
# CUDA tests print "SKIP: no CUDA device" without a GPU; with OFFLOAD_REQUIRE_CUDA=1 they fail
# instead.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/env.sh
# The dependent crate's test checks that the build took this libtorch.
export OFFLOAD_EXPECT_LIBTORCH=2.11.0
# Formatting first: it costs nothing and needs no build.
cargo fmt --all --check
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
# One path per public item: no item of that documentation is named twice.
scripts/check-one-path.sh
# The docs.rs path: no libtorch at all (tch's and torch-sys's doc-only features; build.rs skips
# the shim), in its own target dir so that the main build's artifacts stay valid.
env -u LIBTORCH -u LIBTORCH_USE_PYTORCH -u LIBTORCH_BYPASS_VERSION_CHECK DOCS_RS=1 \
  CARGO_TARGET_DIR=target/doc-only RUSTDOCFLAGS="-D warnings" \
  cargo doc -p layerwise-offload --no-deps --features doc-only
env -u LIBTORCH -u LIBTORCH_USE_PYTORCH -u LIBTORCH_BYPASS_VERSION_CHECK DOCS_RS=1 \
  CARGO_TARGET_DIR=target/doc-only RUSTDOCFLAGS="-D warnings" \
  cargo doc -p layerwise-offload-wan --no-deps --features tch/doc-only
# Packaging: the codec and wan crates as `cargo publish` would upload them (without building the
# packages again); the library's file list (its dry run needs layerwise-offload-codec on
# crates.io first).
for p in layerwise-offload-codec layerwise-offload-wan; do
  cargo publish --quiet --dry-run --no-verify --allow-dirty -p "$p" --target-dir target/package
done
cargo package --quiet --no-verify --allow-dirty --list -p layerwise-offload >/dev/null
# The minimum supported Rust version (rust-version = "1.88" in the manifests): the library crates,
# in their own target dir.
if command -v rustup >/dev/null; then
  rustup toolchain install 1.88 --profile minimal --no-self-update >/dev/null 2>&1 || true
  CARGO_TARGET_DIR=target/msrv cargo +1.88 check --quiet \
    -p layerwise-offload -p layerwise-offload-wan -p layerwise-offload-codec --lib
else
  echo "test.sh: no rustup, the Rust 1.88 build is skipped" >&2
fi
# The other end of the tch range, on the CPU.
if [[ "${OFFLOAD_SKIP_NEXT:-}" != 1 ]]; then
  scripts/test-next.sh
fi
