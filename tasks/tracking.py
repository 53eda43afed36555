"""MLflow tracking for the orchestration layer (the core library never imports mlflow).

Runs are created through ``MlflowClient`` with explicit run ids, never the thread-local fluent
"active run", so stages behave the same whichever thread or worker Prefect runs them on.
One parent run per retrain; one nested run per stage (tag ``mlflow.parentRunId``).

What MLflow 3 users expect to find, and where it comes from here:

- the experiment is marked as classic model development (tag ``mlflow.experimentKind``), so UIs that
  read it open on the training runs rather than the GenAI overview; :func:`experiment_url` is the
  link that opens the runs view of MLflow 3.17's UI (whose GenAI/ML switch is a per-browser setting);
- the standard source tags (``mlflow.source.git.commit``, ``.branch``, ``.repoURL``,
  ``mlflow.source.name``, ``mlflow.source.type``, ``mlflow.user``) on every run;
- system metrics (``system/...``: CPU, memory, disk, network, and GPU when NVML is available) on the
  parent run, sampled by MLflow's ``SystemMetricsMonitor`` against the explicit run id;
- datasets as run inputs (:func:`log_dataset`) with the DVC md5 as digest, so the runs table's
  Datasets column and filter work;
- a per-user table of recommendations (:func:`log_recommendation_sample`).
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
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
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag, SourceType
from mlflow.tracking import MlflowClient
from mlflow.utils import mlflow_tags

from asft.config import Config

# Copied from the parent onto every stage run: git and DVC lineage, the standard source tags, the user.
LINEAGE_TAG_PREFIXES = ("git_", "dvc.", "mlflow.source.", mlflow_tags.MLFLOW_USER)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # the UI's "Machine learning" kind (vs "genai_development")
# System metrics: a sample every 2 s, averaged over 3 samples -> one point per 6 s (30 on a 3-minute run).
SYSTEM_METRICS_SAMPLING_S = 2.0
SYSTEM_METRICS_SAMPLES_PER_POINT = 3
DATASET_CONTEXTS = ("raw", "training", "validation", "evaluation", "preferences", "input")
RECOMMENDATION_SAMPLE_FILE = "recommendations_sample.json"


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


def store_lock(uri: str, what: str = "store", timeout: float | None = 600):
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
    return FileLock(f"{db}.{what}.lock", timeout=-1 if timeout is None else timeout)


def setup_experiment(cfg: Config) -> tuple[str, str]:
    """Point MLflow at the configured store; create the experiment if needed. -> (uri, experiment_id)."""
    uri = resolve_tracking_uri(cfg)
    with store_lock(uri, "init"):  # the first client of a new SQLite store creates its schema
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        if exp is None:
            try:
                exp_id = client.create_experiment(cfg.tracking.experiment,
                                                  artifact_location=default_artifact_root(cfg, uri),
                                                  tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
            except mlflow.exceptions.MlflowException as e:  # a concurrent retrain created it first (a server)
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp = client.get_experiment_by_name(cfg.tracking.experiment)
                exp_id = exp.experiment_id
        else:
            exp_id = exp.experiment_id
            if EXPERIMENT_KIND_TAG not in exp.tags:  # an experiment from before; a kind set by a user stays
                client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return uri, exp_id


def experiment_url(tracking_uri: str, experiment_id: str) -> str | None:
    """The runs view of the experiment in a tracking server's UI (None for a local store).

    MLflow 3.17's UI picks GenAI or machine-learning views from a per-browser switch (default GenAI,
    overridable with ``?workflowType=``); this link opens the training runs whatever the browser's
    setting."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def _git(cwd: str | Path, *args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10,
                              check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_info(cwd: str | Path = ".") -> dict[str, str]:
    commit = _git(cwd, "rev-parse", "HEAD")
    dirty = bool(_git(cwd, "status", "--porcelain")) if commit else False  # untracked (not ignored) files count
    return {"git_commit": commit or "unknown", "git_dirty": str(dirty).lower()}


def _public_url(url: str) -> str:
    """A remote URL without credentials (``https://user:token@host/x`` -> ``https://host/x``)."""
    return re.sub(r"^(\w+://)[^/@]+@", r"\1", url)


