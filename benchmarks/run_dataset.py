"""Benchmark: base generative recommender on a real dataset, full ranking, leave-one-out.

    python benchmarks/run_dataset.py --data ../shared/data/ml-100k --out benchmarks/results/ml100k.json \
        [--config params.yaml] [key=value ...]

Runs the core stages directly (load -> validate -> preprocess -> train base -> evaluate), no
orchestration, and writes metrics, timings and machine info to the JSON.
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
from asft.utils import write_json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default=None, help="work dir (default: next to --out)")
    ap.add_argument("--config", default="params.yaml")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    cfg = load_config(a.config if Path(a.config).is_file() else None, [*a.overrides, f"data.source={a.data}"])
    work = Path(a.work or Path(a.out).with_suffix(""))
    t0 = time.perf_counter()
    stages.stage_load(cfg, work / "raw")
    stages.stage_validate(work / "raw", cfg)
    stats = stages.stage_preprocess(work / "raw", cfg, work / "processed")
    t_pre = time.perf_counter() - t0
    train = stages.stage_train_base(work / "processed", cfg, work / "base")
    metrics = stages.stage_evaluate(work / "base" / "best", work / "processed", cfg)
    total = time.perf_counter() - t0
    import torch

    out = {
        "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "overrides": a.overrides,
        "dataset": stats,
        "train": {k: train[k] for k in ("best_epoch", "epochs_run", "steps", "train_seconds", "eval_seconds",
                                        "tokens_per_s", "n_params", "wall_seconds")},
        "metrics": metrics,
        "wall_seconds_total": total,
        "preprocess_seconds": t_pre,
    }
    write_json(a.out, out)
    print(json.dumps({"test": metrics["test"], "test_unmasked": metrics.get("test_unmasked"),
                      "best_epoch": train["best_epoch"], "wall": total}, indent=1))


if __name__ == "__main__":
    main()
