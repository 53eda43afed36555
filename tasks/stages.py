"""Prefect tasks generated from the stage declarations (:mod:`asft.pipeline`).

:func:`stage_task` turns one :class:`~asft.pipeline.StageSpec` into one Prefect task; the flow calls
``TASKS[name]`` with the typed :class:`~asft.config.Config` (parsed once by the flow), the stage's input
paths and its output path. Every stage task

- is cached on the DVC hashes of its inputs, the config keys the stage declares, its option values and
  the code version (:class:`tasks.lineage.StageCache`); the summary is persisted as JSON (never a pickle);
- runs the core function in this process, or its CLI command (generated from the same spec) in a child
  process: under ``torchrun`` when ``distributed.nproc_per_node`` > 1, or alone when the flow runs
  independent stages concurrently (``orchestration.max_parallel``), with the stage's time limit;
- opens a nested MLflow run under the retrain's parent run, logs the params it read, its numeric summary,
  plots and models, and marks the run FAILED if the stage raises;
- retries I/O and tracking-server errors with backoff and reports a failure naming the stage.

Tasks exchange paths, hashes and run ids, never tensors or frames. Each summary carries
``out_dir``/``out_md5`` (a cached result is verified before it is trusted) and ``stage_run_id``.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff
from pydantic import BaseModel
from rich.console import Console

from asft import pipeline, stages
from asft.config import Config, dump_config
from asft.pipeline import StageSpec
from asft.plots import metric_bars, training_curves
from asft.utils import _json_default, dvc_md5
from tasks import lineage
from tasks.runners import executor_info
from tasks.tracking import TrackedRun, stage_run

CONSOLE = Console(stderr=True, width=160)  # what a person sees: stage lines and summaries
_SLOTS: dict[str, threading.BoundedSemaphore] = {}
_SLOTS_LOCK = threading.Lock()


def _slot(run_id: str, limit: int) -> threading.BoundedSemaphore:
    """The concurrency limit of one retrain's child-process stages (``orchestration.max_parallel``).

    Held in the flow's process, so a killed run frees it with the process: a Prefect global concurrency
    limit is only given back by the server's lease repossessor, which ephemeral servers do not run, so a
    ``kill -9`` there leaked its slots and hung every later retrain."""
    with _SLOTS_LOCK:
        return _SLOTS.setdefault(run_id, threading.BoundedSemaphore(limit))


class RunContext(BaseModel):
    """Where a retrain's stages write and track: passed to every stage task."""

    tracking_uri: str
    parent_run_id: str
    run_dir: str
    work_root: str | None = None  # resumable work dirs of training stages (None: fresh private ones)
    resume: bool = True
    isolated: bool = False  # run each stage's CLI command in its own process (concurrent stages)

    @property
    def reports_dir(self) -> Path:
        return Path(self.run_dir) / stages.REPORTS


RETRIES = 3
_NOT_TRANSIENT = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def is_transient(exc: BaseException | None) -> bool:
    """I/O and tracking-server errors are retried; data, config and programming errors are not."""
    if exc is None or isinstance(exc, _NOT_TRANSIENT):
        return False
    if isinstance(exc, (OSError, TimeoutError)):  # includes ConnectionError
        return True
    try:
        import requests
        from mlflow.exceptions import MlflowException, RestException
    except ImportError:  # pragma: no cover
        return False
    if isinstance(exc, requests.exceptions.RequestException):
        return True
    if isinstance(exc, RestException):  # the tracking server answered with an error
        return exc.get_http_status_code() >= 500
    if isinstance(exc, MlflowException):  # e.g. "API request failed after N retries", database locked
        msg = str(exc).lower()
        return any(s in msg for s in ("retries", "connection", "timed out", "database is locked", "temporarily"))
    return is_transient(exc.__cause__) if exc.__cause__ is not exc else False


def _retry_condition(task_, task_run, state) -> bool:
    exc = state.result(raise_on_failure=False)
    ok = is_transient(exc if isinstance(exc, BaseException) else None)
    if ok:
        get_run_logger().warning("%s: transient error, retrying: %s", task_.name, exc)
    return ok


