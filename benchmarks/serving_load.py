"""Bounded load test of the served recommender: `mlflow models serve` on loopback, p50/p99 latency and
throughput for single-history and batched requests, as JSON.

What is served (first that applies):

- ``--model URI_OR_DIR``: a packaged pyfunc recommender (a directory with an ``MLmodel``, or a
  ``models:/NAME@champion`` URI with ``MLFLOW_TRACKING_URI`` set);
- ``--policy DIR --processed DIR``: a saved recommender (``save_pretrained`` dir + vocabulary) and the
  processed data it was trained on, packaged here with ``tasks.registry.save_serving_model`` exactly as
  the promote stage does;
- otherwise a synthetic one: ``--users`` x ~``--mean-events`` Zipf-distributed events over ``--items``
  items, preprocessed with the pipeline's preprocessing, and a randomly initialised model of the default
  ``model`` config (architecture and catalog size set the cost of a request; trained weights do not).

The server is started with ``--env-manager local -h 127.0.0.1 -p <free port> -w <workers>``; once
``/ping`` answers, ``--single`` one-history requests and ``--batched`` requests of ``--batch-size``
histories are sent by ``--concurrency`` client threads (keep-alive connections), each phase capped at
``--time-cap`` seconds. Histories are drawn from the catalog by popularity, 1..``--max-history`` long;
``--cold-fraction`` of them hold only unknown ids (the popularity fallback). Every answer must be 200
with ``k`` items. Also reported: the error path (negative k -> 400) and the server's CPU time and
peak RSS per phase (psutil over the server's process tree).

    .venv/bin/python benchmarks/serving_load.py --output benchmarks/issue15/serving.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BIND_ERRORS = ("address already in use", "errno 98", "error while attempting to bind")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def synthetic_model(root: Path, n_items: int, n_users: int, mean_events: int, seed: int) -> tuple[Path, Path]:
    """(policy dir, processed dir): Zipf events preprocessed by the pipeline, a random default model."""
    import pandas as pd

    from asft.config import Config
    from asft.data.preprocess import ItemVocab, preprocess
    from asft.data.schema import InteractionData
    from asft.models.recommender import build_model, save_recommender

    cfg = Config()
    rng = np.random.default_rng(seed)
    pop = 1.0 / np.arange(1, n_items + 1) ** 0.8
    lens = np.clip(rng.geometric(1.0 / mean_events, size=n_users), 3, 10 * mean_events)
    users = np.repeat(np.arange(n_users), lens)
    items = rng.choice(n_items, size=len(users), p=pop / pop.sum())
    ts = np.concatenate([np.arange(n) for n in lens]).astype(np.int64)
    df = pd.DataFrame({"user_id": [f"u{u}" for u in users], "item_id": [f"i{i}" for i in items],
                       "timestamp": ts, "rating": np.full(len(users), 4.0)})
    processed = root / "processed"
    preprocess(InteractionData(interactions=df, source="synthetic", format="generic"), cfg.preprocess, processed)
    vocab = ItemVocab.load(processed / "vocab.json")
    model = build_model(cfg.model, vocab.size, cfg.preprocess.max_len, seed=seed)
    policy = save_recommender(model, vocab, root / "policy", {"max_len": cfg.preprocess.max_len})
    return policy, processed


def _tree(proc):
    import psutil

    try:
        p = psutil.Process(proc.pid)
        return [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def server_usage(proc) -> dict:
    """CPU seconds and RSS (MiB) summed over the server's process tree."""
    import psutil

    cpu = rss = 0.0
    for p in _tree(proc):
        try:
            t = p.cpu_times()
            cpu += t.user + t.system
            rss += p.memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            pass
    return {"cpu_s": cpu, "rss_mib": rss}


class RssSampler(threading.Thread):
    def __init__(self, proc, every: float = 0.25):
        super().__init__(daemon=True)
        self.proc, self.every, self.peak, self.stop = proc, every, 0.0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, server_usage(self.proc)["rss_mib"])
            self.stop.wait(self.every)


