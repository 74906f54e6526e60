# shellcheck shell=bash
# Source this file (`source scripts/env.sh`) to get a libtorch that tch's build can use.
#
# - LIBTORCH already set: it is used as is (a libtorch 2.11.0 directory with include/ and lib/).
# - Otherwise: a virtual environment in <repo>/.venv is created if missing, PyPI's torch==2.11.0
#   is installed into it if missing (the first install downloads about 3 GB), and LIBTORCH points
#   at its torch package.
# Idempotent and silent once set up; prints one progress line while it installs.
#
# Reads: LIBTORCH, OFFLOAD_PYTHON (the interpreter that creates the venv, default python3).
# Exports: LIBTORCH, LIBTORCH_CXX11_ABI (1, the ABI of PyPI's torch), LD_LIBRARY_PATH (libtorch's
# lib dir prepended, for tools that run binaries outside cargo).

_lo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${LIBTORCH:-}" ]]; then
  _lo_venv="$_lo_root/.venv"
  _lo_torch="$_lo_venv/lib/python3*/site-packages/torch"
  # shellcheck disable=SC2086
  if ! compgen -G "$(echo $_lo_torch)/lib/libtorch_cpu.so" >/dev/null; then
    if [[ ! -x "$_lo_venv/bin/python" ]]; then
      "${OFFLOAD_PYTHON:-python3}" -m venv "$_lo_venv" || { echo "env.sh: could not create $_lo_venv" >&2; return 1; }
    fi
    echo "env.sh: installing torch==2.11.0 into $_lo_venv (about 3 GB, one time)..." >&2
    "$_lo_venv/bin/python" -m pip install -q --disable-pip-version-check torch==2.11.0 \
      || { echo "env.sh: pip install torch==2.11.0 failed" >&2; return 1; }
  fi
  # shellcheck disable=SC2086
  LIBTORCH="$(cd $(echo $_lo_torch) && pwd)"
  export LIBTORCH
  unset _lo_venv _lo_torch
fi
export LIBTORCH_CXX11_ABI="${LIBTORCH_CXX11_ABI:-1}"
case ":${LD_LIBRARY_PATH:-}:" in
  *":$LIBTORCH/lib:"*) ;;
  *) export LD_LIBRARY_PATH="$LIBTORCH/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
esac
unset _lo_root
