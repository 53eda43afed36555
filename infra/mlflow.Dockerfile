# MLflow tracking server + model registry: Postgres backend store, artifacts proxied to S3 (MinIO).
#   docker build -f infra/mlflow.Dockerfile -t asft-mlflow:3.17.2 infra
# Started by infra/docker-compose.yml (service `mlflow`), which supplies the command and the env
# (MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).
FROM python:3.11-slim

ARG MLFLOW_VERSION=3.17.2
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=true

RUN pip install "mlflow==${MLFLOW_VERSION}" "fastapi<0.151" psycopg2-binary boto3 \
 && useradd --create-home --uid 1000 mlflow

USER mlflow
WORKDIR /home/mlflow
EXPOSE 5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
