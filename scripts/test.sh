#!/usr/bin/env bash
# The test command: set up (idempotent) and run the whole suite offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DO_NOT_TRACK=true PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true \
       DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1 GX_ANALYTICS_ENABLED=false
# Two workers (one per core); --dist loadfile keeps a file's module-scoped fixtures in one worker.
.venv/bin/python -m pytest -q -p no:cacheprovider -n "${ASFT_TEST_WORKERS:-2}" --dist loadfile "$@"
