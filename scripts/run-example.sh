#!/usr/bin/env bash
# The main example. Sets up libtorch on first use (scripts/env.sh), builds in release mode, prints
# the accelerator and its measured copy bandwidths, then makes a video from a prompt with Wan2.1's
# text-to-video pipeline (examples/text_to_video.rs over the workspace's `wan/` crate), its text
# encoder and transformer streamed by the offload manager:
# - without a CUDA device: the tiny pipeline of seeded random weights, the managers in their CPU
#   test mode, checked against the resident pipeline (max_abs_diff 0), written to video.gif;
# - with one: the Wan2.1-T2V-1.3B-shaped pipeline (umT5-XXL, the 1.3B transformer, Wan2.1's VAE;
#   seeded random weights, no download) at 480 x 832, 17 frames, 4 steps, under an 8 GiB VRAM
#   limit, written to video.gif.
# Arguments, if any, go to text_to_video instead (try --help; --pipeline DIR takes a diffusers
# Wan2.1 pipeline directory such as Wan-AI/Wan2.1-T2V-14B-Diffusers).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/env.sh
cargo build --release --quiet --examples
# Cargo's output directory: CARGO_TARGET_DIR when set (shared build machines often set it).
bin="${CARGO_TARGET_DIR:-target}/release/examples"
"$bin/bandwidth" --mib 256
ex="$bin/text_to_video"
if (($#)); then
  exec "$ex" "$@"
elif nvidia-smi -L >/dev/null 2>&1; then
  exec "$ex" --preset wan-1.3b --frames 17 --steps 4 --vram-limit 8 --out video.gif
else
  exec "$ex" --check --out video.gif
fi