def _report_task_failure(task_, task_run, state) -> None:
    """on_failure hook: name the stage and the error (the flow adds it to the MLflow parent run)."""
    get_run_logger().error("stage '%s' failed: %s", task_.name, state.message)




# Retries of I/O and tracking-server errors with backoff, and a failure report naming the stage: every task.
RELIABILITY = {"retries": RETRIES, "retry_delay_seconds": exponential_backoff(backoff_factor=2),
               "retry_jitter_factor": 0.5, "retry_condition_fn": _retry_condition,
               "on_failure": [_report_task_failure]}


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=_json_default))


def processes(cfg: Config) -> int:
    """Processes per distributed stage (``distributed.nproc_per_node``; 0 = one per visible GPU)."""
    n = cfg.distributed.nproc_per_node
    if n == 0:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 1
    return max(n, 1)


def _child_env(threads: int | None = None) -> dict[str, str]:
    """A child stage's environment; ``threads`` caps its math-library threads (concurrent children share
    the cores: unpinned, two CPU trainings oversubscribe and run ~30x slower than one after the other)."""
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", str(lineage.REPO))
    if threads is not None:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
    return env


def child_threads(max_parallel: int) -> int:
    """Math-library threads per concurrently running child stage: the cores divided among them."""
    return max(1, (os.cpu_count() or 1) // max(max_parallel, 1))


def run_cli(spec: StageSpec, cfg: Config, paths: dict, out_dir: str | None, options: dict, work: Path | None,
            resume: bool, log_path: Path, nproc: int = 1, usage: dict | None = None) -> dict:
    """The stage's CLI command (generated from its spec) in a child process, ``torchrun`` when ``nproc`` > 1;
    killed at the stage's time limit. Output goes to ``log_path``; returns the summary it writes. ``usage``
    (if given) receives the child's CPU seconds (user + system, its own waited-for children included) and
    peak resident memory, from ``wait4``."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg_file, result = Path(tmp) / "params.yaml", Path(tmp) / "result.json"
        dump_config(cfg, cfg_file)
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                    if nproc > 1 else [sys.executable])
        cmd = [*launcher, "-m", "asft.cli", *pipeline.cli_command(spec, paths, out_dir, options),
               "--config", str(cfg_file), "--result", str(result)]
        if work is not None:
            cmd += ["--work-dir", str(work)]
        if spec.training and not resume:
            cmd.append("--no-resume")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        timeout = cfg.orchestration.timeout(spec.kind)
        threads = None if nproc > 1 else stage_threads(cfg)
        get_run_logger().info("running %s in %s (log: %s)", spec.name,
                              f"{nproc} torchrun processes" if nproc > 1 else f"a child process, {threads} threads",
                              log_path)
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=lineage.REPO,
                                    env=_child_env(threads))
            try:
                status, ru, hwm = _wait(proc, timeout)
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            if status is None:
                raise TimeoutError(f"{spec.name} exceeded its time limit of {timeout:.0f} s "
                                   f"(orchestration.{spec.kind}_timeout_s); log: {log_path}")
        if usage is not None:
            usage.update(cpu_seconds=ru.ru_utime + ru.ru_stime, child_pid=proc.pid,
                         max_rss_mb=round(hwm / 1024, 1) if hwm else None)
        if proc.returncode != 0:
            tail = log_path.read_text()[-4000:]
            raise RuntimeError(f"{spec.name} failed in its child process (exit code {proc.returncode}); "
                               f"log: {log_path}\n{tail}")
        return json.loads(result.read_text())


def _wait(proc: subprocess.Popen, timeout: float) -> tuple[int | None, Any, int]:
    """Reap ``proc`` with ``wait4`` (its own CPU time, which ``Popen.wait`` discards); at ``timeout`` seconds
    kill it (status None). Returns ``(status, rusage, peak RSS in kB)`` and sets ``proc.returncode``. The
    peak is the last ``VmHWM`` read while it ran: ``ru_maxrss`` would report at least the RSS this process
    had when it forked the child."""
    deadline, pause, hwm = time.monotonic() + timeout, 0.01, 0
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return status, ru, hwm
        hwm = max(hwm, _vm_hwm(proc.pid))
        if time.monotonic() > deadline:
            proc.kill()
            _, status, ru = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            return None, ru, hwm
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


def _vm_hwm(pid: int) -> int:
    """Peak resident memory (kB) of a running process (Linux ``/proc``); 0 when unavailable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), 0)
    except (OSError, ValueError):
        return 0


