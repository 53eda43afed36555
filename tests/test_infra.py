"""The production files under infra/ parse and agree with each other (no Docker, no cluster, no network)."""

from __future__ import annotations

import configparser
import json
import re
import stat
import subprocess
from pathlib import Path

import yaml

INFRA = Path(__file__).resolve().parents[1] / "infra"


def _compose() -> dict:
    return yaml.safe_load((INFRA / "docker-compose.yml").read_text())


def test_compose_services_and_stores():
    services = _compose()["services"]
    assert {"postgres", "minio", "minio-init", "mlflow", "mlflow-init", "prefect-server", "cpu-worker"} <= set(services)
    cmd = services["mlflow"]["command"]
    assert "--backend-store-uri" not in cmd  # the URL holds the password: environment, not argv
    mlflow_env = services["mlflow"]["environment"]
    assert mlflow_env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
    assert mlflow_env["MLFLOW_BACKEND_STORE_URI"].endswith("/mlflow")
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
    assert {"create database mlflow;", "create database mlflow_auth;", "create database prefect;"} <= set(
        init_sql.splitlines())


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


# ------------------------------------------------------------------------------------------------
# Security: authentication on every server, credentials only from the environment / Secrets
# ------------------------------------------------------------------------------------------------

# Names of variables that hold a credential (or a user name of one).
CRED = re.compile(r"PASSWORD|SECRET|AUTH_STRING|TOKEN|ACCESS_KEY|_USER$|_USERNAME$|ROOT_USER")
SECRET = re.compile(r"PASSWORD|SECRET|AUTH_STRING|TOKEN")  # the secret halves
REF = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(:?[-?+]?)([^}]*)\}")  # not $${..} (container shell)
NOT_CREDENTIALS = {"MLFLOW_AUTH_DEFAULT_PERMISSION", "MLFLOW_AUTH_CONFIG_PATH"}


def _compose_text() -> str:
    """docker-compose.yml without its comment lines (what compose interpolates)."""
    lines = (INFRA / "docker-compose.yml").read_text().splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith("#"))


def _env_of(svc: dict) -> dict:
    env = svc.get("environment") or {}
    assert isinstance(env, dict), "environment must be a mapping (the checks read it)"
    return env


def test_compose_credentials_are_required_variables_without_defaults():
    text = _compose_text()
    refs = REF.findall(text)
    assert refs
    for name, op, _msg in refs:
        if CRED.search(name):
            assert op == ":?", f"${{{name}}} must be ${{{name}:?...}} (required, no default), got '{op}'"
    for name, svc in _compose()["services"].items():
        for key, value in _env_of(svc).items():
            credential = (CRED.search(key) or re.search(r"AUTH|CONNECTION_URL|STORE_URI|DATABASE_URI", key)) \
                and key not in NOT_CREDENTIALS
            if not credential:
                continue
            value = str(value)
            assert REF.search(value), f"{name}.{key} is a literal: {value!r}"
            for var, op, _ in REF.findall(value):
                assert op == ":?" and CRED.search(var), f"{name}.{key}: ${{{var}{op}...}}"
            rest = REF.sub("", value)
            if "://" in value:  # a database URL: user and password both come from variables
                userinfo = rest.split("://", 1)[1].split("@", 1)[0]
                assert userinfo == ":", f"{name}.{key}: literal credentials in {value!r}"
            else:
                assert rest == "", f"{name}.{key}: literal text around the variable: {value!r}"
    # no user:password@ literal anywhere, and no credentials in command lines (visible in `ps`)
    for m in re.finditer(r"://([^\s/@:]*):([^\s/@]*)@", text):
        assert REF.fullmatch(m.group(1)) and REF.fullmatch(m.group(2)), m.group(0)
    for name, svc in _compose()["services"].items():
        cmd = " ".join(svc.get("command") or []) if isinstance(svc.get("command"), list) else svc.get("command") or ""
        assert not re.search(r"://[^\s/]*:[^\s/]*@", cmd), f"{name}: credentials in the command line"
        for var, _, _ in REF.findall(cmd):
            assert not CRED.search(var), f"{name}: ${{{var}}} in the command line"


