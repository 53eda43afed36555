"""Cost curve of the simulator: generation time, CPU time and peak memory against events.

    .venv/bin/python benchmarks/scale_simulator.py [--sizes 0.1M,1M,5M,10M,25M] [--workers 2]
        [--out benchmarks/issue15/simulator.json] [--write-25m /work/scale/sim25m]

Each size runs in its own child process (so peak RSS is that size's alone): the simulator is built
(``Simulator(cfg, seed)``), the log generated (``generate(workers)``) and, for the size named by
``--write``, written as ``asft ingest --data simulator`` writes its raw dir (interactions.parquet,
catalog.parquet, simulator/, source.json; ingest adds validation.json when it validates). Sizes:
histories uniform in [12, 300] events (mean 156, as ML-25M's 162k users and 25M ratings); users =
events / 156; items = 60k at 25M, scaled with the users below (at least 2,000). Prints and writes one
JSON document with the per-size figures and the log-log slope of wall and CPU time against events.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIN_LEN, MAX_LEN = 12, 300
SIZES = {"0.1M": 100_000, "1M": 1_000_000, "5M": 5_000_000, "10M": 10_000_000, "25M": 25_000_000}


def size_config(events: int) -> dict:
    users = 160_000 if events == 25_000_000 else max(2, round(events / ((MIN_LEN + MAX_LEN) / 2)))
    items = 60_000 if events == 25_000_000 else max(2_000, round(users * 60_000 / 160_000))
    return {"n_users": users, "n_items": items, "min_len": MIN_LEN, "max_len": MAX_LEN}


def _usage() -> dict:
    self_, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"cpu_s": self_.ru_utime + self_.ru_stime + kids.ru_utime + kids.ru_stime,
            "peak_rss_mb": max(self_.ru_maxrss, kids.ru_maxrss) / 1024}


def child(sim_cfg: dict, seed: int, workers: int, write: str | None, sampler: list[int] | None = None) -> dict:
    sys.path.insert(0, str(ROOT))
    import asft.simulator as simulator_module
    from asft.config import Config
    from asft.simulator import Simulator

    if sampler:  # speed only: the sampled distribution does not depend on these sizes
        names = ("HEAD_ITEMS", "TAIL_CENTRES", "RESIDUAL_BINS", "ROUND_DRAWS")
        for name, value in zip(names, sampler, strict=True):
            setattr(simulator_module, name, value)

    cfg = Config.model_validate({"seed": seed, "simulator": sim_cfg})
    t0 = time.perf_counter()
    sim = Simulator(cfg.simulator, cfg.seed)
    t1 = time.perf_counter()
    sim._proposal()
    t2 = time.perf_counter()
    data = sim.generate(workers=workers)
    t3 = time.perf_counter()
    out = {"config": sim_cfg, "seed": seed, "workers": workers, "events": len(data.interactions),
           "sampler": [simulator_module.HEAD_ITEMS, simulator_module.TAIL_CENTRES, simulator_module.RESIDUAL_BINS,
                       simulator_module.ROUND_DRAWS],
           "users": sim.n_users, "items": sim.n_items, "init_s": t1 - t0, "sampler_tables_s": t2 - t1,
           "generate_s": t3 - t2, "wall_s": t3 - t0, **_usage()}
    out["events_per_s"] = out["events"] / out["wall_s"]
    if write:
        from asft.stages import _write_raw
        from asft.utils import atomic_dir, dir_sha256

        with atomic_dir(write) as tmp:
            _write_raw(data, cfg, tmp)
        out.update({"written": write, "write_s": time.perf_counter() - t3, "sha256": dir_sha256(write),
                    **{f"after_write_{k}": v for k, v in _usage().items()}})
    return out


def fit_slope(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 2:
        return None
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / den if den else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.1M,1M,5M,10M,25M")
    ap.add_argument("--workers", type=int, default=2, help="processes generating blocks of users")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/issue15/simulator.json"))
    ap.add_argument("--write", default=None, metavar="SIZE=DIR", help="write that size's raw dir, e.g. 25M=/work/scale/sim25m")
    ap.add_argument("--sampler", default=None, metavar="H,C,B,M",
                    help="sampler sizes to try (head items, centres, residual bins, draws per round)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(child(spec["cfg"], spec["seed"], spec["workers"], spec.get("write"), spec.get("sampler"))))
        return
    write_size, write_dir = (args.write.split("=", 1) if args.write else (None, None))
    results = []
    for name in [s.strip() for s in args.sizes.split(",") if s.strip()]:
        spec = {"cfg": size_config(SIZES[name]), "seed": args.seed, "workers": args.workers,
                "write": write_dir if name == write_size else None,
                "sampler": [int(x) for x in args.sampler.split(",")] if args.sampler else None}
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], check=False,
                              capture_output=True,
                              text=True, env=env)
        if proc.returncode:
            rec = {"size": name, "error": proc.stderr[-2000:], "wall_s": time.perf_counter() - t0}
        else:
            rec = {"size": name, **json.loads(proc.stdout.strip().splitlines()[-1])}
        results.append(rec)
        print(json.dumps(rec), flush=True)
    ok = [r for r in results if "error" not in r]
    doc = {
        "command": "python benchmarks/scale_simulator.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": os.environ.get("BENCH_MACHINE", f"{os.cpu_count()} CPUs"),
        "results": results,
        "slope_wall_vs_events": fit_slope([r["events"] for r in ok], [r["wall_s"] for r in ok]),
        "slope_cpu_vs_events": fit_slope([r["events"] for r in ok], [r["cpu_s"] for r in ok]),
        "slope_peak_rss_vs_events": fit_slope([r["events"] for r in ok], [r["peak_rss_mb"] for r in ok]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2))
    print(json.dumps({k: v for k, v in doc.items() if k != "results"}, indent=2))


if __name__ == "__main__":
    main()