def stage_threads(cfg: Config) -> int:
    """Math-library threads of a stage's child process: on a Dask worker the host's cores divided among the
    stage slots of the workers on that host (:func:`tasks.runners.dask_stage_threads`), else the cores
    divided among ``orchestration.max_parallel`` concurrent stages."""
    from tasks.runners import dask_stage_threads

    return dask_stage_threads() or child_threads(cfg.orchestration.max_parallel)


def _execute(spec: StageSpec, cfg: Config, paths: dict, out_dir: str | None, options: dict, ctx: RunContext,
             run: TrackedRun, work: Path | None, usage: dict | None = None) -> dict:
    n = processes(cfg) if spec.distributed else 1
    if n > 1 or ctx.isolated:
        from tasks.runners import dask_worker

        label = "-".join([spec.name, *[str(options[o]) for o in spec.options]])
        art = _progress_artifact(spec, options) if spec.training else None
        # On Dask the cluster's worker slots bound the concurrency; here, ``max_parallel`` children at once.
        slot = (contextlib.nullcontext() if dask_worker() is not None
                else _slot(ctx.parent_run_id, cfg.orchestration.max_parallel))
        with slot:
            summary = run_cli(spec, cfg, paths, out_dir, options, work, ctx.resume,
                              Path(ctx.run_dir) / "logs" / f"{label}.log", n, usage)
        _log_history(run, out_dir)
        if art is not None:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(art, 100.0)
        return summary
    on_log = run.on_log
    if spec.training:
        on_log = _with_progress(spec, cfg, options, run.on_log)
    return pipeline.call(spec, cfg, out_dir, paths, options, on_log=on_log, resume=ctx.resume, work_dir=work,
                         progress=True, docs_dir=str(Path(ctx.run_dir) / spec.docs) if spec.docs else None)


def _epochs(spec: StageSpec, cfg: Config) -> int:
    return {"train-base": cfg.train.epochs, "train-reward": cfg.reward.train.epochs,
            "train-judge": cfg.reward.train.epochs}.get(spec.name, cfg.posttrain.train.epochs)


def _progress_artifact(spec: StageSpec, options: dict):
    from prefect.artifacts import create_progress_artifact

    key = "-".join([spec.name, *[str(options[o]) for o in spec.options]]).replace("_", "-").lower()
    return create_progress_artifact(0.0, key=f"{key}-progress", description=f"{spec.name}: share of the epochs done")


def _with_progress(spec: StageSpec, cfg: Config, options: dict, on_log):
    """Trainer callback that also moves a Prefect progress artifact (share of the epoch budget done)."""
    from prefect.artifacts import update_progress_artifact

    art = _progress_artifact(spec, options)
    total = max(_epochs(spec, cfg), 1)

    def log(metrics: dict, step: int) -> None:
        on_log(metrics, step)
        if art is not None:
            update_progress_artifact(art, min(100.0, 100.0 * step / total))

    return log


def _log_history(run: TrackedRun, out_dir: str | None) -> None:
    """Per-epoch metrics of a stage that ran in a child process, from its training summary (with steps)."""
    ts = Path(out_dir or "") / "train_summary.json"
    if out_dir is None or not ts.is_file():
        return
    doc = json.loads(ts.read_text())
    for k, hist in enumerate(doc.get("histories") or [doc.get("history", [])]):
        prefix = f"member_{k}/" if "histories" in doc else ""
        for row in hist:
            if float(row.get("epoch", 0.5)).is_integer():
                run.log_metrics({key: v for key, v in row.items() if key not in ("epoch", "step")},
                                step=int(row["epoch"]), prefix=prefix)


