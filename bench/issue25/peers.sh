#!/usr/bin/env bash
# Issue 25's peer-group rows on a host of two GPUs joined by NVLink (about 4 minutes): Wan2.1-14B
# from the wan crate, one GPU raw and compressed, then a peer group of two raw and compressed,
# then resident, at 1024 and 4096 tokens; a three-forward timeline of every configuration and of
# every group member (--trace-dir), then the over-the-floor summary.
#
#   bench/issue25/peers.sh OFFLOAD_BENCH OUT_DIR
#
# Logs go to OUT_DIR: peers.log, traces/ (Chrome traces, `peer-split-compressed-gpu0-1024.json`
# and so on), summary.md.
set -euo pipefail
bench=${1:?usage: peers.sh OFFLOAD_BENCH OUT_DIR}
out=${2:?usage: peers.sh OFFLOAD_BENCH OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out/traces"
"$bench" --model wan --preset wan-14b --ctx 512 --depth 1 --tokens 1024,4096 --reps 5 --warmup 2 \
  --compress --gpus 2 --modes peer --trace-dir "$out/traces" >"$out/peers.log" 2>&1
python3 "$here/over_floor.py" "$out/peers.log" | tee "$out/summary.md"
grep '^TIMELINE' "$out/peers.log" >>"$out/summary.md" || true
