"""Tables and plots from benchmarks/posttrain.py outputs (markdown to stdout, PNGs next to the JSON).

    python benchmarks/posttrain_report.py benchmarks/work/posttrain_sim.json
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asft.plots import frontier, metric_panels


def seeds_of(nres: dict) -> list[dict]:
    return [v["reports"] for k, v in sorted(nres.items()) if k.startswith("seed_") and "reports" in v]


def agg(reports: list[dict], method: str, key: str, split: str = "test") -> tuple[float, float]:
    vals = [r[method][split][key] for r in reports if method in r and key in r[method][split]]
    return (float(np.mean(vals)), float(np.std(vals))) if vals else (float("nan"), float("nan"))


def fmt(m: float, s: float, digits: int = 3) -> str:
    return f"{m:.{digits}f} ± {s:.{digits}f}" if not math.isnan(s) and s > 0 else f"{m:.{digits}f}"


def main() -> None:
    path = Path(sys.argv[1])
    d = json.loads(path.read_text())
    out_dir = path.with_suffix("")
    out_dir.mkdir(exist_ok=True)
    runs = d["runs"]
    sim = any("true_top10" in r["base"]["test"] for n in runs.values() for r in seeds_of(n))
    for noise, nres in runs.items():
        reps = seeds_of(nres)
        if not reps:
            continue
        methods = list(reps[0])
        print(f"\n#### noise: {noise} ({len(reps)} seed{'s' if len(reps) > 1 else ''})\n")
        if sim:
            cols = [("true_top10", "true reward top-10"), ("true_top1", "true top-1"), ("ndcg@10", "NDCG@10"),
                    ("judged_top10", "judged top-10"), ("kl_ref", "KL to pi_ref"), ("entropy", "entropy"),
                    ("coverage@10", "coverage@10")]
        else:
            cols = [("ndcg@10", "NDCG@10"), ("hr@10", "HR@10"), ("high_rated/ndcg@10", "NDCG@10 rated>=4"),
                    ("high_rated/hr@10", "HR@10 rated>=4"), ("judged_top10", "judged top-10"),
                    ("judged_expected", "judged E_pi"), ("kl_ref", "KL to pi_ref"), ("entropy", "entropy"),
                    ("coverage@10", "coverage@10"), ("popularity@10", "popularity@10")]
        base_true = agg(reps, "base", "true_top10")[0] if sim else None
        base_ndcg = agg(reps, "base", "ndcg@10")[0]
        head = ["method", *[c[1] for c in cols]]
        if sim:
            head += ["true / base", "NDCG / base"]
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for m in methods:
            row = [m] + [fmt(*agg(reps, m, k)) for k, _ in cols]
            if sim:
                row += [f"{agg(reps, m, 'true_top10')[0] / base_true:.3f}x",
                        f"{agg(reps, m, 'ndcg@10')[0] / base_ndcg:.3f}x"]
            print("| " + " | ".join(row) + " |")
        panels = {m: {k: agg(reps, m, k)[0] for k, _ in cols} for m in methods}
        metric_panels(panels, [k for k, _ in cols], out_dir / f"methods_{noise}.png", f"test, noise {noise}")
    order = [n for n in ("none", "medium", "high") if n in runs and seeds_of(runs[n])]
    if sim and len(order) > 1:
        methods = list(seeds_of(runs[order[0]])[0])
        pts = {}
        for m in methods:
            pts[m] = [(i, agg(seeds_of(runs[n]), m, "true_top10")[0] / agg(seeds_of(runs[n]), "base", "true_top10")[0],
                       "") for i, n in enumerate(order)]
        frontier(pts, out_dir / "true_reward_vs_noise.png", "true reward of top-10 / base, by reward-model noise",
                 "noise: " + " / ".join(order), "true reward top-10 / base")
        print(f"\nplot: {out_dir / 'true_reward_vs_noise.png'}")
    if "lambda_sweep" in d and "reports" in d["lambda_sweep"]:
        rep = d["lambda_sweep"]["reports"]
        names = [n for n in rep if n != "base"]
        print(f"\n#### A-SFT lambda sweep (noise {d['lambda_sweep']['noise']}, seed 0)\n")
        keys = [k for k in ("judged_top10", "true_top10", "ndcg@10", "kl_ref", "entropy") if k in rep["base"]["test"]]
        print("| lambda | " + " | ".join(keys) + " |")
        print("|" + "---|" * (len(keys) + 1))
        for n in ["base", *names]:
            print(f"| {n.replace('lam_', '')} | " + " | ".join(f"{rep[n]['test'][k]:.4f}" for k in keys) + " |")
        series = {"judged reward vs KL": [(rep[n]["test"]["kl_ref"], rep[n]["test"]["judged_top10"],
                                           n.replace("lam_", "λ=")) for n in ["base", *names]]}
        frontier(series, out_dir / "lambda_frontier.png", "A-SFT: held-out judged reward vs KL(pi || pi_ref)",
                 "KL(pi || pi_ref) (test contexts)", "judged reward of top-10")
        if "true_top10" in keys:
            frontier({"true reward vs NDCG@10": [(rep[n]["test"]["ndcg@10"], rep[n]["test"]["true_top10"],
                                                 n.replace("lam_", "λ=")) for n in ["base", *names]]},
                     out_dir / "lambda_true_vs_ndcg.png", "A-SFT: true reward vs logged NDCG@10 over lambda",
                     "NDCG@10 (test)", "true reward of top-10")
        print(f"\nplots: {out_dir / 'lambda_frontier.png'}")


if __name__ == "__main__":
    main()
