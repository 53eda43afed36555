"""Production path end to end: a real Prefect server and a real MLflow tracking server as processes on
loopback, the scheduled deployment from prefect.yaml, a process worker running the flow, the
champion/challenger registry, ``mlflow models serve`` of the champion, ``asft compare`` and
``asft audit`` reproducing a run exactly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
EXPERIMENT = "prod-test"
pytestmark = pytest.mark.slow


BIND_ERRORS = ("address already in use", "is already in use", "errno 98")  # uvicorn/gunicorn, prefect's check
SERVE_ATTEMPTS = 5


class ServerExited(RuntimeError):
    """The server process ended before it answered its health check."""

    def __init__(self, url: str, returncode: int, log_tail: str):
        super().__init__(f"{url}: process exited ({returncode}):\n{log_tail}")
        self.log_tail = log_tail


def _free_port() -> int:
    """A port free now; another process may take it before ours binds it (see :func:`_serve`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lost_port_race(err: ServerExited) -> bool:
    return any(m in err.log_tail.lower() for m in BIND_ERRORS)


def _wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise ServerExited(url, proc.returncode, log.read_text()[-3000:])
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} not up after {timeout}s:\n{log.read_text()[-3000:]}")


def _start(cmd: list[str], env: dict, log: Path, cwd: Path = REPO) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(20)


