"""The ``retrain`` flow: the declared stages (asft/pipeline.py) in data-flow order.

ingest (load + GX suite) -> preprocess (+ GX) -> preferences (+ GX) -> train-base (or the champion's base,
reused when data, params and code are unchanged) -> {evaluate, train-reward, train-judge} -> reward-report
-> sample -> score -> advantages -> {posttrain-<method> for every method, the A-SFT lambda sweep} ->
evaluate-policies -> promote (register recommender + reward model; champion or challenger by the gate).
Braces are independent stages submitted concurrently (``orchestration.max_parallel`` at a time, each in
its own process, on the flow's thread-pool task runner).

- The configuration is parsed once here and passed to every task as the typed :class:`Config`; the flow's
  ``overrides`` parameter is a typed partial config (:data:`ConfigOverrides`), so the Prefect UI shows a
  form, or ``key=value`` strings.
- Every run writes to its own output directory (``runs/<start time>-<flow run name>``, or ``$ASFT_RUNS_DIR``).
- Stage tasks are cached on input dataset hashes, declared params and code version; a cached result
  points into the earlier run's directory and is verified (hash of its outputs) before use, and recorded
  as a nested run tagged ``cache_hit``. ``use_cache=False`` recomputes everything.
- Every stage has a time limit; I/O and tracking errors are retried; a failure records the stage and error
  on the MLflow parent run and in ``OUTPUT/failure.json``, and nothing is registered.
- Lineage on the parent run: git commit, dirty flag (+ the diff), code version, DVC hash of every dataset
  (committed to the DVC cache, pushed to ``storage.dvc_remote`` or the default remote, which is recorded),
  params, seeds, package versions, model hashes. ``storage.results_url`` / ``checkpoints_url``: stage results
  and training checkpoints on remote storage (tasks/storage.py, asft/storage.py).
- Prefect artifacts: a markdown summary with links to the MLflow runs, the methods table, stage progress.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import deployment as current_deployment
from prefect.runtime import flow_run as current_flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from asft import datastore, pipeline, stages
from asft.config import Config, ConfigOverrides, dump_config, load_config, overrides_from_model
from asft.utils import dvc_md5, write_json
from tasks import lineage
from tasks.runners import DaskFanOut, workers_reach_this_api
from tasks.samples import recommendation_sample
from tasks.stages import CONSOLE, TASKS, RunContext, log_policy_reports, promote_task
from tasks.storage import push_datasets, result_storage
from tasks.tracking import (
    experiment_url,
    log_dataset,
    log_recommendation_sample,
    record_cached_stage,
    start_parent,
)

WORK_DIR = ".work"  # under the runs dir: resumable work directories of training stages


def runs_dir() -> Path:
    """Where run directories go: ``$ASFT_RUNS_DIR``, else ``runs/`` in the working directory."""
    return Path(os.environ.get("ASFT_RUNS_DIR") or "runs")
METRIC_TIMING_KEYS = ("seconds", "_s", "per_s", "timing", "flow_", "time")
DATASET_CONTEXT = {"raw": "raw", "processed": "training", "preferences": "preferences"}  # MLflow dataset contexts


def default_output_dir() -> Path:
    """``runs/<expected start>-<flow run name>``: stable across retries of the same flow run."""
    start = current_flow_run.scheduled_start_time or datetime.now(UTC)
    name = current_flow_run.name or "local"
    return runs_dir() / f"{start:%Y%m%d-%H%M%S}-{name}"


def ensure_prefect_api() -> None:
    """Start this process's Prefect API before the flow, one process at a time per ``PREFECT_HOME``.

    Without a Prefect server (``PREFECT_API_URL`` unset) every ``retrain`` starts an ephemeral server
    on the SQLite database in ``PREFECT_HOME``; two starting together on a new database both run its
    migrations and one fails. The lock serialises the start (a few seconds); the flows then run
    concurrently on the migrated database.
    """
    import os

    from filelock import FileLock
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url:
        return
    home = Path(os.environ.get("PREFECT_HOME") or settings.home)
    home.mkdir(parents=True, exist_ok=True)
    with FileLock(str(home / "ephemeral-server.lock"), timeout=600), get_client(sync_client=True) as client:
        client.hello()


DATA_ERRORS = ("DataValidationError", "DataFormatError", "ConfigError", "PreferenceConfigError")


class _DataErrorConsoleFilter(logging.Filter):
    """Keeps a data error off the console's Prefect lines (the task failure, the engine's traceback, the
    flow's failure hook): the command prints its message once, without a traceback. The Prefect API (the
    UI's logs) still receives every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and type(exc).__name__ in DATA_ERRORS:
            return False
        msg = record.getMessage()
        return not (record.name.startswith("prefect") and (any(n in msg for n in DATA_ERRORS)
                                                            or "data validation failed" in msg))


