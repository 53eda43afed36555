#!/usr/bin/env bash
# Idempotent setup of the isolated RecBole 1.2.1 benchmark venv.
# Usage: bash benchmarks/recbole/setup.sh
# Creates benchmarks/.venv-recbole (git-ignored) with Python 3.11, the local CPU
# torch wheel from /opt/wheels (never plain PyPI torch: that pulls GBs of CUDA),
# and RecBole 1.2.1 with the version pins it needs (numpy<2, pandas<2.2, scipy<1.13).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${RECBOLE_VENV:-$HERE/../.venv-recbole}"
WHEELS="${TORCH_WHEELS:-/opt/wheels}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
  uv venv --python 3.11 "$VENV"
fi
PY="$VENV/bin/python"

# 1) torch first, CPU-only, from the local wheel dir.
uv pip install --python "$PY" --compile-bytecode --find-links "$WHEELS" "torch==$TORCH_VERSION"

# 2) RecBole itself without its dependency resolution (its metadata would let
#    the resolver touch torch), then its runtime deps with the pins it needs.
uv pip install --python "$PY" --compile-bytecode --no-deps "recbole==1.2.1"
uv pip install --python "$PY" --compile-bytecode --find-links "$WHEELS" \
  "torch==$TORCH_VERSION" \
  "numpy<2" "pandas<2.2" "scipy<1.13" \
  "tqdm>=4.48.2" "colorlog==4.7.2" "colorama==0.4.4" "scikit-learn>=0.23.2,<1.6" \
  "pyyaml>=5.1.0" "tensorboard>=2.5.0" "thop>=0.1.1.post2207130030" \
  "tabulate>=0.8.10" "plotly>=4.0.0" "texttable>=0.9.0" "psutil"

# 3) sanity check.
"$PY" - <<'PY'
import torch, numpy, pandas, scipy, recbole
# recbole.quick_start imports ray at module level; the benchmark does not use it.
from recbole.config import Config  # noqa: F401
from recbole.data import create_dataset, data_preparation  # noqa: F401
from recbole.model.sequential_recommender import SASRec  # noqa: F401
print("torch", torch.__version__, "numpy", numpy.__version__, "pandas", pandas.__version__,
      "scipy", scipy.__version__, "recbole", recbole.__version__)
PY
