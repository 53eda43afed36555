"""The reward-model report (METHODS.md section 4): how good is the learned reward, and against what.

On the held-out (``test`` split) preference pairs:

* pairwise accuracy, AUC and BT loss of the ensemble mean and of each member, by source;
* calibration of ``sigmoid(delta)`` (reliability plot, expected calibration error);
* ensemble spread (std of the members' reward differences) and accuracy on low- vs high-spread pairs;
* the naive predictors on the same pairs: the user's mean rating (over the context's items; it
  cannot separate two items for one user, so it sits at 0.5), the item's mean rating (from the
  train-split users' training events), and item popularity;
* with a rating head: RMSE of the predicted rating against user-mean, item-mean and global-mean;
* on the simulator: per-context Spearman correlation of the reward over the whole catalog with the
  true utility (and of the naive scores and the base model's logits), and the accuracy of the true
  utility itself on the pairs (the ceiling that label noise leaves).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from asft.config import Config
from asft.data.preferences import context_utilities, read_pairs
from asft.data.preprocess import NUM_SPECIAL, ProcessedData
from asft.metrics import calibration_bins, spearman_rows
from asft.models.reward import RewardEnsemble, score_context_chunks, score_contexts
from asft.training.reward import group_pairs, pair_metrics
from asft.utils import write_json

MAX_SPEARMAN_CONTEXTS = 1000


def naive_item_scores(data: ProcessedData, train_users: np.ndarray) -> dict[str, np.ndarray]:
    """Item mean rating (shrunk to the global mean for unrated items) and popularity, per token."""
    seqs = data.table("sequences")
    seqs = seqs[seqs["user_idx"].isin(train_users)]
    V = data.vocab.size
    pop = np.zeros(V)
    sums, counts = np.zeros(V), np.zeros(V)
    for items, ratings in zip(seqs["items"], seqs["ratings"]):
        it = np.asarray(items, dtype=np.int64)[:-2]
        np.add.at(pop, it, 1)
        if ratings is not None:
            r = np.asarray(ratings, dtype=np.float64)[:-2]
            np.add.at(sums, it, r)
            np.add.at(counts, it, 1)
    out = {"popularity": pop}
    if counts.sum() > 0:
        glob = sums.sum() / counts.sum()
        out["item_mean"] = np.where(counts > 0, sums / np.maximum(counts, 1), glob)
        out["global_mean"] = np.full(V, glob)
    return out


def _context_user_mean(data: ProcessedData, users: np.ndarray, ends: np.ndarray) -> np.ndarray:
    seqs = data.table("sequences").set_index("user_idx")
    out = np.full(len(users), np.nan)
    for i, (u, t) in enumerate(zip(users, ends)):
        r = seqs.at[int(u), "ratings"]
        if r is not None and t > 0:
            out[i] = float(np.mean(np.asarray(r, dtype=np.float64)[:t]))
    return out


def reward_report(
    ensemble_dir: str | Path,
    pref_dir: str | Path,
    processed_dir: str | Path,
    cfg: Config,
    out_dir: str | Path,
    simulator=None,
    base_model_dir: str | Path | None = None,
    split: str = "test",
) -> dict:
    """Compute the report, write ``out_dir/reward_report.json`` and its plots; return the report."""
    from asft import plots

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ens = RewardEnsemble.load(ensemble_dir)
    data = ProcessedData.open(processed_dir)
    pairs = read_pairs(pref_dir)
    held = pairs[pairs["split"] == split].sort_values(["context_id", "pair_id"], kind="mergesort")
    if held.empty:
        raise ValueError(f"{pref_dir}: no '{split}' pairs to report on")
    train_users = pairs.loc[pairs["split"] == "train", "user_idx"].unique()
    groups = group_pairs(held)
    contexts = [g.context for g in groups]
    ctx_ids = np.sort(held["context_id"].unique())
    ctx_index = np.searchsorted(ctx_ids, held["context_id"].to_numpy())
    chosen, rejected = held["chosen"].to_numpy(np.int64), held["rejected"].to_numpy(np.int64)
    # each context scored once, in memory-bounded chunks; only the pairs' entries are kept
    d_members = ens.score_pairs(contexts, ctx_index, chosen, rejected)["members"]  # [K, P]
    d_mean = d_members.mean(axis=0)
    spread = d_members.std(axis=0)

    rep: dict = {"split": split, "pairs": len(held), "contexts": len(groups), "members": len(ens.members)}
    cal = calibration_bins(d_mean)
    rep["ensemble"] = {**pair_metrics(d_mean), "ece": cal["ece"]}
    rep["member_metrics"] = [pair_metrics(d) for d in d_members]
    rep["by_source"] = {s: {**pair_metrics(d_mean[m]), "pairs": int(m.sum())}
                        for s in held["source"].unique() for m in [held["source"].to_numpy() == s]}
    rep["spread"] = {"mean_delta_std": float(spread.mean()), "median_delta_std": float(np.median(spread))}
    if len(ens.members) > 1:
        hi = spread > np.median(spread)
        rep["spread"]["acc_low_spread"] = pair_metrics(d_mean[~hi])["pair_acc"] if (~hi).any() else None
        rep["spread"]["acc_high_spread"] = pair_metrics(d_mean[hi])["pair_acc"] if hi.any() else None

    naive = naive_item_scores(data, train_users)
    rep["naive"] = {"popularity": _ranking_only(naive["popularity"][chosen] - naive["popularity"][rejected])}
    if "item_mean" in naive:
        rep["naive"]["item_mean_rating"] = _ranking_only(naive["item_mean"][chosen] - naive["item_mean"][rejected])
        # The user's mean rating is the same for both items of a pair: it cannot order them (delta 0).
        rep["naive"]["user_mean_rating"] = _ranking_only(np.zeros(len(held)))
    src = held["source"].to_numpy()
    naive_deltas = {"popularity": naive["popularity"][chosen] - naive["popularity"][rejected]}
    if "item_mean" in naive:
        naive_deltas["item_mean_rating"] = naive["item_mean"][chosen] - naive["item_mean"][rejected]
    for s_name in rep["by_source"]:
        m = src == s_name
        rep["by_source"][s_name]["naive"] = {k: _ranking_only(v[m]) for k, v in naive_deltas.items()}
    rep["beats_naive"] = all(rep["ensemble"]["pair_acc"] > v["pair_acc"] for v in rep["naive"].values())

    if ens.members[0].has_rating_head and "item_mean" in naive:
        rep["rating"] = _rating_report(ens, data, groups, held, naive)

    if simulator is not None:
        rep["simulator"] = _simulator_report(simulator, data, held, groups, ctx_ids, ens, naive, base_model_dir)

    # Plots.
    rep["plots"] = [
        str(plots.reliability(cal, out_dir / "reward_calibration.png", "reward ensemble: calibration")),
        str(plots.histogram(spread, out_dir / "reward_spread.png", "ensemble spread (std of member deltas)",
                            "std of r(chosen) - r(rejected) across members")),
        str(plots.metric_bars(
            {"ensemble": rep["ensemble"], **{f"member {i}": m for i, m in enumerate(rep["member_metrics"])},
             **{f"naive: {k}": v for k, v in rep["naive"].items()}},
            ["pair_acc", "auc"], out_dir / "reward_accuracy.png", f"held-out ({split}) pairs")),
    ]
    write_json(out_dir / "reward_report.json", rep)
    return rep


def _rating_report(ens: RewardEnsemble, data: ProcessedData, groups, held: pd.DataFrame, naive: dict) -> dict:
    firsts = held.drop_duplicates("context_id")
    gi = np.concatenate([np.full(len(g.rated_items), i) for i, g in enumerate(groups)])
    items = np.concatenate([g.rated_items for g in groups]).astype(np.int64)
    y = np.concatenate([g.ratings for g in groups])
    if len(y) == 0:
        return {"rated_items": 0}
    p = np.empty(len(items), dtype=np.float32)
    for start, sc in score_context_chunks(ens.members, [g.context for g in groups], device=ens.device,
                                          head="rating"):  # [K, n, I] chunks, bounded memory
        sel = np.flatnonzero((gi >= start) & (gi < start + sc.shape[1]))
        p[sel] = sc.mean(axis=0)[gi[sel] - start, items[sel] - NUM_SPECIAL]
    um = _context_user_mean(data, firsts["user_idx"].to_numpy(), firsts["context_end"].to_numpy())[gi]
    um = np.where(np.isfinite(um), um, naive["global_mean"][0])

    def rmse(x):
        return float(np.sqrt(np.mean((x - y) ** 2)))

    return {"rated_items": len(y), "rmse_rating_head": rmse(p), "rmse_user_mean": rmse(um),
            "rmse_item_mean": rmse(naive["item_mean"][items]), "rmse_global_mean": rmse(naive["global_mean"][items])}


def _simulator_report(simulator, data: ProcessedData, held: pd.DataFrame, groups, ctx_ids: np.ndarray,
                      ens: RewardEnsemble, naive: dict, base_model_dir) -> dict:
    firsts = held.drop_duplicates("context_id").sort_values("context_id")
    seqs = data.table("sequences")
    util, _ = context_utilities(simulator, data, seqs, firsts["user_idx"].to_numpy(), firsts["context_end"].to_numpy())
    # Accuracy of the true utility on the pairs: the ceiling left by judge and rating noise.
    ci = np.searchsorted(ctx_ids, held["context_id"].to_numpy())
    d_true = util[ci, held["chosen"].to_numpy()] - util[ci, held["rejected"].to_numpy()]
    out = {"true_utility_pair_acc": pair_metrics(d_true)["pair_acc"]}
    n = min(len(groups), MAX_SPEARMAN_CONTEXTS)
    u = util[:n, NUM_SPECIAL:]
    ok = np.isfinite(u).all(axis=0)
    rew = score_contexts(ens.members, [g.context for g in groups[:n]], device=ens.device).mean(axis=0)
    cands = {"ensemble": rew, "popularity": np.broadcast_to(naive["popularity"][NUM_SPECIAL:], u.shape)}
    if "item_mean" in naive:
        cands["item_mean_rating"] = np.broadcast_to(naive["item_mean"][NUM_SPECIAL:], u.shape)
    if base_model_dir is not None:
        import torch

        from asft.evaluation import pad_right
        from asft.models.recommender import load_recommender, next_item_logits

        base, _, _ = load_recommender(base_model_dir)
        with torch.no_grad():
            ids, am = pad_right([g.context for g in groups[:n]])
            cands["base_logits"] = next_item_logits(base, ids, am)[:, NUM_SPECIAL:].float().numpy()
    out["spearman_true_utility"] = {k: float(np.nanmean(spearman_rows(v[:, ok], u[:, ok]))) for k, v in cands.items()}
    out["spearman_contexts"] = int(n)
    return out


def _ranking_only(delta: np.ndarray) -> dict[str, float]:
    """Naive predictors are not on the BT scale: only their ordering (accuracy, AUC) is meaningful."""
    m = pair_metrics(delta)
    return {"pair_acc": m["pair_acc"], "auc": m["auc"]}