def quiet_data_errors_on_console() -> None:
    """Install :class:`_DataErrorConsoleFilter` on the console handlers Prefect configured."""
    for h in logging.getLogger().handlers:
        if type(h).__name__ == "PrefectConsoleHandler" and not any(isinstance(f, _DataErrorConsoleFilter)
                                                                   for f in h.filters):
            h.addFilter(_DataErrorConsoleFilter())


_ACTIVE: dict[str, dict] = {}  # flow run id -> its MLflow parent run, output dir and stages (for the state hooks)


def _hook_logger():
    try:
        return get_run_logger()
    except Exception:  # noqa: BLE001 - a hook called outside a run context (tests, a runner)
        return logging.getLogger("asft.retrain")


def _mlflow_parent(flow_run) -> dict | None:
    """The MLflow parent run of ``flow_run``: recorded by the flow in this process, else looked up in the
    tracking store its parameters name (a hook run by another process, e.g. a runner after a kill)."""
    got = _ACTIVE.get(str(flow_run.id))
    if got is not None:
        return got
    from mlflow.tracking import MlflowClient

    from tasks.tracking import PREFECT_FLOW_RUN_TAG, resolve_tracking_uri

    params = flow_run.parameters or {}
    try:
        raw = params.get("overrides")
        ov = (list(raw) if isinstance(raw, list) else
              overrides_from_model(ConfigOverrides.model_validate(raw)) if raw else [])
        if params.get("data"):
            ov.append(f"data.source={params['data']}")
        config = params.get("config", "params.yaml")
        cfg = load_config(config if config and Path(config).is_file() else None, ov)
        uri = resolve_tracking_uri(cfg)
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        runs = client.search_runs([exp.experiment_id], f"tags.`{PREFECT_FLOW_RUN_TAG}` = '{flow_run.id}'") if exp else []
    except Exception as e:  # noqa: BLE001 - a hook must not raise; say why the runs stay open
        _hook_logger().warning("retrain %s: MLflow parent run not found: %s", flow_run.name, e)
        return None
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    if not parents:
        return None
    out = parents[0].data.tags.get("output_dir")
    return {"uri": uri, "parent_run_id": parents[0].info.run_id, "out": Path(out) if out else None}


def _close_on(status: str):
    """A flow state hook (on_failure: FAILED; on_crashed, on_cancellation: KILLED): the MLflow parent run
    and the stage runs left open get ``status`` and the reason (tag ``terminated_reason``), and
    ``failure.json`` records the stage, the flow run's state and its message, for a crash the flow's own
    error handling never saw (a signal, a lost worker, a cancellation, an error outside the stages)."""

    def hook(flow_, flow_run, state) -> None:
        found = _mlflow_parent(flow_run)
        _ACTIVE.pop(str(flow_run.id), None)
        reason = f"Prefect flow run {flow_run.name} ({flow_run.id}) {state.name}: {state.message or ''}".strip()
        if found is None:
            return
        from mlflow.tracking import MlflowClient

        from tasks.tracking import close_run_tree

        stage = found["stages"].current if found.get("stages") is not None else None
        try:
            client = MlflowClient(found["uri"])
            if found.get("out") is not None:
                f = Path(found["out"]) / "failure.json"
                info = json.loads(f.read_text()) if f.is_file() else {
                    "stage": stage or "?", "error": reason[:5000], "output_dir": str(found["out"]),
                    "mlflow_run_id": found["parent_run_id"]}
                info.update({"flow_run_id": str(flow_run.id), "flow_run_state": state.name,
                             "flow_run_message": (state.message or "")[:5000]})
                write_json(f, info)
                client.log_artifact(found["parent_run_id"], str(f))
                client.set_tag(found["parent_run_id"], "failed_stage", info.get("stage", "?"))
            close_run_tree(client, found["parent_run_id"], status, reason)
        except Exception as e:  # noqa: BLE001 - a hook must not raise; the next retrain's sweep closes them
            _hook_logger().warning("retrain %s: could not mark its MLflow runs %s: %s", flow_run.name, status, e)

    hook.__name__ = f"mark_mlflow_runs_{status.lower()}"
    return hook


def report_failure(flow_, flow_run, state) -> None:
    """Flow on_failure/on_crashed hook: one line naming the stage and the error (the place to plug a
    notification). The stage comes from ``failure.json`` written by the flow."""
    out = (flow_run.parameters or {}).get("output")
    info = {}
    for cand in ([Path(out)] if out else []) + sorted(runs_dir().glob(f"*-{flow_run.name}")):
        f = cand / "failure.json"
        if f.is_file():
            info = json.loads(f.read_text())
            break
    get_run_logger().error("retrain %s failed at stage '%s': %s", flow_run.name, info.get("stage", "?"),
                           info.get("error", state.message))


