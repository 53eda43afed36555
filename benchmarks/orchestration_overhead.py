"""Orchestration overhead: ``retrain`` (Prefect + MLflow + registry + lineage) against the same stages
called directly as plain functions, on the simulator default (params.yaml).

    python benchmarks/orchestration_overhead.py [--work DIR] [--repeats 2] [key=value ...]

Each side runs as its own process, timed end to end (imports and, for the flow, Prefect's ephemeral
server start included): ``direct`` calls the ``asft.stages`` functions in the flow's order;
``flow`` is ``retrain --no-cache`` with a fresh SQLite MLflow store and Prefect home, registering the
models (champion gate included), committing datasets to the DVC cache and recording lineage.
The sides alternate (direct, flow, flow, direct, ...) ``--repeats`` times each, so drifting machine
load hits both alike; the overhead is the ratio of the medians. The flow runs share one MLflow
store, so from the second on the promotion gate re-evaluates a champion (the steady state of a
weekly retrain). The runs' metrics are also compared (orchestration must not change results).
Writes ``benchmarks/work/orchestration_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run_direct(out: Path, overrides: list[str]) -> dict:
    """The flow's stages as plain function calls (no Prefect, no MLflow)."""
    from asft.env import configure_environment

    configure_environment()
    from asft import stages
    from asft.config import load_config
    from asft.posttrain import evaluate_policies

    cfg = load_config(REPO / "params.yaml", overrides)
    t: dict[str, float] = {}

    def timed(name, fn, *args, **kw):
        t0 = time.perf_counter()
        res = fn(*args, **kw)
        t[name] = time.perf_counter() - t0
        return res

    rep = out / stages.REPORTS
    raw = timed("validate_raw", stages.stage_ingest, cfg, out / stages.RAW, rep / "gx" / "raw")
    proc = timed("preprocess", stages.stage_preprocess, raw["raw_dir"], cfg, out / stages.PROCESSED,
                 rep / "gx" / "processed")
    prefs = timed("preferences", stages.stage_preferences, raw["raw_dir"], proc["processed_dir"], cfg,
                  out / stages.PREFERENCES, rep / "gx" / "preferences")
    base = timed("train_base", stages.stage_train_base, proc["processed_dir"], cfg, out / stages.BASE_MODEL)
    base_metrics = timed("evaluate", stages.stage_evaluate, base["model_dir"], proc["processed_dir"], cfg)
    reward = timed("train_reward", stages.stage_train_reward, proc["processed_dir"], prefs["preferences_dir"],
                   base["model_dir"], cfg, out / stages.REWARD_MODEL)
    timed("reward_report", stages.stage_reward_report, reward["ensemble_dir"], prefs["preferences_dir"],
          proc["processed_dir"], raw["raw_dir"], base["model_dir"], cfg, out / stages.REPORTS / "reward")
    judge = timed("train_judge", stages.stage_train_judge, proc["processed_dir"], prefs["preferences_dir"],
                  base["model_dir"], cfg, out / stages.JUDGE_MODEL)
    sampled = timed("sample", stages.stage_sample, proc["processed_dir"], base["model_dir"], cfg,
                    out / stages.CANDIDATES)
    scored = timed("score", stages.stage_score, sampled["candidates_dir"], proc["processed_dir"], base["model_dir"],
                   reward["ensemble_dir"], cfg, out / stages.SCORED)
    adv = timed("advantages", stages.stage_advantages, scored["scored_dir"], cfg, out / stages.ADVANTAGES)
    post = {m: timed(f"posttrain_{m}", stages.stage_posttrain, m, proc["processed_dir"], base["model_dir"],
                     reward["ensemble_dir"], scored["scored_dir"], adv["advantages_dir"], cfg,
                     out / stages.POSTTRAIN / m) for m in cfg.posttrain.methods}
    reports = timed("evaluate_policies", evaluate_policies, {"base": base["model_dir"],
                                                             **{m: r["model_dir"] for m, r in post.items()}},
                    base["model_dir"], proc["processed_dir"], reward["ensemble_dir"], judge["ensemble_dir"],
                    stages.load_simulator(raw["raw_dir"]), cfg)
    result = {"timings_s": t, "base": base_metrics, "posttrain": {m: reports[m] for m in post}}
    (out / "direct.json").write_text(json.dumps(result, indent=2, default=float))
    return result


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=str(REPO / "benchmarks/work/overhead"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--direct", default=None, help=argparse.SUPPRESS)  # child mode
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.direct:
        run_direct(Path(args.direct), args.overrides)
        return 0

    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect"), "DO_NOT_TRACK": "true",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
           "HF_HUB_OFFLINE": "1"}
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    py = sys.executable

    def cmd(side: str, i: int) -> list[str]:
        if side == "direct":
            return [py, __file__, "--direct", str(work / f"direct{i}"), *args.overrides]
        return [str(Path(py).parent / "retrain"), "--data", "simulator", "--output", str(work / f"flow{i}"),
                "--no-cache", "--config", str(REPO / "params.yaml"), *args.overrides,
                f"tracking.mlflow_uri=sqlite:///{work / 'mlflow.db'}", "tracking.experiment=overhead"]

    wall: dict[str, list[float]] = {"direct": [], "flow": []}
    order = []
    for i in range(args.repeats):
        for side in (("direct", "flow") if i % 2 == 0 else ("flow", "direct")):
            order.append(side)
            t0 = time.perf_counter()
            with (work / f"{side}{i}.log").open("w") as log:
                subprocess.run(cmd(side, i), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
            wall[side].append(time.perf_counter() - t0)
            print(f"{side} #{i}: {wall[side][-1]:.1f}s", flush=True)
    direct = json.loads((work / "direct0" / "direct.json").read_text())
    flow = json.loads((work / "flow0" / "metrics.json").read_text())
    same = {"base_test": direct["base"]["test"] == flow["models"]["base"]["test"],
            **{f"posttrain_{m}_test": direct["posttrain"][m]["test"] == flow["posttrain"][m]["test"]
               for m in direct["posttrain"]}}
    stage_over = {k: flow["timings_s"][k] - v for k, v in direct["timings_s"].items() if k in flow["timings_s"]}
    med = {k: statistics.median(v) for k, v in wall.items()}
    res = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": f"{platform.node()} "
           f"({os.cpu_count()} cores)", "overrides": args.overrides, "order": order, "wall_s": wall,
           "median_wall_s": med, "overhead": med["flow"] / med["direct"] - 1,
           "pair_ratios": [f / d for f, d in zip(wall["flow"], wall["direct"])], "results_identical": same,
           "direct_stage_s": direct["timings_s"], "flow_stage_s": flow["timings_s"],
           "flow_minus_direct_per_stage_s": stage_over, "flow_core_s": flow["core_seconds"]}
    out = REPO / "benchmarks/work/orchestration_overhead.json"
    out.write_text(json.dumps(res, indent=2))
    print(json.dumps({k: res[k] for k in ("wall_s", "median_wall_s", "overhead", "pair_ratios",
                                          "results_identical")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