def _track(spec: StageSpec, run: TrackedRun, summary: dict, out_dir: str | None, cfg: Config) -> None:
    """What every stage logs: the numeric summary as metrics, its plots, training curves and models."""
    run.log_metrics(flat_report({k: v for k, v in summary.items() if k not in ("reports", "history")}))
    for png in summary.get("plots") or []:
        run.log_artifact(png, "plots")
    if out_dir is None:
        return
    out = Path(out_dir)
    ts = out / "train_summary.json"
    if ts.is_file():
        doc = json.loads(ts.read_text())
        hists = doc["histories"] if "histories" in doc else [doc.get("history", [])]
        with tempfile.TemporaryDirectory() as tmp:  # never inside the (published, hashed) output directory
            for k, h in enumerate(hists):
                if h:
                    suffix = f" member {k}" if len(hists) > 1 else ""
                    run.log_artifact(training_curves(h, Path(tmp) / f"training_curves{suffix.replace(' ', '_')}.png",
                                                     f"{spec.name}{suffix}"), "plots")
        run.log_artifact(ts)
    if not summary.get("plots"):  # plots the stage wrote next to its outputs (e.g. weight histograms)
        for png in sorted(out.glob("*.png")):
            run.log_artifact(png, "plots")
    for f in ("stats.json", "sampling.json", "weights.json", "judges.json", "reward_report.json", "SCHEMA.md"):
        if (out / f).is_file():
            run.log_artifact(out / f)
    if spec.training:
        run.log_artifact(out / "best" if (out / "best").is_dir() else out, "model")
        run.set_tags({"model_dir": str(out / "best") if (out / "best").is_dir() else str(out)})
    if spec.dataset and isinstance(summary.get("validation"), dict):
        _log_data_docs(run, summary["validation"].get("docs"), "data_docs")


def _log_data_docs(run: TrackedRun, docs_dir: str | None, artifact_path: str) -> None:
    """This run's GX data docs (the site's index and validation pages), not the GX project's history."""
    if not docs_dir:
        return
    docs = Path(docs_dir)
    docs = docs.parent if docs.suffix == ".html" else docs  # the report names the site's index page
    if not docs.is_dir():
        return
    run.log_artifact(docs / "index.html", artifact_path)
    for sub in ("validations", "expectations", "static"):
        if (docs / sub).is_dir():
            run.log_artifact(docs / sub, f"{artifact_path}/{sub}")


def _evaluate_plot(run: TrackedRun, summary: dict, cfg: Config) -> None:
    keys = [f"{m}@{k}" for k in cfg.eval.ks for m in ("hr", "ndcg")] + ["mrr"]
    with tempfile.TemporaryDirectory() as tmp:
        run.log_artifact(metric_bars(summary, keys, Path(tmp) / "metrics_base.png", "base: full-ranking metrics"),
                         "plots")