def source_tags(source_name: str, source_type: str = "LOCAL", cwd: str | Path = ".") -> dict[str, str]:
    """MLflow's standard source tags, as the fluent ``start_run`` would set them: git commit, branch
    and remote (when there is a repository), entry point, source type and user."""
    if source_type not in SourceType.SOURCETYPE_TO_STRING.values():
        raise ValueError(f"source_type must be one of {sorted(SourceType.SOURCETYPE_TO_STRING.values())}, "
                         f"got {source_type!r}")
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = os.environ.get("USER", "unknown")
    tags = {mlflow_tags.MLFLOW_SOURCE_NAME: source_name, mlflow_tags.MLFLOW_SOURCE_TYPE: source_type,
            mlflow_tags.MLFLOW_USER: user}
    commit = _git(cwd, "rev-parse", "HEAD")
    if commit:
        tags[mlflow_tags.MLFLOW_GIT_COMMIT] = commit
        branch = _git(cwd, "rev-parse", "--abbrev-ref", "HEAD")
        if branch and branch != "HEAD":  # "HEAD": detached, no branch
            tags[mlflow_tags.MLFLOW_GIT_BRANCH] = branch
        remote = _git(cwd, "config", "--get", "remote.origin.url")
        if remote:
            tags[mlflow_tags.MLFLOW_GIT_REPO_URL] = _public_url(remote)
    return tags


class TrackedRun:
    """A thin handle on one MLflow run with explicit ids."""

    FLUSH_EVERY_S = 10.0

    def __init__(self, client: MlflowClient, run_id: str):
        self.client, self.run_id = client, run_id
        self._pending: list[Metric] = []
        self._flushed_at = time.monotonic()
        self._monitor = None

    def start_system_metrics(self, sampling_s: float = SYSTEM_METRICS_SAMPLING_S,
                             samples_per_point: int = SYSTEM_METRICS_SAMPLES_PER_POINT) -> None:
        """Log ``system/*`` metrics to this run from a background thread until :meth:`end` (or until
        the run stops being RUNNING). ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` and
        ``MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING`` override the arguments, as in MLflow."""
        if self._monitor is not None:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=sampling_s,
                                             samples_before_logging=samples_per_point,
                                             tracking_uri=self.client.tracking_uri)
        self._monitor.start()

    def stop_system_metrics(self) -> None:
        if self._monitor is not None:
            self._monitor.finish()  # joins the sampling thread and sends what it holds
            self._monitor = None

    def end(self, status: str = "FINISHED") -> None:
        """Flush buffered metrics, stop the system-metrics thread, mark the run ``status``."""
        self.flush()
        self.stop_system_metrics()
        self.client.set_terminated(self.run_id, status)

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


def start_parent(cfg: Config, run_name: str, tags: dict[str, Any], source_name: str = "flows/retrain.py:retrain",
                 system_metrics: bool = True) -> TrackedRun:
    """The parent run: lineage and source tags; system metrics sampled until :meth:`TrackedRun.end`.

    The source type is ``JOB`` when a Prefect deployment runs the flow (tag ``prefect.deployment``),
    ``LOCAL`` otherwise."""
    uri, exp_id = setup_experiment(cfg)
    client = MlflowClient(uri)
    try:
        ensure_crash_detection()
    except Exception as e:  # noqa: BLE001 - never fail a retrain over the automation; runs are still closed
        logging.getLogger(__name__).warning("could not install Prefect crash detection: %s", e)
    close_dead_runs(client, exp_id)
    source = source_tags(source_name, "JOB" if tags.get("prefect.deployment") else "LOCAL")
    run = client.create_run(exp_id, run_name=run_name,
                            tags={"kind": "retrain", **git_info(), **source, **tags, "host": socket.gethostname(),
                                  "pid": str(os.getpid())})
    tracked = TrackedRun(client, run.info.run_id)
    if system_metrics:
        tracked.start_system_metrics()
    return tracked


def dataset_entity(name: str, path: str | Path, md5: str) -> Dataset:
    """An MLflow dataset for a DVC-versioned directory or file: digest = the DVC md5 (what ``dvc
    checkout`` retrieves), source = the local path, profile = its size."""
    p = Path(path).resolve()
    if not p.exists():
        raise FileNotFoundError(f"dataset {name!r}: {p} does not exist")
    if not md5:
        raise ValueError(f"dataset {name!r}: empty DVC md5")
    files = [f for f in p.rglob("*") if f.is_file()] if p.is_dir() else [p]
    profile = {"files": len(files), "bytes": sum(f.stat().st_size for f in files)}
    return Dataset(name=name, digest=md5, source_type="local", source=json.dumps({"uri": str(p)}),
                   profile=json.dumps(profile))


def log_inputs(client: MlflowClient, run_id: str, datasets: list[DatasetInput], attempts: int = 4) -> None:
    """``client.log_inputs`` that survives a race on a shared tracking server: two runs logging the same
    dataset (experiment, name, digest) at the same moment both find it missing and both insert it; MLflow's
    SQL store does not catch the second insert's unique-constraint error. Again, the row is found and reused."""
    for attempt in range(attempts):
        try:
            client.log_inputs(run_id, datasets=datasets)
            return
        except mlflow.exceptions.MlflowException as e:
            text = str(e)
            if attempt == attempts - 1 or not ("IntegrityError" in text or "UNIQUE constraint" in text
                                               or "duplicate key" in text):
                raise
            time.sleep(0.2 * (attempt + 1))


