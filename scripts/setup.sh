#!/usr/bin/env bash
# Create .venv with the CPU build of torch first (never the CUDA wheels), then the project.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v uv >/dev/null 2>&1 || "$PY" -m pip install --quiet uv
[ -x .venv/bin/python ] || uv venv --quiet -p "$PY" .venv
FL=()
[ -d /opt/wheels ] && FL=(--find-links /opt/wheels)
uv pip install --quiet -p .venv --compile-bytecode "${FL[@]}" torch==2.13.0
uv pip install --quiet -p .venv --compile-bytecode "${FL[@]}" -e '.[dev]'
