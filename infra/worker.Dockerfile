# syntax=docker/dockerfile:1
# The asft-recsys worker image: the project at /opt/asft (editable install, so code, params.yaml,
# dvc.yaml and prefect.yaml are where the flow expects them) in a Python 3.11 venv at /opt/venv.
# One Dockerfile, two builds (run from the repository root; the build context is the repo):
#
#   CPU (python:3.11-slim + CPU torch; Prefect process workers, pool asft-cpu):
#     docker build -f infra/worker.Dockerfile -t asft-worker:cpu .
#   GPU (CUDA runtime + CUDA torch; flow-run pods of the Kubernetes pool asft-gpu):
#     docker build -f infra/worker.Dockerfile -t asft-worker:gpu \
#       --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#
# What is left out of the context: infra/worker.Dockerfile.dockerignore (BuildKit reads
# <Dockerfile>.dockerignore). Default command: a process worker on ${PREFECT_WORK_POOL:-asft-cpu};
# Kubernetes jobs replace it with the flow-run command (their `args`).

ARG BASE_IMAGE=python:3.11-slim
ARG UV_VERSION=0.13
FROM ghcr.io/astral-sh/uv:${UV_VERSION} AS uv

FROM ${BASE_IMAGE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ARG PYTHON_VERSION=3.11

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1 \
    ASFT_PROJECT_DIR=/opt/asft \
    DO_NOT_TRACK=true \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    MLFLOW_DISABLE_TELEMETRY=true \
    DVC_NO_ANALYTICS=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

# git: DVC and the flow's lineage (git diff) need it. No system Python is required: on the CUDA
# (Ubuntu) base uv installs a standalone CPython 3.11 under /opt/python; on python:3.11-slim it
# reuses the image's interpreter.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates git \
 && rm -rf /var/lib/apt/lists/* \
 && git config --system --add safe.directory /opt/asft \
 && useradd --create-home --uid 10001 --shell /bin/bash asft
COPY --from=uv /uv /uvx /usr/local/bin/
RUN uv venv --seed --python "${PYTHON_VERSION}" /opt/venv \
 && if [ -d /opt/python ]; then chmod -R a+rX /opt/python; fi

# torch first, from the chosen index (CPU or CUDA build): the project's `torch==2.13.0` is then
# already satisfied (2.13.0+cpu / 2.13.0+cu128) and never replaced by a PyPI wheel.
RUN uv pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
 && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# Dependencies in their own layer (re-run only when pyproject.toml changes): install against
# empty package stubs, then the real tree below.
WORKDIR /opt/asft
COPY pyproject.toml ./
RUN mkdir -p asft flows tasks ops \
 && touch README.md asft/__init__.py flows/__init__.py tasks/__init__.py ops/__init__.py \
 && uv pip install -e . dvc-s3 boto3

COPY --chown=asft:asft . /opt/asft
RUN uv pip install --no-deps --reinstall-package asft-recsys -e . \
 && mkdir -p /opt/asft/runs \
 && chown -R asft:asft /opt/asft \
 && python -c "import asft, prefect, mlflow, dvc, accelerate; print('asft image ok')"

USER asft
CMD ["sh", "-c", "exec prefect worker start --pool \"${PREFECT_WORK_POOL:-asft-cpu}\" --type process"]