class _Stages:
    """Runs the declared stages' tasks: console announcements, time limits, concurrency, cache-hit
    verification and attribution, timings, the current stage for failures."""

    def __init__(self, cfg: Config, ctx: RunContext, use_cache: bool, total: int):
        self.cfg, self.ctx, self.use_cache, self.total = cfg, ctx, use_cache, total
        self.timings: dict[str, float] = {}
        self.core: dict[str, float] = {}
        self.cache: dict[str, dict] = {}
        self.cpu: dict[str, float] = {}  # CPU seconds per stage (its child process, or this process)
        self.where: dict[str, dict] = {}  # where each stage ran: host, pid, Dask worker, peak memory
        self.current = "setup"
        self.done = 0
        self.dask = DaskFanOut(cfg.orchestration) if cfg.orchestration.task_runner == "dask" else None

    def close(self) -> None:
        """Stop the run's LocalCluster, if it started one."""
        if self.dask is not None:
            self.dask.close()

    def _task(self, spec, refresh: bool = False, thread: bool = False):
        # In the flow's thread Prefect enforces the time limit itself; a stage submitted to a worker thread
        # runs in its own process, killed by ``run_cli`` at the same limit.
        opts = {} if thread else {"timeout_seconds": self.cfg.orchestration.timeout(spec.kind)}
        results = result_storage(self.cfg.storage) if spec.cache else None  # storage.results_url (e.g. S3)
        if results is not None:
            opts["result_storage"] = results
        return TASKS[spec.name].with_options(refresh_cache=refresh or not self.use_cache, **opts)

    def _announce(self, labels: list[str]) -> None:
        first = self.done + 1
        self.done += len(labels)
        span = f"{first}" if len(labels) == 1 else f"{first}-{self.done}"
        extra = ((" (on the Dask cluster, one process each)" if self.dask else " (concurrently, one process each)")
                 if len(labels) > 1 else "")
        line = f"[{span}/{self.total}] {', '.join(labels)}{extra}"
        CONSOLE.print(line, style="bold cyan", highlight=False)
        get_run_logger().info(line)

    def run(self, name: str, paths: dict, out: str | None, options: dict | None = None, cfg: Config | None = None,
            label: str | None = None) -> dict:
        return self.group([(name, paths, out, options or {}, cfg, label)])[0]

    def group(self, calls: list[tuple]) -> list[dict]:
        """Stages that do not depend on each other: with ``orchestration.max_parallel`` > 1 their training
        stages are submitted together, each in its own process; the others run in the flow's thread. With
        ``orchestration.task_runner: dask`` all of them go to the Dask cluster (:func:`fan_out`).
        Results in call order."""
        labels = [c[5] or "-".join([c[0], *map(str, c[3].values())]) for c in calls]  # e.g. posttrain-asft
        t = time.perf_counter()
        specs = [pipeline.get_stage(c[0]) for c in calls]
        if self.dask is not None and len(calls) > 1:
            return self._fan_out(calls, labels, specs, t)
        concurrent = [i for i, spec in enumerate(specs) if spec.training and self.cfg.orchestration.max_parallel > 1
                      and len(calls) > 1]
        if len(concurrent) > 1:
            self._announce([labels[i] for i in concurrent])
        else:
            concurrent = []
        started = {}
        for i in concurrent:
            name, paths, out, options, cfg, _ = calls[i]
            args = {"cfg": cfg or self.cfg, "paths": paths, "out_dir": out, "options": options,
                    "ctx": self.ctx.model_copy(update={"isolated": True})}
            started[i] = (args, self._task(specs[i], thread=True).submit(**args))
        results: dict[int, dict] = {}
        for i, (name, paths, out, options, cfg, _) in enumerate(calls):
            if i in started:
                continue
            self.current = labels[i]
            self._announce([labels[i]])
            args = {"cfg": cfg or self.cfg, "paths": paths, "out_dir": out, "options": options, "ctx": self.ctx}
            t1 = time.perf_counter()
            results[i] = self._finish(labels[i], specs[i], args, self._task(specs[i])(**args, return_state=True), t1)
        for i, (args, fut) in started.items():
            self.current = labels[i]
            fut.wait()
            results[i] = self._finish(labels[i], specs[i], args, fut.state, t)
        return [results[i] for i in range(len(calls))]

    def _fan_out(self, calls: list[tuple], labels: list[str], specs: list, t: float) -> list[dict]:
        """The group as a ``fan-out`` subflow on the Dask task runner: every stage a task on the cluster."""
        self._announce(labels)
        self.current = ", ".join(labels)
        args = [{"cfg": cfg or self.cfg, "paths": paths, "out_dir": out, "options": options,
                 "ctx": self.ctx.model_copy(update={"isolated": True})} for _, paths, out, options, cfg, _ in calls]
        runner = self.dask.runner()
        get_run_logger().info("fan-out of %s to the Dask scheduler at %s", self.current, self.dask.address)
        try:
            with workers_reach_this_api():
                outcomes = fan_out.with_options(task_runner=runner, flow_run_name=f"fan-out: {self.current}"[:200])(
                    [{"stage": spec.name, "label": label, "refresh": not self.use_cache, "args": a}
                     for spec, label, a in zip(specs, labels, args, strict=True)])
        except BaseException as e:
            self.current = getattr(e, "asft_stage", self.current)
            raise
        return [self._finish(label, spec, a, _Outcome(*o), t)
                for label, spec, a, o in zip(labels, specs, args, outcomes, strict=True)]

    def _finish(self, label: str, spec, args: dict, state, t: float) -> dict:
        res = state.result()
        if state.name == "Cached":
            out = res.get("out_dir")
            if out and (not Path(out).exists() or dvc_md5(out) != res["out_md5"]):
                get_run_logger().warning("%s: cached outputs in %s are gone or changed; recomputing", label, out)
                res = self._task(spec, refresh=True)(**args)
                self.cache[label] = {"hit": False, "stale_cache": True}
            else:
                src = res.get("stage_run_id")
                res["run_id"] = record_cached_stage(self.ctx.tracking_uri, self.ctx.parent_run_id, label, src)
                self.cache[label] = {"hit": True, "source_run_id": src, "out_dir": out}
                res["core_seconds"] = res["cpu_seconds"] = 0.0
                res["executor"] = None
                get_run_logger().info("%s: cached (run %s)", label, src)
        else:
            self.cache[label] = {"hit": False}
        self.timings[label] = time.perf_counter() - t
        self.core[label] = res.pop("core_seconds", 0.0)
        self.cpu[label] = res.pop("cpu_seconds", 0.0)
        self.where[label] = res.pop("executor", None)
        line = pipeline.summary_line(spec, res)
        if line and (self.where[label] or {}).get("dask_worker"):  # the worker's console is not this one
            CONSOLE.print(f"      {label}: {line} ({self.core[label]:.0f} s on {self.where[label]['dask_worker']})",
                          highlight=False)
        return res