def stage_task(spec: StageSpec):
    """The Prefect task of one declared stage (see the module doc)."""

    def body(cfg: Config, paths: dict[str, str | None], out_dir: str | None, ctx: RunContext,
             options: dict[str, Any] | None = None) -> dict:
        options = options or {}
        named = {o: options[o] for o in spec.options if o in options}  # the values that name the instance
        label = "-".join([spec.name, *map(str, named.values())])
        work = (Path(ctx.work_root) / lineage.task_key(spec, cfg, paths, options)
                if spec.training and ctx.work_root else None)
        guard = (_ValidationGuard(ctx.reports_dir, label) if spec.docs or spec.dataset
                 else contextlib.nullcontext())
        inputs = {n: "training" if spec.training else "input" for n in ("raw", "processed", "preferences")
                  if paths.get(f"{n}_dir") or (n == "preferences" and paths.get("pref_dir"))}
        with stage_run(ctx.tracking_uri, ctx.parent_run_id, label, tags={**named, "stage_spec": spec.name},
                       inputs=inputs) as run:
            run.log_params({**pipeline.flat_params(spec, cfg.to_dict()), **named})
            if isinstance(guard, _ValidationGuard):
                guard.run = run
            t0, ru0, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF), {}
            with guard:
                summary = _execute(spec, cfg, paths, out_dir, options, ctx, run, work, usage)
            secs = time.perf_counter() - t0
            if "cpu_seconds" not in usage:  # ran in this process: its CPU time over the stage
                ru = resource.getrusage(resource.RUSAGE_SELF)
                usage["cpu_seconds"] = ru.ru_utime + ru.ru_stime - ru0.ru_utime - ru0.ru_stime
            executor = {**executor_info(), **usage}
            run.set_tags({f"executor.{k}": v for k, v in executor.items() if k != "cpu_seconds" and v is not None})
            run.log_metrics({"stage_cpu_seconds": usage["cpu_seconds"]})
            if spec.output_file and out_dir:
                from asft.utils import write_json

                write_json(out_dir, summary)
            _track(spec, run, summary, None if spec.output_file else out_dir, cfg)
            if spec.name == "evaluate":
                _evaluate_plot(run, summary, cfg)
            if spec.dataset:  # a dataset version: into the DVC cache, hashed once
                from asft import datastore

                md5 = datastore.commit(out_dir, lineage.dvc_cache_dir())
                run.set_tags({f"dvc.{spec.dataset}.md5": md5})
            else:
                md5 = dvc_md5(out_dir) if out_dir and Path(out_dir).exists() else None
        line = pipeline.summary_line(spec, summary)
        if line:
            if executor["dask_worker"] is None:  # a Dask worker's console is not the person's: the flow prints it
                CONSOLE.print(f"      {label}: {line} ({secs:.0f} s)", highlight=False)
            get_run_logger().info("%s: %s", label, line)
        return _jsonable({**summary, "out_dir": out_dir, "out_md5": md5, "stage_run_id": run.run_id,
                          "run_id": run.run_id, "core_seconds": secs, "cpu_seconds": usage["cpu_seconds"],
                          "executor": executor})

    body.__name__ = body.__qualname__ = spec.name.replace("-", "_") + "_task"
    body.__doc__ = spec.help
    # A module attribute under its qualified name: pickled by reference (Dask workers import this module)
    # rather than by value with the module's console and locks.
    body.stage_name = spec.name
    if not hasattr(globals().get(body.__name__, body), "stage_name"):
        raise ValueError(f"stage task name {body.__name__} is taken in {__name__}")
    globals()[body.__name__] = body
    return task(name=spec.name, task_run_name=spec.name + ("-{options[method]}" if "method" in spec.options else ""),
                cache_policy=lineage.StageCache(spec) if spec.cache else NO_CACHE, persist_result=spec.cache,
                result_serializer="json", **RELIABILITY)(body)


TASKS = {spec.name: stage_task(spec) for spec in pipeline.flow_stages()}


