"""Thin Prefect tasks around the core stages (``asft.stages``).

Tasks exchange paths, hashes and run ids, never tensors or frames. Each task opens a nested
MLflow run under the retrain's parent run, logs its params, metrics (with steps) and artifacts,
and marks the run FAILED if the stage raises.

Every stage task (:func:`stage_task`) is cached on the DVC hashes of its input paths, the params it
reads and the code version (:class:`tasks.lineage.StageCache`), persists its JSON summary (never a
pickle), retries I/O and tracking-server errors with exponential backoff, and reports a failure
naming the stage. Each summary carries ``out_dir``/``out_md5`` (so a cached result can be verified
before it is trusted) and the ``stage_run_id`` of the MLflow run that produced it.
"""

from __future__ import annotations

import functools
import json
import tempfile
import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from asft import stages
from asft.config import load_config
from asft.plots import metric_bars, metric_panels, training_curves
from asft.utils import _json_default, dvc_md5
from tasks.lineage import StageCache, task_key
from tasks.tracking import stage_run, store_lock

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


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=_json_default))


def stage_task(name: str, path_args: tuple[str, ...] = (), value_args: tuple[str, ...] = (), cache: bool = True,
               task_run_name: str | None = None):
    """A Prefect task for one pipeline stage: cached (see module doc), JSON-persisted, retried."""

    def deco(fn):
        @functools.wraps(fn)
        def body(*args, **kwargs):
            return _jsonable(fn(*args, **kwargs))

        return task(name=name, task_run_name=task_run_name,
                    cache_policy=StageCache(stage=name, path_args=path_args, value_args=value_args) if cache
                    else NO_CACHE,
                    persist_result=cache, result_serializer="json", retries=RETRIES,
                    retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.5,
                    retry_condition_fn=_retry_condition, on_failure=[_report_task_failure])(body)

    return deco


def _outputs(res: dict, out_dir: str | Path, run) -> dict:
    """Add what the flow needs to verify and attribute a (possibly cached) result."""
    if out_dir is None:
        return {**res, "out_dir": None, "out_md5": None, "stage_run_id": run.run_id}
    return {**res, "out_dir": str(out_dir), "out_md5": dvc_md5(out_dir), "stage_run_id": run.run_id}


def _cfg(config_path: str):
    return load_config(config_path)


def _work_dir(work_root: str | None, stage: str, cfg, paths: dict, values: dict | None = None) -> Path | None:
    """The resumable work directory of a training stage: keyed like its cache entry (inputs' DVC hashes,
    params, code), so any later run of the same stage, e.g. ``retrain`` after a crash, resumes from
    its checkpoints; a changed input, param or code starts afresh in another directory."""
    return None if work_root is None else Path(work_root) / task_key(stage, cfg, paths, values)


def processes(cfg) -> int:
    """Processes per distributed stage (``distributed.nproc_per_node``; 0 = one per visible GPU)."""
    n = cfg.distributed.nproc_per_node
    if n == 0:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 1
    return max(n, 1)


def _staged(cfg, config_path: str, command: list[str], fn, *args, **kwargs) -> dict:
    """Run a core stage in this process, or, with ``distributed.nproc_per_node`` > 1, its CLI command
    under ``torchrun --standalone`` (DDP on this machine's GPUs, or gloo CPU processes) and read back the
    summary the main process writes. Step metrics then come from the stage's history at the end."""
    n = processes(cfg)
    if n == 1:
        return fn(*args, **kwargs)
    import subprocess
    import sys

    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m",
               "asft.cli", *command, "--config", config_path, "--result", str(result)]
        if kwargs.get("work_dir"):
            cmd += ["--work-dir", str(kwargs["work_dir"])]
        if kwargs.get("resume") is False:
            cmd.append("--no-resume")
        get_run_logger().info("launching %s on %d processes: %s", command[0], n, " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{command[0]} under torchrun ({n} processes) failed with exit code "
                               f"{proc.returncode}:\n{proc.stderr[-4000:]}")
        return json.loads(result.read_text())


def _timed(fn, *args, **kwargs):
    """Run a core stage; return (result, seconds spent in the core, excluding tracking)."""
    t0 = time.perf_counter()
    res = fn(*args, **kwargs)
    return res, time.perf_counter() - t0


