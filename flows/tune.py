"""The ``tune`` flow: ingest (load + GX validation) -> Optuna study over base-model settings.

One MLflow parent run per invocation (``kind=tune``) with a nested run per trial (its sampled values
as params, validation metrics per epoch, the trial's state); the best values are logged and written
to ``OUTPUT/best.yaml`` (usable as ``retrain --config``), and a Prefect table artifact lists the
trials. Run the same command again (or on several workers against one ``tune.storage``) to resume.

With ``orchestration.task_runner: dask`` the trials fan out to a Dask cluster (``orchestration.dask_address``,
or a LocalCluster for the run): one study worker per worker slot of the cluster, as tasks of a ``tune-trials``
subflow on prefect-dask's DaskTaskRunner, all on the same study (its storage must be reachable from the
workers: the SQLite file on a shared filesystem, or ``tune.storage``), each with its own sampler seed.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from asft import stages
from asft.config import load_config
from asft.tuning import TRIALS_FILE, tune_base


@task(name="ingest", task_run_name="ingest")
def _ingest(cfg, raw_dir: str, docs_dir: str) -> dict:
    if (Path(raw_dir) / "interactions.parquet").is_file():
        return {"raw_dir": raw_dir, "reused": True}
    return stages.stage_ingest(cfg, raw_dir, docs_dir)


@task(name="tune-base", task_run_name="tune-base")
def _tune(cfg, raw_dir: str, output: str, n_trials: int | None, parent_run_id: str | None, uri: str | None,
          worker: int = 0) -> dict:
    from tasks.runners import dask_stage_threads

    threads = dask_stage_threads()  # on a Dask worker: its share of the host's cores (workers start with 1)
    if threads:
        import torch

        torch.set_num_threads(threads)
    logger = get_run_logger()
    trial_logger = None
    if parent_run_id:
        from tasks.runners import executor_info
        from tasks.tracking import stage_run

        @contextlib.contextmanager
        def trial_logger(number: int, values: dict):
            where = {f"executor.{k}": v for k, v in executor_info().items() if v is not None}
            with stage_run(uri, parent_run_id, f"trial-{number:04d}", tags={"trial": str(number), **where}) as run:
                run.log_params(values)
                yield run.on_log

    def log(msg: str) -> None:  # the console (Prefect's own console level is WARNING) and the Prefect UI
        print(msg, file=sys.stderr, flush=True)
        logger.info(msg)

    return tune_base(raw_dir, cfg, output, n_trials=n_trials, trial_logger=trial_logger, log=log, worker=worker)


@flow(name="tune-trials", validate_parameters=False)
def _trials(cfg, raw_dir: str, output: str, n_trials: int | None, parent_run_id: str | None, uri: str | None,
            workers: int, timeout_s: float) -> list[dict]:
    """``workers`` study workers on this flow's task runner (a DaskTaskRunner), sharing one study."""
    futures = [_tune.with_options(timeout_seconds=timeout_s, task_run_name=f"tune-base-{w}").submit(
        cfg, raw_dir, output, n_trials, parent_run_id, uri, worker=w) for w in range(workers)]
    return [f.result() for f in futures]


def _tune_on_dask(cfg, raw_dir: str, output: str, n_trials: int | None, parent_run_id: str | None,
                  uri: str | None, timeout_s: float) -> dict:
    """The study on the Dask cluster, one study worker per worker slot; the summary of the whole study."""
    import time

    from asft.tuning import open_study, write_results
    from tasks.runners import DaskFanOut, cluster_slots, workers_reach_this_api

    t = time.perf_counter()
    open_study(cfg, Path(output))  # the storage and the study exist before the workers open them together
    fan = DaskFanOut(cfg.orchestration)
    try:
        runner = fan.runner()
        workers = cluster_slots(fan.address)
        get_run_logger().info("tune: %d study workers on the Dask scheduler at %s", workers, fan.address)
        with workers_reach_this_api():
            _trials.with_options(task_runner=runner)(cfg, raw_dir, output, n_trials, parent_run_id, uri, workers,
                                                     timeout_s)
    finally:
        fan.close()
    return write_results(open_study(cfg, Path(output)), cfg, Path(output), time.perf_counter() - t)


@flow(name="tune", log_prints=False, validate_parameters=True)
def tune(data: str | None = None, output: str = "runs/tune", config: str | None = "params.yaml",
         overrides: list[str] | None = None, n_trials: int | None = None) -> dict:
    """Tune the base model on ``data`` (validation split only); resumable."""
    cfg = load_config(config if config and Path(config).is_file() else None,
                      [*(overrides or []), *([f"data.source={data}"] if data else [])])
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    # time limits: a data stage's for ingest; a training stage's per trial for the study
    ingest = _ingest.with_options(timeout_seconds=cfg.orchestration.data_timeout_s)(cfg, str(out / "raw"),
                                                                                    str(out / "docs"))
    parent = uri = None
    if cfg.tracking.enabled:
        from tasks.tracking import start_parent

        run = start_parent(cfg, f"tune-{out.name}", {"kind": "tune", "data_source": cfg.data.source},
                           source_name="flows/tune.py:tune")
        parent, uri = run.run_id, run.client.tracking_uri
        run.log_params({f"tune.{k}": v for k, v in cfg.tune.model_dump(mode="json", exclude={"space"}).items()})
    try:
        study_limit = cfg.orchestration.train_timeout_s * (n_trials or cfg.tune.n_trials)
        if cfg.orchestration.task_runner == "dask":
            result = _tune_on_dask(cfg, ingest["raw_dir"], str(out), n_trials, parent, uri, study_limit)
        else:
            result = _tune.with_options(timeout_seconds=study_limit)(cfg, ingest["raw_dir"], str(out), n_trials,
                                                                     parent, uri)
    except BaseException:
        if parent:
            run.end("FAILED")
        raise
    if parent:
        run.log_metrics({"best_valid_" + cfg.train.monitor: result["best_value"], "trials": result["trials"],
                         "pruned": result["pruned"]})
        run.log_params({f"best.{k}": v for k, v in result["best_params"].items()})
        run.log_artifact(result["best_file"])
        run.log_artifact(out / TRIALS_FILE)
        run.end()
    import json

    trials = json.loads((out / TRIALS_FILE).read_text())
    create_table_artifact(key="tune-trials", description="Optuna trials (validation metric)",
                          table=[{"trial": t["number"], "state": t["state"],
                                  "value": None if t["value"] is None else round(t["value"], 4),
                                  **{k: v for k, v in t["params"].items()}} for t in trials])
    create_markdown_artifact(key="tune-best", description="best trial",
                             markdown=f"**best {cfg.train.monitor} {result['best_value']:.4f}** (trial "
                             f"{result['best_trial']}): `retrain --config {result['best_file']}`\n\n```yaml\n"
                             f"{Path(result['best_file']).read_text()}```")
    return result
