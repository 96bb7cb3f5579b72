#!/usr/bin/env bash
# Sets up, then builds a tiny model, converts it and checks it in llama.cpp.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mt demo "$@"
