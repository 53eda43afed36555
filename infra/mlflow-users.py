"""Create (or re-key) the MLflow account the pipeline uses, as the MLflow admin. Idempotent.

Run by the one-shot compose service `mlflow-init` after the MLflow server is healthy, with
  MLFLOW_TRACKING_URI                                    the server
  MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD     the admin account (sent as HTTP basic auth)
  ASFT_MLFLOW_USERNAME, ASFT_MLFLOW_PASSWORD             the pipeline account to create
A missing account is created (not an admin); an existing one gets the password from the
environment, so rotating it is: edit infra/.env, `docker compose ... up -d` (this re-runs).
The pipeline account owns (MANAGE) the experiments and registered models it creates; other
resources it may only read (the server's default_permission).
"""

from __future__ import annotations

import os
import sys

from mlflow.exceptions import MlflowException
from mlflow.server import get_app_client


def main() -> int:
    uri = os.environ["MLFLOW_TRACKING_URI"]
    user, password = os.environ["ASFT_MLFLOW_USERNAME"], os.environ["ASFT_MLFLOW_PASSWORD"]
    if user == os.environ.get("MLFLOW_TRACKING_USERNAME"):
        print("mlflow-init: the pipeline account must not be the admin account", file=sys.stderr)
        return 2
    client = get_app_client("basic-auth", tracking_uri=uri)
    try:
        client.get_user(user)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_user(user, password)
        print(f"mlflow-init: created user {user}")
    else:
        client.update_user_password(user, password)
        client.update_user_admin(user, False)
        print(f"mlflow-init: user {user} exists; password set from the environment")
    return 0


if __name__ == "__main__":
    sys.exit(main())