def log_policy_reports(reports: dict[str, dict], run_ids: dict[str, str], policies_dir: str, tracking_uri: str,
                       parent_run_id: str) -> None:
    """Each method's section-7 report into its own posttrain run; the comparison plots into the parent."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    for name, rep in reports.items():
        if name in run_ids:
            TrackedRun(client, run_ids[name]).log_nested_metrics({"test": rep["test"], "selected_valid": rep["valid"]})
    parent = TrackedRun(client, parent_run_id)
    for png in sorted(Path(policies_dir).glob("*.png")):
        parent.log_artifact(png, "plots")
    parent.log_artifact(policies_dir, "policies")


class _ValidationGuard:
    """On a data error (validation or malformed input) write a failure summary, log it and the GX data
    docs to the stage's MLflow run, and re-raise: nothing downstream runs."""

    def __init__(self, reports_dir: str | Path, stage: str, run=None):
        self.run, self.reports_dir, self.stage = run, Path(reports_dir), stage

    def __enter__(self):
        return self

    def __exit__(self, et, e, tb):
        from asft.data.schema import DataFormatError
        from asft.data.validation import DataValidationError

        if e is None or not isinstance(e, (DataValidationError, DataFormatError)):
            return False
        if isinstance(e, DataValidationError):
            summary = {"stage": self.stage, **e.to_dict(), "message": str(e)}
        else:
            summary = {"stage": self.stage, "dataset": e.path, "message": str(e), "docs_dir": None,
                       "failures": [{"expectation": "readable_input_file", "column": e.column, "count": len(e.rows or [])
                                     or 1, "sample_rows": list(e.rows or [])[:10], "detail": e.problem}]}
        path = self.reports_dir / "validation_failure.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2, default=str))
        self.run.log_artifact(path, "validation")
        _log_data_docs(self.run, summary.get("docs_dir"), "validation/data_docs")
        self.run.set_tags({"validation_failed": "true", "validation_summary": str(e)[:4000]})
        get_run_logger().error("%s: data validation failed\n%s", self.stage, e)
        return False