def test_compose_every_server_requires_authentication():
    services = _compose()["services"]
    mlflow = services["mlflow"]
    assert mlflow["command"][:2] == ["--app-name", "basic-auth"]
    env = _env_of(mlflow)
    for key in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert REF.fullmatch(env[key]), key
    assert env["MLFLOW_AUTH_DATABASE_URI"].startswith("postgresql+psycopg2://")
    assert env["MLFLOW_AUTH_DATABASE_URI"].endswith("/mlflow_auth")
    dockerfile = (INFRA / "mlflow.Dockerfile").read_text()
    assert '"mlflow[auth]==${MLFLOW_VERSION}"' in dockerfile  # Flask-WTF: the auth app will not start without
    assert 'ENTRYPOINT ["/opt/mlflow/mlflow-entrypoint.sh"]' in dockerfile
    assert 'exec mlflow server --app-name basic-auth "$@"' in (INFRA / "mlflow-entrypoint.sh").read_text()

    prefect_env = _env_of(services["prefect-server"])
    auth = prefect_env["PREFECT_SERVER_API_AUTH_STRING"]
    assert REF.fullmatch(auth) and REF.fullmatch(auth).group(2) == ":?"
    # every client of the servers sends credentials: Prefect auth string, MLflow account, S3 account
    for name, svc in services.items():
        env = _env_of(svc)
        if "PREFECT_API_URL" in env or name == "prefect-server":
            assert env.get("PREFECT_API_AUTH_STRING") == auth, name
        if "MLFLOW_TRACKING_URI" in env:
            assert REF.fullmatch(env.get("MLFLOW_TRACKING_USERNAME", "")), name
            assert REF.fullmatch(env.get("MLFLOW_TRACKING_PASSWORD", "")), name
        if "MLFLOW_S3_ENDPOINT_URL" in env:
            assert REF.fullmatch(env.get("AWS_SECRET_ACCESS_KEY", "")), name
    # the pipeline uses its own accounts, never the admin / root ones
    worker = _env_of(services["cpu-worker"])
    assert "MLFLOW_ADMIN" not in worker["MLFLOW_TRACKING_USERNAME"]
    assert "MINIO_ROOT" not in json.dumps(worker)
    assert "asft-pipeline" in services["minio-init"]["command"][0]
    assert "readwrite --user" not in services["minio-init"]["command"][0].replace("detach local readwrite", "")
    # unauthenticated surfaces are published on loopback only
    assert services["postgres"]["ports"][0].startswith("127.0.0.1:")
    assert services["serve"]["ports"][0].startswith("${SERVE_BIND:-127.0.0.1}:")


def test_env_example_lists_every_required_variable_with_empty_secrets():
    required = {n for n, op, _ in REF.findall(_compose_text()) if op == ":?"}
    example = {}
    for line in (INFRA / ".env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            k, v = line.split("=", 1)
            example[k] = v
    assert required <= set(example), required - set(example)
    for k, v in example.items():
        if SECRET.search(k):
            assert v == "", f".env.example must not carry a value for the secret {k}"


def test_make_env_generates_every_secret(tmp_path):
    out = tmp_path / "gen.env"
    subprocess.run(["bash", str(INFRA / "make-env.sh"), str(out)], check=True, capture_output=True)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    values = dict(line.split("=", 1) for line in out.read_text().splitlines() if line and not line.startswith("#"))
    required = {n for n, op, _ in REF.findall(_compose_text()) if op == ":?"}
    for name in required:
        assert values.get(name), f"{name} empty in the generated env file"
    for name, value in values.items():
        if SECRET.search(name):
            assert re.fullmatch(r"(asft:)?[0-9a-f]{48}", value), (name, value)
    assert values["PREFECT_API_AUTH_STRING"].startswith("asft:")
    again = subprocess.run(["bash", str(INFRA / "make-env.sh"), str(out)], capture_output=True, text=True, check=False)
    assert again.returncode != 0 and "not overwriting" in again.stderr


def test_mlflow_entrypoint_writes_auth_config_from_env(tmp_path):
    """The entrypoint (with a stub `mlflow`) writes basic_auth.ini (mode 600, '%' escaped for
    configparser) and execs `mlflow server --app-name basic-auth ARGS`; it refuses a missing secret."""
    import configparser

    stub = tmp_path / "bin" / "mlflow"
    stub.parent.mkdir()
    stub.write_text('#!/bin/sh\necho "ARGS: $*"\necho "CONFIG: $MLFLOW_AUTH_CONFIG_PATH"\n')
    stub.chmod(0o755)
    env = {"PATH": f"{stub.parent}:/usr/bin:/bin", "TMPDIR": str(tmp_path),
           "MLFLOW_AUTH_DATABASE_URI": "sqlite:////tmp/x%25y.db", "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
           "MLFLOW_AUTH_ADMIN_PASSWORD": "not-in-the-file-123", "MLFLOW_FLASK_SERVER_SECRET_KEY": "k" * 24}
    r = subprocess.run(["sh", str(INFRA / "mlflow-entrypoint.sh"), "--host", "0.0.0.0"], env=env,
                       capture_output=True, text=True, check=True)
    assert "ARGS: server --app-name basic-auth --host 0.0.0.0" in r.stdout
    ini = Path(r.stdout.split("CONFIG: ")[1].strip())
    assert stat.S_IMODE(ini.stat().st_mode) == 0o600
    assert "not-in-the-file-123" not in ini.read_text()  # the admin password stays in the environment
    cp = configparser.ConfigParser()
    cp.read(ini)
    assert cp["mlflow"]["database_uri"] == "sqlite:////tmp/x%25y.db"
    assert cp["mlflow"]["default_permission"] == "READ"
    assert cp["mlflow"]["authorization_function"] == "mlflow.server.auth:authenticate_request_basic_auth"
    for missing in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_AUTH_DATABASE_URI"):
        r = subprocess.run(["sh", str(INFRA / "mlflow-entrypoint.sh")], capture_output=True, text=True, check=False,
                           env={k: v for k, v in env.items() if k != missing})
        assert r.returncode != 0 and missing in r.stderr and "ARGS" not in r.stdout


def _k8s_credential_entries(env_list: list[dict]) -> list[dict]:
    return [e for e in env_list if CRED.search(e["name"])]


def test_k8s_credentials_come_from_secret_key_refs():
    template = json.loads((INFRA / "k8s" / "gpu-work-pool.json").read_text())
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    creds = _k8s_credential_entries(container["env"])
    assert {e["name"] for e in creds} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_USERNAME",
                                          "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING"}
    for e in creds:
        assert set(e) == {"name", "valueFrom"}, e
        assert e["valueFrom"]["secretKeyRef"] == {"name": "{{ credentials_secret }}", "key": e["name"]}
    props = template["variables"]["properties"]
    # no literal credential anywhere in the template's defaults
    for key, value in props["env"]["default"].items():
        assert not CRED.search(key) or value is None, key
    multinode = list(yaml.safe_load_all((INFRA / "k8s" / "multinode-train-base.yaml").read_text()))[1]
    mcontainer = multinode["spec"]["template"]["spec"]["containers"][0]
    mcreds = _k8s_credential_entries(mcontainer["env"])
    assert {e["name"] for e in mcreds} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    for e in mcreds:
        assert "value" not in e and e["valueFrom"]["secretKeyRef"]["key"] == e["name"]
    assert "secretRef" not in json.dumps(mcontainer.get("envFrom", []))  # settings only, via the ConfigMap


