#!/usr/bin/env bash
# The main example. Sets up libtorch on first use (scripts/env.sh), builds in release mode and
# runs it; extra arguments go to the example.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/env.sh
exec cargo run --release --quiet --example bandwidth -- "$@"
