"""Thin Prefect tasks around the core stages (``asft.stages``).

Tasks exchange paths, hashes and run ids, never tensors or frames. Each task opens a nested
MLflow run under the retrain's parent run, logs its params, metrics (with steps) and artifacts,
and marks the run FAILED if the stage raises.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from asft import stages
from asft.config import load_config
from asft.plots import metric_bars, training_curves
from tasks.tracking import stage_run


def _cfg(config_path: str):
    return load_config(config_path)


def _timed(fn, *args, **kwargs):
    """Run a core stage; return (result, seconds spent in the core, excluding tracking)."""
    t0 = time.perf_counter()
    res = fn(*args, **kwargs)
    return res, time.perf_counter() - t0


@task(name="load", cache_policy=NO_CACHE)
def load_task(config_path: str, out_dir: str, tracking_uri: str, parent_run_id: str) -> dict:
    cfg = _cfg(config_path)
    with stage_run(tracking_uri, parent_run_id, "load") as run:
        run.log_params({"data.source": cfg.data.source, "data.format": cfg.data.format})
        res, res["core_seconds"] = _timed(stages.stage_load, cfg, out_dir)
        run.log_metrics({"rows": res["rows"], "seconds": res["seconds"]})
        run.set_tags({"raw_sha256": res["sha256"]})
    get_run_logger().info("loaded %s rows (%s) into %s", res["rows"], res["format"], out_dir)
    return res


@task(name="validate-schema", cache_policy=NO_CACHE)
def validate_task(raw_dir: str, config_path: str, tracking_uri: str, parent_run_id: str) -> dict:
    cfg = _cfg(config_path)
    with stage_run(tracking_uri, parent_run_id, "validate-schema") as run:
        try:
            report, secs = _timed(stages.stage_validate, raw_dir, cfg)
        except Exception as e:
            from asft.data.validation import DataValidationError

            if isinstance(e, DataValidationError):
                path = Path(raw_dir).parent / "reports" / "validation_failure.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(e.to_dict(), indent=2))
                run.log_artifact(path, "validation")
            raise
        run.log_metrics(report)
    return {**report, "core_seconds": secs}


@task(name="preprocess", cache_policy=NO_CACHE)
def preprocess_task(raw_dir: str, config_path: str, out_dir: str, tracking_uri: str, parent_run_id: str) -> dict:
    cfg = _cfg(config_path)
    with stage_run(tracking_uri, parent_run_id, "preprocess") as run:
        run.log_params({f"preprocess.{k}": v for k, v in cfg.preprocess.model_dump().items()})
        stats, secs = _timed(stages.stage_preprocess, raw_dir, cfg, out_dir)
        run.log_metrics({k: v for k, v in stats.items() if isinstance(v, (int, float))})
        run.set_tags({"processed_sha256": stats["sha256"]})
        run.log_artifact(Path(out_dir) / "stats.json")
    get_run_logger().info("preprocessed: %s users, %s items, %s events", stats["users"], stats["items"], stats["events"])
    return {**stats, "core_seconds": secs}


@task(name="train-base", cache_policy=NO_CACHE)
def train_base_task(processed_dir: str, config_path: str, out_dir: str, tracking_uri: str, parent_run_id: str) -> dict:
    cfg = _cfg(config_path)
    with stage_run(tracking_uri, parent_run_id, "train-base") as run:
        run.log_params({k: v for k, v in cfg.flat().items() if k.split(".")[0] in ("model", "train", "seed")})
        summary, summary["core_seconds"] = _timed(stages.stage_train_base, processed_dir, cfg, out_dir,
                                                  on_log=run.on_log)
        run.log_metrics({k: summary[k] for k in ("best_metric", "best_epoch", "epochs_run", "steps", "tokens_per_s",
                                                 "train_seconds", "eval_seconds", "n_params")})
        hist = json.loads((Path(out_dir) / "train_summary.json").read_text())["history"]
        run.log_artifact(training_curves(hist, Path(out_dir) / "training_curves.png", "base SFT"), "plots")
        run.log_artifact(Path(out_dir) / "train_summary.json")
        run.log_artifact(summary["model_dir"], "model")
        run.set_tags({"model_dir": summary["model_dir"]})
    get_run_logger().info("base model: best valid %s %.4f at epoch %s", cfg.train.monitor, summary["best_metric"],
                          summary["best_epoch"])
    return summary


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(model_dir: str, processed_dir: str, config_path: str, model_name: str, tracking_uri: str,
                  parent_run_id: str) -> dict:
    cfg = _cfg(config_path)
    with stage_run(tracking_uri, parent_run_id, f"evaluate-{model_name}") as run:
        metrics, secs = _timed(stages.stage_evaluate, model_dir, processed_dir, cfg)
        run.log_nested_metrics(metrics)
        run.log_metrics({"core_seconds": secs})
        keys = [f"{m}@{k}" for k in cfg.eval.ks for m in ("hr", "ndcg")] + ["mrr"]
        png = Path(model_dir).parent / f"metrics_{model_name}.png"
        run.log_artifact(metric_bars(metrics, keys, png, f"{model_name}: full-ranking metrics"), "plots")
    return {**metrics, "core_seconds": secs}