class _Outcome:
    """A fan-out task's final state, as the flow reads it: its name (``Cached``...) and result."""

    def __init__(self, name: str, value):
        self.name, self._value = name, value

    def result(self):
        return self._value


@flow(name="fan-out", validate_parameters=False, log_prints=True)
def fan_out(stages: list[dict]) -> list[tuple[str, dict]]:
    """Independent stages as tasks on this flow's task runner (retrain chooses a DaskTaskRunner from the
    configuration at run time): submitted together, awaited together; ``(state name, result)`` in order.
    A failed stage fails the subflow with its own error, tagged ``asft_stage``."""
    futures = [TASKS[s["stage"]].with_options(refresh_cache=s["refresh"]).submit(**s["args"]) for s in stages]
    for f in futures:
        f.wait()
    out = []
    for s, f in zip(stages, futures, strict=True):
        try:
            out.append((f.state.name, f.state.result()))
        except BaseException as e:
            e.asft_stage = s["label"]
            raise
    return out


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=lineage.REPO, capture_output=True, text=True, timeout=20,
                              check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def working_tree_patch() -> str:
    """``git diff HEAD`` plus every untracked, not ignored file as an addition: applying it to the
    commit (``git apply``) recreates the working tree the run used."""
    patch = _git("diff", "HEAD", "--binary")
    for f in filter(None, _git("ls-files", "--others", "--exclude-standard").splitlines()):
        patch += _git("diff", "--no-index", "--binary", "/dev/null", f)
    return patch


def _record_lineage(parent, cfg, out: Path) -> dict:
    """Params, seeds, package versions, code version and (if dirty) the git diff, on the parent run."""
    lin = {"code_version": lineage.code_version(), "environment": lineage.environment(), "seeds": lineage.seeds(cfg)}
    write_json(out / "lineage" / "environment.json", lin["environment"])
    write_json(out / "lineage" / "seeds.json", lin["seeds"])
    diff = working_tree_patch()
    if diff:
        (out / "lineage" / "git_diff.patch").write_text(diff)
    parent.log_artifact(out / "lineage", "lineage")
    parent.set_tags({"code_version": lin["code_version"], **{f"env.{k}": v for k, v in lin["environment"].items()}})
    parent.log_params({f"seeds.{k}": v for k, v in lin["seeds"].items()})
    return lin


def _dataset_pointer(parent, name: str, res: dict, out: Path) -> str:
    """The ``.dvc`` pointer of a dataset version the stage committed to the DVC cache."""
    md5, cache = res["out_md5"], lineage.dvc_cache_dir()
    if datastore.missing(md5, cache):  # a cached stage whose objects were garbage-collected since
        md5 = datastore.commit(res["out_dir"], cache)
    datastore.pointer_file(md5, name, out / "dvc" / f"{name}.dvc")
    parent.set_tags({f"dvc.{name}.md5": md5, f"{name}_sha256": res["sha256"]})
    log_dataset(parent, name, res["out_dir"], md5, DATASET_CONTEXT[name])
    return md5