def start_server(model: str, workers: int, log: Path, timeout: float, env: dict) -> tuple[subprocess.Popen, int]:
    """`mlflow models serve` on a free loopback port (a lost port race is retried), up once /ping is 200."""
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    for _ in range(3):
        port = _free_port()
        cmd = [mlflow_bin, "models", "serve", "-m", model, "--env-manager", "local", "-h", "127.0.0.1",
               "-p", str(port), "-w", str(workers)]
        with open(log, "ab") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        t0 = time.time()
        while time.time() - t0 < timeout:
            if proc.poll() is not None:
                break
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/ping")
                if c.getresponse().status == 200:
                    return proc, port
            except OSError:
                pass
            time.sleep(0.25)
        tail = log.read_text(errors="replace")[-3000:]
        stop_server(proc)
        if not any(m in tail.lower() for m in BIND_ERRORS):
            raise RuntimeError(f"`mlflow models serve` did not come up in {timeout:.0f} s:\n{tail}")
    raise RuntimeError("`mlflow models serve` lost the port race three times")


def stop_server(proc: subprocess.Popen) -> None:
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_phase(port: int, bodies: list[bytes], concurrency: int, time_cap: float, check) -> dict:
    """Send ``bodies`` from ``concurrency`` threads (one keep-alive connection each); latency per request."""
    lat: list[float] = []
    errors: list[str] = []
    lock, nxt = threading.Lock(), iter(range(len(bodies)))
    deadline = time.perf_counter() + time_cap

    def worker():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while time.perf_counter() < deadline:
            with lock:
                i = next(nxt, None)
            if i is None:
                break
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/invocations", bodies[i], {"Content-Type": "application/json"})
                r = conn.getresponse()
                payload = r.read()
                dt = time.perf_counter() - t0
                msg = check(i, r.status, payload)
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                dt, msg = time.perf_counter() - t0, f"{type(e).__name__}: {e}"
            with lock:
                lat.append(dt)
                if msg:
                    errors.append(msg)
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    a = np.asarray(lat) * 1e3
    return {"requests": len(lat), "planned": len(bodies), "errors": len(errors), "error_examples": errors[:3],
            "wall_s": round(wall, 3), "requests_per_s": round(len(lat) / wall, 2),
            "p50_ms": round(float(np.percentile(a, 50)), 2) if len(a) else None,
            "p90_ms": round(float(np.percentile(a, 90)), 2) if len(a) else None,
            "p99_ms": round(float(np.percentile(a, 99)), 2) if len(a) else None,
            "max_ms": round(float(a.max()), 2) if len(a) else None, "capped": len(lat) < len(bodies)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="packaged pyfunc recommender: a directory with an MLmodel or a models:/ URI")
    ap.add_argument("--policy", help="a saved recommender directory (with --processed) to package and serve")
    ap.add_argument("--processed", help="the processed data --policy was trained on (its popularity fallback)")
    ap.add_argument("--items", type=int, default=2000, help="synthetic catalog size")
    ap.add_argument("--users", type=int, default=3000, help="synthetic users")
    ap.add_argument("--mean-events", type=int, default=30, help="synthetic mean events per user")
    ap.add_argument("--single", type=int, default=500, help="one-history requests")
    ap.add_argument("--batched", type=int, default=100, help="batched requests")
    ap.add_argument("--batch-size", type=int, default=32, help="histories per batched request")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--max-history", type=int, default=50, help="longest history sent")
    ap.add_argument("--cold-fraction", type=float, default=0.05, help="share of histories with only unknown ids")
    ap.add_argument("--concurrency", type=int, default=4, help="client threads")
    ap.add_argument("--workers", type=int, default=1, help="`mlflow models serve -w`")
    ap.add_argument("--time-cap", type=float, default=240.0, help="seconds per phase at most")
    ap.add_argument("--warmup", type=int, default=20, help="requests sent (and not measured) before each phase")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="keep the packaged model and server log here (default: a temporary dir)")
    ap.add_argument("--output", help="also write the JSON here")
    args = ap.parse_args(argv)

    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "HF_HUB_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="serving-load-"))
    work.mkdir(parents=True, exist_ok=True)
    t_build = time.perf_counter()
    source: dict = {}
    if args.model:
        model_uri, source = args.model, {"model": args.model}
    else:
        from tasks.registry import save_serving_model

        if args.policy:
            if not args.processed:
                ap.error("--policy needs --processed (the data it was trained on: its popularity fallback)")
            policy, processed = Path(args.policy), Path(args.processed)
            source = {"policy": str(policy), "processed": str(processed)}
        else:
            policy, processed = synthetic_model(work / "synthetic", args.items, args.users, args.mean_events,
                                                args.seed)
            source = {"synthetic": {"items": args.items, "users": args.users, "mean_events": args.mean_events,
                                    "model": "default `model` config, random init"}}
        model_uri = str(save_serving_model("recommender", policy, work / "pyfunc", k=args.k,
                                           processed_dir=processed, max_rows=max(1024, args.batch_size)))
    build_s = time.perf_counter() - t_build

    # the catalog and the model's description, read from the packaged model
    local = Path(model_uri) if Path(model_uri).is_dir() else None
    if local is None:
        import mlflow

        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(work / "dl")))
    pop = json.loads(next(local.rglob("popularity.json")).read_text())
    catalog, counts = pop["items"], np.asarray(pop["counts"], dtype=np.float64) + 1.0
    meta = {"n_items": len(catalog), "events": pop["events"]}

    rng = np.random.default_rng(args.seed + 1)

    def history() -> list[str]:
        if rng.random() < args.cold_fraction:
            return [f"unknown-{int(rng.integers(1e9))}" for _ in range(int(rng.integers(0, 4)))]
        n = int(rng.integers(1, args.max_history + 1))
        return [catalog[i] for i in rng.choice(len(catalog), size=n, p=counts / counts.sum())]

    def body(rows: list[list[str]]) -> bytes:
        return json.dumps({"dataframe_records": [{"history": h, "k": args.k} for h in rows]}).encode()

    single = [body([history()]) for _ in range(args.single)]
    batched = [body([history() for _ in range(args.batch_size)]) for _ in range(args.batched)]
    expect_k = min(args.k, len(catalog))

    def check(n_rows: int):
        def _check(i: int, status: int, payload: bytes) -> str | None:
            if status != 200:
                return f"request {i}: HTTP {status}: {payload[:200]!r}"
            preds = json.loads(payload)["predictions"]
            if len(preds) != n_rows or any(len(p["items"]) != expect_k for p in preds):
                return f"request {i}: wrong shape"
            return None
        return _check

    log = work / "serve.log"
    t0 = time.perf_counter()
    proc, port = start_server(model_uri, args.workers, log, 300, env)
    startup_s = time.perf_counter() - t0
    result: dict = {}
    try:
        sampler = RssSampler(proc)
        sampler.start()
        # the error path: a client error is a 400 with the reason, fast
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        c.request("POST", "/invocations", json.dumps({"dataframe_records": [{"history": catalog[:3], "k": -1}]}),
                  {"Content-Type": "application/json"})
        r = c.getresponse()
        err = {"status": r.status, "message": json.loads(r.read())["message"][-120:]}
        c.close()
        phases = {}
        for name, bodies, rows in (("single", single, 1), ("batched", batched, args.batch_size)):
            warm = bodies[: args.warmup]
            run_phase(port, warm, min(args.concurrency, len(warm)) or 1, args.time_cap, check(rows))
            before = server_usage(proc)
            res = run_phase(port, bodies, args.concurrency, args.time_cap, check(rows))
            after = server_usage(proc)
            res["histories_per_s"] = round(res["requests_per_s"] * rows, 2)
            res["server_cpu_s"] = round(after["cpu_s"] - before["cpu_s"], 2)
            res["server_cpu_ms_per_history"] = round(1e3 * res["server_cpu_s"] / max(1, res["requests"] * rows), 3)
            phases[name] = res
        sampler.stop.set()
        sampler.join()
        result["server_peak_rss_mib"] = round(sampler.peak, 1)
        result["server_cpu_total_s"] = round(server_usage(proc)["cpu_s"], 2)  # startup + all requests
    finally:
        stop_server(proc)
    r1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    # this process (model build + client threads) and reaped children; the server's own CPU is
    # server_cpu_total_s (its process tree, read with psutil before it is stopped)
    cpu = sum(b.ru_utime + b.ru_stime for b in r1)
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    result = {
        "command": "benchmarks/serving_load.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_at_end": load},
        "served": {**source, **meta, "uri": model_uri}, "k": args.k, "concurrency": args.concurrency,
        "server_workers": args.workers, "batch_size": args.batch_size, "max_history": args.max_history,
        "cold_fraction": args.cold_fraction, "build_s": round(build_s, 2), "server_startup_s": round(startup_s, 2),
        "negative_k": err, **phases, **result,
        "client_cpu_s": round(cpu, 2),
        "client_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    bad = [n for n in ("single", "batched") if result[n]["errors"]]
    if bad or err["status"] != 400:
        raise SystemExit(f"serving load test failed: errors in {bad}; negative k -> HTTP {err['status']}")
    return result


if __name__ == "__main__":
    main()