class _ValidationGuard:
    """On a data error (validation or malformed input) write a failure summary, log it and the GX data
    docs to the stage's MLflow run, and re-raise: nothing downstream runs."""

    def __init__(self, run, reports_dir: str | Path, stage: str):
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
        if summary.get("docs_dir"):
            self.run.log_artifact(summary["docs_dir"], "validation/data_docs")
        self.run.set_tags({"validation_failed": "true", "validation_summary": str(e)[:4000]})
        get_run_logger().error("%s: data validation failed\n%s", self.stage, e)
        return False


def _log_validation(run, report: dict | None, prefix: str = "validation/") -> None:
    if not report:
        return
    run.log_metrics({k: v for k, v in report.items() if isinstance(v, (int, float))}, prefix=prefix)
    if report.get("docs"):
        run.log_artifact(report["docs"], "data_docs")


@stage_task("validate-raw")
def ingest_task(config_path: str, out_dir: str, reports_dir: str, tracking_uri: str, parent_run_id: str) -> dict:
    """The first stage: load (or simulate) the raw log and validate it with the raw GX suite."""
    cfg = _cfg(config_path)
    with stage_run(tracking_uri, parent_run_id, "validate-raw") as run:
        run.log_params({"data.source": cfg.data.source, "data.format": cfg.data.format})
        with _ValidationGuard(run, reports_dir, "validate-raw"):
            res, res["core_seconds"] = _timed(stages.stage_ingest, cfg, out_dir, Path(reports_dir) / "gx" / "raw")
        run.log_metrics({"rows": res["rows"], "seconds": res["seconds"]})
        _log_validation(run, res.get("validation"))
        res["dvc_md5"] = dvc_md5(out_dir)
        run.set_tags({"raw_sha256": res["sha256"], "dvc.raw.md5": res["dvc_md5"]})
    get_run_logger().info("validated %s rows (%s) into %s", res["rows"], res["format"], out_dir)
    return _outputs(res, out_dir, run)


@stage_task("preprocess", path_args=("raw_dir",))
def preprocess_task(raw_dir: str, config_path: str, out_dir: str, reports_dir: str, tracking_uri: str,
                    parent_run_id: str) -> dict:
    cfg = _cfg(config_path)
    with stage_run(tracking_uri, parent_run_id, "preprocess") as run:
        run.log_params({f"preprocess.{k}": v for k, v in cfg.preprocess.model_dump().items()})
        with _ValidationGuard(run, reports_dir, "preprocess"):
            stats, secs = _timed(stages.stage_preprocess, raw_dir, cfg, out_dir, Path(reports_dir) / "gx" / "processed")
        run.log_metrics({k: v for k, v in stats.items() if isinstance(v, (int, float))})
        _log_validation(run, stats.get("validation"))
        stats["dvc_md5"] = dvc_md5(out_dir)
        run.set_tags({"processed_sha256": stats["sha256"], "dvc.processed.md5": stats["dvc_md5"]})
        run.log_artifact(Path(out_dir) / "stats.json")
    get_run_logger().info("preprocessed: %s users, %s items, %s events", stats["users"], stats["items"], stats["events"])
    return _outputs({**stats, "core_seconds": secs}, out_dir, run)


@stage_task("train-base", path_args=("processed_dir",))
def train_base_task(processed_dir: str, config_path: str, out_dir: str, tracking_uri: str, parent_run_id: str,
                    work_root: str | None = None, resume: bool = True) -> dict:
    cfg = _cfg(config_path)
    work = _work_dir(work_root, "train-base", cfg, {"processed_dir": processed_dir})
    with stage_run(tracking_uri, parent_run_id, "train-base") as run:
        run.log_params({k: v for k, v in cfg.flat().items() if k.split(".")[0] in ("model", "train", "seed")})
        summary, summary["core_seconds"] = _timed(_staged, cfg, config_path, ["train-base", "--processed", processed_dir,
                                                                              "--output", out_dir],
                                                  stages.stage_train_base, processed_dir, cfg, out_dir,
                                                  on_log=run.on_log, resume=resume, work_dir=work)
        run.log_metrics({"resumed_from_epoch": summary["resumed_from_epoch"]})
        run.log_metrics({k: summary[k] for k in ("best_metric", "best_epoch", "epochs_run", "steps", "tokens_per_s",
                                                 "train_seconds", "eval_seconds", "n_params")})
        hist = json.loads((Path(out_dir) / "train_summary.json").read_text())["history"]
        run.log_artifact(training_curves(hist, Path(out_dir) / "training_curves.png", "base SFT"), "plots")
        run.log_artifact(Path(out_dir) / "train_summary.json")
        run.log_artifact(summary["model_dir"], "model")
        run.set_tags({"model_dir": summary["model_dir"]})
    get_run_logger().info("base model: best valid %s %.4f at epoch %s", cfg.train.monitor, summary["best_metric"],
                          summary["best_epoch"])
    return _outputs(summary, out_dir, run)


