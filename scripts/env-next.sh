# shellcheck shell=bash
# Source this file (`source scripts/env-next.sh`) to get the libtorch of the newest tch release
# the crate supports: tch 0.26 with libtorch 2.13.0. scripts/env.sh gives the other end of the
# range, tch 0.24 with libtorch 2.11.0: the pair Cargo.lock holds and the GPU tests run.
#
# - LIBTORCH_NEXT set: used as is (a libtorch 2.13.0 directory with include/ and lib/).
# - Otherwise: a virtual environment in <repo>/.venv-next is created if missing, PyPI's
#   torch==2.13.0 is installed into it if missing (about 4.7 GB installed with its CUDA
#   libraries, which libtorch_cpu needs to load even on the CPU), and that torch package is used.
# Idempotent and silent once set up; prints one progress line while it installs.
#
# Reads: LIBTORCH_NEXT, OFFLOAD_PYTHON (the interpreter that creates the venv, default python3).
# Exports: LIBTORCH (the libtorch 2.13.0 directory: source this in a subshell or a separate
# shell, not after scripts/env.sh in the same one), LIBTORCH_CXX11_ABI (1), LD_LIBRARY_PATH (its
# lib dir first), OFFLOAD_NEXT_TCH and OFFLOAD_NEXT_LIBTORCH (the pair's versions).

export OFFLOAD_NEXT_TCH=0.26.0 OFFLOAD_NEXT_LIBTORCH=2.13.0
_lo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${LIBTORCH_NEXT:-}" ]]; then
  LIBTORCH="$LIBTORCH_NEXT"
else
  _lo_venv="$_lo_root/.venv-next"
  _lo_torch="$_lo_venv/lib/python3*/site-packages/torch"
  # shellcheck disable=SC2086
  if ! compgen -G "$(echo $_lo_torch)/lib/libtorch_cpu.so" >/dev/null; then
    if [[ ! -x "$_lo_venv/bin/python" ]]; then
      "${OFFLOAD_PYTHON:-python3}" -m venv "$_lo_venv" || { echo "env-next.sh: could not create $_lo_venv" >&2; return 1; }
    fi
    echo "env-next.sh: installing torch==$OFFLOAD_NEXT_LIBTORCH into $_lo_venv (about 4.7 GB, one time)..." >&2
    "$_lo_venv/bin/python" -m pip install -q --disable-pip-version-check "torch==$OFFLOAD_NEXT_LIBTORCH" \
      || { echo "env-next.sh: pip install torch==$OFFLOAD_NEXT_LIBTORCH failed" >&2; return 1; }
  fi
  # shellcheck disable=SC2086
  LIBTORCH="$(cd $(echo $_lo_torch) && pwd)"
  unset _lo_venv _lo_torch
fi
export LIBTORCH
export LIBTORCH_CXX11_ABI="${LIBTORCH_CXX11_ABI:-1}"
export LD_LIBRARY_PATH="$LIBTORCH/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
unset _lo_root
