"""Fan-out of the default main job's post-training stages: sequential vs the thread-pool runner vs a Dask cluster.

    git clone -q . /work/scale/fanout/repo
    .venv/bin/python benchmarks/fan_out.py --repo /work/scale/fanout/repo --variants threads dask sequential

``retrain --data simulator`` (the default config: four methods, the README command; only base and reward epochs
cut, see SHORT_UPSTREAM) once per variant. Before each variant the post-training stages' cache records and
resumable work directories are deleted, so after the first run ingest ... advantages come from the stage cache
and only the post-training group (and evaluate-policies) is recomputed:

- ``sequential``: ``orchestration.max_parallel=1`` (each stage in the flow's process, one after another);
- ``threads``: the default (``max_parallel=2``: child processes two at a time, cores/2 threads each);
- ``dask``: ``orchestration.task_runner=dask`` (a 2-worker LocalCluster on loopback; child processes on the
  workers, cores/2 threads each).

Reported per variant: the post-training group's wall time (its slowest stage's time since the group
started), the stages' own time and CPU seconds (user + system of each stage's child process from ``wait4``,
or of the flow process over an in-process stage), the whole retrain's wall and CPU time (the command and all
its descendants) and peak RSS, and the policies' test metrics (the variants must agree).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Upstream stages only feed the post-training stages (whose settings stay the defaults): fewer base and reward
# epochs keep the warm-up affordable on a busy 2-core machine (--full: the default config throughout).
SHORT_UPSTREAM = ["train.epochs=2", "reward.train.epochs=1"]
VARIANTS = {
    "sequential": ["orchestration.max_parallel=1"],
    "threads": [],
    "dask": ["orchestration.task_runner=dask"],
}


def _env(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"DO_NOT_TRACK": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
                "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "GX_ANALYTICS_ENABLED": "false",
                "PREFECT_HOME": str(work / "prefect"), "ASFT_RUNS_DIR": str(work / "runs"),
                "ASFT_DVC_CACHE_DIR": str(work / "dvc-cache"),
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"})  # a busy machine starts it slowly
    env.pop("PREFECT_API_URL", None)
    return env


def retrain(work: Path, name: str, overrides: list[str], upstream: list[str], repo: Path = REPO) -> dict:
    """One ``retrain`` command; its wall time, CPU time (it and every descendant) and peak RSS."""
    out = work / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "asft.cli", "retrain", "--data", "simulator", "--output", str(out), "--config",
           str(repo / "params.yaml"), "--no-register", f"tracking.mlflow_uri=sqlite:///{work / 'mlflow.db'}",
           *upstream, *overrides]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    with open(work / f"{name}.log", "w") as log:
        proc = subprocess.run(cmd, cwd=repo, env={**_env(work), "PYTHONPATH": str(repo)}, stdout=log,
                              stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"{name}: retrain failed (exit {proc.returncode}); log: {work / f'{name}.log'}")
    m = json.loads((out / "metrics.json").read_text())
    return {"wall_s": wall, "cpu_s": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
            "peak_rss_mb_any_process": after.ru_maxrss / 1024, "metrics": m,
            "warnings": sum("warn" in line.lower() for line in (work / f"{name}.log").read_text().splitlines())}


def forget_posttrain(work: Path) -> int:
    """Delete the post-training stages' cache records and resumable work directories (their keys start
    with the stage name); everything before them stays cached."""
    n = 0
    for root in (work / "prefect" / "storage", work / "runs" / ".work"):
        for p in root.glob("posttrain-*") if root.is_dir() else []:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            n += 1
    return n


def summary(name: str, r: dict) -> dict:
    m = r["metrics"]
    post = [k for k in m["timings_s"] if k.startswith("posttrain-")]
    return {"variant": name, "overrides": VARIANTS[name], "retrain_wall_s": round(r["wall_s"], 1),
            "retrain_cpu_s": round(r["cpu_s"], 1), "peak_rss_mb_any_process": round(r["peak_rss_mb_any_process"]),
            # concurrent stages are timed from the group's start, in-flow (sequential) ones from their own
            "posttrain_group_wall_s": round((sum if name == "sequential" else max)(m["timings_s"][k] for k in post), 1),
            "posttrain_stage_s": {k: round(m["core_seconds"][k], 1) for k in post},
            "posttrain_stage_cpu_s": {k: round(m["cpu_seconds"][k], 1) for k in post},
            "posttrain_cpu_sum_s": round(sum(m["cpu_seconds"][k] for k in post), 1),
            "where": {k: (m["lineage"]["executors"].get(k) or {}) for k in post},
            "cache_hits_before_posttrain": sum(v["hit"] for k, v in m["lineage"]["cache"].items()
                                               if not k.startswith(("posttrain-", "evaluate-policies"))),
            "test": {k: m["posttrain"][k]["test"] for k in m["posttrain"]}, "console_warning_lines": r["warnings"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/work/scale/fanout/bench")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "issue15" / "fan_out.json"))
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--full", action="store_true", help="default base/reward epochs for the warm-up too")
    ap.add_argument("--repo", default=str(REPO), help="the checkout to run (a frozen clone: the stage cache keys"
                    " include the code version, which a working tree being edited keeps changing)")
    ap.add_argument("--warmup", action="store_true", help="a first retrain that only fills the stage cache"
                    " (else the first variant computes the upstream stages and the others reuse them)")
    args = ap.parse_args()
    upstream = [] if args.full else SHORT_UPSTREAM
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    repo = Path(args.repo).resolve()
    warm = retrain(work, "warmup", [], upstream, repo) if args.warmup else None
    res = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "machine": f"{platform.platform()}, {os.cpu_count()} cpus", "command": " ".join(sys.argv),
           "upstream_overrides": upstream,
           "repo_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                         check=False).stdout.strip(),
           "warmup": warm and {"wall_s": round(warm["wall_s"], 1), "cpu_s": round(warm["cpu_s"], 1)},
           "variants": []}
    for name in args.variants:
        forget_posttrain(work)
        res["variants"].append(summary(name, retrain(work, name, VARIANTS[name], upstream, repo)))
        print(json.dumps(res["variants"][-1], indent=1), flush=True)
    base = {v["variant"]: v for v in res["variants"]}
    if "sequential" in base:
        res["posttrain_wall_ratio_vs_sequential"] = {
            n: round(v["posttrain_group_wall_s"] / base["sequential"]["posttrain_group_wall_s"], 3)
            for n, v in base.items()}
    names = list(base)
    res["same_test_metrics"] = {n: base[n]["test"] == base[names[0]]["test"] for n in names}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "variants"}, indent=1))


if __name__ == "__main__":
    main()