def _restored_raw(run: _Stages, raw_dir: str, out_dir: str) -> dict:
    """The raw dataset version an audit restored through DVC, copied in place of ``ingest`` (the source
    the audited run ingested is not on this machine) and committed to the DVC cache like a stage's."""
    import shutil

    from asft.utils import dir_sha256

    run.current = "ingest"
    run._announce(["ingest (the recorded raw dataset, restored through DVC)"])
    t = time.perf_counter()
    dst = Path(out_dir)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(raw_dir, dst)
    md5 = datastore.commit(dst, lineage.dvc_cache_dir())
    run.timings["ingest"] = time.perf_counter() - t
    run.cache["ingest"] = {"hit": False, "restored_from": str(raw_dir)}
    return {"out_dir": str(dst), "out_md5": md5, "sha256": dir_sha256(dst)}


def _plan(cfg: Config, sweep: dict[str, float], reuse_base: bool) -> int:
    """How many stage instances this run announces (``[i/N]``)."""
    fixed = ["ingest", "preprocess", "preferences", "train-base", "evaluate", "train-reward", "train-judge",
             "reward-report", "sample", "score", "advantages", "evaluate-policies"]
    return len(fixed) + len(cfg.posttrain.methods) + 2 * len(sweep)


@flow(name="retrain", log_prints=True, validate_parameters=True,
      on_failure=[_close_on("FAILED"), report_failure], on_crashed=[_close_on("KILLED"), report_failure],
      on_cancellation=[_close_on("KILLED")], task_runner=ThreadPoolTaskRunner(max_workers=8))
