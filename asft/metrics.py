"""Full-ranking metrics (METHODS.md section 7). Pure functions on scores and ranks.

``rank`` is 0-based: the number of candidate items scoring strictly higher than the target.
HR@K = [rank < K]; NDCG@K = 1/log2(rank+2) if rank < K else 0 (one relevant item, so IDCG = 1);
MRR = 1/(rank+1) (full); MRR@K truncates at K.
"""

from __future__ import annotations

import numpy as np
import torch


def ranks_from_scores(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """scores [B, V] (masked entries -inf), targets [B] -> 0-based ranks [B] (int64)."""
    target_scores = scores.gather(1, targets.view(-1, 1))
    ranks = (scores > target_scores).sum(dim=1)
    # A NaN score must never look like a hit: a NaN target ranks last.
    return torch.where(torch.isnan(target_scores.squeeze(1)), torch.full_like(ranks, scores.size(1)), ranks)


def ranking_metrics(ranks: np.ndarray | torch.Tensor, ks: list[int] | tuple[int, ...] = (10, 50)) -> dict[str, float]:
    """Mean HR@K, NDCG@K, MRR@K for each K, plus full MRR, over users."""
    r = np.asarray(ranks.cpu() if isinstance(ranks, torch.Tensor) else ranks, dtype=np.float64)
    if r.size == 0:
        raise ValueError("no ranks to aggregate")
    out: dict[str, float] = {}
    for k in ks:
        hit = r < k
        out[f"hr@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(r + 2.0), 0.0).mean())
        out[f"mrr@{k}"] = float(np.where(hit, 1.0 / (r + 1.0), 0.0).mean())
    out["mrr"] = float((1.0 / (r + 1.0)).mean())
    return out


# ---------------------------------------------------------------------------- preference metrics
# ``delta`` is score(chosen) - score(rejected) per held-out pair. A pair counts as correct when
# delta > 0 and half when delta == 0 (a predictor that cannot tell two items apart scores 0.5).


def pairwise_accuracy(delta: np.ndarray) -> float:
    d = np.asarray(delta, dtype=np.float64)
    if d.size == 0:
        raise ValueError("no pairs")
    return float(((d > 0) + 0.5 * (d == 0)).mean())


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties averaged (as scipy.stats.rankdata)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.r_[0, np.flatnonzero(xs[1:] != xs[:-1]) + 1]
    ends = np.r_[starts[1:], len(xs)]
    avg = (starts + ends + 1) / 2.0  # mean of 1-based positions starts+1 .. ends
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def pairwise_auc(delta: np.ndarray) -> float:
    """ROC AUC of the pair presented in both orders: positives score ``delta``, negatives ``-delta``.

    Equals P(delta_i > -delta_j) over pairs i, j (ties half); 0.5 for an uninformative predictor.
    """
    d = np.asarray(delta, dtype=np.float64)
    n = d.size
    if n == 0:
        raise ValueError("no pairs")
    ranks = _average_ranks(np.concatenate([d, -d]))
    return float((ranks[:n].sum() - n * (n + 1) / 2) / (n * n))


def calibration_bins(delta: np.ndarray, n_bins: int = 10) -> dict[str, np.ndarray | float]:
    """Reliability of ``sigmoid(delta)`` as P(chosen > rejected), both orders of every pair.

    Returns per-bin mean predicted probability, observed frequency and count, plus the expected
    calibration error (count-weighted |observed - predicted|).
    """
    d = np.asarray(delta, dtype=np.float64)
    p = 1.0 / (1.0 + np.exp(-np.concatenate([d, -d])))
    y = np.concatenate([np.ones(d.size), np.zeros(d.size)])
    idx = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        pred = np.bincount(idx, weights=p, minlength=n_bins) / count
        obs = np.bincount(idx, weights=y, minlength=n_bins) / count
    ok = count > 0
    ece = float((count[ok] * np.abs(obs[ok] - pred[ok])).sum() / count.sum()) if count.sum() else float("nan")
    return {"predicted": pred, "observed": obs, "count": count, "ece": ece}


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation between matching rows of two [N, M] arrays (NaN for a constant row)."""
    a, b = np.atleast_2d(np.asarray(a, dtype=np.float64)), np.atleast_2d(np.asarray(b, dtype=np.float64))
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    out = np.empty(a.shape[0])
    for i in range(a.shape[0]):
        ra, rb = _average_ranks(a[i]), _average_ranks(b[i])
        ra, rb = ra - ra.mean(), rb - rb.mean()
        den = np.sqrt((ra * ra).sum() * (rb * rb).sum())
        out[i] = (ra * rb).sum() / den if den > 0 else np.nan
    return out


def ndcg_per_user(ranks: np.ndarray, k: int = 10) -> np.ndarray:
    """NDCG@k of each user's single held-out item: ``1/log2(rank+2)`` if rank < k else 0 (rank from 0)."""
    r = np.asarray(ranks, dtype=np.float64)
    return np.where(r < k, 1.0 / np.log2(r + 2.0), 0.0)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict[str, float]:
    """Mean paired difference ``a - b`` over users and its percentile bootstrap interval.

    ``a`` and ``b`` are per-user values ``[U]`` or ``[S, U]`` (S seeds evaluated on the same U users):
    users are resampled with replacement (the same users for every seed, keeping the pairing), and each
    replicate is the mean over seeds and resampled users."""
    a, b = np.atleast_2d(np.asarray(a, np.float64)), np.atleast_2d(np.asarray(b, np.float64))
    if a.shape != b.shape:
        raise ValueError(f"paired values need equal shapes, got {a.shape} and {b.shape}")
    d = (a - b).mean(axis=0)  # per-user difference, averaged over seeds
    u = d.shape[0]
    rng = np.random.default_rng(seed)
    reps = np.empty(n_boot)
    for i in range(0, n_boot, 256):
        idx = rng.integers(0, u, size=(min(256, n_boot - i), u))
        reps[i : i + len(idx)] = d[idx].mean(axis=1)
    lo, hi = np.quantile(reps, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"diff": float(d.mean()), "lo": float(lo), "hi": float(hi), "n_users": int(u), "n_seeds": int(a.shape[0]),
            "excludes_zero": bool(lo > 0 or hi < 0)}
