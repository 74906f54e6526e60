#!/usr/bin/env bash
# Whether a compressed configuration's speed depends on which of libtorch's pool streams its
# copy and decode streams are. On an H100 (32 hardware queues) the 20 GiB budget, compressed, at
# 1024 tokens took 113.6-116.0 ms when its copy stream was the pool's normal-priority stream #8
# (the sixth configuration of remeasure.sh's table.log) and 107.1-107.7 with streams #1-#6. One
# hypothesis: the pool creates its streams four priorities interleaved, CUDA hands hardware
# queues out round robin in creation order, so normal-priority streams #0, #8, #16 and #24
# share the default (compute) stream's queue. This builds the configuration 11 times in one
# process, drawing one idle pool stream before each (`--skip-streams 1`), so that the copy and
# decode streams step through every index modulo 8, then maps the streams onto queues
# (`--probe-queues`); then the same with the managers passing over #0, #8, #16 and #24
# (`--avoid-pool-streams`, OffloadConfig::avoid_pool_streams). About 6 minutes on an H100.
#
#   bench/issue25/stream_sweep.sh OFFLOAD_BENCH OUT_DIR
#
#   sweep.log    the runs, each initialize line naming its streams, and the queue map
#   avoid.log    the runs that pass over #0, #8, #16 and #24
#   summary.md   bench/issue25/over_floor.py of both (a copy / decode stream column)
set -euo pipefail
bench=${1:?usage: stream_sweep.sh OFFLOAD_BENCH OUT_DIR}
out=${2:?usage: stream_sweep.sh OFFLOAD_BENCH OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
"$bench" --model wan --preset wan-14b --ctx 512 --depth 1 --tokens 1024 --reps 3 --warmup 1 \
  --budgets 20 --no-full-streaming --compress --no-raw --repeat 11 \
  --skip-streams 1 --probe-queues >"$out/sweep.log" 2>&1
"$bench" --model wan --preset wan-14b --ctx 512 --depth 1 --tokens 1024 --reps 3 --warmup 1 \
  --budgets 20 --no-full-streaming --compress --no-raw --repeat 11 \
  --skip-streams 1 --avoid-pool-streams 0,8,16,24 >"$out/avoid.log" 2>&1
python3 "$here/over_floor.py" "$out/sweep.log" "$out/avoid.log" | tee "$out/summary.md"
grep -h "compute stream\|hardware queue" "$out/sweep.log" >>"$out/summary.md" || true
