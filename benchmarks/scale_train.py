"""Benchmark: base training at catalogue scale -- tokens/s and peak memory (issue 15, item 2).

Real data (a processed dir from ``asft preprocess``): ONE epoch of base training with the sampled
softmax, then the chunked full-catalogue evaluation of every test user::

    python benchmarks/scale_train.py --processed /work/scale/sim25m/processed --out /work/scale/train25m.json \
        [--config params.yaml] [--max-steps N] [key=value ...]

Synthetic sequences (the per-token cost against the catalogue size, same model config)::

    python benchmarks/scale_train.py --synthetic --items 2000 60000 --softmax full sampled \
        --steps 40 --out /work/scale/train_cost.json [key=value ...]

Every measurement records wall and CPU seconds (RUSAGE_SELF + CHILDREN) and peak RSS; tokens/s counts
scored target tokens per second of training (the trainer's own count, as in ``train_summary.json``).
On ``--synthetic``, each (items, softmax) runs in a fresh child process so that peak RSS is its own.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asft.env import configure_environment

configure_environment()

import numpy as np
import torch
from _usage import cpu_seconds, peak_rss_mb

from asft.config import load_config
from asft.data.preprocess import NUM_SPECIAL, ProcessedData
from asft.evaluation import evaluate_table
from asft.models.recommender import build_model
from asft.training.sft import base_windows, make_trainer, target_counts, use_sampled_softmax
from asft.utils import seed_everything, write_json


def machine() -> dict:
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def train(windows, vocab_size: int, cfg, work: Path, max_steps: int = 0) -> dict:
    """Train the base model on ``windows`` for one epoch (or ``max_steps`` optimizer steps)."""
    seed_everything(cfg.seed)
    if max_steps:
        windows = windows[: max_steps * cfg.train.batch_size]
    model = build_model(cfg.model, vocab_size, cfg.preprocess.max_len, seed=cfg.seed)
    sampled = use_sampled_softmax(cfg.train, vocab_size - NUM_SPECIAL)
    counts = target_counts(windows, vocab_size) if sampled else None
    trainer = make_trainer(model, cfg, work, progress=False, item_counts=counts)
    c0, t0 = cpu_seconds(), time.perf_counter()
    res = trainer.fit(windows, resume=False)
    cpu = cpu_seconds() - c0
    return {"model": model, "softmax": "sampled" if sampled else "full", "steps": res.steps, "tokens": res.tokens,
            "train_seconds": res.train_seconds, "tokens_per_s": res.tokens_per_s,
            "wall_seconds": time.perf_counter() - t0, "cpu_seconds": cpu, "tokens_per_cpu_s": res.tokens / cpu,
            "windows": len(windows)}


def run_processed(a, overrides: list[str]) -> dict:
    cfg = load_config(a.config, [*overrides, "train.epochs=1", "train.softmax=sampled"])
    data = ProcessedData.open(a.processed)
    t0 = time.perf_counter()
    windows = base_windows(data, cfg.train.mask_history)
    load_s = time.perf_counter() - t0
    rss_load = peak_rss_mb()
    r = train(windows, data.vocab.size, cfg, Path(a.work), a.max_steps)
    rss_train = peak_rss_mb()
    model = r.pop("model")
    c0, t0 = cpu_seconds(), time.perf_counter()
    ev = evaluate_table(model, data.table("test"), cfg.eval.ks, cfg.eval.mask_history, cfg.eval.batch_size,
                        memory_mb=cfg.eval.memory_mb)
    return {"mode": "processed", "processed": str(a.processed), "n_items": data.vocab.n_items,
            "n_users": len(ev.ranks), "train": r, "windows_seconds": load_s, "peak_rss_mb_after_load": rss_load,
            "peak_rss_mb_after_train": rss_train,
            "eval": {"users": len(ev.ranks), "seconds": time.perf_counter() - t0, "cpu_seconds": cpu_seconds() - c0,
                     "memory_mb_budget": cfg.eval.memory_mb, "metrics": ev.metrics},
            "peak_rss_mb": peak_rss_mb(), "train_cfg": cfg.train.model_dump(mode="json"),
            "model_cfg": cfg.model.model_dump(mode="json")}


def synthetic_windows(n_windows: int, n_items: int, length: int, seed: int) -> list[tuple]:
    """Random item sequences (no repeats within a window), each with an empty pre-window history."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_windows):
        w = NUM_SPECIAL + rng.choice(n_items, size=length, replace=False)
        out.append((w.astype(np.int64), 0, np.zeros(0, dtype=np.int64)))
    return out