@stage_task("evaluate", path_args=("model_dir", "processed_dir"), value_args=("model_name",))
def evaluate_task(model_dir: str, processed_dir: str, config_path: str, model_name: str, tracking_uri: str,
                  parent_run_id: str) -> dict:
    cfg = _cfg(config_path)
    with stage_run(tracking_uri, parent_run_id, f"evaluate-{model_name}") as run:
        metrics, secs = _timed(stages.stage_evaluate, model_dir, processed_dir, cfg)
        run.log_nested_metrics(metrics)
        run.log_metrics({"core_seconds": secs})
        keys = [f"{m}@{k}" for k in cfg.eval.ks for m in ("hr", "ndcg")] + ["mrr"]
        with tempfile.TemporaryDirectory() as tmp:  # never inside the model's (published, hashed) directory
            png = Path(tmp) / f"metrics_{model_name}.png"
            run.log_artifact(metric_bars(metrics, keys, png, f"{model_name}: full-ranking metrics"), "plots")
    return _outputs({**metrics, "core_seconds": secs}, None, run)


@stage_task("preferences", path_args=("raw_dir", "processed_dir"))
def preferences_task(raw_dir: str, processed_dir: str, config_path: str, out_dir: str, reports_dir: str,
                     tracking_uri: str, parent_run_id: str) -> dict:
    cfg = _cfg(config_path)
    with stage_run(tracking_uri, parent_run_id, "preferences") as run:
        run.log_params({k: v for k, v in cfg.flat().items() if k.startswith("preferences.")})
        with _ValidationGuard(run, reports_dir, "preferences"):
            stats, secs = _timed(stages.stage_preferences, raw_dir, processed_dir, cfg, out_dir,
                                 Path(reports_dir) / "gx" / "preferences")
        run.log_metrics({"pairs": stats["pairs"], "contexts": stats["contexts"], "users": stats["users"],
                         "mean_pairs_per_context": stats["mean_pairs_per_context"]})
        run.log_metrics(stats["pairs_by_source"], prefix="pairs_by_source/")
        run.log_metrics(stats["pairs_by_split"], prefix="pairs_by_split/")
        if "judges" in stats:
            run.log_metrics({k: v for k, v in stats["judges"].items() if isinstance(v, int)}, prefix="judges/")
        _log_validation(run, stats.get("validation"))
        stats["dvc_md5"] = dvc_md5(out_dir)
        run.set_tags({"preferences_sha256": stats["sha256"], "dvc.preferences.md5": stats["dvc_md5"]})
        for f in ("stats.json", "judges.json", "SCHEMA.md"):
            run.log_artifact(Path(out_dir) / f)
    get_run_logger().info("preferences: %s pairs over %s contexts (%s)", stats["pairs"], stats["contexts"],
                          ", ".join(f"{k} {v}" for k, v in stats["pairs_by_source"].items()))
    return _outputs({**stats, "core_seconds": secs}, out_dir, run)