def retrain(
    data: str | None = None,
    output: str | None = None,
    config: str | None = "params.yaml",
    overrides: ConfigOverrides | list[str] | None = None,
    use_cache: bool = True,
    register_models: bool = True,
    audit_of: str | None = None,
    raw_dir: str | None = None,
) -> dict:
    """Retrain and post-train; ``output`` defaults to a fresh per-run directory under ``runs/``.

    ``overrides``: settings to change (typed, every field optional) or ``key=value`` strings;
    ``use_cache=False`` recomputes every stage; ``register_models=False`` (and audits, ``audit_of=RUN_ID``)
    never touch the model registry. ``raw_dir``: a raw dataset version already ingested (an audit's copy
    restored through DVC, when the run's data source is not on this machine) stands in for ingest.
    """
    t_start = time.perf_counter()
    ov = list(overrides) if isinstance(overrides, list) else overrides_from_model(overrides)
    if data is not None:
        ov.append(f"data.source={data}")
    cfg = load_config(config if config and Path(config).is_file() else None, ov)
    out = Path(output or default_output_dir()).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "failure.json").unlink(missing_ok=True)
    cfg_path = str(out / "params.resolved.yaml")
    dump_config(cfg, cfg_path)

    run_name = f"{'audit' if audit_of else 'retrain'}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    tags = {"data_source": cfg.data.source, "output_dir": str(out), "kind": "audit" if audit_of else "retrain",
            "prefect.flow_run_id": str(current_flow_run.id or ""),
            "prefect.deployment": str(current_deployment.name or "")}
    if audit_of:
        tags["audit_of"] = audit_of
    parent = start_parent(cfg, run_name, tags)
    uri, pid = parent.client.tracking_uri, parent.run_id
    hooked = _ACTIVE.setdefault(str(current_flow_run.id), {"uri": uri, "parent_run_id": pid, "out": out})
    parent.log_params(cfg.flat())
    parent.log_artifact(cfg_path)
    # Training stages checkpoint into work directories keyed by their inputs, params and code: a rerun
    # after a crash resumes them. Without the cache (audits, --no-cache) everything starts afresh in
    # private work directories.
    ctx = RunContext(tracking_uri=uri, parent_run_id=pid, run_dir=str(out),
                     work_root=str(runs_dir().resolve() / WORK_DIR) if use_cache else None, resume=use_cache)
    sweep = {f"asft@lam={lam:g}": lam for lam in cfg.posttrain.lambda_sweep
             if lam != cfg.advantage.lam and "asft" in cfg.posttrain.methods}
    do_register = register_models and cfg.registry.enabled and not audit_of
    run = _Stages(cfg, ctx, use_cache, _plan(cfg, sweep, do_register))
    hooked["stages"] = run  # the state hooks name the stage a crash or cancellation interrupted
    run.timings["flow_setup"] = time.perf_counter() - t_start
    at = lambda rel: str(out / rel)
    try:
        lin = _record_lineage(parent, cfg, out)
        raw = _restored_raw(run, raw_dir, at(stages.RAW)) if raw_dir else run.run("ingest", {}, at(stages.RAW))
        datasets = {"raw": _dataset_pointer(parent, "raw", raw, out)}
        stats = run.run("preprocess", {"raw_dir": raw["out_dir"]}, at(stages.PROCESSED))
        datasets["processed"] = _dataset_pointer(parent, "processed", stats, out)
        prefs = run.run("preferences", {"raw_dir": raw["out_dir"], "processed_dir": stats["out_dir"]},
                        at(stages.PREFERENCES))
        datasets["preferences"] = _dataset_pointer(parent, "preferences", prefs, out)
        remote = push_datasets(parent, cfg, datasets, out, get_run_logger())  # tasks/storage.py

        processed, raw_dir, pref_dir = stats["out_dir"], raw["out_dir"], prefs["out_dir"]
        run.current = "train-base"
        base_key = lineage.task_key(pipeline.get_stage("train-base"), cfg, {"processed_dir": processed})
        base = _champion_base(cfg, uri, pid, base_key, out, run, processed) if (do_register and use_cache and
                                                                     cfg.registry.reuse_champion_base) else None
        if base is None:
            base = run.run("train-base", {"processed_dir": processed}, at(stages.BASE_MODEL))
        ref = base["model_dir"]
        base_run_id = base.get("base_run_id") or base["stage_run_id"]
        ens = {"processed_dir": processed, "pref_dir": pref_dir, "base_model_dir": ref}
        base_metrics, reward, judge = run.group([
            ("evaluate", {"model_dir": ref, "processed_dir": processed}, at("metrics/base.json"), {}, None, None),
            ("train-reward", ens, at(stages.REWARD_MODEL), {}, None, None),
            ("train-judge", ens, at(stages.JUDGE_MODEL), {}, None, None)])
        report = run.run("reward-report", {"reward_dir": reward["out_dir"], "pref_dir": pref_dir,
                                           "processed_dir": processed, "raw_dir": raw_dir, "base_model_dir": ref},
                         at(stages.REPORTS + "/reward"))
        sampled = run.run("sample", {"processed_dir": processed, "ref_dir": ref}, at(stages.CANDIDATES))
        scored = run.run("score", {"cand_dir": sampled["out_dir"], "processed_dir": processed, "ref_dir": ref,
                                   "reward_dir": reward["out_dir"]}, at(stages.SCORED))
        adv_dirs = {None: run.run("advantages", {"scored_dir": scored["out_dir"]}, at(stages.ADVANTAGES))}
        sweep_cfg = {name: cfg.model_copy(update={"advantage": cfg.advantage.model_copy(update={"lam": lam})})
                     for name, lam in sweep.items()}
        if sweep:
            for (name, lam), res in zip(sweep.items(), run.group([
                    ("advantages", {"scored_dir": scored["out_dir"]}, at(f"{stages.ADVANTAGES}_lam{lam:g}"), {},
                     sweep_cfg[name], f"advantages@lam={lam:g}") for name, lam in sweep.items()]), strict=True):
                adv_dirs[name] = res
        post_in = {"processed_dir": processed, "ref_dir": ref, "reward_dir": reward["out_dir"],
                   "scored_dir": scored["out_dir"]}
        calls = [("posttrain", {**post_in, "adv_dir": adv_dirs[None]["out_dir"]}, at(f"{stages.POSTTRAIN}/{m}"),
                  {"method": m}, None, None) for m in cfg.posttrain.methods]
        calls += [("posttrain", {**post_in, "adv_dir": adv_dirs[name]["out_dir"]},
                   at(f"{stages.POSTTRAIN}/asft_lam{lam:g}"), {"method": "asft"}, sweep_cfg[name], f"posttrain-{name}")
                  for name, lam in sweep.items()]
        post = dict(zip([*cfg.posttrain.methods, *sweep], run.group(calls), strict=True)) if calls else {}
        lams = {"asft": cfg.advantage.lam, **sweep} if "asft" in post else dict(sweep)
        ev = run.run("evaluate-policies", {"posttrain_dir": at(stages.POSTTRAIN), "ref_dir": ref,
                                           "processed_dir": processed, "reward_dir": reward["out_dir"],
                                           "judge_dir": judge["out_dir"], "raw_dir": raw_dir},
                     at(stages.REPORTS + "/policies"),
                     {"policies": {m: r["model_dir"] for m, r in post.items()}, "lams": lams}, label="evaluate-policies")
        policies = ev["reports"]
        log_policy_reports(policies, {m: r["run_id"] for m, r in post.items()}, ev["out_dir"], uri, pid)

        run.current = "lineage"
        models = {"base": ref, "reward": reward["out_dir"], "judge": judge["out_dir"],
                  **{f"posttrain/{m}": r["model_dir"] for m, r in post.items()}}
        model_hashes = {name: lineage.file_hashes(d) for name, d in models.items()}
        write_json(out / "lineage" / "model_hashes.json", model_hashes)
        parent.log_artifact(out / "lineage" / "model_hashes.json", "lineage")
        parent.set_tags({f"model_sha256.{n}": lineage.digest(h) for n, h in model_hashes.items()})

        promotion = None
        method = cfg.posttrain.champion_method
        if do_register and method in post:
            run.current = "promote"
            lineage_tags = {"base_key": base_key, "base_run_id": base_run_id, "code_version": lin["code_version"],
                            **{f"dvc.{k}.md5": v for k, v in datasets.items()}}
            t = time.perf_counter()
            promotion = promote_task.with_options(timeout_seconds=cfg.registry.gate_timeout_s)(
                method, post[method]["model_dir"], policies[method]["valid"], reward["out_dir"], lineage_tags, ref,
                processed, judge["out_dir"], raw_dir, cfg, str(out), uri, pid, reward_metrics=report["ensemble"])
            run.timings["promote"] = time.perf_counter() - t
            parent.set_tags({"promotion.alias": promotion["alias"], "promotion.reason": promotion["reason"][:4000],
                             "registry.product": promotion["product"],
                             "registry.recommender_model": promotion["recommender_model"]})
    except BaseException as e:
        failure = {"stage": run.current, "error": f"{type(e).__name__}: {e}"[:5000],
                   "traceback": traceback.format_exc()[-8000:], "output_dir": str(out), "mlflow_run_id": pid}
        write_json(out / "failure.json", failure)
        parent.set_tags({"failed_stage": run.current, "failed_stage_error": failure["error"]})
        parent.log_artifact(out / "failure.json")
        parent.end("FAILED")
        run.close()
        raise
    run.close()

    run.timings["flow_total"] = time.perf_counter() - t_start
    strip = ("out_", "stage_run", "run_id")
    result = {
        "dataset": {k: v for k, v in stats.items() if not k.startswith(strip)},
        "preferences": {k: v for k, v in prefs.items() if k != "validation" and not k.startswith(strip)},
        "models": {"base": {**{k: v for k, v in base_metrics.items() if k in ("valid", "test", "test_unmasked",
                                                                               "test_high_rated")},
                            "train": {k: base.get(k) for k in ("best_epoch", "epochs_run", "tokens_per_s",
                                                               "train_seconds")}}},
        "reward": {"report": {k: v for k, v in report.items() if k != "plots" and not k.startswith(strip)},
                   "train": {"members": reward["members"], "train_seconds": reward["train_seconds"],
                             "centring": reward["centring"]}},
        "judge": {"train_seconds": judge["train_seconds"], "fold": judge["fold"]},
        "sampling": {k: v for k, v in {**sampled, **scored}.items() if isinstance(v, (int, float))},
        "advantages": {k: v for k, v in adv_dirs[None].items() if k != "plots" and not k.startswith(strip)},
        "posttrain": {m: {"valid": policies[m]["valid"], "test": policies[m]["test"],
                          "train": {k: v for k, v in r.items() if k in ("best_metric", "best_epoch", "epochs_run",
                                                                         "train_seconds", "weights", "pairs")}}
                      for m, r in post.items()},
        "policy_base": policies["base"],
        "promotion": promotion,
        "datasets": datasets,
        "dvc_remote": remote,
        "lineage": {"code_version": lin["code_version"], "base_key": base_key, "base_run_id": base_run_id,
                    "cache": run.cache, "executors": run.where, "model_sha256": {n: lineage.digest(h) for n, h in model_hashes.items()}},
        "timings_s": run.timings,
        "core_seconds": run.core,
        "cpu_seconds": run.cpu,
        "output_dir": str(out),
        "mlflow": {"tracking_uri": uri, "parent_run_id": pid, "experiment": cfg.tracking.experiment},
    }
    write_json(out / "metrics.json", result)
    parent.log_nested_metrics({f"base/{k}": v for k, v in result["models"]["base"].items() if k != "train"})
    parent.log_metrics({f"reward/{k}": v for k, v in report["ensemble"].items()})
    for m in post:
        parent.log_metrics(policies[m]["test"], prefix=f"posttrain/{m}/test/")
        parent.log_metrics(policies[m]["valid"], prefix=f"posttrain/{m}/valid/")
    parent.log_metrics(policies["base"]["test"], prefix="posttrain/base/test/")
    parent.log_metrics(policies["base"]["valid"], prefix="posttrain/base/valid/")
    parent.log_metrics({f"timing/{k}": v for k, v in run.timings.items()})
    parent.log_metrics({"cache_hits": sum(c["hit"] for c in run.cache.values())})
    parent.log_artifact(out / "metrics.json")
    if cfg.posttrain.champion_method in post:  # what the policy recommends, per user, as an MLflow table
        log_recommendation_sample(parent, recommendation_sample(post[cfg.posttrain.champion_method]["model_dir"],
                                                                processed, "test", seed=cfg.seed))
    parent.end()
    links = _mlflow_links(uri, parent, post)
    _artifacts(result, policies, links)
    _final_summary(result, policies, links, run.timings["flow_total"])
    _ACTIVE.pop(str(current_flow_run.id), None)
    return result


