#!/usr/bin/env bash
# Compressed transport with only the blocks the link needs encoded (OffloadConfig::compress_blocks,
# sized by LayerwiseOffloadManager::encoded_blocks_needed: `--compress-blocks auto`), against
# every streamed block encoded and against raw, at the sizes where the model's compute covers
# part or all of the raw uploads: 13 and 20 GiB budgets at 4096 tokens, full streaming at
# 16384. Wan2.1-14B from the wan crate.
#
#   bench/issue25/mixed.sh OFFLOAD_BENCH OUT_DIR [4096|16384|rounds]
#
#   4096.log     13 and 20 GiB budgets at 4096 tokens: raw, all encoded, auto; resident
#   16384.log    full streaming at 16384 tokens: the same
#   rounds.log   (only when asked for) the 13 GiB budget at 4096 tokens with auto sizing in up
#                to three rounds (`--sizing-rounds 3`), beside one round and all encoded
#   summary.md   bench/issue25/over_floor.py of what ran, and the counts auto chose
set -euo pipefail
bench=${1:?usage: mixed.sh OFFLOAD_BENCH OUT_DIR [4096|16384|rounds]}
out=${2:?usage: mixed.sh OFFLOAD_BENCH OUT_DIR [4096|16384|rounds]}
only=${3:-}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
common=(--model wan --preset wan-14b --ctx 512 --depth 1 --compress --compress-blocks all,auto)
if [[ -z $only || $only == 4096 ]]; then
  "$bench" "${common[@]}" --tokens 4096 --reps 5 --warmup 2 --budgets 13,20 \
    --no-full-streaming >"$out/4096.log" 2>&1
fi
if [[ -z $only || $only == 16384 ]]; then
  "$bench" "${common[@]}" --tokens 16384 --reps 3 --warmup 1 >"$out/16384.log" 2>&1
fi
if [[ $only == rounds ]]; then
  "$bench" "${common[@]}" --tokens 4096 --reps 5 --warmup 2 --budgets 13 --no-full-streaming \
    --no-raw --sizing-rounds 3 >"$out/rounds.log" 2>&1
fi
logs=("$out"/*.log)
python3 "$here/over_floor.py" "${logs[@]}" | tee -a "$out/summary.md"
grep -h "streamed blocks encoded" "${logs[@]}" | tee -a "$out/summary.md" || true