def _serve(cmd: Callable[[int], list[str]], health: str, env: dict, log: Path, timeout: float,
           cwd: Path = REPO) -> tuple[subprocess.Popen, int]:
    """Start a server on a free loopback port and wait until ``health`` answers 200. The port is free
    when picked but may be taken before the server binds it: a server that exits on a bind error is
    started again on a new port (at most :data:`SERVE_ATTEMPTS` times); any other failure is raised."""
    for _ in range(SERVE_ATTEMPTS):
        port = _free_port()
        proc = _start(cmd(port), env, log, cwd)
        try:
            _wait_http(f"http://127.0.0.1:{port}{health}", timeout, proc, log)
            return proc, port
        except ServerExited as e:
            if not _lost_port_race(e):
                raise
        except BaseException:
            _stop(proc)
            raise
    raise RuntimeError(f"{cmd(0)[:3]}: lost the race for a free port {SERVE_ATTEMPTS} times:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """A Prefect server and an MLflow tracking server on loopback, and the environment pointing at them.
    The flow's run and work directories and the DVC cache go under the test's temp dir (the worker
    runs the flow in the repository), never into the repository."""
    tmp = tmp_path_factory.mktemp("prod")
    base = {**os.environ, "PREFECT_HOME": str(tmp / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false", "ASFT_RUNS_DIR": str(tmp / "runs"),
            "ASFT_DVC_CACHE_DIR": str(tmp / "dvc-cache"),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # as with the venv activated (uvicorn)
    for var in ("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        base.pop(var, None)
    procs = []
    try:
        prefect, prefect_port = _serve(
            lambda port: [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            "/api/health", base, tmp / "prefect.log", 180)
        procs.append(prefect)
        mlflow, mlflow_port = _serve(
            lambda port: [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers",
                          "1", "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--artifacts-destination",
                          str(tmp / "artifacts")],
            "/health", base, tmp / "mlflow.log", 120)
        procs.append(mlflow)
        env = {**base, "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
               "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}"}
        yield {"env": env, "tmp": tmp, "mlflow": env["MLFLOW_TRACKING_URI"], "prefect": env["PREFECT_API_URL"]}
    finally:
        for p in procs:
            _stop(p)


def _run_deployment(servers, pool: str, output: Path, extra: list[str], tiny: list[str]) -> dict:
    """Trigger the deployment now, run it on a process worker (--run-once), return the flow run."""
    env = servers["env"]
    overrides = [*tiny, f"tracking.mlflow_uri={servers['mlflow']}", f"tracking.experiment={EXPERIMENT}", *extra]
    params = json.dumps({"data": "simulator", "output": str(output), "overrides": overrides})
    code = (
        "import json,sys\n"
        "from prefect.deployments import run_deployment\n"
        "fr = run_deployment('retrain/retrain-weekly', parameters=json.loads(sys.argv[1]), timeout=0)\n"
        "print(fr.id)\n")
    fr_id = subprocess.run([sys.executable, "-c", code, params], env=env, cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.strip().splitlines()[-1]
    log = servers["tmp"] / f"worker-{output.name}.log"
    worker = subprocess.run([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process",
                             "--run-once", "--limit", "1"], env=env, cwd=REPO, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, timeout=600, check=False)
    code = (
        "import sys, asyncio\n"
        "from prefect.client.orchestration import get_client\n"
        "async def main():\n"
        "    async with get_client() as c:\n"
        "        fr = await c.read_flow_run(sys.argv[1])\n"
        "        print(fr.state.type.value, fr.deployment_id)\n"
        "asyncio.run(main())\n")
    for _ in range(60):
        state, dep = subprocess.run([sys.executable, "-c", code, fr_id], env=env, capture_output=True, text=True,
                                    check=True).stdout.split()
        if state not in ("PENDING", "RUNNING", "SCHEDULED"):
            break
        time.sleep(2)
    assert state == "COMPLETED", f"flow run {fr_id}: {state} (worker exit {worker.returncode})\n" \
                                 f"{log.read_text()[-4000:]}"
    return {"id": fr_id, "deployment_id": dep, "metrics": json.loads((output / "metrics.json").read_text())}


def _check_mlflow3_records(client: MlflowClient, parent, champ, reward_champ, metrics: dict) -> None:
    """What MLflow 3 users look for: LoggedModels behind the versions, the experiment's kind, source
    tags, system metrics, datasets with their DVC md5, and a table of recommendations."""
    from mlflow.entities import LoggedModelStatus

    pid = parent.info.run_id
    for version, name in ((champ, "recommender"), (reward_champ, "reward_model")):
        assert version.source.startswith("models:/m-"), version.source
        model = client.get_logged_model(version.source.removeprefix("models:/"))
        assert (model.name, model.source_run_id, model.status) == (name, pid, LoggedModelStatus.READY)
        assert {"name": version.name, "version": int(version.version)} in json.loads(model.tags["mlflow.modelVersions"])
    assert {o.model_id for o in parent.outputs.model_outputs} == {champ.source[len("models:/"):],
                                                                   reward_champ.source[len("models:/"):]}
    rec_model = client.get_logged_model(champ.source.removeprefix("models:/"))
    linked = {m.key: m for m in rec_model.metrics}
    assert linked["posttrain/asft/valid/ndcg_at_10"].value == pytest.approx(
        metrics["posttrain"]["asft"]["valid"]["ndcg@10"], abs=1e-12)
    assert linked["posttrain/asft/valid/ndcg_at_10"].dataset_digest == metrics["datasets"]["processed"]
    assert client.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    tags = parent.data.tags
    assert tags["mlflow.source.git.commit"] == tags["git_commit"] and tags["mlflow.source.type"] == "JOB"
    assert tags["mlflow.source.name"] == "flows/retrain.py:retrain" and tags["mlflow.user"]
    assert len(client.get_metric_history(pid, "system/cpu_utilization_percentage")) >= 2
    inputs = {d.dataset.name: d.dataset.digest for d in parent.inputs.dataset_inputs}
    assert inputs == {k: metrics["datasets"][k] for k in ("raw", "processed", "preferences")}
    assert "recommendations_sample.json" in {a.path for a in client.list_artifacts(pid)}


def test_scheduled_deployment_worker_registry_serving_compare_audit(servers, tiny_overrides):
    env = servers["env"]
    tmp = servers["tmp"]
    pool = "asft-test"
    subprocess.run([str(BIN / "prefect"), "work-pool", "create", pool, "--type", "process"], env=env, check=True,
                   capture_output=True)
    subprocess.run([sys.executable, "-m", "asft.cli", "deploy", "--pool", pool], env=env, cwd=REPO, check=True,
                   capture_output=True)
    code = (
        "import asyncio\n"
        "from prefect.client.orchestration import get_client\n"
        "async def main():\n"
        "    async with get_client() as c:\n"
        "        d = await c.read_deployment_by_name('retrain/retrain-weekly')\n"
        "        print(json.dumps([str(d.id), d.work_pool_name, d.schedules[0].schedule.cron,"
        " d.schedules[0].active]))\n"
        "asyncio.run(main())\n")
    dep_id, dep_pool, cron, active = json.loads(subprocess.run(
        [sys.executable, "-c", "import json\n" + code], env=env, capture_output=True, text=True,
        check=True).stdout.strip().splitlines()[-1])
    assert dep_pool == pool and cron == "0 3 * * 1" and active is True  # weekly, from prefect.yaml

    # 1st run through the worker: finished, tracked, registered as champion
    first = _run_deployment(servers, pool, tmp / "run1", [], tiny_overrides)
    assert first["deployment_id"] == dep_id
    m1 = first["metrics"]
    client = MlflowClient(servers["mlflow"])
    parent = client.get_run(m1["mlflow"]["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["kind"] == "retrain"
    assert parent.data.tags["prefect.deployment"] == "retrain-weekly"
    assert abs(parent.data.metrics["posttrain/asft/test/ndcg_at_10"] - m1["posttrain"]["asft"]["test"]["ndcg@10"]) < 1e-12
    assert m1["promotion"]["alias"] == "champion" and m1["promotion"]["reason"].startswith("no current champion")
    rec_name, rew_name = m1["promotion"]["recommender_model"], m1["promotion"]["reward_model"]  # the product's
    champ = client.get_model_version_by_alias(rec_name, "champion")
    reward_champ = client.get_model_version_by_alias(rew_name, "champion")
    assert champ.run_id == parent.info.run_id and champ.tags["method"] == "asft"
    assert reward_champ.run_id == parent.info.run_id
    assert champ.tags["dvc.processed.md5"] == m1["datasets"]["processed"]
    _check_mlflow3_records(client, parent, champ, reward_champ, m1)

    # 2nd run, worse (base trained with a learning rate too small to learn): stays challenger, reason logged
    second = _run_deployment(servers, pool, tmp / "run2", ["train.lr=1e-7"], tiny_overrides)
    m2 = second["metrics"]
    assert m2["lineage"]["code_version"] == m1["lineage"]["code_version"], \
        "the code changed between the two runs (edited during the test?): every stage cache key changed"
    assert m2["promotion"]["alias"] == "challenger", m2["promotion"]
    assert "NDCG@10" in m2["promotion"]["reason"] and "re-evaluated" in m2["promotion"]["reason"]
    assert m2["lineage"]["cache"]["preprocess"]["hit"] and not m2["lineage"]["cache"]["train-base"]["hit"]
    assert client.get_model_version_by_alias(rec_name, "champion").version == champ.version
    chall = client.get_model_version_by_alias(rec_name, "challenger")
    assert chall.run_id == m2["mlflow"]["parent_run_id"] and "NDCG@10" in chall.tags["promotion_reason"]
    p2 = client.get_run(m2["mlflow"]["parent_run_id"])
    assert p2.data.tags["promotion.alias"] == "challenger"

    # serving: `mlflow models serve` of the champion answers a recommendation request
    proc, port = _serve(lambda p: [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{rec_name}@champion",
                                   "--env-manager", "local", "-h", "127.0.0.1", "-p", str(p), "-w", "1"],
                        "/ping", env, tmp / "serve.log", 180, cwd=tmp)
    try:
        vocab = json.loads((tmp / "run1/processed/vocab.json").read_text())["items"]
        body = json.dumps({"dataframe_records": [{"history": vocab[:5], "k": 5},
                                                 {"history": [vocab[7], "not-an-item"], "k": 3},
                                                 {"history": ["not-an-item"], "k": 2}]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body,
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            preds = json.loads(r.read())["predictions"]
        bad = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps(
            {"dataframe_records": [{"history": vocab[:2], "k": -1}]}).encode(), {"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:  # a client error: 400 with the reason
            urllib.request.urlopen(bad, timeout=60)
        assert refused.value.code == 400 and "k must be an integer >= 1" in refused.value.read().decode()
    finally:
        _stop(proc)
    assert len(preds) == 3 and len(preds[0]["items"]) == 5 and len(preds[1]["items"]) == 3
    assert [p["fallback"] for p in preds] == [None, None, "popular"] and len(preds[2]["items"]) == 2  # cold start
    assert not set(preds[0]["items"]) & set(vocab[:5])  # history items are not recommended
    assert set(preds[0]["items"]) <= set(vocab) and preds[1]["unknown_items"] == ["not-an-item"]
    assert preds[0]["scores"] == sorted(preds[0]["scores"], reverse=True)

    # comparison: both runs, every method, filtered by dataset version; table and plot saved
    out = tmp / "compare"
    res = subprocess.run([sys.executable, "-m", "asft.cli", "compare", "--tracking-uri", servers["mlflow"],
                          "--experiment", EXPERIMENT, "--dataset-version", m1["datasets"]["processed"][:10],
                          "--since", "2000-01-01", "--output", str(out)], env=env, cwd=REPO, capture_output=True,
                         text=True, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    table = pd.read_csv(out / "compare.csv")
    assert set(table["run_id"]) == {m1["mlflow"]["parent_run_id"], m2["mlflow"]["parent_run_id"]}
    assert set(table["method"]) == {"base", "asft", "sft", "dpo", "grpo"}
    assert (out / "compare.png").stat().st_size > 10_000
    res = subprocess.run([sys.executable, "-m", "asft.cli", "compare", "--tracking-uri", servers["mlflow"],
                          "--experiment", EXPERIMENT, "--since", "2999-01-01", "--output", str(out)], env=env,
                         cwd=REPO, capture_output=True, text=True, check=False)
    assert res.returncode == 1 and "no finished retrain runs" in res.stderr

    # audit of the first run: lineage checks pass and the re-run reproduces every metric exactly
    res = subprocess.run([sys.executable, "-m", "asft.cli", "audit", m1["mlflow"]["parent_run_id"],
                          "--tracking-uri", servers["mlflow"], "--output", str(tmp / "audit")], env=env, cwd=REPO,
                         capture_output=True, text=True, check=False)
    report = json.loads((tmp / "audit/audit.json").read_text())
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:], report)
    assert report["lineage_ok"] and report["reproduced"]
    assert report["checks"]["datasets"]["ok"] and report["checks"]["git"]["present"]
    assert report["rerun"]["numeric"] > 200 and report["rerun"]["mismatched"] == []
    audit_run = client.get_run(report["rerun"]["audit_run_id"])
    assert audit_run.data.tags["kind"] == "audit" and audit_run.data.tags["audit_of"] == m1["mlflow"]["parent_run_id"]
    assert client.get_model_version_by_alias(rec_name, "champion").version == champ.version  # untouched
