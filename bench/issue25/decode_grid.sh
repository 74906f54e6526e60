#!/usr/bin/env bash
# Whether a smaller decode grid lowers what compression costs where the model's kernels keep
# every SM busy (issue 25: compute-bound compressed rows 2-5% over resident on an H100, the
# decode's kernels taking SM time from the model's). Wan2.1-14B from the wan crate, compressed
# with decode grids of every SM (4 blocks each: `full`), 132, 33 and 16 blocks
# (`OffloadConfig::compress_decode_blocks`; an H100 has 132 SMs), beside raw and resident
# (about 6 minutes on an H100):
#
#   bench/issue25/decode_grid.sh OFFLOAD_BENCH OUT_DIR
#
#   16384.log   full streaming at 16384 tokens (compute-bound)
#   budget.log  the 20 GiB budget at 1024 and 4096 tokens (transfer-bound, and near the
#               resident time): a grid too small for a segment's copy shows here
#   summary.md  bench/issue25/over_floor.py of both
set -euo pipefail
bench=${1:?usage: decode_grid.sh OFFLOAD_BENCH OUT_DIR}
out=${2:?usage: decode_grid.sh OFFLOAD_BENCH OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
common=(--model wan --preset wan-14b --ctx 512 --depth 1 --compress --decode-blocks 0,132,33,16)
"$bench" "${common[@]}" --tokens 16384 --reps 3 --warmup 1 >"$out/16384.log" 2>&1
"$bench" "${common[@]}" --tokens 1024,4096 --reps 5 --warmup 2 --budgets 20 \
  --no-full-streaming >"$out/budget.log" 2>&1
python3 "$here/over_floor.py" "$out/16384.log" "$out/budget.log" | tee "$out/summary.md"
grep -h "decode grid" "$out"/*.log >>"$out/summary.md" || true