def log_dataset(run: TrackedRun, name: str, path: str | Path, md5: str, context: str) -> Dataset:
    """Log a dataset as an input of ``run`` (the runs table's Datasets column and filter), and record
    its path as tag ``dvc.<name>.path`` (stage runs copy it with the md5: see ``stage_run(inputs=)``)."""
    if context not in DATASET_CONTEXTS:
        raise ValueError(f"dataset context must be one of {DATASET_CONTEXTS}, got {context!r}")
    ds = dataset_entity(name, path, md5)
    log_inputs(run.client, run.run_id, [DatasetInput(ds, tags=[InputTag(mlflow_tags.MLFLOW_DATASET_CONTEXT, context)])])
    run.set_tags({f"dvc.{name}.path": json.loads(ds.source)["uri"]})
    return ds


def log_recommendation_sample(run: TrackedRun, frame, artifact_file: str = RECOMMENDATION_SAMPLE_FILE) -> None:
    """A table of recommendations (one row per user; see ``tasks.samples.recommendation_sample``) as
    an MLflow table artifact, viewable in the run's artifacts."""
    import pandas as pd

    if len(frame) == 0:
        raise ValueError("empty recommendation sample")
    # Text columns as objects: MLflow looks for images among object columns, a lookup pandas 3
    # deprecates for its (default) Arrow string columns.
    text = {c: object for c in frame.columns if isinstance(frame[c].dtype, pd.StringDtype)}
    run.client.log_table(run.run_id, data=frame.astype(text), artifact_file=artifact_file)


PREFECT_FLOW_RUN_TAG = "prefect.flow_run_id"


def close_run_tree(client: MlflowClient, parent_run_id: str, status: str, reason: str) -> list[str]:
    """Mark a retrain's parent run and its stage runs still RUNNING as ``status`` (FAILED or KILLED), each
    tagged ``terminated_reason``; the parent also when it already ended FAILED (a crash or cancellation
    after the flow recorded a failed stage ends KILLED, with the reason). Returns the runs changed."""
    parent = client.get_run(parent_run_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}' and "
                                  "attributes.status = 'RUNNING'", max_results=1000)
    changed = []
    for c in children:
        client.set_tag(c.info.run_id, "terminated_reason", reason[:5000])
        client.set_terminated(c.info.run_id, status)
        changed.append(c.info.run_id)
    if parent.info.status == "RUNNING" or (parent.info.status == "FAILED" and status == "KILLED"):
        client.set_tag(parent_run_id, "terminated_reason", reason[:5000])
        client.set_terminated(parent_run_id, status)
        changed.append(parent_run_id)
    return changed


def _flow_run_states(flow_run_ids: list[str]) -> dict[str, Any]:
    """{flow run id: its current state} for the ids this process's Prefect API knows (a run recorded by
    another Prefect server is absent: nothing can be said about it from here)."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    ids = []
    for i in flow_run_ids:
        try:
            ids.append(UUID(i))
        except ValueError:
            continue
    if not ids:
        return {}
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)), limit=len(ids))
    return {str(r.id): r.state for r in runs if r.state is not None}


CRASH_DETECTION = "asft: flow runs without heartbeats are Crashed"


def ensure_crash_detection() -> bool:
    """Against a Prefect server: install (once) the proactive automation of Prefect's "Detect zombie flows"
    guide, which marks a flow run Crashed when its heartbeats (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``)
    stop for three intervals without a final state: the process died (``kill -9``, OOM, a lost pod) on
    whichever host. :func:`close_dead_runs` then closes its MLflow runs. Returns True if it was created;
    without a server (ephemeral API, where nothing evaluates automations) nothing is done."""
    from datetime import timedelta

    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if not settings.api.url or not settings.flows.heartbeat_frequency:
        return False
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    within = 3 * settings.flows.heartbeat_frequency
    with get_client(sync_client=True) as client:
        if client.read_automations_by_name(CRASH_DETECTION):
            return False
        client.create_automation(AutomationCore(
            name=CRASH_DETECTION,
            description=f"A flow run with no heartbeat for {within} s and no final state has lost its process.",
            trigger=EventTrigger(
                after={"prefect.flow-run.heartbeat"},
                expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                        "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
                match={"prefect.resource.id": ["prefect.flow-run.*"]}, for_each={"prefect.resource.id"},
                posture=Posture.Proactive, threshold=1, within=timedelta(seconds=within)),
            actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                        message=f"no heartbeat for {within} s: the flow run's process died")]))
    return True


def _process_gone(host: str, pid: str) -> bool:
    """True only when ``pid`` ran on *this* host and no such process exists any more."""
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _mark_crashed(flow_run_id: str, message: str):
    """Set the flow run Crashed through the Prefect API; its new state (None if Prefect refused)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Crashed(message=message), force=True)
        return client.read_flow_run(flow_run_id).state


