"""Cost of the data stages (ingest = load + GX validation, preprocess = preprocessing + GX validation,
optionally preferences) against the number of events: wall time, CPU time and peak RSS of each stage,
each run as its own child process (the `asft <stage>` CLI, as DVC and the flow run it), plus the
log-log slope of each cost against events.

Sources:

* ``movielens``: ML-100K (``../shared/data/ml-100k/ml-100k.inter``) replicated R times with user ids
  shifted by R * (max user id), written as a MovieLens ``u.data`` file (tab-separated, no header);
  R = events / 100k (the last replica cut to the exact count);
* ``simulator``: ``data.source=simulator`` with ``simulator.n_users`` / ``n_items`` / ``min_len`` /
  ``max_len`` sized to the event count (160k users x 60k items at 25M, mean history 156, as ML-25M).

    python benchmarks/scale_data.py --sizes 0.1,1,5,25 --source movielens --out /work/scale/curve_ml.json
    python benchmarks/scale_data.py --sizes 5 --stages ingest,preprocess,preferences

Data and stage outputs go under ``--work`` (default /work/scale). Prints the JSON (and writes --out).
Wall times on a shared machine are inflated; CPU time (user + system of the child) is the steadier
figure. Peak RSS: the child's ``ru_maxrss`` (wait4), and the largest sum of RSS over the child's
process tree sampled every 50 ms; the larger is reported.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ML100K = ROOT.parent / "shared" / "data" / "ml-100k" / "ml-100k.inter"
ENV = {
    "DO_NOT_TRACK": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "GX_ANALYTICS_ENABLED": "false",
}
MEAN_HISTORY = 156  # simulated events per user (ML-25M: 25M events / 162k users)


def build_movielens(events: int, work: Path) -> Path:
    """``work/ml-<events>/u.data``: ML-100K replicated with shifted user ids (cached by event count)."""
    d = work / f"ml-{events}"
    f = d / "u.data"
    if f.is_file():
        return d
    import pyarrow as pa
    import pyarrow.csv as pacsv

    t = pacsv.read_csv(ML100K, parse_options=pacsv.ParseOptions(delimiter="\t"))
    u, i, r, ts = (t.column(k).to_numpy().astype(np.int64) for k in range(4))
    n = len(u)
    reps = math.ceil(events / n)
    shift = int(u.max())
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / "u.data.tmp"
    with pa.OSFile(str(tmp), "wb") as sink:
        for k in range(reps):
            m = min(n, events - k * n)
            tab = pa.table({"u": u[:m] + k * shift, "i": i[:m], "r": r[:m], "t": ts[:m]})
            pacsv.write_csv(tab, sink, pacsv.WriteOptions(include_header=False, delimiter="\t"))
    tmp.rename(f)
    return d


def simulator_overrides(events: int) -> list[str]:
    n_users = max(2, round(events / MEAN_HISTORY))
    n_items = max(1000, round(events * 60_000 / 25_000_000))
    return ["--data", "simulator", f"simulator.n_users={n_users}", f"simulator.n_items={n_items}",
            "simulator.min_len=50", "simulator.max_len=262"]


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_stage(cmd: list[str], log: Path, cwd: Path = ROOT) -> dict:
    """Run one stage in a child process; wall, CPU (user+sys) and peak RSS."""
    env = {**os.environ, **ENV, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    # the generated data directory is a data root (containment also covers paths from config files)
    env["ASFT_DATA_ROOTS"] = os.pathsep.join(p for p in (os.environ.get("ASFT_DATA_ROOTS"), str(log.parents[2])) if p)
    peak = [0]
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], _tree_rss(p.pid))
                stop.wait(0.05)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        stop.set()
        th.join()
    wall = time.perf_counter() - t0
    out = {
        "wall_s": round(wall, 2),
        "cpu_s": round(ru.ru_utime + ru.ru_stime, 2),
        "peak_rss_mb": round(max(ru.ru_maxrss * 1024, peak[0]) / 2**20, 1),
        "rc": p.returncode,
    }
    if p.returncode != 0:
        out["log_tail"] = log.read_text()[-2000:]
    return out


def run_size(events: int, source: str, stages: list[str], work: Path, extra: list[str], code: Path = ROOT) -> dict:
    asft = [sys.executable, "-m", "asft.cli"]
    run = work / "runs" / f"{source}-{events}"
    run.mkdir(parents=True, exist_ok=True)
    if source == "movielens":
        data = ["--data", str(build_movielens(events, work))]
    else:
        data = simulator_overrides(events)
    res: dict = {"events": events, "stages": {}}
    cmds = {
        "ingest": [*asft, "ingest", *data, "--output", str(run / "raw"), *extra],
        "preprocess": [*asft, "preprocess", "--raw", str(run / "raw"), "--output", str(run / "processed"), *extra],
        "preferences": [*asft, "preferences", "--raw", str(run / "raw"), "--processed", str(run / "processed"),
                        "--output", str(run / "preferences"), *extra],
    }
    for st in stages:
        cmd = cmds[st]
        if st != "ingest" and source == "simulator":
            cmd = [*cmd, *[o for o in data[2:]]]  # same simulator settings (preferences reads them)
        r = run_stage(cmd, run / f"{st}.log", code)
        r["command"] = " ".join(Path(c).name if c == sys.executable else c for c in cmd)
        res["stages"][st] = r
        print(json.dumps({"events": events, "stage": st, **{k: v for k, v in r.items() if k != "log_tail"}}),
              file=sys.stderr, flush=True)
        if r["rc"] != 0:
            break
    data_st = [s for s in ("ingest", "preprocess") if s in res["stages"]]
    res["data_stages"] = {
        "wall_s": round(sum(res["stages"][s]["wall_s"] for s in data_st), 2),
        "cpu_s": round(sum(res["stages"][s]["cpu_s"] for s in data_st), 2),
        "peak_rss_mb": max((res["stages"][s]["peak_rss_mb"] for s in data_st), default=0),
    }
    if source == "movielens":
        with open(run / "raw" / "source.json") as fh:
            res["rows"] = json.load(fh).get("rows")
    return res


def slopes(results: list[dict], stages: list[str]) -> dict:
    """Least-squares slope of log(cost) against log(events), per stage and metric."""
    out: dict = {}
    ok = [r for r in results if all(r["stages"].get(s, {}).get("rc") == 0 for s in stages)]
    if len(ok) < 2:
        return out
    x = np.log([r["events"] for r in ok])
    for s in [*stages, "data_stages"]:
        out[s] = {}
        for m in ("wall_s", "cpu_s", "peak_rss_mb"):
            y = [(r["data_stages"] if s == "data_stages" else r["stages"][s])[m] for r in ok]
            out[s][m] = round(float(np.polyfit(x, np.log(np.maximum(y, 1e-3)), 1)[0]), 3)
            # the slope over the two largest sizes: fixed costs (imports, GX start-up) flatten the full fit
            y2 = np.log(np.maximum(y[-2:], 1e-3))
            out[s][m + "_top2"] = round(float((y2[1] - y2[0]) / (x[-1] - x[-2])), 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="0.1,1,5,25", help="millions of events, comma-separated")
    ap.add_argument("--source", choices=("movielens", "simulator"), default="movielens")
    ap.add_argument("--stages", default="ingest,preprocess", help="comma-separated: ingest,preprocess,preferences")
    ap.add_argument("--work", default="/work/scale")
    ap.add_argument("--out", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the stage outputs (default: removed after each size)")
    ap.add_argument("--code", default=str(ROOT),
                    help="checkout whose asft the stages run (e.g. an export of an older commit, for a baseline)")
    ap.add_argument("overrides", nargs="*", help="config overrides passed to every stage (key=value)")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    stages = a.stages.split(",")
    results = []
    for s in a.sizes.split(","):
        events = round(float(s) * 1_000_000)
        results.append(run_size(events, a.source, stages, work, a.overrides, Path(a.code)))
        if not a.keep:
            import shutil

            shutil.rmtree(work / "runs" / f"{a.source}-{events}", ignore_errors=True)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, cwd=a.code, capture_output=True, text=True).stdout
    out = {
        "benchmark": "scale_data",
        "source": a.source,
        "stages": stages,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "git": git.strip() or a.code,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "results": results,
        "loglog_slope": slopes(results, stages),
    }
    text = json.dumps(out, indent=2)
    if a.out:
        Path(a.out).write_text(text)
        ok = [r for r in results if all(r["stages"].get(s, {}).get("rc") == 0 for s in stages)]
        if len(ok) > 1:  # the log-log curves, next to the JSON
            from asft.plots import cost_curves

            costs = {s: {m: [(r["data_stages"] if s == "data_stages" else r["stages"][s])[m] for r in ok]
                         for m in ("wall_s", "cpu_s", "peak_rss_mb")} for s in [*stages, "data_stages"]}
            cost_curves([r["events"] for r in ok], costs, Path(a.out).with_suffix(".png"), a.source)
    print(text)


if __name__ == "__main__":
    main()