def _mlflow_links(uri: str, parent, post: dict) -> dict[str, str]:
    """Where to look: the MLflow UI addresses of the parent run and each method's run."""
    exp = parent.client.get_run(parent.run_id).info.experiment_id
    base = uri.rstrip("/") if uri.startswith("http") else "http://127.0.0.1:5000"
    url = lambda rid: f"{base}/#/experiments/{exp}/runs/{rid}"
    return {"retrain": url(parent.run_id), "experiment": experiment_url(base, exp),
            **{m: url(r["run_id"]) for m, r in post.items()}}


def _artifacts(result: dict, policies: dict, links: dict[str, str]) -> None:
    """Prefect artifacts: the methods table and a markdown summary with the promotion and MLflow links."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    keys = [k for k in stages.POLICY_KEYS if k in policies["base"]["test"]]
    rows = [{"policy": n, **{k: round(r["test"][k], 4) for k in keys}} for n, r in policies.items()]
    create_table_artifact(rows, key="posttrain-methods", description="Post-training methods on test (section 7)")
    promo = result["promotion"]
    decision = (f"**{promo['alias']}** ({promo['recommender_model']} v{promo['recommender_version']}): "
                f"{promo['reason']}" if promo
                else "not registered")
    md = [f"# retrain {Path(result['output_dir']).name}", "", f"- promotion: {decision}",
          f"- MLflow run: [{links['retrain']}]({links['retrain']})", f"- output: `{result['output_dir']}`",
          f"- base test NDCG@10: {result['models']['base']['test']['ndcg@10']:.4f}",
          f"- wall time: {result['timings_s']['flow_total']:.0f} s", "", "| policy | " + " | ".join(keys) + " |",
          "|---|" + "---:|" * len(keys)]
    md += [f"| [{r['policy']}]({links.get(r['policy'], links['retrain'])}) | " + " | ".join(
        f"{r[k]:.4f}" for k in keys) + " |" for r in rows]
    create_markdown_artifact("\n".join(md), key="retrain-summary", description="Retrain summary")
    create_link_artifact(links["retrain"], link_text="MLflow retrain run", key="mlflow-run",
                         description="The MLflow parent run of this retrain (stage runs, models, datasets)")


def _final_summary(result: dict, policies: dict, links: dict[str, str], seconds: float) -> None:
    """The console's last word: base metrics, the methods table, the promotion decision, where to look."""
    console = CONSOLE
    _print_methods(policies)
    promo = result["promotion"]
    if promo:
        console.print(f"promotion: {promo['alias']} ({promo['recommender_model']} v{promo['recommender_version']}): "
                      f"{promo['reason']}")
    else:
        console.print("promotion: none (registration off or the champion method did not run)")
    uri = result["mlflow"]["tracking_uri"]
    console.print(f"MLflow run: {links['retrain']}" + ("" if uri.startswith("http") else
                  f"  (start the UI: mlflow ui --backend-store-uri {uri})"))
    console.print(f"output: {result['output_dir']}  (metrics.json)  finished in {seconds:.0f} s")


