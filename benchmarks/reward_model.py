"""Benchmark: preference dataset + Bradley-Terry reward ensemble + reward report on one dataset.

    python benchmarks/reward_model.py --data simulator --work benchmarks/work/rm_sim --out benchmarks/work/rm_sim.json \
        [--config params.yaml] [key=value ...]
    python benchmarks/reward_model.py --data ../shared/data/ml-100k --work benchmarks/work/tune_b \
        --out benchmarks/work/rm_ml100k.json model.dropout=0.5 ...

Runs the core stages directly (no orchestration). Stages whose output already exists in ``--work``
(raw/, processed/, base/best) are reused, so a base model trained by ``run_dataset.py`` serves here.
Writes the reward report, per-stage timings and machine info to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asft.env import configure_environment

configure_environment()

from asft import stages
from asft.config import load_config
from asft.utils import dvc_md5, write_json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", default="params.yaml")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    cfg = load_config(a.config if Path(a.config).is_file() else None, [*a.overrides, f"data.source={a.data}"])
    work = Path(a.work)
    timings: dict[str, float] = {}

    def timed(name, fn, *args, **kw):
        t = time.perf_counter()
        res = fn(*args, **kw)
        timings[name] = time.perf_counter() - t
        return res

    if not (work / "raw" / "interactions.parquet").is_file():
        timed("ingest", stages.stage_ingest, cfg, work / "raw")
    if not (work / "processed" / "stats.json").is_file():
        timed("preprocess", stages.stage_preprocess, work / "raw", cfg, work / "processed")
    if not (work / "base" / "best" / "model.safetensors").is_file():
        timed("train_base", stages.stage_train_base, work / "processed", cfg, work / "base")
    prefs = timed("preferences", stages.stage_preferences, work / "raw", work / "processed", cfg, work / "preferences",
                  work / "reports" / "gx" / "preferences")
    reward = timed("train_reward", stages.stage_train_reward, work / "processed", work / "preferences",
                   work / "base" / "best", cfg, work / "reward", resume=False)
    report = timed("reward_report", stages.stage_reward_report, work / "reward", work / "preferences",
                   work / "processed", work / "raw", work / "base" / "best", cfg, work / "reports" / "reward")
    import torch

    out = {
        "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "overrides": a.overrides,
        "preferences": {k: v for k, v in prefs.items() if k not in ("validation",)},
        "preferences_dvc_md5": dvc_md5(work / "preferences"),
        "reward_train": {"members": reward["members"], "train_seconds": reward["train_seconds"],
                         "centring": reward["centring"], "train_pairs": reward["train_pairs"]},
        "report": report,
        "timings_s": timings,
    }
    write_json(a.out, out)
    print(json.dumps({"ensemble": report["ensemble"], "naive": report["naive"], "rating": report.get("rating"),
                      "simulator": report.get("simulator"), "timings": timings}, indent=1))


if __name__ == "__main__":
    main()