def _train_ensemble(stage: str, stage_fn, processed_dir: str, pref_dir: str, base_model_dir: str, config_path: str,
                    out_dir: str, tracking_uri: str, parent_run_id: str, params_prefixes: tuple[str, ...],
                    work_root: str | None, resume: bool) -> dict:
    cfg = _cfg(config_path)
    work = _work_dir(work_root, stage, cfg, {"processed_dir": processed_dir, "pref_dir": pref_dir,
                                             "base_model_dir": base_model_dir})
    with stage_run(tracking_uri, parent_run_id, stage) as run:
        run.log_params({k: v for k, v in cfg.flat().items() if k.startswith(params_prefixes) or k == "seed"})
        summary, secs = _timed(_staged, cfg, config_path, [stage, "--processed", processed_dir, "--preferences", pref_dir,
                                                           "--base", base_model_dir, "--output", out_dir],
                               stage_fn, processed_dir, pref_dir, base_model_dir, cfg, out_dir, on_log=run.on_log,
                               resume=resume, work_dir=work)
        for m in summary["members"]:
            run.log_metrics({"best_metric": m["best_metric"], "best_epoch": m["best_epoch"],
                             "epochs_run": m["epochs_run"], "resumed_from_epoch": m["resumed_from_epoch"]},
                            prefix=f"member_{m['member']}/")
        run.log_metrics({"train_seconds": summary["train_seconds"]})
        run.log_metrics(summary["centring"], prefix="centring/")
        hist = json.loads((Path(out_dir) / "train_summary.json").read_text())["histories"]
        for k, h in enumerate(hist):
            png = Path(out_dir) / f"training_curves_member_{k}.png"
            run.log_artifact(training_curves(h, png, f"{stage} member {k}"), "plots")
        run.log_artifact(Path(out_dir) / "train_summary.json")
        run.log_artifact(Path(out_dir) / "ensemble.json", "model")
        for d in summary["member_dirs"]:
            run.log_artifact(Path(out_dir) / d, f"model/{d}")
        run.set_tags({"model_dir": str(out_dir), "fold": summary.get("fold")})
    return _outputs({**summary, "core_seconds": secs}, out_dir, run)


@stage_task("train-reward", path_args=("processed_dir", "pref_dir", "base_model_dir"))
def train_reward_task(processed_dir: str, pref_dir: str, base_model_dir: str, config_path: str, out_dir: str,
                      tracking_uri: str, parent_run_id: str,
                      work_root: str | None = None, resume: bool = True) -> dict:
    """The training reward ensemble (reward.fold of the preference data)."""
    return _train_ensemble("train-reward", stages.stage_train_reward, processed_dir, pref_dir, base_model_dir,
                           config_path, out_dir, tracking_uri, parent_run_id, ("reward.",), work_root, resume)


@stage_task("train-judge", path_args=("processed_dir", "pref_dir", "base_model_dir"))
def train_judge_task(processed_dir: str, pref_dir: str, base_model_dir: str, config_path: str, out_dir: str,
                     tracking_uri: str, parent_run_id: str,
                     work_root: str | None = None, resume: bool = True) -> dict:
    """The held-out judge ensemble (judge.fold, other seeds): evaluation only."""
    return _train_ensemble("train-judge", stages.stage_train_judge, processed_dir, pref_dir, base_model_dir,
                           config_path, out_dir, tracking_uri, parent_run_id, ("judge.", "reward."), work_root, resume)


@stage_task("sample", path_args=("processed_dir", "ref_dir"))
def sample_task(processed_dir: str, ref_dir: str, config_path: str, out_dir: str, tracking_uri: str,
                parent_run_id: str) -> dict:
    cfg = _cfg(config_path)
    with stage_run(tracking_uri, parent_run_id, "sample") as run:
        run.log_params({k: v for k, v in cfg.flat().items() if k.startswith("sampling.")})
        res, secs = _timed(_staged, cfg, config_path, ["sample", "--processed", processed_dir, "--base", ref_dir,
                                                       "--output", out_dir], stages.stage_sample, processed_dir,
                           ref_dir, cfg, out_dir)
        run.log_metrics(flat_report(res))
        run.log_artifact(Path(out_dir) / "sampling.json")
    get_run_logger().info("sampled %s candidates for %s contexts (%.0f/s)", res["candidates"], res["contexts"],
                          res["candidates_per_s"])
    return _outputs({**res, "core_seconds": secs}, out_dir, run)


