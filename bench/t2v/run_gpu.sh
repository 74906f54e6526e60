#!/usr/bin/env bash
# The text-to-video comparison on one CUDA host, all runs on the same machine: the Rust pipeline
# (examples/text_to_video, staged in .gpu/) and diffusers' WanPipeline (scripts/bench_wan_pipeline.py,
# diffusers' wheel carried in .wheels/), same shapes, same steps, same 24 GiB limit.
#   bash bench/t2v/run_gpu.sh PRESET STEPS FRAMES [SYSTEMS...]   (systems: rust group model)
set -uo pipefail
cd "$(dirname "$0")/../.."
source .gpu/env.sh
unset OFFLOAD_REQUIRE_CUDA
out=${OUT:-/tmp/out}
mkdir -p "$out"
if ! python3 -c 'import diffusers' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .wheels/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
preset=$1 steps=$2 frames=$3
limit=${LIMIT_S:-300}  # seconds per system
shift 3
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for sys in "$@"; do
  log="$out/${preset}_${sys}.log"
  echo "=== $preset $sys" | tee "$log"
  t0=$(date +%s)
  if [[ $sys == rust ]]; then
    timeout "$limit" .gpu/bin/examples/text_to_video --preset "$preset" --steps "$steps" --frames "$frames" \
      --height 480 --width 832 --vram-limit 24 --out "/tmp/${preset}.gif" >>"$log" 2>&1
  else
    timeout "$limit" python3 scripts/bench_wan_pipeline.py --mode "$sys" --preset "$preset" --steps "$steps" \
      --frames "$frames" --height 480 --width 832 --vram-limit 24 >>"$log" 2>&1
  fi
  echo "exit $? after $(( $(date +%s) - t0 )) s" | tee -a "$log"
  grep -v "^\s*[0-9]*%\|it/s\]" "$log" | tail -12
done
