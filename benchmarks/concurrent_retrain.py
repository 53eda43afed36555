"""Concurrent ``retrain`` runs against one MLflow store, one DVC cache and one Prefect home.

    python benchmarks/concurrent_retrain.py [--runs 2] [--work DIR] [--tiny] [key=value ...]

Starts ``--runs`` ``retrain`` commands at the same moment, exactly as two users (or a schedule and a
user) would on the embedded default: the same working directory (so the same ``runs/`` tree, stage
work directories and DVC cache), the same SQLite MLflow store and the same ``PREFECT_HOME`` (each
command starts its own ephemeral Prefect server on the shared SQLite database). Then checks that
the store is consistent:

- every command exits 0 and writes its metrics.json; with the same config the runs' metrics are
  identical (the audit's exact comparison), model files included;
- MLflow: one FINISHED parent run per command, every nested stage run FINISHED, none left RUNNING;
  one registered recommender and reward version per command, exactly one champion alias;
- the DVC cache: every dataset version recorded by the runs is complete (``datastore.missing``);
- the stage cache: no run trusted an entry whose outputs were gone (``stale_cache`` would say so).

Writes ``benchmarks/work/concurrent_retrain.json`` (also used by tests/test_concurrency.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def launch(n: int, work: Path, overrides: list[str], env_extra: dict[str, str] | None = None) -> list[dict]:
    work.mkdir(parents=True, exist_ok=True)
    config = work / "params.yaml"
    if not config.exists():
        config.write_text((REPO / "params.yaml").read_text())
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(work / ".prefect"), **(env_extra or {})}
    env.pop("PREFECT_API_URL", None)  # each command starts its own ephemeral server, as a user's would
    store = f"sqlite:///{work / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "asft.cli", "retrain", "--config", str(config), *overrides,
           f"tracking.mlflow_uri={store}"]
    procs = []
    t0 = time.perf_counter()
    for i in range(n):
        log = open(work / f"retrain-{i}.log", "w")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    out = []
    for i, (p, log) in enumerate(procs):
        rc = p.wait()
        log.close()
        out.append({"run": i, "rc": rc, "seconds": time.perf_counter() - t0,
                    "log_tail": (work / f"retrain-{i}.log").read_text()[-3000:]})
    return out


def check(work: Path, results: list[dict]) -> dict:
    from mlflow.tracking import MlflowClient

    from asft import datastore
    from ops.audit import compare_metrics
    from tasks import lineage

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=5000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    metrics = []
    for p in parents:
        f = Path(p.data.tags.get("output_dir", "")) / "metrics.json"
        if f.is_file():
            metrics.append(json.loads(f.read_text()))
    pairs = [compare_metrics(metrics[0], m) for m in metrics[1:]]
    versions = client.search_model_versions()
    champions = []
    for name in {v.name for v in versions}:
        try:
            champions.append(client.get_model_version_by_alias(name, "champion").version)
        except Exception:  # noqa: BLE001, S110 - no champion
            pass
    missing = {}
    for m in metrics:
        for name, md5 in m["datasets"].items():
            gone = datastore.missing(md5, lineage.dvc_cache_dir())
            if gone:
                missing[f"{m['output_dir']}:{name}"] = gone[:5]
    return {
        "exit_codes": [r["rc"] for r in results],
        "wall_seconds": [round(r["seconds"], 1) for r in results],
        "parent_runs": sorted(r.info.status for r in parents),
        "stage_runs": len(children),
        "stage_runs_not_finished": sorted({r.info.status for r in children} - {"FINISHED"}),
        "metrics_files": len(metrics),
        "metric_values_compared": [c["compared"] for c in pairs],
        "metric_mismatches": [c["mismatched"][:5] for c in pairs if c["mismatched"]],
        "model_hashes_equal": all(m["lineage"]["model_sha256"] == metrics[0]["lineage"]["model_sha256"]
                                  for m in metrics),
        "registered_versions": sorted(f"{v.name} v{v.version}" for v in versions),
        "champion_versions": champions,
        "dvc_missing": missing,
        "stale_cache": [k for m in metrics for k, c in m["lineage"]["cache"].items() if c.get("stale_cache")],
        "cache_hits": [sum(c["hit"] for c in m["lineage"]["cache"].values()) for m in metrics],
    }


def consistent(report: dict, n: int) -> bool:
    return (report["exit_codes"] == [0] * n and report["parent_runs"] == ["FINISHED"] * n
            and not report["stage_runs_not_finished"] and report["metrics_files"] == n
            and not report["metric_mismatches"] and report["model_hashes_equal"]
            and len(report["registered_versions"]) == 2 * n and len(report["champion_versions"]) == 2
            and not report["dvc_missing"] and not report["stale_cache"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--work", default=str(REPO / "benchmarks" / "work" / "concurrent"))
    ap.add_argument("--tiny", action="store_true", help="the test suite's tiny config (seconds, not minutes)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    overrides = list(args.overrides)
    if args.tiny:
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import TINY

        overrides = [*TINY, "posttrain.methods=[asft]", *overrides]
    work = Path(args.work)
    results = launch(args.runs, work, overrides)
    report = check(work, results)
    report.update(runs=args.runs, overrides=overrides, consistent=consistent(report, args.runs),
                  machine=f"{platform.node()} ({os.cpu_count()} CPUs)", date=datetime.now(UTC).isoformat())
    out = REPO / "benchmarks" / "work" / "concurrent_retrain.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps({k: v for k, v in report.items() if k != "overrides"}, indent=1, default=str))
    if not report["consistent"]:
        for r in results:
            if r["rc"] != 0:
                print(f"--- run {r['run']} (exit {r['rc']}):\n{r['log_tail']}", file=sys.stderr)
    return 0 if report["consistent"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
