# syntax=docker/dockerfile:1
# MLflow tracking server + model registry with basic authentication: Postgres backend store (and
# auth store), artifacts proxied to S3 (MinIO).
#   docker build -f infra/mlflow.Dockerfile -t asft-mlflow:3.17.2 infra
# Started by infra/docker-compose.yml (services `mlflow` and `mlflow-init`), which supplies the
# command and the environment; no credential is in the image (infra/mlflow-entrypoint.sh writes
# the auth app's config from the environment at every start). The build context is infra/ with
# everything but the two scripts excluded (mlflow.Dockerfile.dockerignore), so infra/.env never
# reaches the builder.
FROM python:3.11-slim

ARG MLFLOW_VERSION=3.17.2
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=true

# mlflow[auth]: the basic-auth app needs Flask-WTF (CSRF protection of its user-creation form).
RUN pip install "mlflow[auth]==${MLFLOW_VERSION}" "fastapi<0.151" psycopg2-binary boto3 \
 && python -c "import flask_wtf" \
 && useradd --create-home --uid 1000 mlflow

COPY --chmod=0755 mlflow-entrypoint.sh /opt/mlflow/mlflow-entrypoint.sh
COPY --chmod=0644 mlflow-users.py /opt/mlflow/mlflow-users.py

USER mlflow
WORKDIR /home/mlflow
EXPOSE 5000
ENTRYPOINT ["/opt/mlflow/mlflow-entrypoint.sh"]
CMD ["--host", "0.0.0.0", "--port", "5000"]
