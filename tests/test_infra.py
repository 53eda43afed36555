"""The production files under infra/ parse and agree with each other (no Docker, no cluster, no network)."""

from __future__ import annotations

import configparser
import json
import re
from pathlib import Path

import yaml

INFRA = Path(__file__).resolve().parents[1] / "infra"


def _compose() -> dict:
    return yaml.safe_load((INFRA / "docker-compose.yml").read_text())


def test_compose_services_and_stores():
    services = _compose()["services"]
    assert {"postgres", "minio", "minio-init", "mlflow", "prefect-server", "cpu-worker"} <= set(services)
    cmd = services["mlflow"]["command"]
    assert cmd[cmd.index("--backend-store-uri") + 1].startswith("postgresql+psycopg2://")
    assert cmd[cmd.index("--artifacts-destination") + 1].startswith("s3://")
    assert "--serve-artifacts" in cmd
    db_url = services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert db_url.startswith("postgresql+asyncpg://") and db_url.endswith("/prefect")
    for name, svc in services.items():  # every depends_on names a service that can satisfy its condition
        for dep, spec in (svc.get("depends_on") or {}).items():
            assert dep in services, (name, dep)
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], (name, dep)
    init_sql = (INFRA / "postgres" / "init.sql").read_text().lower()
    assert "create database mlflow" in init_sql and "create database prefect" in init_sql


def test_gpu_work_pool_template():
    template = json.loads((INFRA / "k8s" / "gpu-work-pool.json").read_text())
    config, props = template["job_configuration"], template["variables"]["properties"]
    container = config["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["name"] == "prefect-job"  # the Kubernetes worker requires this name
    assert container["image"] == "{{ image }}" and container["args"] == "{{ command }}"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    used = set(re.findall(r"{{\s*([\w.\-\[\]$]+)\s*}}", json.dumps(config)))
    assert used <= set(props), used - set(props)
    assert {"image", "gpu_count", "namespace", "env", "command", "cluster_config"} <= used
    assert props["gpu_count"]["type"] == "integer" and props["gpu_count"]["default"] == 1

    from prefect.server.schemas.actions import validate_base_job_template
    from prefect.utilities.templating import apply_values
    from prefect.workers.base import BaseJobConfiguration

    validate_base_job_template(template)  # what `prefect work-pool create --base-job-template` runs
    values = {**BaseJobConfiguration._get_base_config_defaults(props), "gpu_count": 2}
    rendered = apply_values(config, values)["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert rendered["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert rendered["image"] == props["image"]["default"]


def test_worker_dockerfile_build_args():
    lines = (INFRA / "worker.Dockerfile").read_text().splitlines()
    assert "ARG BASE_IMAGE=python:3.11-slim" in lines
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in lines
    assert "FROM ${BASE_IMAGE}" in lines
    ignored = (INFRA / "worker.Dockerfile.dockerignore").read_text().split()
    assert {".venv", "mlruns", "mlflow.db", ".dvc/cache", "data", "models"} <= set(ignored)


def test_dvc_s3_snippet_and_k8s_example():
    cp = configparser.ConfigParser()
    cp.read_string((INFRA / "dvc" / "config.s3").read_text())
    remote = cp["'remote \"s3\"'"]
    assert remote["url"].startswith("s3://") and remote["endpointurl"].startswith("http")
    kinds = [d["kind"] for d in yaml.safe_load_all((INFRA / "k8s" / "multinode-train-base.yaml").read_text())]
    assert kinds == ["Service", "Job"]
