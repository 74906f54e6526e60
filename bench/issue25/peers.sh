#!/usr/bin/env bash
# Issue 25's peer-group rows on a host of two GPUs joined by NVLink (about 6 minutes): Wan2.1-14B
# from the wan crate at 1024 and 4096 tokens.
#   peers.log          one GPU raw and compressed, a peer group of two raw and compressed (each
#                      share sent on whole once it has arrived, the default), resident; a
#                      three-forward timeline of every configuration and member (traces/)
#   peers_chunked.log  the peer group alone with shares sent on in 64 MiB chunks as they
#                      arrive (--push-chunk-mib 64), and resident; timelines (traces_chunked/)
#   summary.md       bench/issue25/over_floor.py of both, and the TIMELINE lines
#
#   bench/issue25/peers.sh OFFLOAD_BENCH OUT_DIR
set -euo pipefail
bench=${1:?usage: peers.sh OFFLOAD_BENCH OUT_DIR}
out=${2:?usage: peers.sh OFFLOAD_BENCH OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out/traces" "$out/traces_chunked"
common=(--model wan --preset wan-14b --ctx 512 --depth 1 --tokens 1024,4096 --reps 5 --warmup 2
  --compress --gpus 2 --modes peer)
"$bench" "${common[@]}" --trace-dir "$out/traces" >"$out/peers.log" 2>&1
"$bench" "${common[@]}" --multi-only --push-chunk-mib 64 --trace-dir "$out/traces_chunked" \
  >"$out/peers_chunked.log" 2>&1
python3 "$here/over_floor.py" "$out/peers.log" "$out/peers_chunked.log" | tee "$out/summary.md"
grep '^TIMELINE' "$out/peers.log" "$out/peers_chunked.log" >>"$out/summary.md" || true