def _champion_base(cfg, uri: str, pid: str, base_key: str, out: Path, run: _Stages, processed: str) -> dict | None:
    """The champion (of this run's product) base model when it was trained on this data with these params
    and code."""
    from mlflow.tracking import MlflowClient

    from tasks.registry import champion_base, model_names

    t = time.perf_counter()
    got = champion_base(MlflowClient(uri), model_names(cfg, processed)["recommender"], base_key,
                        out / stages.BASE_MODEL / "best")
    if got is None:
        return None
    run._announce(["train-base (the champion's base model)"])
    record_cached_stage(uri, pid, "train-base", got["base_run_id"],
                        tags={"reused_champion_base": "true", "champion_version": str(got["champion_version"])})
    run.cache["train-base"] = {"hit": True, "source_run_id": got["base_run_id"], "champion_base": True}
    run.timings["train-base"] = time.perf_counter() - t
    get_run_logger().info("reusing the champion's base model (run %s): same data, params and code",
                          got["base_run_id"])
    return {**got, "stage_run_id": got["base_run_id"], "out_dir": str(Path(got["model_dir"]).parent)}


def _print_methods(reports: dict[str, dict]) -> None:
    from rich.table import Table

    keys = [k for k in stages.POLICY_KEYS if k in reports["base"]["test"]]
    t = Table(title="post-training methods (test)")
    t.add_column("method")
    for k in keys:
        t.add_column(k, justify="right")
    for name, rep in reports.items():
        t.add_row(name, *[f"{rep['test'].get(k, float('nan')):.4f}" for k in keys])
    CONSOLE.print(t)
