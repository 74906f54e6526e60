#!/usr/bin/env bash
# Issue 25's single-GPU table in one run (about 8 minutes on an H100, much of it building the
# weights of each process): Wan2.1-14B from the wan crate, every configuration raw and
# compressed, then the over-the-floor summary.
#
#   bench/issue25/remeasure.sh OFFLOAD_BENCH OUT_DIR
#
# OFFLOAD_BENCH is a release build of offload-bench (it sets CUDA_DEVICE_MAX_CONNECTIONS=32 itself
# unless the environment sets it; every RESULT line records the value). Logs go to OUT_DIR:
#   table.log     1024 and 4096 tokens: full streaming, 13 and 20 GiB budgets, resident; then
#                 `--probe-queues` (which of the process's streams share a hardware queue)
#   16384.log     16384 tokens (compute-bound): full streaming, resident
#   repeat.log    the 20 GiB compressed row built three times in one process
#   summary.md    bench/issue25/over_floor.py of the three (each row with its copy and decode
#                 stream's pool index), the streams' lines and the queue map
# On an H100 the 20 GiB compressed row at 1024 tokens was slow (+6.6-8.5%) where its copy stream
# was the pool's #8; bench/issue25/stream_sweep.sh is the experiment for that.
set -euo pipefail
bench=${1:?usage: remeasure.sh OFFLOAD_BENCH OUT_DIR}
out=${2:?usage: remeasure.sh OFFLOAD_BENCH OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
common=(--model wan --preset wan-14b --ctx 512 --depth 1)
"$bench" "${common[@]}" --tokens 1024,4096 --reps 5 --warmup 2 --budgets 13,20 --compress \
  --probe-queues >"$out/table.log" 2>&1
"$bench" "${common[@]}" --tokens 16384 --reps 3 --warmup 1 --compress >"$out/16384.log" 2>&1
"$bench" "${common[@]}" --tokens 1024 --reps 5 --warmup 2 --budgets 20 --compress --no-raw \
  --no-full-streaming --repeat 3 --no-resident >"$out/repeat.log" 2>&1
python3 "$here/over_floor.py" "$out/table.log" "$out/16384.log" "$out/repeat.log" \
  | tee "$out/summary.md"
grep -h "copy stream\|compute stream\|hardware queue" "$out"/*.log >>"$out/summary.md" || true
