#!/usr/bin/env bash
# The main job: set up (idempotent) and run `retrain` on the built-in simulator with a local
# SQLite MLflow store (./mlflow.db, ./mlartifacts) and Prefect's ephemeral server.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DO_NOT_TRACK=true PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true \
       DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1
.venv/bin/retrain --data simulator --output "${OUTPUT:-runs/simulator}" --config params.yaml "$@"
