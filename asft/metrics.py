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