def flat_report(rep: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested report as slash-separated metric names."""
    out: dict[str, float] = {}
    for k, v in rep.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_report(v, key + "/"))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, x in enumerate(v):
                out.update(flat_report(x, f"{key}/{i}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


@task(name="promote", cache_policy=NO_CACHE, **RELIABILITY)
def promote_task(method: str, model_dir: str, valid_report: dict, reward_dir: str, lineage_tags: dict,
                 ref_dir: str, processed_dir: str, judge_dir: str, raw_dir: str, cfg: Config, out_dir: str,
                 tracking_uri: str, parent_run_id: str, reward_metrics: dict[str, float] | None = None) -> dict:
    """Register the ``method`` policy and its reward ensemble under the run's product; champion only if
    the gate passes.

    The product's registered names come from :func:`tasks.registry.model_names`. The whole
    read-decide-register-move is one critical section per product (:func:`tasks.registry.promotion_gate`):
    the champion alias is read inside it, and read again just before the alias moves (compare-and-set: a
    champion that changed meanwhile, which the gate should make impossible, leaves this version challenger).
    The current champion is re-evaluated on this run's validation contexts with this run's held-out judge,
    so both sides of the gate are measured the same way; a champion of another catalog is never compared
    (:func:`asft.promotion.catalog_change_decision`).
    """
    from mlflow.tracking import MlflowClient

    from asft.posttrain import evaluate_policies
    from asft.promotion import catalog_change_decision, promotion_decision
    from tasks import registry

    rc = cfg.registry
    client = MlflowClient(tracking_uri)
    out = Path(out_dir)
    names = registry.model_names(cfg, processed_dir)
    rec_name, rew_name, product = names["recommender"], names["reward"], names["product"]
    catalog = (names["catalog"], int(names["items"]))
    with stage_run(tracking_uri, parent_run_id, "promote", tags={"method": method, "product": product}) as run:
        t_wait = time.perf_counter()
        with registry.promotion_gate(tracking_uri, rec_name, rc.gate_timeout_s, rc.gate_lease_s) as gate:
            waited = time.perf_counter() - t_wait
            champ = registry.alias_version(client, rec_name, registry.CHAMPION)
            champ_report, basis = None, "no champion"
            if champ is None:
                decision = promotion_decision(valid_report, None, rc.ndcg_tolerance, rc.judged_margin)
            else:
                champ_dir = registry.download_model_dir(client, champ, out / "champion")
                champ_catalog = registry.catalog_of(champ_dir)
                if champ_catalog[0] == catalog[0]:
                    champ_report = evaluate_policies(
                        {"champion": champ_dir}, ref_dir, processed_dir, None, judge_dir,
                        stages.load_simulator(raw_dir), cfg, splits=("valid",))["champion"]["valid"]
                    basis = f"champion v{champ.version} re-evaluated on this run's validation data and judge"
                    decision = promotion_decision(valid_report, champ_report, rc.ndcg_tolerance, rc.judged_margin)
                else:
                    basis = f"champion v{champ.version}: catalog {champ_catalog[0][:12]}, not compared"
                    decision = catalog_change_decision(valid_report, champ.version, product, champ_catalog, catalog,
                                                       rc.catalog_change)
            reason = f"{decision.reason} ({basis})"
            common = {**lineage_tags, "method": method, "alias": decision.alias, "promotion_reason": reason,
                      "valid_ndcg_at_10": valid_report["ndcg@10"], "valid_judged_top10": valid_report["judged_top10"],
                      "retrain_run_id": parent_run_id, "product": product, "catalog_fingerprint": catalog[0],
                      "catalog_items": catalog[1]}
            model_tags = {"product": product, "catalog_fingerprint": catalog[0], "catalog_items": catalog[1],
                          "data_source": cfg.data.source}
            limits = {"max_rows": rc.serve_max_rows, "max_history": rc.serve_max_history}
            rec_local = registry.save_serving_model("recommender", model_dir, out / "serving" / "recommender",
                                                    rc.serve_k, processed_dir=processed_dir, **limits)
            rew_local = registry.save_serving_model("reward", reward_dir, out / "serving" / "reward", **limits)
            rec = registry.register_version(
                client, rec_name, parent_run_id, rec_local, "recommender", common,
                registry.serving_description("recommender", rc.serve_k, **limits),
                metrics={f"posttrain/{method}/valid/{k}": v for k, v in valid_report.items()},
                dataset=("processed", lineage_tags["dvc.processed.md5"]), model_tags=model_tags)
            rew = registry.register_version(
                client, rew_name, parent_run_id, rew_local, "reward_model",
                {**common, "recommender_version": rec.version},
                registry.serving_description("reward", rc.serve_k, **limits),
                metrics={f"reward/{k}": v for k, v in (reward_metrics or {}).items()},
                dataset=("preferences", lineage_tags["dvc.preferences.md5"]), model_tags=model_tags)
            client.set_model_version_tag(rec_name, rec.version, "reward_version", rew.version)
            alias, now = decision.alias, registry.alias_version(client, rec_name, registry.CHAMPION)
            if alias == registry.CHAMPION and (now.version if now else None) != (champ.version if champ else None):
                alias = registry.CHALLENGER  # compare-and-set failed: the champion moved during this gate
                reason += (f"; not promoted: the champion moved from v{champ.version if champ else None} to "
                           f"v{now.version if now else None} while this gate ran")
                for name, v in ((rec_name, rec.version), (rew_name, rew.version)):
                    client.set_model_version_tag(name, v, "alias", alias)
                    client.set_model_version_tag(name, v, "promotion_reason", reason)
            client.set_registered_model_alias(rec_name, alias, rec.version)
            client.set_registered_model_alias(rew_name, alias, rew.version)
        result = {**decision.to_dict(), "alias": alias, "promote": alias == registry.CHAMPION, "reason": reason,
                  "recommender_version": rec.version, "reward_version": rew.version,
                  "champion_version_before": champ.version if champ else None, "product": product,
                  "recommender_model": rec_name, "reward_model": rew_name, "catalog_fingerprint": catalog[0],
                  "gate": gate, "gate_wait_s": waited}
        path = registry.write_decision(out / "promotion.json", result)
        run.log_artifact(path)
        run.set_tags({"promotion.alias": alias, "promotion.reason": reason[:4000], "promotion.gate": gate,
                      "registered_model": rec_name})
        if champ_report:
            run.log_metrics(champ_report, prefix="champion_valid/")
        run.log_metrics(valid_report, prefix="new_valid/")
        run.log_metrics({"gate_wait_s": waited})
    get_run_logger().info("registered %s v%s as %s: %s", rec_name, rec.version, alias, reason)
    return result
