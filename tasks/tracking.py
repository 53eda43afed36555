"""MLflow tracking for the orchestration layer (the core library never imports mlflow).

Runs are created through ``MlflowClient`` with explicit run ids, never the thread-local fluent
"active run", so stages behave the same whichever thread or worker Prefect runs them on.
One parent run per retrain; one nested run per stage (tag ``mlflow.parentRunId``).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from asft.config import Config

LINEAGE_TAG_PREFIXES = ("git_", "dvc.")


def mlflow_key(key: str) -> str:
    """MLflow names allow only alphanumerics, ``_ - . : /`` and spaces: ndcg@10 -> ndcg_at_10,
    asft@lam=0.5 -> asft_at_lam_0.5."""
    return re.sub(r"[^\w\-. :/]", "_", key.replace("@", "_at_"))


def resolve_tracking_uri(cfg: Config) -> str:
    uri = cfg.tracking.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = f"sqlite:///{Path('mlflow.db').resolve()}"
    return uri


def default_artifact_root(cfg: Config, uri: str) -> str | None:
    if cfg.tracking.artifact_root:
        return cfg.tracking.artifact_root
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


def store_lock(uri: str, what: str = "store"):
    """A cross-process lock for a local SQLite store (``<db>.<what>.lock``); a no-op for servers, which
    serialise writes themselves.

    Two ``retrain`` runs on one SQLite file race where MLflow itself does not guard: creating the
    schema of a new store (both run the migrations: "table ... already exists") and the
    read-decide-write of the promotion gate (both would compare against the same champion).
    """
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    from filelock import FileLock

    db = Path(uri[len("sqlite:///"):].split("?", 1)[0])
    db.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(f"{db}.{what}.lock", timeout=600)


def setup_experiment(cfg: Config) -> tuple[str, str]:
    """Point MLflow at the configured store; create the experiment if needed. -> (uri, experiment_id)."""
    uri = resolve_tracking_uri(cfg)
    with store_lock(uri, "init"):  # the first client of a new SQLite store creates its schema
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        if exp is None:
            exp_id = client.create_experiment(cfg.tracking.experiment,
                                              artifact_location=default_artifact_root(cfg, uri))
        else:
            exp_id = exp.experiment_id
    return uri, exp_id


def git_info(cwd: str | Path = ".") -> dict[str, str]:
    def run(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10,
                                  check=False).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = run("rev-parse", "HEAD")
    dirty = bool(run("status", "--porcelain")) if commit else False  # untracked (not ignored) files count
    return {"git_commit": commit or "unknown", "git_dirty": str(dirty).lower()}


class TrackedRun:
    """A thin handle on one MLflow run with explicit ids."""

    FLUSH_EVERY_S = 10.0

    def __init__(self, client: MlflowClient, run_id: str):
        self.client, self.run_id = client, run_id
        self._pending: list[Metric] = []
        self._flushed_at = time.monotonic()

    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    @staticmethod
    def _metrics(metrics: dict[str, float], step: int | None, prefix: str = "") -> list[Metric]:
        ts = int(time.time() * 1000)
        return [Metric(mlflow_key(prefix + k), float(v), ts, step or 0) for k, v in metrics.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, prefix: str = "") -> None:
        items = self._metrics(metrics, step, prefix)
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def log_nested_metrics(self, nested: dict[str, dict], step: int | None = None) -> None:
        for split, vals in nested.items():
            if isinstance(vals, dict):
                self.log_metrics(vals, step, prefix=f"{split}/")

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(mlflow_key(k), str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(self.run_id, str(p), artifact_path)
        elif p.is_file():
            self.client.log_artifact(self.run_id, str(p), artifact_path)

    def on_log(self, metrics: dict[str, float], step: int) -> None:
        """Trainer callback: metrics with steps, buffered so training does not wait on the tracking
        store at every step (sent every ``FLUSH_EVERY_S`` seconds and when the stage ends)."""
        self._pending += self._metrics(metrics, step)
        if time.monotonic() - self._flushed_at > self.FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        items, self._pending = self._pending, []
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])
        self._flushed_at = time.monotonic()


def start_parent(cfg: Config, run_name: str, tags: dict[str, Any]) -> TrackedRun:
    uri, exp_id = setup_experiment(cfg)
    client = MlflowClient(uri)
    close_dead_runs(client, exp_id)
    run = client.create_run(exp_id, run_name=run_name, tags={"kind": "retrain", **git_info(), **tags,
                                                             "host": socket.gethostname(), "pid": str(os.getpid())})
    return TrackedRun(client, run.info.run_id)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def close_dead_runs(client: MlflowClient, exp_id: str) -> list[str]:
    """Retrain runs left RUNNING by a process on this host that no longer exists (``kill -9``, OOM,
    power loss) are marked KILLED, with their stage runs, so the store shows what happened. Returns
    their ids. Runs of live processes and of other hosts are left alone."""
    host = socket.gethostname().replace("'", "")
    dead = []
    for r in client.search_runs([exp_id], f"attributes.status = 'RUNNING' and tags.host = '{host}'",
                                max_results=200):
        pid = r.data.tags.get("pid", "")
        if not pid.isdigit() or _alive(int(pid)) or r.data.tags.get("mlflow.parentRunId"):
            continue
        children = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{r.info.run_id}' and "
                                                "attributes.status = 'RUNNING'", max_results=500)
        for c in [*children, r]:
            client.set_tag(c.info.run_id, "terminated_reason", f"process {pid} on {host} died while running")
            client.set_terminated(c.info.run_id, "KILLED")
        dead.append(r.info.run_id)
    return dead


@contextlib.contextmanager
def stage_run(tracking_uri: str, parent_run_id: str, stage: str, tags: dict | None = None) -> Iterator[TrackedRun]:
    """A nested MLflow run for one stage; FAILED if the stage raises."""
    client = MlflowClient(tracking_uri)
    parent = client.get_run(parent_run_id)
    # Lineage on every run: the git commit and the DVC hashes of the datasets produced so far.
    lineage = {k: v for k, v in parent.data.tags.items() if k.startswith(LINEAGE_TAG_PREFIXES)}
    run = client.create_run(parent.info.experiment_id, run_name=stage,
                            tags={**lineage, "mlflow.parentRunId": parent_run_id, "stage": stage, **(tags or {})})
    tr = TrackedRun(client, run.info.run_id)
    try:
        yield tr
    except BaseException as e:
        tr.flush()
        tr.set_tags({"error": f"{type(e).__name__}: {e}"[:5000]})
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    tr.flush()
    client.set_terminated(run.info.run_id, "FINISHED")


def record_cached_stage(tracking_uri: str, parent_run_id: str, stage: str, source_run_id: str | None,
                        tags: dict | None = None) -> str:
    """A nested run for a stage whose result came from the cache (or the champion): tagged
    ``cache_hit`` and ``source_run_id``, with the source run's final metrics, so every retrain has
    the same set of stage runs to compare. Returns the new run id."""
    client = MlflowClient(tracking_uri)
    with stage_run(tracking_uri, parent_run_id, stage,
                   tags={"cache_hit": "true", "source_run_id": source_run_id or "", **(tags or {})}) as run:
        if source_run_id:
            try:
                src = client.get_run(source_run_id).data
            except mlflow.exceptions.MlflowException:  # source run deleted: the outputs were verified anyway
                src = None
            if src is not None:
                run.log_metrics(src.metrics)
                run.log_params(src.params)
                run.set_tags({k: v for k, v in src.tags.items() if k in ("method", "model_dir", "fold")})
    return run.run_id
