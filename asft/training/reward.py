"""Stage: train the Bradley-Terry reward ensemble on a preference dataset.

The training example is a *context group*: one context with all its pairs (and, for the rating
head, the logged ratings of its items), so a context is encoded once however many pairs it has.
The loss of an optimizer batch is

    L = [ sum_pairs -log sigma(r(x, w) - r(x, l)) + rating_weight * sum_rated (rating(x, a) - y)^2 ] / N_pairs

with ``N_pairs`` the global pair count of the batch (all micro-batches and processes), so gradient
accumulation and data parallelism do not change it. Each of the K members starts from the base
model's backbone with its own seed and (with ``reward.bootstrap``) a bootstrap resample of the
training contexts; early stopping on the valid pairs' BT loss (``reward.train.monitor``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from asft.config import Config
from asft.data.preferences import read_pairs
from asft.data.preprocess import NUM_SPECIAL, ProcessedData
from asft.losses import bradley_terry_loss, squared_error_loss
from asft.metrics import pairwise_accuracy, pairwise_auc
from asft.models.recommender import load_recommender
from asft.models.reward import (
    ENSEMBLE_FILE,
    RewardEnsemble,
    RewardModel,
    bucket_contexts,
    load_reward_model,
    save_reward_model,
    score_contexts,
)
from asft.training.trainer import Trainer
from asft.utils import atomic_write_text, seed_everything, write_json


@dataclass
class ContextGroup:
    context: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray
    rated_items: np.ndarray
    ratings: np.ndarray


def group_pairs(pairs: pd.DataFrame) -> list[ContextGroup]:
    """One group per context_id, in context_id order."""
    groups = []
    if pairs.empty:
        return groups
    pairs = pairs.sort_values(["context_id", "pair_id"], kind="mergesort")
    for _, g in pairs.groupby("context_id", sort=True):
        items = np.concatenate([g["chosen"].to_numpy(), g["rejected"].to_numpy()]).astype(np.int64)
        vals = np.concatenate([g["chosen_rating"].to_numpy(), g["rejected_rating"].to_numpy()]).astype(np.float64)
        ok = ~np.isnan(vals)
        items, vals = items[ok], vals[ok]
        items, first = np.unique(items, return_index=True)
        groups.append(ContextGroup(np.asarray(g["context"].iloc[0], dtype=np.int64),
                                   g["chosen"].to_numpy(np.int64), g["rejected"].to_numpy(np.int64),
                                   items, vals[first]))
    return groups


# Length buckets per training micro-batch: contexts are sorted by length and each bucket is padded only to
# its own longest context. On the simulator's contexts (2..50 items, mean ~19) four buckets of a 256-context
# batch cut the backbone's padded tokens by about half and its attention work by about two thirds; the
# gradient is the same (each context's last hidden state does not depend on padding).
MAX_BUCKETS = 4
MIN_BUCKET_CONTEXTS = 32  # smaller buckets cost more in per-call overhead than they save in padding


def n_buckets(n_contexts: int) -> int:
    return max(1, min(MAX_BUCKETS, n_contexts // MIN_BUCKET_CONTEXTS))


def collate_groups(groups: list[ContextGroup]) -> dict:
    """A micro-batch of context groups: the contexts as length buckets (``contexts``), and per pair / rated
    item the index of its context in ``groups`` order (``pair_group``, ``rate_group``)."""
    pg = np.concatenate([np.full(len(g.chosen), i) for i, g in enumerate(groups)])
    rg = np.concatenate([np.full(len(g.rated_items), i) for i, g in enumerate(groups)])
    return {
        "contexts": bucket_contexts([g.context for g in groups], n_buckets(len(groups))),
        "pair_group": torch.from_numpy(pg.astype(np.int64)),
        "chosen": torch.from_numpy(np.concatenate([g.chosen for g in groups])),
        "rejected": torch.from_numpy(np.concatenate([g.rejected for g in groups])),
        "rate_group": torch.from_numpy(rg.astype(np.int64)),
        "rate_item": torch.from_numpy(np.concatenate([g.rated_items for g in groups]).astype(np.int64)),
        "rate_value": torch.from_numpy(np.concatenate([g.ratings for g in groups]).astype(np.float32)),
    }


def count_pairs(batch: dict) -> float:
    return float(len(batch["chosen"]))


def make_reward_loss(rating_weight: float) -> Callable:
    def loss_fn(model: RewardModel, batch: dict, normalizer: float):
        h = model.hidden_buckets(batch["contexts"])
        r = model.rewards(h)
        g = batch["pair_group"]
        rc, rr = r[g, batch["chosen"]], r[g, batch["rejected"]]
        loss = bradley_terry_loss(rc, rr, normalizer)
        stats = {"bt_sum": float(loss.detach()) * normalizer, "correct": float((rc > rr).sum())}
        if model.has_rating_head and rating_weight > 0 and len(batch["rate_item"]):
            pred = model.ratings(h)[batch["rate_group"], batch["rate_item"]]
            mse = squared_error_loss(pred, batch["rate_value"], normalizer)
            loss = loss + rating_weight * mse
            stats["sq_err_sum"] = float(mse.detach()) * normalizer
            stats["rated"] = float(len(pred))
        return loss, stats

    return loss_fn


def pair_metrics(delta: np.ndarray) -> dict[str, float]:
    d = np.asarray(delta, dtype=np.float64)
    bt = float(np.logaddexp(0.0, -d).mean())
    return {"pair_acc": pairwise_accuracy(d), "auc": pairwise_auc(d), "bt_loss": bt, "neg_bt_loss": -bt}


def group_deltas(models: list[RewardModel], groups: list[ContextGroup], batch_size: int = 512) -> np.ndarray:
    """Per-member reward differences for every pair of ``groups`` (in group order): [K, P]."""
    scores = score_contexts(models, [g.context for g in groups], batch_size, next(models[0].parameters()).device)
    gi = np.concatenate([np.full(len(g.chosen), i) for i, g in enumerate(groups)])
    c = np.concatenate([g.chosen for g in groups]) - NUM_SPECIAL
    r = np.concatenate([g.rejected for g in groups]) - NUM_SPECIAL
    return scores[:, gi, c] - scores[:, gi, r]


def _rating_mean(groups: list[ContextGroup]) -> float:
    vals = np.concatenate([g.ratings for g in groups]) if groups else np.zeros(0)
    return float(vals.mean()) if len(vals) else 0.0


def train_reward_ensemble(
    processed_dir: str | Path,
    pref_dir: str | Path,
    base_model_dir: str | Path,
    cfg: Config,
    out_dir: str | Path,
    on_log: Callable[[dict, int], None] | None = None,
    progress: bool = True,
    resume: bool = True,
    fold: int | None = None,
    members: int | None = None,
    seed: int | None = None,
    kind: str = "bt-reward-ensemble",
) -> dict:
    """Train ``reward.members`` members into ``out_dir/member_K``; write ``out_dir/ensemble.json``.

    ``fold`` (default ``reward.fold``; -1 = all) restricts training and validation pairs to one
    preference fold; ``members`` and ``seed`` override ``reward.members`` and the global seed (the
    held-out judge ensemble uses the other fold and other seeds)."""
    rc = cfg.reward
    fold = rc.fold if fold is None else fold
    n_members = rc.members if members is None else members
    base_seed = cfg.seed if seed is None else seed
    out_dir = Path(out_dir)
    ProcessedData.open(processed_dir)  # fails early, naming the directory, if it is not processed data
    pairs = read_pairs(pref_dir)
    if fold >= 0:
        pairs = pairs[pairs["fold"] == fold]
    train_groups = group_pairs(pairs[pairs["split"] == "train"])
    valid_groups = group_pairs(pairs[pairs["split"] == "valid"])
    if not train_groups:
        raise ValueError(f"{pref_dir}: no training pairs")
    base, vocab, _ = load_recommender(base_model_dir)
    use_rating = rc.rating_head and any(len(g.ratings) for g in train_groups)
    rating_mean = _rating_mean(train_groups)
    loss_fn = make_reward_loss(rc.rating_weight)
    summaries, names = [], []
    t0 = time.perf_counter()
    for k in range(n_members):
        seed = base_seed + 1009 * (k + 1)
        seed_everything(seed)
        if rc.bootstrap and n_members > 1:
            idx = np.random.default_rng([seed, 7]).integers(0, len(train_groups), size=len(train_groups))
            member_train = [train_groups[i] for i in idx]
        else:
            member_train = list(train_groups)
        model = RewardModel.from_base(base, rc.head_init_scale, use_rating, rating_mean)
        name = f"member_{k}"
        mdir = out_dir / name
        meta = {"member": k, "seed": seed, "bootstrap": bool(rc.bootstrap and n_members > 1),
                "train_contexts": len(member_train)}

        def evaluate_fn(m, _groups=valid_groups or train_groups):
            return pair_metrics(group_deltas([m], _groups)[0])

        def save_best(m, path, _meta=meta):
            save_reward_model(m, vocab, path, _meta)

        member_log = (lambda metrics, step, _k=k: on_log({f"member_{_k}/{a}": b for a, b in metrics.items()}, step)) \
            if on_log else None
        trainer = Trainer(model, rc.train, mdir, collate_fn=collate_groups, loss_fn=loss_fn, count_fn=count_pairs,
                          evaluate_fn=evaluate_fn, save_best_fn=save_best, monitor=rc.train.monitor, seed=seed,
                          on_log=member_log, progress=progress, name=f"{kind} member {k + 1}/{n_members}")
        res = trainer.fit(member_train, resume=resume)
        s = {k2: v for k2, v in asdict(res).items() if k2 != "history"}
        s.update(member=k, seed=seed, tokens_per_s=res.tokens_per_s, history=res.history)
        summaries.append(s)
        names.append(f"{name}/best")
    ens = RewardEnsemble([load_reward_model(out_dir / n) for n in names],
                         vocab, rc.kappa)
    centring = centring_stats(ens, train_groups, rc.centring_contexts, base_seed)
    info = {"kind": kind, "fold": fold, "member_dirs": names, "kappa": rc.kappa, "centring": centring,
            "centring_note": "member rewards are centred per context over the catalog, then averaged; "
                             "standardised reward = (mean - centring.mean) / centring.std",
            "rating_head": bool(use_rating), "rating_mean": rating_mean, "train_pairs": int(sum(
                len(g.chosen) for g in train_groups)), "train_contexts": len(train_groups),
            "valid_pairs": int(sum(len(g.chosen) for g in valid_groups)), "seed": base_seed}
    atomic_write_text(out_dir / ENSEMBLE_FILE, _dumps(info))
    summary = {"members": [{k2: v for k2, v in s.items() if k2 != "history"} for s in summaries],
               "train_seconds": time.perf_counter() - t0, "ensemble_dir": str(out_dir), **info}
    write_json(out_dir / "train_summary.json", {**summary, "histories": [s["history"] for s in summaries]})
    return summary


def centring_stats(ens: RewardEnsemble, groups: list[ContextGroup], n_contexts: int, seed: int) -> dict:
    rng = np.random.default_rng([seed, 11])
    pick = rng.choice(len(groups), size=min(n_contexts, len(groups)), replace=False)
    sc = ens.score_all([groups[i].context for i in sorted(pick)])
    m = sc.mean[:, NUM_SPECIAL:]
    return {"mean": float(m.mean()), "std": float(m.std()) or 1.0, "mean_member_std": float(
        sc.std[:, NUM_SPECIAL:].mean()), "contexts": len(pick)}


def _dumps(obj) -> str:
    import json

    return json.dumps(obj, indent=2, sort_keys=True)
