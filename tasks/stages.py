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
from asft.plots import metric_bars, metric_panels, training_curves
from asft.utils import dvc_md5
from tasks.tracking import stage_run


def _cfg(config_path: str):
    return load_config(config_path)


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


@task(name="validate-raw", cache_policy=NO_CACHE)
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
    return res


@task(name="preprocess", cache_policy=NO_CACHE)
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


@task(name="preferences", cache_policy=NO_CACHE)
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
    return {**stats, "core_seconds": secs}


def _train_ensemble(stage: str, stage_fn, processed_dir: str, pref_dir: str, base_model_dir: str, config_path: str,
                    out_dir: str, tracking_uri: str, parent_run_id: str, params_prefixes: tuple[str, ...]) -> dict:
    cfg = _cfg(config_path)
    with stage_run(tracking_uri, parent_run_id, stage) as run:
        run.log_params({k: v for k, v in cfg.flat().items() if k.startswith(params_prefixes) or k == "seed"})
        summary, secs = _timed(stage_fn, processed_dir, pref_dir, base_model_dir, cfg, out_dir, on_log=run.on_log)
        for m in summary["members"]:
            run.log_metrics({"best_metric": m["best_metric"], "best_epoch": m["best_epoch"],
                             "epochs_run": m["epochs_run"]}, prefix=f"member_{m['member']}/")
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
    return {**summary, "core_seconds": secs}


@task(name="train-reward", cache_policy=NO_CACHE)
def train_reward_task(processed_dir: str, pref_dir: str, base_model_dir: str, config_path: str, out_dir: str,
                      tracking_uri: str, parent_run_id: str) -> dict:
    """The training reward ensemble (reward.fold of the preference data)."""
    return _train_ensemble("train-reward", stages.stage_train_reward, processed_dir, pref_dir, base_model_dir,
                           config_path, out_dir, tracking_uri, parent_run_id, ("reward.",))


@task(name="train-judge", cache_policy=NO_CACHE)
def train_judge_task(processed_dir: str, pref_dir: str, base_model_dir: str, config_path: str, out_dir: str,
                     tracking_uri: str, parent_run_id: str) -> dict:
    """The held-out judge ensemble (judge.fold, other seeds): evaluation only."""
    return _train_ensemble("train-judge", stages.stage_train_judge, processed_dir, pref_dir, base_model_dir,
                           config_path, out_dir, tracking_uri, parent_run_id, ("judge.", "reward."))


@task(name="sample", cache_policy=NO_CACHE)
def sample_task(processed_dir: str, ref_dir: str, config_path: str, out_dir: str, tracking_uri: str,
                parent_run_id: str) -> dict:
    cfg = _cfg(config_path)
    with stage_run(tracking_uri, parent_run_id, "sample") as run:
        run.log_params({k: v for k, v in cfg.flat().items() if k.startswith("sampling.")})
        res, secs = _timed(stages.stage_sample, processed_dir, ref_dir, cfg, out_dir)
        run.log_metrics(flat_report(res))
        run.log_artifact(Path(out_dir) / "sampling.json")
    get_run_logger().info("sampled %s candidates for %s contexts (%.0f/s)", res["candidates"], res["contexts"],
                          res["candidates_per_s"])
    return {**res, "core_seconds": secs}


@task(name="score", cache_policy=NO_CACHE)
def score_task(cand_dir: str, processed_dir: str, ref_dir: str, reward_dir: str, config_path: str, out_dir: str,
               tracking_uri: str, parent_run_id: str) -> dict:
    cfg = _cfg(config_path)
    with stage_run(tracking_uri, parent_run_id, "score") as run:
        res, secs = _timed(stages.stage_score, cand_dir, processed_dir, ref_dir, reward_dir, cfg, out_dir)
        run.log_metrics(flat_report(res))
        run.log_artifact(Path(out_dir) / "sampling.json")
    return {**res, "core_seconds": secs}


@task(name="advantages", cache_policy=NO_CACHE)
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
    return {**res, "core_seconds": secs}


@task(name="posttrain", cache_policy=NO_CACHE, task_run_name="posttrain-{method}")
def posttrain_task(method: str, processed_dir: str, ref_dir: str, reward_dir: str, scored_dir: str, adv_dir: str,
                   config_path: str, out_dir: str, tracking_uri: str, parent_run_id: str) -> dict:
    """One post-training method in its own nested MLflow run (tag ``method``), so methods compare side
    by side; the run id is returned so evaluation logs into the same run."""
    cfg = _cfg(config_path)
    with stage_run(tracking_uri, parent_run_id, f"posttrain-{method}", tags={"method": method}) as run:
        run.log_params({"method": method, **{k: v for k, v in cfg.flat().items()
                                             if k.startswith(("posttrain.", "advantage.", "sampling."))}})
        summary, secs = _timed(stages.stage_posttrain, method, processed_dir, ref_dir, reward_dir, scored_dir, adv_dir,
                               cfg, out_dir, on_log=run.on_log)
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
    return {**summary, "run_id": run.run_id, "core_seconds": secs}


@task(name="evaluate-policies", cache_policy=NO_CACHE)
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
    parent.log_artifact(out, "policies")
    return {"reports": reports, "core_seconds": secs}


@task(name="reward-report", cache_policy=NO_CACHE)
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
    return {**rep, "core_seconds": secs}


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