def test_k8s_worker_does_not_copy_its_auth_string_into_the_job():
    """A Kubernetes worker passes its own Prefect settings to the Job as literal env values; the
    template's null PREFECT_API_AUTH_STRING drops that copy, so the pod reads it from the Secret."""
    from uuid import uuid4

    from prefect.client.schemas.objects import FlowRun
    from prefect.settings import PREFECT_API_AUTH_STRING, temporary_settings
    from prefect.utilities.templating import apply_values
    from prefect.workers.base import BaseJobConfiguration

    template = json.loads((INFRA / "k8s" / "gpu-work-pool.json").read_text())
    props = template["variables"]["properties"]
    rendered = apply_values(template["job_configuration"], BaseJobConfiguration._get_base_config_defaults(props))
    config = BaseJobConfiguration(env=rendered["env"])
    with temporary_settings({PREFECT_API_AUTH_STRING: "worker:" + "s3cr3t" * 4}):
        config.prepare_for_flow_run(FlowRun(flow_id=uuid4()))
    assert "PREFECT_API_AUTH_STRING" not in config.env
    assert "s3cr3t" not in json.dumps(config.env)
    container = rendered["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "PREFECT_API_AUTH_STRING", "valueFrom": {"secretKeyRef": {
        "name": "asft-credentials", "key": "PREFECT_API_AUTH_STRING"}}} in container["env"]


def test_secrets_never_reach_git_or_build_contexts():
    repo = INFRA.parent
    for path in ("infra/.env", ".env", "infra/k8s/.env"):
        ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=repo, check=False)
        assert ignored.returncode == 0, path
    template = subprocess.run(["git", "check-ignore", "-q", "--no-index", "infra/.env.example"], cwd=repo, check=False)
    assert template.returncode == 1
    worker_ignore = (INFRA / "worker.Dockerfile.dockerignore").read_text().split()
    assert {"infra/.env", "**/.env", ".dvc/config.local"} <= set(worker_ignore)
    mlflow_ignore = [line for line in (INFRA / "mlflow.Dockerfile.dockerignore").read_text().splitlines()
                     if line and not line.startswith("#")]
    assert mlflow_ignore[0] == "*" and all(line.startswith("!") for line in mlflow_ignore[1:])
    readme = (INFRA / "README.md").read_text()
    security = readme[readme.index("## Security"):]
    for needle in ("basic-auth", "PREFECT_SERVER_API_AUTH_STRING", "secretKeyRef", "Rotating", "TLS",
                   "openssl rand -hex 24"):
        assert needle in security, needle
