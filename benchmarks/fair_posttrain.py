"""Fair post-training benchmark: every method's own regulariser swept, the same budget, anchor option
and selection rule, seeds that re-draw everything, paired bootstrap CIs over test users, frontiers.

    python benchmarks/fair_posttrain.py --table sim --work benchmarks/work/fair_sim --seeds 3
    python benchmarks/fair_posttrain.py --table ml100k --data ../shared/data/ml-100k \
        --config configs/ml-100k.yaml --work benchmarks/work/fair_ml100k --seeds 3

One command per table; resumable (every finished run is skipped on a re-run; results.json is
rewritten after each). Protocol:

- data, preprocessing and pi_ref (the masked base) are shared; each seed s re-draws the preference
  sample, the training reward ensemble, the held-out judge, pi_ref's candidates and every
  post-training run (config seed + 1000 s);
- grid (``GRIDS``): each method's regulariser over values chosen to span the same KL(pi || pi_ref)
  range (A-SFT variants: lambda; DPO/IPO: beta; RLOO/GRPO: kl_coef with the exact KL; RFT: keep
  fraction); ``sft`` (continued SFT) and ``anchor_only`` (pi_ref's candidates, uniform weights) are
  controls; the same SFT-anchor setting for every method (``--anchor``, default 0 = none);
- the same budget (posttrain.train), evaluation before the first update and after each epoch, and
  the same selection rule (training ensemble's reward of the valid top-10 under the NDCG guard), so
  a run may return pi_ref; one grid value per method is then chosen on *validation* (same rule);
- test: per-user NDCG@10 (all, and targets rated >= 4), judged top-10 reward, and on the simulator
  the true utility of the top-10; 95 % paired bootstrap CIs over users (seeds averaged) of each
  chosen method vs the base and vs continued SFT; frontier plots over the grid.
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asft.env import configure_environment

configure_environment()

from asft import stages
from asft.config import load_config
from asft.metrics import paired_bootstrap

# method -> (config key of its regulariser, values). Values span KL(pi || pi_ref) from ~pi_ref to far.
GRIDS = {
    "asft": ("advantage.lam", [4.0, 1.0, 0.5, 0.25, 0.1]),
    "asft_full": ("advantage.lam", [4.0, 1.0, 0.5, 0.25, 0.1]),
    "asft_logged": ("advantage.lam", [4.0, 1.0, 0.5, 0.25, 0.1]),
    "dpo": ("posttrain.dpo.beta", [3.0, 1.0, 0.3, 0.1, 0.03]),
    "ipo": ("posttrain.dpo.beta", [3.0, 1.0, 0.3, 0.1, 0.03]),
    "grpo": ("posttrain.pg.kl_coef", [1.0, 0.3, 0.1, 0.03, 0.01]),
    "rloo": ("posttrain.pg.kl_coef", [1.0, 0.3, 0.1, 0.03, 0.01]),
    "rft": ("posttrain.rft.keep_fracs", [[0.5], [0.25], [0.125]]),
    "sft": (None, [None]),
    "anchor_only": (None, [None]),
}
TABLES = {
    "sim": {"methods": list(GRIDS), "noise": []},  # the simulator at medium judge noise (params.yaml)
    "ml100k": {"methods": ["asft", "asft_full", "asft_logged", "dpo", "grpo", "rft", "sft", "anchor_only"], "noise": []},
}
# Every method: evaluation before the first update and every --eval-steps optimizer steps, so selection
# can stop inside the NDCG guard at a fine KL step; patience counts evaluations.
COMMON = ["posttrain.pg.kl_estimator=exact", "posttrain.pg.ppo_epochs=2", "posttrain.train.patience=6", "train.num_threads=1", "reward.train.num_threads=1",
          "posttrain.train.num_threads=1"]


def log(msg: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def run_name(method: str, value) -> str:
    if value is None:
        return method
    v = value[0] if isinstance(value, list) else value
    return f"{method}@{v:g}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--table", required=True, choices=sorted(TABLES))
    ap.add_argument("--work", required=True)
    ap.add_argument("--data", default=None)
    ap.add_argument("--config", default=None, help="config file (default: code defaults)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=None, choices=sorted(GRIDS), metavar="METHOD")
    ap.add_argument("--grid-size", type=int, default=0, help="keep this many values per grid (0 = all)")
    ap.add_argument("--anchor", type=float, default=0.0, help="posttrain.anchor_weight for every method")
    ap.add_argument("--boot", type=int, default=2000)
    ap.add_argument("--eval-steps", type=int, default=4, help="posttrain.train.eval_steps for every method")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    t_all = time.perf_counter()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    out_path = work / "results.json"
    res = json.loads(out_path.read_text()) if out_path.is_file() else {}
    res.update(command=" ".join([Path(sys.executable).name, *sys.argv]), table=a.table,
               machine={"platform": platform.platform(), "cpus": os.cpu_count()})
    runs = res.setdefault("runs", {})
    methods = a.methods or TABLES[a.table]["methods"]
    base_ov = [*a.overrides, *COMMON, f"posttrain.anchor_weight={a.anchor}", f"posttrain.train.eval_steps={a.eval_steps}",
               *([f"data.source={a.data}"] if a.data else [])]
    cfg0 = load_config(a.config, base_ov)
    res["config"] = {"anchor_weight": a.anchor, "posttrain.train": cfg0.posttrain.train.model_dump(mode="json"),
                     "overrides": base_ov}

    def save() -> None:
        res["date"] = f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
        res["wall_seconds_this_invocation"] = time.perf_counter() - t_all
        out_path.write_text(json.dumps(res, indent=1, default=str))

    if not (work / "raw" / "interactions.parquet").is_file():
        stages.stage_ingest(cfg0, work / "raw")
    if not (work / "processed" / "stats.json").is_file():
        stages.stage_preprocess(work / "raw", cfg0, work / "processed")
    ref = work / "base" / "best"
    if not (ref / "model.safetensors").is_file():
        t0 = time.perf_counter()
        log("training the base model (pi_ref)")
        res["base_train"] = stages.stage_train_base(work / "processed", cfg0, work / "base", progress=False)
        res["base_train"]["wall_seconds"] = time.perf_counter() - t0
        save()
    sim = stages.load_simulator(work / "raw")

    from asft.data.preprocess import ProcessedData
    from asft.models.reward import RewardEnsemble
    from asft.policy_eval import PolicyScorer
    from asft.posttrain import load_policy

    data = ProcessedData.open(work / "processed")
    ref_model = load_policy(ref)[0]
    per_user: dict[str, dict[str, list[np.ndarray]]] = {}
    for s in range(a.seeds):
        cfg = cfg0.model_copy(update={"seed": cfg0.seed + 1000 * s})
        sd = work / f"seed_{s}"
        t0 = time.perf_counter()
        if not (sd / "preferences" / "pairs.parquet").is_file():
            stages.stage_preferences(work / "raw", work / "processed", cfg, sd / "preferences")
        for kind, fn in (("reward", stages.stage_train_reward), ("judge", stages.stage_train_judge)):
            if not (sd / kind / "ensemble.json").is_file():
                log(f"seed {s}: training the {kind} ensemble")
                fn(work / "processed", sd / "preferences", ref, cfg, sd / kind, progress=False)
        if not (sd / "scored" / "candidates.parquet").is_file():
            stages.stage_sample(work / "processed", ref, cfg, sd / "sampled", progress=False)
            stages.stage_score(sd / "sampled", work / "processed", ref, sd / "reward", cfg, sd / "scored", progress=False)
        sres = runs.setdefault(f"seed_{s}", {"setup_seconds": time.perf_counter() - t0})
        reward = RewardEnsemble.load(sd / "reward")
        judge = RewardEnsemble.load(sd / "judge")
        scorers = {sp: PolicyScorer.build(data, sp, ref_model, cfg.eval.ks, reward_ens=reward, judge_ens=judge,
                                          simulator=sim, ndcg_tolerance=cfg.posttrain.ndcg_tolerance,
                                          batch_size=cfg.eval.batch_size) for sp in ("valid", "test")}
        if "base" not in sres:
            sres["base"] = {sp: sc.evaluate(ref_model) for sp, sc in scorers.items()}
            sres["sanity"] = sanity_policies(scorers["test"], data, reward, sim)
            save()
        per_user.setdefault("base", {}).setdefault("all", []).append(scorers["test"].per_user(ref_model))
        for m in methods:
            key, values = GRIDS[m]
            values = values[: a.grid_size] if a.grid_size and len(values) > a.grid_size else values
            for v in values:
                name = run_name(m, v)
                d = sd / "posttrain" / name
                entry = sres.get(name)
                if entry is None or not (d / "best" / "model.safetensors").is_file():
                    c = cfg if key is None else load_config(a.config, [*base_ov, f"{key}={json.dumps(v)}"]).model_copy(
                        update={"seed": cfg.seed})
                    log(f"seed {s}: {name}")
                    t1 = time.perf_counter()
                    try:
                        summ = stages.stage_posttrain(m, work / "processed", ref, sd / "reward", sd / "scored", None,
                                                      c, d, progress=False)
                    except ValueError as e:  # e.g. asft_logged on data without ratings
                        log(f"{name} skipped: {e}")
                        sres[name] = {"skipped": str(e)}
                        save()
                        break
                    model = load_policy(d / "best")[0]
                    entry = {"method": m, "param": key, "value": v, "returned_ref": summ.get("returned_ref"),
                             "best_epoch": summ.get("best_epoch"), "steps": summ.get("steps"),
                             "wall_seconds": time.perf_counter() - t1,
                             **{sp: sc.evaluate(model) for sp, sc in scorers.items()}}
                    sres[name] = entry
                    save()
                if "skipped" in entry:
                    break
                pu = scorers["test"].per_user(load_policy(d / "best")[0])
                per_user.setdefault(name, {}).setdefault("all", []).append(pu)
        log(f"seed {s}: done")
    res["summary"] = summarise(res, per_user, methods, a.boot, sim is not None)
    res["wall_seconds_total"] = res.get("wall_seconds_total", 0.0) + (time.perf_counter() - t_all)
    save()
    plots(res, work, sim is not None)
    log(f"wrote {out_path}")


def sanity_policies(sc, data, reward, sim) -> dict:
    """Top-10 by the reward ensemble alone, by item mean rating, by popularity (and, on the simulator, by
    the true utility: the oracle), scored like a policy on the test contexts."""
    import torch

    n, v = len(sc.inputs), data.vocab.size
    seqs = data.table("sequences")
    out = {}
    pop = np.log1p(data.item_popularity().astype(np.float64))
    out["popularity"] = np.broadcast_to(pop, (n, v)).copy()
    if data.stats.get("has_ratings"):
        tot, cnt = np.zeros(v), np.zeros(v)
        for items, ratings in zip(seqs["items"], seqs["ratings"]):
            if ratings is None:
                continue
            it = np.asarray(items[:-2], dtype=np.int64)
            np.add.at(tot, it, np.asarray(ratings[:-2], dtype=np.float64))
            np.add.at(cnt, it, 1)
        mean = np.where(cnt > 0, (tot + 3.0 * 5) / (cnt + 5), 0.0)  # shrunk to 3 with 5 pseudo-ratings
        out["item_mean_rating"] = np.broadcast_to(mean, (n, v)).copy()
    out["reward_model"] = np.nan_to_num(reward.score_all(sc.inputs, batch_size=sc.batch_size).mean, neginf=-1e9)
    if sc.utility is not None:
        out["oracle"] = np.nan_to_num(sc.utility, neginf=-1e9)
    return {k: sc.evaluate_logits(torch.from_numpy(x.astype(np.float32))) for k, x in out.items()}


def chosen(res: dict, method: str) -> str | None:
    """The grid value chosen on validation by the selection rule, pooled over seeds (mean)."""
    names = sorted({k for s in res["runs"].values() for k, e in s.items()
                    if isinstance(e, dict) and e.get("method") == method})
    if not names:
        return None
    score = {n: np.mean([s[n]["valid"]["selection"] for s in res["runs"].values() if n in s and "valid" in s[n]])
             for n in names}
    return max(score, key=score.get)


def summarise(res: dict, per_user: dict, methods: list[str], n_boot: int, simulated: bool) -> dict:
    keys = ["ndcg@10", "high_rated/ndcg@10", "judged_top10", "kl_ref"] + (["true_top10"] if simulated else [])
    out: dict = {"methods": {}, "chosen": {}, "ci": {}}
    seeds = list(res["runs"].values())
    for name in ["base", *sorted({k for s in seeds for k, e in s.items() if isinstance(e, dict) and "method" in e})]:
        rows = [s[name]["test"] if name != "base" else s["base"]["test"] for s in seeds if name in s and
                isinstance(s[name], dict) and "test" in s[name]]
        if rows:
            out["methods"][name] = {k: float(np.mean([r[k] for r in rows if k in r])) for k in keys
                                    if any(k in r for r in rows)}
            out["methods"][name]["seeds"] = len(rows)
    for m in methods:
        c = chosen(res, m)
        if c is None:
            continue
        out["chosen"][m] = c
        if c not in per_user:
            continue
        cis = {}
        for ref_name in ("base", "sft"):
            ref_key = ref_name if ref_name == "base" else chosen(res, "sft")
            if ref_key is None or ref_key not in per_user or ref_key == c:
                continue
            a_list, b_list = per_user[c]["all"], per_user[ref_key]["all"]
            for metric in ("ndcg@10", "high_rated/ndcg@10", "judged_top10", "true_top10"):
                base_metric = metric.split("/")[-1]
                if base_metric not in a_list[0]:
                    continue
                mask = a_list[0]["high_rated"] if metric.startswith("high_rated") else np.ones(len(a_list[0]["rank"]), bool)
                if not mask.any():
                    continue
                a_arr = np.stack([x[base_metric][mask] for x in a_list])
                b_arr = np.stack([x[base_metric][mask] for x in b_list])
                cis[f"{metric} vs {ref_name}"] = paired_bootstrap(a_arr, b_arr, n_boot=n_boot, seed=0)
        out["ci"][m] = cis
    return out


def plots(res: dict, work: Path, simulated: bool) -> None:
    from asft.plots import frontier

    seeds = list(res["runs"].values())
    ys = [("ndcg@10", "NDCG@10 (test)")] + ([("true_top10", "true utility of top-10 (test)")] if simulated else
                                            [("judged_top10", "judged reward of top-10 (test)"),
                                             ("high_rated/ndcg@10", "NDCG@10, targets rated >= 4 (test)")])
    if simulated:
        ys.append(("judged_top10", "judged reward of top-10 (test)"))
    for key, label in ys:
        pts: dict[str, list] = {}
        names = sorted({k for s in seeds for k, e in s.items() if isinstance(e, dict) and "method" in e})
        for n in names:
            rows = [s[n]["test"] for s in seeds if n in s and "test" in s.get(n, {})]
            if not rows or key not in rows[0]:
                continue
            m = seeds[0].get(n, {}).get("method") or n.split("@")[0]
            pts.setdefault(m, []).append((float(np.mean([r["kl_ref"] for r in rows])),
                                          float(np.mean([r[key] for r in rows])), n.split("@")[-1] if "@" in n else ""))
        base = [s["base"]["test"][key] for s in seeds if key in s["base"]["test"]]
        if base:
            pts["base (pi_ref)"] = [(0.0, float(np.mean(base)), "")]
        for rows_m in pts.values():
            rows_m.sort()
        frontier(pts, work / f"frontier_{key.replace('/', '_').replace('@', '')}.png",
                 f"{res['table']}: {label} vs KL", "KL(pi || pi_ref) (test contexts)", label, xscale="symlog")


if __name__ == "__main__":
    main()