@stage_task("score", path_args=("cand_dir", "processed_dir", "ref_dir", "reward_dir"))
def score_task(cand_dir: str, processed_dir: str, ref_dir: str, reward_dir: str, config_path: str, out_dir: str,
               tracking_uri: str, parent_run_id: str) -> dict:
    cfg = _cfg(config_path)
    with stage_run(tracking_uri, parent_run_id, "score") as run:
        res, secs = _timed(_staged, cfg, config_path, ["score", "--candidates", cand_dir, "--processed", processed_dir,
                                                       "--base", ref_dir, "--reward", reward_dir, "--output", out_dir],
                           stages.stage_score, cand_dir, processed_dir, ref_dir, reward_dir, cfg, out_dir)
        run.log_metrics(flat_report(res))
        run.log_artifact(Path(out_dir) / "sampling.json")
    return _outputs({**res, "core_seconds": secs}, out_dir, run)


@stage_task("advantages", path_args=("scored_dir",))
def advantages_task(scored_dir: str, config_path: str, out_dir: str, tracking_uri: str, parent_run_id: str) -> dict:
    cfg = _cfg(config_path)
    with stage_run(tracking_uri, parent_run_id, "advantages") as run:
        run.log_params({k: v for k, v in cfg.flat().items() if k.startswith("advantage.")})
        res, secs = _timed(stages.stage_advantages, scored_dir, cfg, out_dir)
        run.log_metrics({k: v for k, v in res.items() if isinstance(v, float)}, prefix="weights/")
        for png in res["plots"]:
            run.log_artifact(png, "plots")
        run.log_artifact(Path(out_dir) / "weights.json")
    get_run_logger().info("A-SFT weights: ESS %.1f%% of %d, %.2f%% clipped", 100 * res["ess_share"], res["n"],
                          100 * res["clipped_share"])
    return _outputs({**res, "core_seconds": secs}, out_dir, run)


@stage_task("posttrain", path_args=("processed_dir", "ref_dir", "reward_dir", "scored_dir", "adv_dir"),
            value_args=("method",), task_run_name="posttrain-{method}")
def posttrain_task(method: str, processed_dir: str, ref_dir: str, reward_dir: str, scored_dir: str, adv_dir: str,
                   config_path: str, out_dir: str, tracking_uri: str, parent_run_id: str, work_root: str | None = None,
                   resume: bool = True) -> dict:
    """One post-training method in its own nested MLflow run (tag ``method``), so methods compare side
    by side; the run id is returned so evaluation logs into the same run."""
    cfg = _cfg(config_path)
    work = _work_dir(work_root, "posttrain", cfg, {"processed_dir": processed_dir, "ref_dir": ref_dir,
                                                   "reward_dir": reward_dir, "scored_dir": scored_dir,
                                                   "adv_dir": adv_dir}, {"method": method})
    with stage_run(tracking_uri, parent_run_id, f"posttrain-{method}", tags={"method": method}) as run:
        run.log_params({"method": method, **{k: v for k, v in cfg.flat().items()
                                             if k.startswith(("posttrain.", "advantage.", "sampling."))}})
        cli = ["posttrain", "--method", method, "--processed", processed_dir, "--base", ref_dir, "--output", out_dir]
        for flag, path in (("--reward", reward_dir), ("--scored", scored_dir), ("--advantages", adv_dir)):
            cli += [flag, path] if path else []
        summary, secs = _timed(_staged, cfg, config_path, cli, stages.stage_posttrain, method, processed_dir, ref_dir,
                               reward_dir, scored_dir, adv_dir, cfg, out_dir, on_log=run.on_log, resume=resume,
                               work_dir=work)
        run.log_metrics(flat_report({k: v for k, v in summary.items() if k not in ("rounds",)}), prefix="train/")
        hist = json.loads((Path(out_dir) / "train_summary.json").read_text())["history"]
        run.log_artifact(training_curves(hist, Path(out_dir) / "training_curves.png", f"{method}"), "plots")
        for png in ("weights_hist.png", "advantages_hist.png"):
            run.log_artifact(Path(out_dir) / png, "plots")
        run.log_artifact(Path(out_dir) / "train_summary.json")
        run.log_artifact(summary["model_dir"], "model")
        run.set_tags({"model_dir": summary["model_dir"]})
    get_run_logger().info("%s: best valid %s %.4f at epoch %s", method, cfg.posttrain.train.monitor,
                          summary["best_metric"], summary["best_epoch"])
    return _outputs({**summary, "run_id": run.run_id, "core_seconds": secs}, out_dir, run)


