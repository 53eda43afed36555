#!/bin/sh
# Start the MLflow tracking server with basic authentication (`--app-name basic-auth`).
#
# The auth app reads an INI file (MLFLOW_AUTH_CONFIG_PATH). It is written here, at every start, from
# the environment, so no credential is ever baked into the image or committed:
#   MLFLOW_AUTH_DATABASE_URI        users and permissions store (Postgres database `mlflow_auth`)
#   MLFLOW_AUTH_DEFAULT_PERMISSION  what an authenticated user may do on resources it does not own
#                                   (READ by default; NO_PERMISSIONS, READ, EDIT or MANAGE)
#   MLFLOW_AUTH_ADMIN_USERNAME, MLFLOW_AUTH_ADMIN_PASSWORD
#                                   the admin account MLflow creates on the first start against an
#                                   empty user store (read by MLflow from the environment, never
#                                   written to the file; ignored once the admin exists)
#   MLFLOW_FLASK_SERVER_SECRET_KEY  static key of the auth app's CSRF protection
# The arguments are passed to `mlflow server` (the backend store comes from MLFLOW_BACKEND_STORE_URI).
set -eu

: "${MLFLOW_AUTH_DATABASE_URI:?set MLFLOW_AUTH_DATABASE_URI (the auth users database)}"
: "${MLFLOW_AUTH_ADMIN_USERNAME:?set MLFLOW_AUTH_ADMIN_USERNAME}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?set MLFLOW_AUTH_ADMIN_PASSWORD}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY}"

# The auth database: infra/postgres/init.sql creates it on a new volume; create it here when a
# volume from before authentication lacks it.
case "$MLFLOW_AUTH_DATABASE_URI" in
  postgresql*)
    python - <<'PY'
import os

import sqlalchemy as sa

url = sa.engine.make_url(os.environ["MLFLOW_AUTH_DATABASE_URI"])
engine = sa.create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
with engine.connect() as conn:
    if conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :d"), {"d": url.database}).first() is None:
        conn.execute(sa.text(f'CREATE DATABASE "{url.database}"'))
        print(f"created database {url.database}")
engine.dispose()
PY
    ;;
esac

config=${MLFLOW_AUTH_CONFIG_PATH:-${TMPDIR:-/tmp}/mlflow-auth/basic_auth.ini}
umask 077
mkdir -p "$(dirname "$config")"
# configparser interpolates '%': a percent-encoded password in the URI must be written as '%%'.
db_uri=$(printf '%s' "$MLFLOW_AUTH_DATABASE_URI" | sed 's/%/%%/g')
cat >"$config" <<EOF
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = ${db_uri}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
grant_default_workspace_access = false
EOF
export MLFLOW_AUTH_CONFIG_PATH="$config"
exec mlflow server --app-name basic-auth "$@"
