"""The ``retrain`` flow: load -> validate schema -> preprocess -> train base -> evaluate.

One MLflow parent run per retrain, one nested run per stage. Writes ``OUTPUT/metrics.json``.
Later stages (preferences, reward model, sampling, A-SFT) join this same flow.
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
from tasks.stages import evaluate_task, load_task, preprocess_task, train_base_task, validate_task
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

    try:
        raw = timed("load", load_task, cfg_path, str(out / stages.RAW), uri, pid)
        timed("validate", validate_task, raw["raw_dir"], cfg_path, uri, pid)
        stats = timed("preprocess", preprocess_task, raw["raw_dir"], cfg_path, str(out / stages.PROCESSED), uri, pid)
        parent.set_tags({"raw_sha256": raw["sha256"], "processed_sha256": stats["sha256"]})
        base = timed("train_base", train_base_task, stats["processed_dir"], cfg_path, str(out / stages.BASE_MODEL),
                     uri, pid)
        base_metrics = timed("evaluate", evaluate_task, base["model_dir"], stats["processed_dir"], cfg_path, "base",
                             uri, pid)
    except BaseException as e:
        parent.set_tags({"failed_stage_error": f"{type(e).__name__}: {e}"[:5000]})
        parent.client.set_terminated(pid, "FAILED")
        logger.error("retrain failed: %s", e)
        raise

    timings["flow_total"] = time.perf_counter() - t_start
    result = {
        "dataset": {k: v for k, v in stats.items() if k not in ("processed_dir",)},
        "models": {"base": {**base_metrics, "train": {k: base[k] for k in ("best_epoch", "epochs_run",
                                                                            "tokens_per_s", "train_seconds")}}},
        "timings_s": timings,
        "core_seconds": core,
        "mlflow": {"tracking_uri": uri, "parent_run_id": pid, "experiment": cfg.tracking.experiment},
    }
    write_json(out / "metrics.json", result)
    parent.log_nested_metrics({f"base/{k}": v for k, v in base_metrics.items()})
    parent.log_metrics({f"timing/{k}": v for k, v in timings.items()})
    parent.log_artifact(out / "metrics.json")
    parent.client.set_terminated(pid, "FINISHED")
    logger.info("retrain finished in %.1fs: base test ndcg@10 %.4f", timings["flow_total"],
                base_metrics["test"]["ndcg@10"])
    print(json.dumps({"test": base_metrics["test"]}, indent=1))
    return result
