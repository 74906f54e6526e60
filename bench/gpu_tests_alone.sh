#!/usr/bin/env bash
# Every staged test binary's tests, each in a process of its own (`--exact NAME`), CUDA required:
# libtorch initializes CUDA lazily, so a test that passes only after others ran shows here.
#   bash bench/gpu_tests_alone.sh [BINARY...]   (default: every staged test binary)
cd "$(dirname "$0")/.." || exit 1
source .gpu/env.sh
pass=0 fail=0 t0=$(date +%s)
bins=("$@")
((${#bins[@]})) || bins=(.gpu/bin/tests/*)
for t in "${bins[@]}"; do
  [[ -x $t ]] || t=.gpu/bin/tests/$t
  n=0
  for name in $("$t" --list 2>/dev/null | sed -n 's/: test$//p'); do
    if timeout 300 "$t" --exact "$name" >/tmp/one.log 2>&1; then
      pass=$((pass + 1))
    else
      fail=$((fail + 1))
      echo "FAIL ${t##*/} $name"
      tail -8 /tmp/one.log
    fi
    n=$((n + 1))
  done
  echo "${t##*/}: $n tests alone ($(( $(date +%s) - t0 )) s so far)"
done
echo "alone: $pass passed, $fail failed"
