"""Benchmark: sampled vs full softmax for base training on a real dataset (issue 15, item 2).

    python benchmarks/sampled_softmax.py --data ../shared/data/ml-100k --config configs/ml-100k.yaml \
        --out /work/scale/ss/ml-100k [--negatives 64 256 1024] [--seeds 0 1 2] [key=value ...]

Same budget for both objectives (the config's epochs, schedule and early stopping; overrides apply to
both). Plan, in this order (one JSON per run under ``--out/runs``; a run whose JSON exists is skipped,
so the command resumes):

1. seed 0: the full softmax and the sampled softmax at each ``--negatives`` value;
2. the number of negatives with the best *validation* NDCG@10 at seed 0 is chosen;
3. the other seeds: full and sampled (chosen negatives). The seed re-draws model init, batch order,
   dropout and negatives (the leave-one-out split is not random).

The report (``--out/report.json``, printed) has valid/test metrics per run, training time (wall, CPU)
and tokens/s, and 95 % paired bootstrap CIs over test users (seeds averaged per user) of sampled - full
for NDCG@10 and HR@10.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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

from asft import stages
from asft.config import load_config
from asft.data.preprocess import ProcessedData
from asft.evaluation import evaluate_table
from asft.metrics import ndcg_per_user, paired_bootstrap
from asft.models.recommender import load_recommender
from asft.training.sft import train_base
from asft.utils import write_json


def run_one(name: str, processed: Path, cfg, out: Path) -> dict:
    path = out / "runs" / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    work = out / "work" / name
    c0, t0 = cpu_seconds(), time.perf_counter()
    summary = train_base(processed, cfg, work, resume=True, progress=False)
    cpu_train, wall_train = cpu_seconds() - c0, time.perf_counter() - t0
    model, _, _ = load_recommender(work / "best")
    data = ProcessedData.open(processed)
    valid = evaluate_table(model, data.table("valid"), cfg.eval.ks, True, cfg.eval.batch_size)
    test = evaluate_table(model, data.table("test"), cfg.eval.ks, True, cfg.eval.batch_size)
    rec = {
        "name": name, "seed": cfg.seed, "softmax": summary["softmax"],
        "train_cfg": cfg.train.model_dump(mode="json"), "model_cfg": cfg.model.model_dump(mode="json"),
        "valid": valid.metrics, "test": test.metrics,
        "test_ranks": test.ranks.astype(int).tolist(), "test_users": test.user_idx.astype(int).tolist(),
        "best_epoch": summary["best_epoch"], "epochs_run": summary["epochs_run"], "steps": summary["steps"],
        "train_seconds": summary["train_seconds"], "eval_seconds": summary["eval_seconds"],
        "tokens": summary["tokens"], "tokens_per_s": summary["tokens_per_s"],
        "wall_seconds": wall_train, "cpu_seconds": cpu_train, "peak_rss_mb": peak_rss_mb(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_json(path, rec)
    print(f"{name}: valid ndcg@10 {valid.metrics['ndcg@10']:.4f} test ndcg@10 {test.metrics['ndcg@10']:.4f} "
          f"hr@10 {test.metrics['hr@10']:.4f} best epoch {summary['best_epoch']} train {summary['train_seconds']:.0f}s "
          f"{summary['tokens_per_s']:.0f} tok/s", flush=True)
    return rec


def partial_report(out: Path, cfg) -> None:
    """Validation curves of every run (finished or not) and test metrics of each run's best model so far;
    paired bootstrap (sampled - full) over test users for each seed that has both."""
    data = ProcessedData.open(out / "processed")
    runs = {}
    for work in sorted((out / "work").iterdir()):
        done = out / "runs" / f"{work.name}.json"
        state_path = work / "checkpoint" / "trainer_state.json"
        if not state_path.is_file():
            continue
        state = json.loads(state_path.read_text())
        curve = [round(h["valid/ndcg@10"], 4) for h in state["history"] if "valid/ndcg@10" in h]
        if done.is_file():
            rec = json.loads(done.read_text())
            ranks, test = np.asarray(rec["test_ranks"]), rec["test"]
        else:
            best = work / "checkpoint" / "best"
            if not best.is_dir():
                continue
            model, _, _ = load_recommender(best)
            ev = evaluate_table(model, data.table("test"), cfg.eval.ks, True, cfg.eval.batch_size)
            ranks, test = ev.ranks, ev.metrics
        runs[work.name] = {"finished": done.is_file(), "epochs": state["epoch"], "best_epoch": state["best_epoch"],
                           "valid_ndcg@10_best": state["best"], "valid_ndcg@10_curve": curve,
                           "train_seconds": state["train_s"], "test": {k: test[k] for k in ("ndcg@10", "hr@10")},
                           "ranks": ranks}
    cis = {}
    for name, r in runs.items():
        if not name.startswith("sampled"):
            continue
        full = runs.get(f"full-{name.rsplit('-', 1)[1]}")
        if full is None:
            continue
        cis[f"{name} - full"] = {
            m: paired_bootstrap(f(r["ranks"]), f(full["ranks"]), n_boot=2000, seed=0)
            for m, f in (("ndcg@10", lambda x: ndcg_per_user(x, 10)), ("hr@10", lambda x: (x < 10).astype(float)))}
    report = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
              "runs": {k: {kk: vv for kk, vv in v.items() if kk != "ranks"} for k, v in runs.items()},
              "paired_bootstrap": cis}
    write_json(out / "partial_report.json", report)
    print(json.dumps(report, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--negatives", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sampled", nargs="*", default=[], help="extra overrides of the sampled runs only")
    ap.add_argument("--tag", default="", help="suffix of the sampled runs' names (a variant given by --sampled)")
    ap.add_argument("--only", choices=["full", "sampled"], default=None,
                    help="run only this objective for every seed (sampled: at the first --negatives) and stop;"
                    " lets several processes share the plan (the full command then reuses their runs)")
    ap.add_argument("--partial", action="store_true",
                    help="report what exists now: finished runs, and the best-so-far model of unfinished ones"
                    " (their validation curve per epoch, and test ranks of their best checkpoint)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of both objectives")
    a = ap.parse_args()
    out = Path(a.out)
    if a.partial:
        partial_report(out, load_config(a.config, [*a.overrides, f"data.source={a.data}"]))
        return
    (out / "runs").mkdir(parents=True, exist_ok=True)
    base = [*a.overrides, f"data.source={a.data}"]
    cfg0 = load_config(a.config, base)
    processed = out / "processed"
    if not (processed / "stats.json").is_file() and not (out / "processed.done").is_file():
        stages.stage_load(cfg0, out / "raw")
        stages.stage_preprocess(out / "raw", cfg0, processed)
        (out / "processed.done").write_text("ok")

    def cfg_for(seed: int, k: int | None):
        extra = ["train.softmax=full"] if k is None else ["train.softmax=sampled", f"train.negatives={k}", *a.sampled]
        return load_config(a.config, [*base, f"seed={seed}", *extra])

    if a.only:
        for s in a.seeds:
            if a.only == "full":
                run_one(f"full-s{s}", processed, cfg_for(s, None), out)
            else:
                run_one(f"sampled{a.tag}-k{a.negatives[0]}-s{s}", processed, cfg_for(s, a.negatives[0]), out)
        return
    s0 = a.seeds[0]
    runs = {"full": [run_one(f"full-s{s0}", processed, cfg_for(s0, None), out)]}
    tune = {k: run_one(f"sampled{a.tag}-k{k}-s{s0}", processed, cfg_for(s0, k), out) for k in a.negatives}
    best_k = max(a.negatives, key=lambda k: tune[k]["valid"]["ndcg@10"])
    runs["sampled"] = [tune[best_k]]
    for s in a.seeds[1:]:
        runs["sampled"].append(run_one(f"sampled{a.tag}-k{best_k}-s{s}", processed, cfg_for(s, best_k), out))
    for s in a.seeds[1:]:
        runs["full"].append(run_one(f"full-s{s}", processed, cfg_for(s, None), out))

    def per_user(recs, metric):
        ranks = np.array([r["test_ranks"] for r in recs], dtype=np.float64)
        return ndcg_per_user(ranks, 10) if metric == "ndcg@10" else (ranks < 10).astype(np.float64)

    cis = {m: paired_bootstrap(per_user(runs["sampled"], m), per_user(runs["full"], m), n_boot=2000, seed=0)
           for m in ("ndcg@10", "hr@10")}

    def summ(recs):
        keys = ("ndcg@10", "hr@10", "ndcg@50", "hr@50", "mrr")
        return {"test": {k: float(np.mean([r["test"][k] for r in recs])) for k in keys},
                "test_sd": {k: float(np.std([r["test"][k] for r in recs])) for k in keys},
                "valid_ndcg@10": float(np.mean([r["valid"]["ndcg@10"] for r in recs])),
                "train_seconds": float(np.mean([r["train_seconds"] for r in recs])),
                "cpu_seconds": float(np.mean([r["cpu_seconds"] for r in recs])),
                "tokens_per_s": float(np.mean([r["tokens_per_s"] for r in recs])),
                "best_epoch": [r["best_epoch"] for r in recs], "epochs_run": [r["epochs_run"] for r in recs],
                "seeds": [r["seed"] for r in recs]}

    report = {
        "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "note": "2-core VM, shared with other jobs"},
        "tuning_valid_ndcg@10": {"full": runs["full"][0]["valid"]["ndcg@10"],
                                 **{f"sampled k={k}": tune[k]["valid"]["ndcg@10"] for k in a.negatives}},
        "chosen_negatives": best_k,
        "full": summ(runs["full"]), "sampled": summ(runs["sampled"]),
        "paired_bootstrap_sampled_minus_full": cis,
    }
    write_json(out / "report.json", report)
    print(json.dumps({k: v for k, v in report.items() if k not in ("command", "machine")}, indent=1))


if __name__ == "__main__":
    main()
