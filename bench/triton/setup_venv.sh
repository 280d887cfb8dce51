#!/usr/bin/env bash
# Build the environment for bench/triton/compare.py: PyTriton (with its bundled tritonserver)
# plus this checkout's client and load generator.  A separate venv because nvidia-pytriton
# 0.7 pins numpy < 2, and the project's own venv runs numpy 2.
#
#   bash bench/triton/setup_venv.sh [VENV]        # default VENV: .venv-triton in the checkout
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VENV=${1:-$ROOT/.venv-triton}
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q nvidia-pytriton msgpack uvloop onnxruntime
# The server under test runs from the project's venv; here only trtserve_client and
# trtserve_bench are imported, so the project's other dependencies are not needed.  The
# client is a distribution of its own (docs/packaging.md).
"$VENV/bin/pip" install -q --no-deps -e "$ROOT/clients" -e "$ROOT"
du -sh "$VENV"
"$VENV/bin/python" -c "import pytriton, tritonclient; print('pytriton', __import__('importlib.metadata').metadata.version('nvidia-pytriton'))"