def run_synthetic_one(a, overrides: list[str], items: int, softmax: str) -> dict:
    cfg = load_config(a.config, [*overrides, f"train.softmax={softmax}", "train.epochs=1"])
    windows = synthetic_windows(a.steps * cfg.train.batch_size, items, cfg.preprocess.max_len + 1, cfg.seed)
    r = train(windows, items + NUM_SPECIAL, cfg, Path(a.work) / f"{softmax}-{items}")
    r.pop("model")
    return {"items": items, "softmax": softmax, **r, "tokens_per_window": cfg.preprocess.max_len,
            "peak_rss_mb": peak_rss_mb(), "train_cfg": cfg.train.model_dump(mode="json"),
            "model_cfg": cfg.model.model_dump(mode="json")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--processed", help="processed dir (from `asft preprocess`)")
    ap.add_argument("--synthetic", action="store_true")
    ap.add_argument("--items", type=int, nargs="+", default=[2000, 60000])
    ap.add_argument("--softmax", nargs="+", default=["full", "sampled"])
    ap.add_argument("--steps", type=int, default=40, help="--synthetic: optimizer steps per measurement")
    ap.add_argument("--full-max-items", type=int, default=20000,
                    help="--synthetic: skip the full softmax above this many items (60k: ~5 GB and ~60x slower)")
    ap.add_argument("--max-steps", type=int, default=0, help="--processed: stop the epoch after N steps (0 = all)")
    ap.add_argument("--config", default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: "items:softmax"
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    a.work = a.work or str(Path(a.out).with_suffix("")) + "_work"
    head = {"command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
            "date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine()}
    if a.one:
        items, softmax = a.one.split(":")
        print(json.dumps(run_synthetic_one(a, a.overrides, int(items), softmax)))
        return
    if a.processed:
        out = {**head, **run_processed(a, a.overrides)}
    elif a.synthetic:
        runs = []
        for items in a.items:
            for softmax in a.softmax:
                if softmax == "full" and items > a.full_max_items:
                    continue
                cmd = [sys.executable, __file__, "--out", a.out, "--work", a.work, "--steps", str(a.steps),
                       "--one", f"{items}:{softmax}", *(["--config", a.config] if a.config else []), *a.overrides]
                res = subprocess.run(cmd, check=False, capture_output=True, text=True)
                if res.returncode:
                    raise SystemExit(f"{items} items, {softmax}: failed\n{res.stderr[-3000:]}")
                runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
                print(f"{items:>6} items {softmax:>7}: {runs[-1]['tokens_per_s']:8.0f} tokens/s "
                      f"({runs[-1]['tokens_per_cpu_s']:.0f} per CPU s), peak RSS {runs[-1]['peak_rss_mb']:.0f} MB",
                      flush=True)
        ref = next((r for r in runs if r["items"] == min(a.items) and r["softmax"] == "full"), None)
        for r in runs:
            if ref:  # > 1: a token costs more than with the full softmax at the smallest catalogue
                r["cost_per_token_vs_smallest_full"] = ref["tokens_per_s"] / r["tokens_per_s"]
                r["cpu_cost_per_token_vs_smallest_full"] = ref["tokens_per_cpu_s"] / r["tokens_per_cpu_s"]
        out = {**head, "mode": "synthetic", "runs": runs}
    else:
        raise SystemExit("give --processed DIR or --synthetic")
    write_json(a.out, out)
    print(json.dumps({k: v for k, v in out.items() if k not in ("machine",)}, indent=1, default=str)[:4000])


if __name__ == "__main__":
    main()
