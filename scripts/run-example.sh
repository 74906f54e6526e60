#!/usr/bin/env bash
# The main example. Sets up libtorch on first use (scripts/env.sh), builds in release mode, prints
# the accelerator and its measured copy bandwidths, then samples a Wan-style diffusion
# transformer through the offload manager (examples/dit_layer_loop.rs):
# - without a CUDA device: the tiny preset in the manager's CPU test mode, checked against the
#   resident model (max_abs_diff 0);
# - with one: the wan-1.3b-shaped model under a 2 GiB VRAM limit (below its 2.8 GiB of weights),
#   then again without the limit and checked against the resident model.
# Arguments, if any, go to dit_layer_loop instead (try --help).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/env.sh
cargo build --release --quiet --examples
# Cargo's output directory: CARGO_TARGET_DIR when set (shared build machines often set it).
bin="${CARGO_TARGET_DIR:-target}/release/examples"
"$bin/bandwidth" --mib 256
ex="$bin/dit_layer_loop"
if (($#)); then
  exec "$ex" "$@"
elif nvidia-smi -L >/dev/null 2>&1; then
  "$ex" --preset wan-1.3b --steps 4 --vram-limit 2
  exec "$ex" --preset wan-1.3b --steps 4 --check
else
  exec "$ex" --preset tiny --steps 4 --check
fi
