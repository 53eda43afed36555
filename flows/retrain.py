"""The ``retrain`` flow.

validate-raw (load + GX suite) -> preprocess (+ GX suite) -> preferences (+ GX suite) -> train-base ->
evaluate -> train-reward (BT ensemble, reward.fold) -> reward-report -> train-judge (held-out ensemble,
judge.fold) -> sample (N candidates per context from pi_ref) -> score -> advantages -> posttrain-<method>
for every method in posttrain.methods (A-SFT and baselines, one nested run each) -> evaluate-policies.

Every dataset is validated before it is published; a validation failure stops the flow there with a
summary (``OUTPUT/reports/validation_failure.json``, GX data docs, both in MLflow) and nothing
downstream runs. One MLflow parent run per retrain, one nested run per stage; every run carries the
git commit and the DVC hash of each dataset produced so far. Writes ``OUTPUT/metrics.json``.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow, get_run_logger

from asft import stages
from asft.config import dump_config, load_config
from asft.utils import write_json
from tasks.stages import (
    advantages_task,
    evaluate_policies_task,
    evaluate_task,
    posttrain_task,
    sample_task,
    score_task,
    train_judge_task,
    ingest_task,
    preferences_task,
    preprocess_task,
    reward_report_task,
    train_base_task,
    train_reward_task,
)
from tasks.tracking import start_parent


@flow(name="retrain", log_prints=True, validate_parameters=True)
def retrain(
    data: str | None = None,
    output: str = "runs/latest",
    config: str | None = "params.yaml",
    overrides: list[str] | None = None,
) -> dict:
    t_start = time.perf_counter()
    logger = get_run_logger()
    ov = list(overrides or [])
    if data is not None:
        ov.append(f"data.source={data}")
    cfg = load_config(config if config and Path(config).is_file() else None, ov)
    out = Path(output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = str(out / "params.resolved.yaml")
    dump_config(cfg, cfg_path)

    run_name = f"retrain-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    parent = start_parent(cfg, run_name, {"data_source": cfg.data.source, "output_dir": str(out)})
    uri, pid = parent.client.tracking_uri, parent.run_id
    parent.log_params(cfg.flat())
    parent.log_artifact(cfg_path)
    timings: dict[str, float] = {"flow_setup": time.perf_counter() - t_start}
    core: dict[str, float] = {}

    def timed(name, task_fn, *args):
        t = time.perf_counter()
        res = task_fn(*args)
        timings[name] = time.perf_counter() - t
        if isinstance(res, dict) and "core_seconds" in res:
            core[name] = res.pop("core_seconds")
        return res

    reports = str(out / stages.REPORTS)
    try:
        raw = timed("validate_raw", ingest_task, cfg_path, str(out / stages.RAW), reports, uri, pid)
        parent.set_tags({"raw_sha256": raw["sha256"], "dvc.raw.md5": raw["dvc_md5"]})
        stats = timed("preprocess", preprocess_task, raw["raw_dir"], cfg_path, str(out / stages.PROCESSED), reports,
                      uri, pid)
        parent.set_tags({"processed_sha256": stats["sha256"], "dvc.processed.md5": stats["dvc_md5"]})
        prefs = timed("preferences", preferences_task, raw["raw_dir"], stats["processed_dir"], cfg_path,
                      str(out / stages.PREFERENCES), reports, uri, pid)
        parent.set_tags({"preferences_sha256": prefs["sha256"], "dvc.preferences.md5": prefs["dvc_md5"]})
        base = timed("train_base", train_base_task, stats["processed_dir"], cfg_path, str(out / stages.BASE_MODEL),
                     uri, pid)
        base_metrics = timed("evaluate", evaluate_task, base["model_dir"], stats["processed_dir"], cfg_path, "base",
                             uri, pid)
        reward = timed("train_reward", train_reward_task, stats["processed_dir"], prefs["preferences_dir"],
                       base["model_dir"], cfg_path, str(out / stages.REWARD_MODEL), uri, pid)
        report = timed("reward_report", reward_report_task, reward["ensemble_dir"], prefs["preferences_dir"],
                       stats["processed_dir"], raw["raw_dir"], base["model_dir"], cfg_path,
                       str(out / stages.REPORTS / "reward"), uri, pid)
        judge = timed("train_judge", train_judge_task, stats["processed_dir"], prefs["preferences_dir"],
                      base["model_dir"], cfg_path, str(out / stages.JUDGE_MODEL), uri, pid)
        sampled = timed("sample", sample_task, stats["processed_dir"], base["model_dir"], cfg_path,
                        str(out / stages.CANDIDATES), uri, pid)
        scored = timed("score", score_task, sampled["candidates_dir"], stats["processed_dir"], base["model_dir"],
                       reward["ensemble_dir"], cfg_path, str(out / stages.SCORED), uri, pid)
        adv = timed("advantages", advantages_task, scored["scored_dir"], cfg_path, str(out / stages.ADVANTAGES), uri,
                    pid)
        post: dict[str, dict] = {}
        for method in cfg.posttrain.methods:
            post[method] = timed(f"posttrain_{method}", posttrain_task, method, stats["processed_dir"],
                                 base["model_dir"], reward["ensemble_dir"], scored["scored_dir"],
                                 adv["advantages_dir"], cfg_path, str(out / stages.POSTTRAIN / method), uri, pid)
        policies = timed("evaluate_policies", evaluate_policies_task, {m: r["model_dir"] for m, r in post.items()},
                         {m: r["run_id"] for m, r in post.items()}, base["model_dir"], stats["processed_dir"],
                         reward["ensemble_dir"], judge["ensemble_dir"], raw["raw_dir"], cfg_path,
                         str(out / stages.REPORTS / "policies"), uri, pid)["reports"]
    except BaseException as e:
        parent.set_tags({"failed_stage_error": f"{type(e).__name__}: {e}"[:5000]})
        parent.client.set_terminated(pid, "FAILED")
        logger.error("retrain failed: %s", e)
        raise

    timings["flow_total"] = time.perf_counter() - t_start
    result = {
        "dataset": {k: v for k, v in stats.items() if k not in ("processed_dir",)},
        "preferences": {k: v for k, v in prefs.items() if k not in ("preferences_dir", "validation")},
        "models": {"base": {**base_metrics, "train": {k: base[k] for k in ("best_epoch", "epochs_run",
                                                                            "tokens_per_s", "train_seconds")}}},
        "reward": {"report": {k: v for k, v in report.items() if k != "plots"},
                   "train": {"members": reward["members"], "train_seconds": reward["train_seconds"],
                             "centring": reward["centring"]}},
        "judge": {"train_seconds": judge["train_seconds"], "fold": judge["fold"]},
        "sampling": {k: v for k, v in {**sampled, **scored}.items() if isinstance(v, (int, float))},
        "advantages": {k: v for k, v in adv.items() if k not in ("plots", "advantages_dir")},
        "posttrain": {m: {"valid": policies[m]["valid"], "test": policies[m]["test"],
                          "train": {k: v for k, v in r.items() if k in ("best_metric", "best_epoch", "epochs_run",
                                                                         "train_seconds", "weights", "pairs")}}
                      for m, r in post.items()},
        "policy_base": policies["base"],
        "datasets": {"raw": raw["dvc_md5"], "processed": stats["dvc_md5"], "preferences": prefs["dvc_md5"]},
        "timings_s": timings,
        "core_seconds": core,
        "mlflow": {"tracking_uri": uri, "parent_run_id": pid, "experiment": cfg.tracking.experiment},
    }
    write_json(out / "metrics.json", result)
    parent.log_nested_metrics({f"base/{k}": v for k, v in base_metrics.items()})
    parent.log_metrics({f"reward/{k}": v for k, v in report["ensemble"].items()})
    for m in post:
        parent.log_metrics(policies[m]["test"], prefix=f"posttrain/{m}/test/")
    parent.log_metrics(policies["base"]["test"], prefix="posttrain/base/test/")
    parent.log_metrics({f"timing/{k}": v for k, v in timings.items()})
    parent.log_artifact(out / "metrics.json")
    parent.client.set_terminated(pid, "FINISHED")
    logger.info("retrain finished in %.1fs: base test ndcg@10 %.4f", timings["flow_total"],
                base_metrics["test"]["ndcg@10"])
    print(json.dumps({"test": base_metrics["test"]}, indent=1))
    if post:
        _print_methods(policies)
    return result


def _print_methods(reports: dict[str, dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    keys = [k for k in ("ndcg@10", "hr@10", "high_rated/ndcg@10", "judged_top10", "true_top10", "kl_ref", "entropy",
                        "coverage@10") if k in reports["base"]["test"]]
    t = Table(title="post-training methods (test)")
    t.add_column("method")
    for k in keys:
        t.add_column(k, justify="right")
    for name, rep in reports.items():
        t.add_row(name, *[f"{rep['test'].get(k, float('nan')):.4f}" for k in keys])
    Console(stderr=True, width=160).print(t)
