#!/usr/bin/env bash
# Start a Prefect server and an MLflow tracking server on loopback for a team-style setup on one
# machine (instead of the embedded defaults: Prefect's ephemeral server and a SQLite file store).
#   bash infra/local-services.sh start|stop|status
# Then point the pipeline at them:
#   export PREFECT_API_URL=http://127.0.0.1:4200/api MLFLOW_TRACKING_URI=http://127.0.0.1:5000
set -euo pipefail
cd "$(dirname "$0")/.."
STATE=${ASFT_SERVICES_DIR:-.services}
mkdir -p "$STATE"
export DO_NOT_TRACK=true PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true
export PREFECT_HOME="$PWD/$STATE/prefect"
case "${1:-status}" in
  start)
    nohup .venv/bin/prefect server start --host 127.0.0.1 --port 4200 >"$STATE/prefect.log" 2>&1 &
    echo $! >"$STATE/prefect.pid"
    nohup .venv/bin/mlflow server --host 127.0.0.1 --port 5000 \
      --backend-store-uri "sqlite:///$PWD/$STATE/mlflow.db" \
      --artifacts-destination "$PWD/$STATE/mlartifacts" >"$STATE/mlflow.log" 2>&1 &
    echo $! >"$STATE/mlflow.pid"
    echo "prefect: http://127.0.0.1:4200  mlflow: http://127.0.0.1:5000 (logs in $STATE/)";;
  stop)
    for s in prefect mlflow; do [ -f "$STATE/$s.pid" ] && kill "$(cat "$STATE/$s.pid")" 2>/dev/null || true; rm -f "$STATE/$s.pid"; done;;
  status)
    for s in prefect mlflow; do
      if [ -f "$STATE/$s.pid" ] && kill -0 "$(cat "$STATE/$s.pid")" 2>/dev/null; then echo "$s: running"; else echo "$s: stopped"; fi
    done;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2;;
esac
