"""Markdown tables from a fair_posttrain.py results.json (chosen runs, CIs, frontier points, sanity).

    python benchmarks/fair_report.py benchmarks/work/fair_sim/results.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def ci(c: dict | None) -> str:
    if not c:
        return ""
    star = " *" if c["excludes_zero"] else ""
    return f"{c['diff']:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}]{star}"


def clip_rates(work: Path, name: str) -> list[float]:
    out = []
    for f in sorted(work.glob(f"seed_*/posttrain/{name}/train_summary.json")):
        rows = [h["train_clip_frac"] for h in json.loads(f.read_text()).get("history", []) if "train_clip_frac" in h]
        out.extend(rows)
    return out


def main() -> None:
    path = Path(sys.argv[1])
    d = json.loads(path.read_text())
    work = path.parent
    summ = d["summary"]
    seeds = list(d["runs"].values())
    sim = "true_top10" in summ["methods"]["base"]
    base = summ["methods"]["base"]
    oracle = np.mean([s["sanity"]["oracle"]["true_top10"] for s in seeds]) if sim else None
    print(f"{len(seeds)} seeds; wall time of all invocations {d.get('wall_seconds_total', 0) / 60:.1f} min\n")
    print("**Every run** (test, mean over seeds): regulariser value, KL(pi||pi_ref), metrics, runs that returned pi_ref\n")
    keys = ["kl_ref", "ndcg@10", "high_rated/ndcg@10", "judged_top10"] + (["true_top10"] if sim else [])
    print("| run | " + " | ".join(keys) + " | returned pi_ref |")
    print("|---|" + "---|" * (len(keys) + 1))
    print("| base (pi_ref) | " + " | ".join(f"{base.get(k, float('nan')):.4f}" for k in keys) + " | |")
    for name, m in summ["methods"].items():
        if name == "base":
            continue
        ref = sum(bool(s.get(name, {}).get("returned_ref")) for s in seeds)
        print(f"| {name} | " + " | ".join(f"{m.get(k, float('nan')):.4f}" for k in keys) + f" | {ref}/{m['seeds']} |")
    print("\n**Chosen on validation** (one value per method, same rule) and 95 % paired bootstrap CIs over test"
          " users (seeds averaged); * = the interval excludes 0\n")
    cols = ["ndcg@10", "high_rated/ndcg@10", "judged_top10"] + (["true_top10"] if sim else [])
    hdr = [f"{c} vs base" for c in cols] + [f"{c} vs SFT" for c in cols]
    print("| method | chosen | " + " | ".join(hdr) + (" | gap to oracle closed |" if sim else " |"))
    print("|---|---|" + "---|" * len(hdr) + ("---|" if sim else ""))
    for m, name in summ["chosen"].items():
        c = summ["ci"].get(m, {})
        row = [ci(c.get(f"{k} vs base")) for k in cols] + [ci(c.get(f"{k} vs sft")) for k in cols]
        gap = ""
        if sim and name in summ["methods"]:
            gap = f" | {(summ['methods'][name]['true_top10'] - base['true_top10']) / (oracle - base['true_top10']):+.1%}"
        print(f"| {m} | {name} | " + " | ".join(row) + gap + " |")
    print("\n**Sanity policies** (test, mean over seeds)\n")
    san = {k: {m: np.mean([s["sanity"][k][m] for s in seeds]) for m in ("ndcg@10", "judged_top10", "true_top10")
               if m in seeds[0]["sanity"][k]} for k in seeds[0]["sanity"]}
    print("| policy | " + " | ".join(next(iter(san.values()))) + " |")
    print("|---|" + "---|" * len(next(iter(san.values()))))
    for k, v in san.items():
        print(f"| {k} | " + " | ".join(f"{x:.4f}" for x in v.values()) + " |")
    rates = {n: clip_rates(work, n) for n in summ["methods"] if n.startswith(("grpo", "rloo"))}
    if any(rates.values()):
        print("\n**PPO clip** (share of samples whose clip binds, per epoch, all seeds; ppo_epochs=2)\n")
        for n, r in rates.items():
            if r:
                print(f"- {n}: mean {np.mean(r):.3f}, max {np.max(r):.3f} over {len(r)} epochs")


if __name__ == "__main__":
    main()
