#!/usr/bin/env bash
# Sets up and runs the whole test suite (this is what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# one worker per core (CI has 2); files stay whole on one worker so their fixtures are built once
python3 -m pytest -q -n "${MT_TEST_WORKERS:-2}" --dist loadfile "$@"
