#!/usr/bin/env bash
# The main job: set up (idempotent) and run `retrain` on the built-in simulator with a local
# SQLite MLflow store (./mlflow.db, ./mlartifacts), Prefect's ephemeral server and the local DVC
# cache. Each run writes to its own directory runs/<time>-<flow run name>/ (or $OUTPUT).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DO_NOT_TRACK=true PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true \
       DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1
.venv/bin/retrain --data simulator ${OUTPUT:+--output "$OUTPUT"} --config params.yaml "$@"
