#!/usr/bin/env bash
# The main example. Sets up libtorch on first use (scripts/env.sh), builds in release mode, then
# prints the accelerator and its measured copy bandwidths and runs a Wan-shaped block stack
# streamed and resident through the offload manager (on a machine without a CUDA device: the
# tiny preset in the manager's CPU test mode). Extra arguments go to offload-bench.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/env.sh
cargo build --release --quiet --example bandwidth --bin offload-bench
target/release/examples/bandwidth --mib 256
exec target/release/offload-bench "$@"