@stage_task("evaluate-policies", cache=False)
def evaluate_policies_task(model_dirs: dict[str, str], run_ids: dict[str, str], ref_dir: str, processed_dir: str,
                           reward_dir: str, judge_dir: str, raw_dir: str, config_path: str, out_dir: str,
                           tracking_uri: str, parent_run_id: str) -> dict:
    """Section-7 reports of the base and every method on the same contexts; each method's report is
    logged into its own posttrain run, the comparison table and plot into the parent run."""
    from mlflow.tracking import MlflowClient

    from asft.posttrain import evaluate_policies
    from tasks.tracking import TrackedRun

    cfg = _cfg(config_path)
    t0 = time.perf_counter()
    reports = evaluate_policies({"base": ref_dir, **model_dirs}, ref_dir, processed_dir, reward_dir, judge_dir,
                                stages.load_simulator(raw_dir), cfg)
    secs = time.perf_counter() - t0
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri)
    for name, rep in reports.items():
        (out / f"{name}.json").write_text(json.dumps(rep, indent=2))
        if name in run_ids:
            TrackedRun(client, run_ids[name]).log_nested_metrics({"test": rep["test"], "selected_valid": rep["valid"]})
    keys = [k for k in ("ndcg@10", "hr@10", "high_rated/ndcg@10", "judged_top10", "true_top10", "kl_ref", "entropy",
                        "coverage@10") if k in reports["base"]["test"]]
    png = metric_panels({n: r["test"] for n, r in reports.items()}, keys, out / "methods_test.png",
                      "post-training methods (test)")
    parent = TrackedRun(client, parent_run_id)
    parent.log_artifact(png, "plots")
    for path in lambda_frontiers(reports, cfg.advantage.lam, out):
        parent.log_artifact(path, "plots")
    parent.log_artifact(out, "policies")
    return {"reports": reports, "core_seconds": secs}


@stage_task("reward-report", path_args=("reward_dir", "pref_dir", "processed_dir", "raw_dir", "base_model_dir"))
def reward_report_task(reward_dir: str, pref_dir: str, processed_dir: str, raw_dir: str, base_model_dir: str,
                       config_path: str, out_dir: str, tracking_uri: str, parent_run_id: str) -> dict:
    cfg = _cfg(config_path)
    with stage_run(tracking_uri, parent_run_id, "reward-report") as run:
        rep, secs = _timed(stages.stage_reward_report, reward_dir, pref_dir, processed_dir, raw_dir,
                           base_model_dir, cfg, out_dir)
        run.log_metrics(flat_report(rep))
        for png in rep["plots"]:
            run.log_artifact(png, "plots")
        run.log_artifact(Path(out_dir) / "reward_report.json")
    e = rep["ensemble"]
    get_run_logger().info("reward ensemble on held-out pairs: accuracy %.4f, AUC %.4f (item-mean %.4f)",
                          e["pair_acc"], e["auc"], rep["naive"].get("item_mean_rating", {}).get("pair_acc", float("nan")))
    return _outputs({**rep, "core_seconds": secs}, out_dir, run)


def lambda_frontiers(reports: dict[str, dict], lam: float, out: Path) -> list[Path]:
    """Judged reward vs KL (and, on the simulator, true reward vs NDCG@10) on test: the A-SFT lambda
    sweep as one curve (``asft`` and ``asft@lam=X`` policies), every other policy as a point."""
    from asft.plots import frontier

    def lam_of(name: str) -> float | None:
        return lam if name == "asft" else float(name.split("=", 1)[1]) if name.startswith("asft@lam=") else None

    paths = []
    for (xk, yk, fname) in (("kl_ref", "judged_top10", "frontier_judged_kl.png"),
                            ("ndcg@10", "true_top10", "frontier_true_ndcg.png")):
        if yk not in reports["base"]["test"]:
            continue
        sweep = sorted((lam_of(n), r["test"]) for n, r in reports.items() if lam_of(n) is not None)
        points = {"A-SFT (lambda)": [(t[xk], t[yk], f"{la:g}") for la, t in sweep]} if sweep else {}
        points.update({n: [(r["test"][xk], r["test"][yk], n)] for n, r in reports.items() if lam_of(n) is None})
        paths.append(frontier(points, out / fname, f"test: {yk} vs {xk}", xk, yk))
    return paths


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


