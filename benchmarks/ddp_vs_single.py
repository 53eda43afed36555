"""DDP on 2 CPU processes (torchrun, gloo) against 1 process with the same global batch.

    python benchmarks/ddp_vs_single.py [--work DIR] [--epochs 4] [key=value ...]

On the simulator (params.yaml, shrunk by the overrides below unless given), for base SFT, the
reward model (one member) and A-SFT: the 1-process run is the core stage called in this process with
batch size B; the 2-process run is the stage's CLI command under ``torchrun --nproc_per_node 2``
with B/2 per process. Dropout is off, so the only difference is the order of floating-point sums.
Prints the per-epoch training losses side by side with the largest relative difference, checks
that sampling and scoring sharded over 2 processes give the single-process rows, and writes
``benchmarks/work/ddp_vs_single.{json,png}``.
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

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SMALL = ["simulator.n_users=300", "simulator.n_items=150", "model.n_layer=2", "model.n_embd=32", "model.n_head=2",
         "reward.members=1", "sampling.n_candidates=8", "train.device=cpu", "reward.train.device=cpu",
         "posttrain.train.device=cpu"]
BATCH = {"base": ("train.batch_size", 32), "reward": ("reward.train.batch_size", 64),
         "asft": ("posttrain.train.batch_size", 32)}


def torchrun(work: Path, args: list[str], overrides: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "asft.cli",
           *args, "--config", str(work / "params.yaml"), *overrides]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise SystemExit(p.stderr[-4000:])
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=str(REPO / "benchmarks" / "work" / "ddp"))
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    from asft import stages
    from asft.config import load_config
    from asft.env import configure_environment

    configure_environment()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "params.yaml").write_text((REPO / "params.yaml").read_text())
    e = args.epochs
    common = [*SMALL, "model.dropout=0", f"train.epochs={e}", f"reward.train.epochs={e}",
              f"posttrain.train.epochs={e}", "train.patience=100", "reward.train.patience=100",
              "posttrain.train.patience=100", "train.num_threads=1", "reward.train.num_threads=1",
              "posttrain.train.num_threads=1", *[f"{k}={v}" for k, v in BATCH.values()], *args.overrides]
    half = [o for o in common if o.split("=")[0] not in {k for k, _ in BATCH.values()}] + \
        [f"{k}={v // 2}" for k, v in BATCH.values()]
    cfg = load_config(work / "params.yaml", common)
    raw = stages.stage_ingest(cfg, work / "raw")["raw_dir"]
    proc = stages.stage_preprocess(raw, cfg, work / "processed")["processed_dir"]
    prefs = stages.stage_preferences(raw, proc, cfg, work / "preferences")["preferences_dir"]
    secs: dict[str, dict[str, float]] = {}

    def one(name, fn, *a, **kw):
        t0 = time.perf_counter()
        fn(*a, **kw)
        secs.setdefault(name, {})["1 process"] = time.perf_counter() - t0

    one("base", stages.stage_train_base, proc, cfg, work / "base1", progress=False)
    secs["base"]["2 processes"] = torchrun(work, ["train-base", "--processed", proc, "--output", str(work / "base2")],
                                           half)
    base = str(work / "base1" / "best")
    one("reward", stages.stage_train_reward, proc, prefs, base, cfg, work / "reward1", progress=False)
    secs["reward"]["2 processes"] = torchrun(work, ["train-reward", "--processed", proc, "--preferences", prefs,
                                                    "--base", base, "--output", str(work / "reward2")], half)
    one("sample", stages.stage_sample, proc, base, cfg, work / "cand1", progress=False)
    secs["sample"]["2 processes"] = torchrun(work, ["sample", "--processed", proc, "--base", base, "--output",
                                                    str(work / "cand2")], common)
    one("score", stages.stage_score, str(work / "cand1"), proc, base, str(work / "reward1"), cfg, work / "scored1",
        progress=False)
    secs["score"]["2 processes"] = torchrun(work, ["score", "--candidates", str(work / "cand1"), "--processed", proc,
                                                   "--base", base, "--reward", str(work / "reward1"), "--output",
                                                   str(work / "scored2")], common)
    adv = stages.stage_advantages(str(work / "scored1"), cfg, work / "adv")["advantages_dir"]
    one("asft", stages.stage_posttrain, "asft", proc, base, str(work / "reward1"), str(work / "scored1"), adv, cfg,
        work / "asft1", progress=False)
    secs["asft"]["2 processes"] = torchrun(work, ["posttrain", "--method", "asft", "--processed", proc, "--base", base,
                                                  "--reward", str(work / "reward1"), "--scored", str(work / "scored1"),
                                                  "--advantages", adv, "--output", str(work / "asft2")], half)

    def hist(d: Path) -> list[float]:
        s = json.loads((d / "train_summary.json").read_text())
        return [h["train_loss"] for h in (s["histories"][0] if "histories" in s else s["history"]) if "train_loss" in h]

    curves = {name: {"1 process": hist(work / f"{name}1"), "2 processes": hist(work / f"{name}2")}
              for name in ("base", "reward", "asft")}
    for c in curves.values():
        a, b = np.array(c["1 process"]), np.array(c["2 processes"])
        c["max_rel_diff"] = float(np.max(np.abs(a - b) / np.abs(a)))
    c1, c2 = pd.read_parquet(work / "cand1" / "candidates.parquet"), pd.read_parquet(work / "cand2" / "candidates.parquet")
    s1, s2 = pd.read_parquet(work / "scored1" / "candidates.parquet"), pd.read_parquet(work / "scored2" / "candidates.parquet")
    sampling_equal = c1.equals(c2)
    def col(f: pd.DataFrame, c: str) -> np.ndarray:
        v = f[c].to_numpy()
        return np.stack(v).astype(float) if v.dtype == object else v.astype(float)

    score_diff = max(float(np.max(np.abs(col(s1, c) - col(s2, c)))) for c in
                     ("r_mean", "r_std", "logged_r_mean", "expected_r_mean"))
    report = {"curves": curves, "seconds": secs, "sampling_rows": len(c1), "sampling_identical": sampling_equal,
              "scoring_max_abs_diff": score_diff, "overrides": common,
              "machine": f"{platform.node()} ({os.cpu_count()} CPUs)", "date": datetime.now(UTC).isoformat()}
    out = REPO / "benchmarks" / "work" / "ddp_vs_single.json"
    out.write_text(json.dumps(report, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, (name, c) in zip(axes, curves.items(), strict=True):
        x = np.arange(1, len(c["1 process"]) + 1)
        ax.plot(x, c["1 process"], "o-", label="1 process, batch B")
        ax.plot(x, c["2 processes"], "x--", label="2 processes (gloo), B/2 each")
        ax.set_title(f"{name}: max rel. diff {c['max_rel_diff']:.1e}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("train loss")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    for name, c in curves.items():
        print(f"{name:7s} 1 proc : " + " ".join(f"{v:.6f}" for v in c["1 process"]))
        print(f"{name:7s} 2 procs: " + " ".join(f"{v:.6f}" for v in c["2 processes"])
              + f"   max rel diff {c['max_rel_diff']:.2e}")
    print(f"sampling: {len(c1)} rows, identical: {sampling_equal}; scoring max |diff| {score_diff:.2e}")
    print(json.dumps(secs, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
