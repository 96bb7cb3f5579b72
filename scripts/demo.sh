#!/usr/bin/env bash
# Sets up, then releases SmolLM2-135M-Instruct as F16, Q8_0 and Q4_K_M (each verified) and asks each file a question.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mt demo "$@"
