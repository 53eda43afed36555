#!/usr/bin/env bash
# Start a Prefect server and an MLflow tracking server on loopback for a team-style setup on one
# machine (instead of the embedded defaults: Prefect's ephemeral server and a SQLite file store).
#   bash infra/local-services.sh start|stop|status
# Both servers require authentication, as in infra/docker-compose.yml: the first start writes
# random credentials to $STATE/credentials.env (mode 600, git-ignored). Then point the pipeline at them:
#   set -a; . .services/credentials.env; set +a
#   export PREFECT_API_URL=http://127.0.0.1:4200/api MLFLOW_TRACKING_URI=http://127.0.0.1:5000
# MLflow's basic-auth app needs Flask-WTF (`uv pip install 'mlflow[auth]==3.17.2'` in the venv);
# without it MLflow starts unauthenticated, with a warning (loopback only, still reachable by every
# local user of the machine).
set -euo pipefail
cd "$(dirname "$0")/.."
STATE=${ASFT_SERVICES_DIR:-.services}
mkdir -p "$STATE"
chmod 700 "$STATE"
STATE=$(cd "$STATE" && pwd)
export DO_NOT_TRACK=true PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true
export PREFECT_HOME="$STATE/prefect"
CREDS="$STATE/credentials.env"

rand() { .venv/bin/python -c "import secrets; print(secrets.token_hex(24))"; }

case "${1:-status}" in
  start)
    if [ ! -f "$CREDS" ]; then
      (umask 077; {
        echo "PREFECT_API_AUTH_STRING=asft:$(rand)"
        echo "MLFLOW_TRACKING_USERNAME=admin"
        echo "MLFLOW_TRACKING_PASSWORD=$(rand)"
      } >"$CREDS")
    fi
    set -a; . "$CREDS"; set +a
    PREFECT_SERVER_API_AUTH_STRING="$PREFECT_API_AUTH_STRING" \
      nohup .venv/bin/prefect server start --host 127.0.0.1 --port 4200 >"$STATE/prefect.log" 2>&1 &
    echo $! >"$STATE/prefect.pid"
    mlflow_args=(--host 127.0.0.1 --port 5000 --backend-store-uri "sqlite:///$STATE/mlflow.db"
                 --artifacts-destination "$STATE/mlartifacts")
    if .venv/bin/python -c "import flask_wtf" 2>/dev/null; then
      PATH="$PWD/.venv/bin:$PATH" \
      MLFLOW_AUTH_DATABASE_URI="sqlite:///$STATE/mlflow_auth.db" \
      MLFLOW_AUTH_CONFIG_PATH="$STATE/basic_auth.ini" \
      MLFLOW_AUTH_ADMIN_USERNAME="$MLFLOW_TRACKING_USERNAME" \
      MLFLOW_AUTH_ADMIN_PASSWORD="$MLFLOW_TRACKING_PASSWORD" \
      MLFLOW_FLASK_SERVER_SECRET_KEY="$(rand)" \
        nohup infra/mlflow-entrypoint.sh "${mlflow_args[@]}" >"$STATE/mlflow.log" 2>&1 &
      auth="basic auth"
    else
      nohup .venv/bin/mlflow server "${mlflow_args[@]}" >"$STATE/mlflow.log" 2>&1 &
      auth="NO authentication: install mlflow[auth] in the venv to enable it"
      echo "warning: MLflow starts without authentication (Flask-WTF missing)" >&2
    fi
    echo $! >"$STATE/mlflow.pid"
    echo "prefect: http://127.0.0.1:4200 (auth string)  mlflow: http://127.0.0.1:5000 ($auth)"
    echo "credentials: set -a; . $CREDS; set +a   (logs in $STATE/)";;
  stop)
    for s in prefect mlflow; do [ -f "$STATE/$s.pid" ] && kill "$(cat "$STATE/$s.pid")" 2>/dev/null || true; rm -f "$STATE/$s.pid"; done;;
  status)
    for s in prefect mlflow; do
      if [ -f "$STATE/$s.pid" ] && kill -0 "$(cat "$STATE/$s.pid")" 2>/dev/null; then echo "$s: running"; else echo "$s: stopped"; fi
    done;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2;;
esac