@stage_task("promote", cache=False)
def promote_task(method: str, model_dir: str, valid_report: dict, reward_dir: str, lineage_tags: dict,
                 ref_dir: str, processed_dir: str, judge_dir: str, raw_dir: str, config_path: str, out_dir: str,
                 tracking_uri: str, parent_run_id: str) -> dict:
    """Register the ``method`` policy and its reward ensemble; champion only if the gate passes.

    The current champion is re-evaluated on this run's validation contexts with this run's held-out
    judge (when it ranks the same catalog), so both sides of the gate are measured the same way;
    with a different catalog the champion's recorded validation metrics are used, and the reason
    says so.
    """
    from mlflow.tracking import MlflowClient

    from asft.posttrain import evaluate_policies
    from asft.promotion import promotion_decision
    from tasks import registry

    cfg = _cfg(config_path)
    rc = cfg.registry
    client = MlflowClient(tracking_uri)
    out = Path(out_dir)
    # One promotion at a time per local store: the gate reads the champion and moves the alias.
    with store_lock(tracking_uri, "registry"), stage_run(tracking_uri, parent_run_id, "promote",
                                                         tags={"method": method}) as run:
        champ = registry.alias_version(client, rc.recommender_model, registry.CHAMPION)
        champ_report, basis = None, "no champion"
        if champ is not None:
            champ_dir = registry.download_model_dir(client, champ, out / "champion")
            if registry.same_catalog(champ_dir, processed_dir):
                champ_report = evaluate_policies({"champion": champ_dir}, ref_dir, processed_dir, None, judge_dir,
                                                 stages.load_simulator(raw_dir), cfg, splits=("valid",))["champion"]["valid"]
                basis = f"champion v{champ.version} re-evaluated on this run's validation data and judge"
            else:
                champ_report = {"ndcg@10": float(champ.tags["valid_ndcg_at_10"]),
                                "judged_top10": float(champ.tags["valid_judged_top10"])}
                basis = f"champion v{champ.version} ranks another catalog: its recorded validation metrics"
        decision = promotion_decision(valid_report, champ_report, rc.ndcg_tolerance, rc.judged_margin)
        reason = f"{decision.reason} ({basis})"
        common = {**lineage_tags, "method": method, "alias": decision.alias, "promotion_reason": reason,
                  "valid_ndcg_at_10": valid_report["ndcg@10"], "valid_judged_top10": valid_report["judged_top10"],
                  "retrain_run_id": parent_run_id}
        rec_local = registry.save_serving_model("recommender", model_dir, out / "serving" / "recommender", rc.serve_k)
        rew_local = registry.save_serving_model("reward", reward_dir, out / "serving" / "reward")
        rec = registry.register_version(client, rc.recommender_model, parent_run_id, rec_local, "recommender", common,
                                        "Generative recommender post-trained with A-SFT; pyfunc: history -> top-K")
        rew = registry.register_version(client, rc.reward_model, parent_run_id, rew_local, "reward_model",
                                        {**common, "recommender_version": rec.version},
                                        "Bradley-Terry reward ensemble; pyfunc: (history, items) -> rewards")
        client.set_model_version_tag(rc.recommender_model, rec.version, "reward_version", rew.version)
        client.set_registered_model_alias(rc.recommender_model, decision.alias, rec.version)
        client.set_registered_model_alias(rc.reward_model, decision.alias, rew.version)
        result = {**decision.to_dict(), "reason": reason, "recommender_version": rec.version,
                  "reward_version": rew.version, "champion_version_before": champ.version if champ else None}
        path = registry.write_decision(out / "promotion.json", result)
        run.log_artifact(path)
        run.set_tags({"promotion.alias": decision.alias, "promotion.reason": reason[:4000]})
        if champ_report:
            run.log_metrics(champ_report, prefix="champion_valid/")
        run.log_metrics(valid_report, prefix="new_valid/")
    get_run_logger().info("registered %s v%s as %s: %s", rc.recommender_model, rec.version, decision.alias, reason)
    return result
