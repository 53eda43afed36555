"""Concurrent ``retrain`` runs against shared stores: both finish, one champion per product.

    python benchmarks/concurrent_retrain.py [--runs 2] [--servers] [--products alpha,beta] [--lease-check]
                                            [--crash-check] [--work DIR] [--tiny] [key=value ...]

Starts ``--runs`` ``retrain`` commands at the same moment, as two users (or a schedule and a user) would:
the same working directory (so the same ``runs/`` tree, stage work directories and DVC cache) and

- by default, the embedded setup: one SQLite MLflow store and one ``PREFECT_HOME`` (each command starts
  its own ephemeral Prefect server on the shared database; the promotion gate is the file lock next to
  the store);
- with ``--servers``, the production setup: a real Prefect server (``prefect server start``) and a real
  MLflow tracking server (``mlflow server``, SQLite backend, proxied artifacts) started on loopback; the
  commands talk to them only over HTTP (the gate is the Prefect global concurrency limit).

``--products alpha,beta`` adds one more command per extra product (``registry.product=beta`` ...), also at
the same moment: each product has its own registered models and champion, and never compares with
another's. ``--lease-check`` (with ``--servers``) also verifies that a gate slot held by a process that is
killed (``kill -9``) comes back when its lease expires (about ``lease`` + the repossessor's 15 s loop);
``--crash-check`` that a retrain killed with SIGKILL mid-run is marked Crashed by the Prefect server
(heartbeats every 30 s, the automation ``retrain`` installs) and its MLflow runs are then closed from
that state.

Then checks that the stores are consistent:

- every command exits 0 and writes its metrics.json; with the same config the runs' metrics are
  identical (the audit's exact comparison), model files included;
- MLflow: one FINISHED parent run per command, every nested stage run FINISHED, none left RUNNING;
  one registered recommender and reward version per command, under its product's names; exactly one
  champion per registered model; in each product the gates ran one after the other (every gate but the
  first compared against the champion the one before it registered);
- the DVC cache: every dataset version recorded by the runs is complete (``datastore.missing``);
- the stage cache: no run trusted an entry whose outputs were gone (``stale_cache`` would say so).

Prints and writes ``benchmarks/work/concurrent_retrain.json`` (wall time, CPU time and peak RSS of the
commands included; also used by tests/test_concurrency.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))
BIND_ERRORS = ("address already in use", "is already in use", "errno 98")
SERVE_ATTEMPTS = 5


# -- servers on loopback ----------------------------------------------------------------------------------
def free_port() -> int:
    """A port free now; another process may take it before ours binds it (see :func:`serve`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(20)


def serve(cmd, health: str, env: dict, log: Path, timeout: float = 180) -> tuple[subprocess.Popen, int]:
    """Start ``cmd(port)`` on a free loopback port and wait until ``health`` answers 200; a server that
    lost the race for its port is started again on another (at most :data:`SERVE_ATTEMPTS` times)."""
    for _ in range(SERVE_ATTEMPTS):
        port = free_port()
        proc = subprocess.Popen(cmd(port), env=env, cwd=log.parent, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        t0 = time.time()
        try:
            while True:
                if proc.poll() is not None:
                    tail = log.read_text()[-3000:]
                    if any(m in tail.lower() for m in BIND_ERRORS):
                        break  # lost the port: next attempt
                    raise RuntimeError(f"{cmd(port)[:3]} exited ({proc.returncode}):\n{tail}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}{health}", timeout=2) as r:
                        if r.status == 200:
                            return proc, port
                except OSError:
                    pass
                if time.time() - t0 > timeout:
                    raise TimeoutError(f"{cmd(port)[:3]} not up after {timeout} s:\n{log.read_text()[-3000:]}")
                time.sleep(0.3)
        except BaseException:
            stop(proc)
            raise
    raise RuntimeError(f"{cmd(0)[:3]}: lost the race for a free port {SERVE_ATTEMPTS} times")


@contextlib.contextmanager
def servers(work: Path):
    """A Prefect server and an MLflow tracking server on loopback (state under ``work``); yields
    ``{"env": variables pointing a client at them, "mlflow": tracking URI, "prefect": API URL}``."""
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI",
                                                            "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE")}
    env.update(PREFECT_HOME=str(work / "prefect-server-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_ENABLED="false", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    procs = []
    try:
        prefect, pport = serve(lambda p: [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                          str(p)], "/api/health", env, work / "prefect-server.log")
        procs.append(prefect)
        mlflow, mport = serve(lambda p: [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(p),
                                         "--workers", "1", "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}",
                                         "--artifacts-destination", str(work / "mlartifacts")],
                              "/health", env, work / "mlflow-server.log")
        procs.append(mlflow)
        api = f"http://127.0.0.1:{pport}/api"
        yield {"prefect": api, "mlflow": f"http://127.0.0.1:{mport}",
               "env": {"PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}}
    finally:
        for p in reversed(procs):
            stop(p)


# -- the runs ---------------------------------------------------------------------------------------------
def launch(n: int, work: Path, overrides: list[str], env_extra: dict[str, str] | None = None,
           tracking_uri: str | None = None, per_run: list[list[str]] | None = None) -> list[dict]:
    """``n`` retrain commands started together (``per_run[i]``: extra overrides of command ``i``); without
    ``PREFECT_API_URL`` in ``env_extra`` each starts its own ephemeral Prefect server, as a user's would."""
    work.mkdir(parents=True, exist_ok=True)
    config = work / "params.yaml"
    if not config.exists():
        config.write_text((REPO / "params.yaml").read_text())
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(work / ".prefect")}
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(env_extra or {})
    store = tracking_uri or f"sqlite:///{work / 'mlflow.db'}"
    procs = []
    t0 = time.perf_counter()
    for i in range(n):
        cmd = [sys.executable, "-m", "asft.cli", "retrain", "--config", str(config), *overrides,
               *(per_run[i] if per_run else []), f"tracking.mlflow_uri={store}"]
        log = open(work / f"retrain-{i}.log", "w")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    out = []
    for i, (p, log) in enumerate(procs):
        rc = p.wait()
        log.close()
        out.append({"run": i, "rc": rc, "seconds": time.perf_counter() - t0,
                    "overrides": per_run[i] if per_run else [],
                    "log_tail": (work / f"retrain-{i}.log").read_text()[-3000:]})
    return out


def check(work: Path, results: list[dict], tracking_uri: str | None = None) -> dict:
    from mlflow.tracking import MlflowClient

    from asft import datastore
    from ops.audit import compare_metrics
    from tasks import lineage

    client = MlflowClient(tracking_uri or f"sqlite:///{work / 'mlflow.db'}")
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
    champions = {}
    for name in sorted({v.name for v in versions}):
        try:
            champions[name] = int(client.get_model_version_by_alias(name, "champion").version)
        except Exception:  # noqa: BLE001, S110 - no champion
            pass
    # per product: the gates in the order they registered; each compared against the champion before it
    gates: dict[str, list[dict]] = {}
    for m in metrics:
        p = m.get("promotion") or {}
        if p:
            gates.setdefault(p["product"], []).append(
                {"version": int(p["recommender_version"]), "alias": p["alias"], "gate": p.get("gate"),
                 "champion_before": None if p["champion_version_before"] is None else int(p["champion_version_before"]),
                 "wait_s": round(p.get("gate_wait_s", 0.0), 2), "reason": p["reason"][:200]})
    serialised = {}
    for product, gs in gates.items():
        gs.sort(key=lambda g: g["version"])
        champ, ok = None, True
        for g in gs:
            ok &= g["champion_before"] == champ
            if g["alias"] == "champion":
                champ = g["version"]
        serialised[product] = ok
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
        "champions": champions,
        "gates": gates,
        "gates_serialised": serialised,
        "dvc_missing": missing,
        "stale_cache": [k for m in metrics for k, c in m["lineage"]["cache"].items() if c.get("stale_cache")],
        "cache_hits": [sum(c["hit"] for c in m["lineage"]["cache"].values()) for m in metrics],
    }


def consistent(report: dict, n: int, products: int = 1) -> bool:
    return (report["exit_codes"] == [0] * n and report["parent_runs"] == ["FINISHED"] * n
            and not report["stage_runs_not_finished"] and report["metrics_files"] == n
            and not report["metric_mismatches"] and report["model_hashes_equal"]
            and len(report["registered_versions"]) == 2 * n and len(report["champions"]) == 2 * products
            and len(report["gates"]) == products and all(report["gates_serialised"].values())
            and not report["dvc_missing"] and not report["stale_cache"])


# -- a killed holder's gate slot comes back ---------------------------------------------------------------
HOLDER = """
import sys, time
from tasks.registry import GATE_PREFIX, ensure_gate_limit
from prefect.concurrency.sync import concurrency
name = GATE_PREFIX + "lease-check"
ensure_gate_limit(name)
with concurrency(name, lease_duration=60, strict=True):
    print("acquired", flush=True)
    time.sleep(3600)
"""


def lease_check(env_extra: dict[str, str], work: Path) -> dict:
    """A process takes the gate's slot (60 s lease, the server's minimum) and is killed with SIGKILL; how
    long until another process gets the slot (expected: the lease's 60 s plus the repossessor's loop)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **env_extra}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], env=env, stdout=subprocess.PIPE, text=True,
                              cwd=REPO)
    assert holder.stdout.readline().strip() == "acquired", "the holder did not get the slot"
    holder.kill()
    holder.wait()
    t0 = time.perf_counter()
    probe = ("from tasks.registry import GATE_PREFIX\nfrom prefect.concurrency.sync import concurrency\n"
             "with concurrency(GATE_PREFIX + 'lease-check', timeout_seconds=240, lease_duration=60, strict=True):\n"
             "    print('acquired', flush=True)\n")
    res = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, cwd=REPO,
                         check=False)
    return {"holder_killed": "SIGKILL", "lease_s": 60, "slot_back_after_s": round(time.perf_counter() - t0, 1),
            "acquired": res.stdout.strip() == "acquired", "error": res.stderr[-1000:] if res.returncode else ""}


def crash_check(srv: dict, work: Path, overrides: list[str], heartbeat_s: int = 30, budget_s: float = 600) -> dict:
    """A retrain killed with SIGKILL (its whole process group) mid-run: the Prefect server marks its flow run
    Crashed from the missing heartbeats (the automation ``retrain`` installs), and the next retrain's
    sweep (:func:`tasks.tracking.close_dead_runs`, called here as it would call it) closes its MLflow runs
    from that state. No pid is consulted."""
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.tracking import close_dead_runs

    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(work / ".prefect"), **srv["env"],
           "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(heartbeat_s)}
    cmd = [sys.executable, "-m", "asft.cli", "retrain", "--config", str(work / "params.yaml"), *overrides,
           "tracking.experiment=crash-check", f"tracking.mlflow_uri={srv['mlflow']}"]
    log = work / "crash-check.log"
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    client = MlflowClient(srv["mlflow"])
    t0, parent, stage = time.perf_counter(), None, None
    while time.perf_counter() - t0 < budget_s and proc.poll() is None:
        exp = client.get_experiment_by_name("crash-check")
        runs = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'") if exp else []
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        stages = [r.data.tags.get("stage") for r in runs if r.data.tags.get("stage") == "train-base"]
        if parents and stages:
            parent, stage = parents[0], stages[0]
            break
        time.sleep(1)
    if parent is None:
        stop(proc)
        return {"error": f"the retrain never reached train-base:\n{log.read_text()[-2000:]}"}
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    t_kill = time.perf_counter()
    fr_id = parent.data.tags["prefect.flow_run_id"]
    with temporary_settings(updates={PREFECT_API_URL: srv["prefect"]}):
        state = None
        while time.perf_counter() - t_kill < budget_s:
            with get_client(sync_client=True) as pc:
                state = pc.read_flow_run(fr_id).state
            if state.is_final():
                break
            time.sleep(2)
        t_state = time.perf_counter() - t_kill
        status_before = client.get_run(parent.info.run_id).info.status
        closed = close_dead_runs(client, parent.info.experiment_id)
    after = client.get_run(parent.info.run_id)
    kids = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return {"killed": "SIGKILL to the retrain's process group", "killed_during": stage,
            "heartbeat_s": heartbeat_s, "prefect_state": state.name if state else None,
            "prefect_state_message": state.message if state else None, "state_after_kill_s": round(t_state, 1),
            "mlflow_parent_before_sweep": status_before, "closed_by_sweep": closed == [parent.info.run_id],
            "mlflow_parent_after_sweep": after.info.status,
            "terminated_reason": after.data.tags.get("terminated_reason"),
            "stage_runs_after_sweep": sorted(k.info.status for k in kids)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=2, help="commands of the first product")
    ap.add_argument("--servers", action="store_true", help="against a real Prefect server and MLflow server")
    ap.add_argument("--products", default="", help="comma-separated registry.product names: the first gets --runs"
                    " commands, every other one more command (default: the derived product)")
    ap.add_argument("--lease-check", action="store_true", help="with --servers: a killed holder's slot comes back")
    ap.add_argument("--crash-check", action="store_true", help="with --servers: a retrain killed with SIGKILL is"
                    " marked Crashed by Prefect and its MLflow runs are closed from that state")
    ap.add_argument("--work", default=str(REPO / "benchmarks" / "work" / "concurrent"))
    ap.add_argument("--tiny", action="store_true", help="the test suite's tiny config (seconds, not minutes)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    overrides = list(args.overrides)
    if args.tiny:
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import TINY, pinned_threads

        overrides = [*TINY, "posttrain.methods=[asft]", *overrides]
        os.environ.update(pinned_threads())  # identical metrics are compared: the suite's pinned threads
    products = [p for p in args.products.split(",") if p]
    per_run = ([[f"registry.product={products[0]}"]] * args.runs + [[f"registry.product={p}"] for p in products[1:]]
               if products else None)
    n = len(per_run) if per_run else args.runs
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ["ASFT_RUNS_DIR"] = str(work / "runs")
    os.environ["ASFT_DVC_CACHE_DIR"] = str(work / "dvc-cache")
    t0 = time.perf_counter()
    with servers(work) if args.servers else contextlib.nullcontext() as srv:
        t_up = time.perf_counter() - t0
        env = {"PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(work / "results"), **(srv["env"] if srv else {})}
        results, report = [], {}
        if n:  # --runs 0: only the checks below
            results = launch(n, work, overrides, env_extra=env, tracking_uri=srv["mlflow"] if srv else None,
                             per_run=per_run)
            report = check(work, results, srv["mlflow"] if srv else None)
        elif not (work / "params.yaml").exists():
            (work / "params.yaml").write_text((REPO / "params.yaml").read_text())
        if args.lease_check and srv:
            report["lease_check"] = lease_check(srv["env"], work)
        if args.crash_check and srv:
            report["crash_check"] = crash_check(srv, work, overrides)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    me = resource.getrusage(resource.RUSAGE_SELF)
    report.update(runs=n, servers=bool(srv), servers_up_s=round(t_up, 1), overrides=overrides, per_run=per_run,
                  consistent=consistent(report, n, max(len(products), 1)) if n else None,
                  total_wall_s=round(time.perf_counter() - t0, 1),
                  cpu_s=round(usage.ru_utime + usage.ru_stime + me.ru_utime + me.ru_stime, 1),
                  peak_rss_mb_largest_process=round(max(usage.ru_maxrss, me.ru_maxrss) / 1024, 1),
                  machine=f"{platform.node()} ({os.cpu_count()} CPUs)", date=datetime.now(UTC).isoformat())
    out = REPO / "benchmarks" / "work" / ("concurrent_retrain.json" if n else "concurrent_retrain_checks.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps({k: v for k, v in report.items() if k != "overrides"}, indent=1, default=str))
    if report["consistent"] is False:
        for r in results:
            if r["rc"] != 0:
                print(f"--- run {r['run']} (exit {r['rc']}):\n{r['log_tail']}", file=sys.stderr)
    ok = report["consistent"] is not False and report.get("lease_check", {}).get("acquired", True) and \
        report.get("crash_check", {}).get("closed_by_sweep", True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
