#!/usr/bin/env bash
# Installs everything mt and its tests need into the current python3, idempotently.
# torch comes first from the pinned CPU release so nothing later pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore "$@"; }
pip_install "torch==2.13.0"
pip_install -e ".[test]"
# llama.cpp is the oracle and the runtime: llama-cpp-python built from the registry's sdist
# (4 to 10 minutes on 2 cores the first time; pip caches the built wheel).
"$PY" -c "import llama_cpp" 2>/dev/null || pip_install --no-binary llama-cpp-python "llama-cpp-python==0.3.36"
# Go renders Ollama Modelfile templates in the tests (tests/release/ollama_render): Debian's golang-go
if ! command -v go >/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get install -y -q golang-go >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q golang-go >/dev/null; }
fi
"$PY" -c "import llama_cpp, torch, transformers, gguf; print(f'setup ok: torch {torch.__version__}, transformers {transformers.__version__}, gguf, llama-cpp-python {llama_cpp.__version__}')"