def close_dead_runs(client: MlflowClient, exp_id: str) -> list[str]:
    """Retrain runs left RUNNING in MLflow whose Prefect flow run has ended (tag ``prefect.flow_run_id``):
    the process died before it could close them (``kill -9``, OOM, a preempted pod) or a hook could not
    reach MLflow. Their stage runs and they are marked KILLED (flow run Crashed or Cancelled) or FAILED,
    with the flow run's state as the reason. Returns the parent run ids closed.

    The flow run's state is asked of the Prefect API, so a run on another host sharing the Prefect server
    is handled like a local one: the server marks a flow run whose process vanished Crashed from its
    missing heartbeats (:func:`ensure_crash_detection`). A flow run Prefect still reports running is left
    alone, except when it ran on this host and its process is gone: then this host is a witness, and the
    flow run is first marked Crashed *in Prefect* (so Prefect's record agrees, without waiting for missed
    heartbeats, and with an ephemeral API where no server watches them), and closed from that state. A
    flow run unknown to this Prefect API (another server) is closed only on that same-host evidence."""
    running = client.search_runs([exp_id], "attributes.status = 'RUNNING'", max_results=500)
    parents = {r.data.tags[PREFECT_FLOW_RUN_TAG]: r for r in running
               if not r.data.tags.get("mlflow.parentRunId") and r.data.tags.get(PREFECT_FLOW_RUN_TAG)}
    if not parents:
        return []
    try:
        states = _flow_run_states(list(parents))
    except Exception:  # noqa: BLE001 - no Prefect API here: only same-host evidence can be used
        states = None
    closed = []
    for fr_id, run in parents.items():
        state = states.get(fr_id) if states is not None else None
        host, pid = run.data.tags.get("host", ""), run.data.tags.get("pid", "")
        if (state is None or not state.is_final()) and _process_gone(host, pid):
            witness = f"process {pid} on {host} died while running"
            if state is not None:
                try:
                    state = _mark_crashed(fr_id, witness)
                except Exception:  # noqa: BLE001 - Prefect refused: close the MLflow runs on the evidence alone
                    state = None
            if state is None or not state.is_final():
                close_run_tree(client, run.info.run_id, "KILLED",
                               f"{witness}; its Prefect flow run {fr_id} is unknown to this Prefect API")
                closed.append(run.info.run_id)
                continue
        if state is None or not state.is_final():
            continue
        status = "KILLED" if state.is_crashed() or state.is_cancelled() else "FAILED"
        reason = f"Prefect flow run {fr_id} ended {state.name} without closing its MLflow run"
        if state.message:
            reason += f": {state.message}"
        close_run_tree(client, run.info.run_id, status, reason)
        closed.append(run.info.run_id)
    return closed


@contextlib.contextmanager
def stage_run(tracking_uri: str, parent_run_id: str, stage: str, tags: dict | None = None,
              inputs: dict[str, str] | None = None) -> Iterator[TrackedRun]:
    """A nested MLflow run for one stage; FAILED if the stage raises.

    ``inputs`` ({dataset name: context}, e.g. ``{"processed": "training"}``) logs datasets the parent
    recorded with :func:`log_dataset` as inputs of this run."""
    client = MlflowClient(tracking_uri)
    parent = client.get_run(parent_run_id)
    # Lineage on every run: the git commit and the DVC hashes of the datasets produced so far.
    lineage = {k: v for k, v in parent.data.tags.items() if k.startswith(LINEAGE_TAG_PREFIXES)}
    missing = [n for n in (inputs or {}) if f"dvc.{n}.md5" not in lineage or f"dvc.{n}.path" not in lineage]
    if missing:
        raise ValueError(f"stage {stage}: datasets {missing} were not logged on the parent run (log_dataset)")
    run = client.create_run(parent.info.experiment_id, run_name=stage,
                            tags={**lineage, "mlflow.parentRunId": parent_run_id, "stage": stage, **(tags or {})})
    tr = TrackedRun(client, run.info.run_id)
    if inputs:
        log_inputs(client, run.info.run_id, [
            DatasetInput(dataset_entity(n, lineage[f"dvc.{n}.path"], lineage[f"dvc.{n}.md5"]),
                         tags=[InputTag(mlflow_tags.MLFLOW_DATASET_CONTEXT, ctx)]) for n, ctx in inputs.items()])
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
