"""Lineage that survives the worker, measured: a retrain on one "pod", then ``asft audit`` from a fresh clone.

One command (prints and writes JSON)::

    .venv/bin/python benchmarks/remote_lineage.py [--work /work/scale/lineage] [--repo .] [key=value ...]

1. A local S3-compatible server (moto) on a free loopback port, dummy credentials in the environment, one
   bucket holding the DVC remote (``dvc/``), Prefect's results (``results/``), the checkpoints
   (``checkpoints/``) and the MLflow artifacts (``mlflow/``); MLflow's backend is a SQLite file outside
   both clones (the "tracking server").
2. The worker: ``git clone REPO worker``, then ``retrain --no-register`` there with ``storage.*`` pointing at
   the server (its own DVC cache, Prefect home and runs directory inside the clone; every trained model is
   logged to MLflow by its stage run, registration is left out). Then the worker clone is deleted:
   the pod is gone with its disk.
3. The auditor: ``git clone REPO auditor`` (an empty DVC cache, no runs directory, another Prefect home),
   then ``asft audit RUN_ID``: datasets fetched through the S3 DVC remote the run recorded, models
   downloaded from MLflow (S3 artifacts), an exact re-run, every value compared.

Reports wall and CPU seconds (this process and its children) and the peak RSS of each command, the
audit's checks and what it compared; writes ``WORK/result.json``. The clones take ``REPO``'s HEAD (commit
first). Default overrides: the test suite's tiny pipeline (all four default post-training methods).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

BUCKET = "asft-lineage"
TINY = ["simulator.n_users=60", "simulator.n_items=40", "simulator.min_len=8", "simulator.max_len=16",
        "preprocess.max_len=12", "preprocess.window_stride=6", "model.n_layer=1", "model.n_head=1",
        "model.n_embd=16", "train.epochs=2", "train.batch_size=16", "train.warmup_steps=2", "train.device=cpu",
        "eval.batch_size=64", "preferences.judge.n_judges=4", "reward.members=2", "reward.train.epochs=2",
        "reward.train.batch_size=32", "reward.train.warmup_steps=2", "reward.train.device=cpu", "judge.members=1",
        "sampling.n_candidates=4", "posttrain.pg.group_size=4", "posttrain.train.epochs=2",
        "posttrain.train.batch_size=16", "posttrain.train.warmup_steps=2", "posttrain.train.device=cpu"]


def _run(cmd: list[str], cwd: Path, env: dict, log: Path) -> dict:
    t0 = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"cmd": " ".join(cmd), "rc": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1),
            "cpu_s": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 1),
            "peak_rss_mb_children_so_far": round(after.ru_maxrss / 1024), "log": str(log)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/work/scale/lineage")
    ap.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument("--data", default="simulator",
                    help="'simulator' or a data directory; a directory is copied onto the worker's disk and is gone "
                         "with it, so the audit re-runs from the raw dataset restored through the DVC remote")
    ap.add_argument("overrides", nargs="*", help="extra key=value settings of the retrain")
    args = ap.parse_args()
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)

    import boto3
    from moto.server import ThreadedMotoServer

    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket=BUCKET)

    py = sys.executable
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "ASFT_"))}
    base_env.update(DO_NOT_TRACK="true", PREFECT_SERVER_ANALYTICS_ENABLED="false", MLFLOW_DISABLE_TELEMETRY="true",
                    DVC_NO_ANALYTICS="1", HF_HUB_OFFLINE="1", GX_ANALYTICS_ENABLED="false",
                    MLFLOW_S3_ENDPOINT_URL=endpoint, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300")  # a busy machine starts slowly
    uri = f"sqlite:///{work / 'tracking' / 'mlflow.db'}"
    (work / "tracking").mkdir()
    storage = [f"storage.dvc_remote=s3://{BUCKET}/dvc", f"storage.s3_endpoint_url={endpoint}",
               f"storage.results_url=s3://{BUCKET}/results", f"storage.checkpoints_url=s3://{BUCKET}/checkpoints",
               f"tracking.mlflow_uri={uri}", f"tracking.artifact_root=s3://{BUCKET}/mlflow",
               "tracking.experiment=remote-lineage"]
    result: dict = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
                    "machine": "2-core VM, shared with other jobs", "s3": "moto server on 127.0.0.1 (S3 API)"}

    # -- the worker pod ---------------------------------------------------------------------------------
    worker = work / "worker"
    subprocess.run(["git", "clone", "-q", args.repo, str(worker)], check=True)
    result["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=worker, capture_output=True, text=True,
                                      check=True).stdout.strip()
    disk = work / "worker-disk"  # the worker's data disk (outside the clone: no untracked files in it)
    env = {**base_env, "PREFECT_HOME": str(worker / ".prefect"), "ASFT_DATA_ROOTS": str(disk),
           "PYTHONPATH": str(worker)}
    out = worker / "runs" / "lineage-run"
    data = args.data
    if data != "simulator":  # the log lives on the worker's disk only
        data = str(disk / Path(args.data).name)
        shutil.copytree(Path(args.data).resolve(), data)
    result["data"] = args.data
    result["retrain"] = _run([py, "-m", "asft.cli", "retrain", "--data", data, "--output", str(out),
                              "--no-register", *TINY, *storage, *args.overrides], worker, env, work / "retrain.log")
    if result["retrain"]["rc"] != 0:
        print(json.dumps(result, indent=1))
        return 1
    metrics = json.loads((out / "metrics.json").read_text())
    run_id = metrics["mlflow"]["parent_run_id"]
    result["run_id"] = run_id
    result["datasets"] = metrics["datasets"]
    result["dvc_remote"] = {k: v for k, v in metrics["dvc_remote"].items() if k != "datasets"}
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            for o in page.get("Contents", [])]
    result["s3_objects"] = {p: sum(k.startswith(p + "/") for k in keys)
                            for p in ("dvc", "results", "checkpoints", "mlflow")}
    shutil.rmtree(worker)  # the pod is gone, with its disk (DVC cache, runs, stage results, checkpoints)
    shutil.rmtree(disk, ignore_errors=True)  # and its data

    # -- a fresh machine: a new clone, an empty DVC cache, no runs --------------------------------------------
    fresh = work / "auditor"
    subprocess.run(["git", "clone", "-q", args.repo, str(fresh)], check=True)
    result["auditor_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=fresh, capture_output=True,
                                              text=True, check=True).stdout.strip()
    cache = fresh / ".dvc" / "cache"
    result["auditor_dvc_cache_objects_before"] = sum(1 for p in cache.rglob("*") if p.is_file()) if cache.exists() else 0
    env = {**base_env, "PREFECT_HOME": str(fresh / ".prefect"), "ASFT_DATA_ROOTS": str(fresh),
           "PYTHONPATH": str(fresh)}
    audit_out = fresh / "audit"
    result["audit"] = _run([py, "-m", "asft.cli", "audit", run_id, "--tracking-uri", uri, "--output", str(audit_out)],
                           fresh, env, work / "audit.log")
    report = json.loads((audit_out / "audit.json").read_text())
    checks = report["checks"]
    rerun = report.get("rerun", {})
    result["audit"].update({
        "lineage_ok": report["lineage_ok"], "reproduced": report.get("reproduced"),
        "rerun_input": report.get("rerun_input"), "code": checks["code"], "git": checks["git"],
        "checks_ok": {k: c.get("ok") for k, c in checks.items()},
        "datasets_from": {k: checks["datasets"][k].get("from") for k in ("raw", "processed", "preferences")},
        "dvc_remote_used": checks["datasets"]["remote"],
        "models_from_mlflow": {"compared": checks["models"]["compared"],
                               "files": sum(checks["models"][n]["files"] for n in checks["models"]["compared"])},
        "values_compared": rerun.get("compared"), "numeric_values": rerun.get("numeric"),
        "values_mismatched": len(rerun.get("mismatched", [])), "mismatched": rerun.get("mismatched", [])[:20],
        "datasets_equal": rerun.get("datasets_equal"), "model_hashes_equal": rerun.get("model_hashes_equal"),
        "models_vs_mlflow": rerun.get("models_vs_mlflow"),
        "environment_differences": checks["environment"]["differences"]})
    self_usage = resource.getrusage(resource.RUSAGE_SELF)
    result["this_process"] = {"cpu_s": round(self_usage.ru_utime + self_usage.ru_stime, 1),
                              "peak_rss_mb": round(self_usage.ru_maxrss / 1024)}
    server.stop()
    (work / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0 if report["lineage_ok"] and report.get("reproduced") else 1


if __name__ == "__main__":
    sys.exit(main())
