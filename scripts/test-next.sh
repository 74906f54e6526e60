#!/usr/bin/env bash
# The CPU tests against the other end of the supported tch range: tch 0.26 with libtorch 2.13.0
# (scripts/test.sh runs everything against tch 0.24 / libtorch 2.11.0, the pair Cargo.lock
# holds). Cargo keeps one lock file per workspace and one torch-sys per lock file, so the
# repository's tracked files are copied into target/tch-next/src, that copy's Cargo.lock is moved
# to tch 0.26 (`cargo update --precise`), and it builds in target/tch-next/target. Runs a
# subset: the library's unit tests, the manager, checkpoint and error tests, and the dependent
# crate (a user's crate), which also checks which libtorch the build took.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
# The first pair's libtorch must not leak into this build or its binaries' search path.
unset LIBTORCH LIBTORCH_USE_PYTORCH LD_LIBRARY_PATH
# shellcheck disable=SC1091
source scripts/env-next.sh
next="$root/target/tch-next"
rm -rf "$next/src"
mkdir -p "$next/src"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$next/src"
else
  tar --exclude=./target --exclude=./.venv --exclude=./.venv-next -cf - . | tar -xf - -C "$next/src"
fi
cd "$next/src"
cargo update --quiet -p tch --precise "$OFFLOAD_NEXT_TCH"
grep -A1 '^name = "tch"$' Cargo.lock | grep -q "version = \"$OFFLOAD_NEXT_TCH\"" \
  || { echo "test-next.sh: the lock file did not move to tch $OFFLOAD_NEXT_TCH" >&2; exit 1; }
export CARGO_TARGET_DIR="$next/target" OFFLOAD_EXPECT_LIBTORCH="$OFFLOAD_NEXT_LIBTORCH"
cargo test --lib -p layerwise-offload 2>&1
cargo test -p layerwise-offload --test manager --test checkpoint --test errors 2>&1
cargo test -p layerwise-offload-dependent 2>&1
