"""Full-ranking evaluation of a generative recommender (METHODS.md section 7).

Every user's target is ranked against the whole catalog (never sampled negatives). With
``mask_history`` the items already in the user's history are set to -inf first; the target itself
is never masked (a repeat consumption then still counts). Special tokens are always masked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from asft.data.preprocess import PAD
from asft.metrics import ranking_metrics, ranks_from_scores
from asft.models.recommender import mask_special, next_item_logits


def pad_right(seqs: list[np.ndarray], pad: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad integer sequences -> (ids [B, T], attention mask [B, T])."""
    lens = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    T = int(lens.max()) if len(seqs) else 0
    ids = np.full((len(seqs), T), pad, dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
    mask = (np.arange(T)[None, :] < lens[:, None]).astype(np.int64)
    return torch.from_numpy(ids), torch.from_numpy(mask)


def mask_items(scores: torch.Tensor, histories: list[np.ndarray], keep: torch.Tensor | None = None) -> torch.Tensor:
    """Set each row's history items to -inf (in place); ``keep`` tokens (e.g. targets) keep their score."""
    if not histories:
        return scores
    saved = scores.gather(1, keep.view(-1, 1)) if keep is not None else None
    hist, hmask = pad_right(histories)
    hist = hist.to(scores.device)
    fill = torch.where(hmask.to(scores.device).bool(), torch.tensor(float("-inf"), device=scores.device),
                       scores.gather(1, hist))
    scores.scatter_(1, hist, fill)
    if saved is not None:
        scores.scatter_(1, keep.view(-1, 1), saved)
    return scores


def rows_per_chunk(bytes_per_row: int, memory_mb: float | None, max_rows: int) -> int:
    """Rows (users, windows) processed at once so that ``rows * bytes_per_row`` fits ``memory_mb``; at most
    ``max_rows``, at least 1. ``memory_mb`` None: ``max_rows``."""
    if memory_mb is None:
        return max(1, max_rows)
    return max(1, min(max_rows, int(memory_mb * 2**20 // max(1, bytes_per_row))))


# Live [rows, V] float32 copies while ranking one chunk: logits, masked scores, comparison, gather/scatter.
EVAL_COPIES = 4


@dataclass
class EvalResult:
    metrics: dict[str, float]
    ranks: np.ndarray
    user_idx: np.ndarray


@torch.no_grad()
def evaluate_table(
    model: torch.nn.Module,
    table: pd.DataFrame,
    ks: list[int] = (10, 50),
    mask_history: bool = True,
    batch_size: int = 512,
    device: str | torch.device | None = None,
    memory_mb: float | None = 1024,
) -> EvalResult:
    """Rank every row's ``target`` given its ``input`` (and ``history`` for masking).

    Users are scored in chunks of at most ``batch_size``, fewer when their ``[users, items]`` scores would
    exceed ``memory_mb``; only each user's rank is kept, so memory is bounded whatever the catalog and the
    number of users (the ranks do not depend on the chunking)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    config = getattr(getattr(model, "module", model), "config", None)
    if config is not None:
        batch_size = rows_per_chunk(EVAL_COPIES * 4 * config.vocab_size, memory_mb, batch_size)
    was_training = model.training
    model.eval()
    inputs = [np.asarray(x, dtype=np.int64) for x in table["input"]]
    histories = [np.asarray(x, dtype=np.int64) for x in table["history"]]
    targets = torch.from_numpy(np.array(table["target"], dtype=np.int64))
    ranks = []
    for s in range(0, len(inputs), batch_size):
        ids, am = pad_right(inputs[s : s + batch_size])
        scores = mask_special(next_item_logits(model, ids.to(device), am.to(device)).float())
        tgt = targets[s : s + batch_size].to(device)
        if mask_history:
            mask_items(scores, histories[s : s + batch_size], keep=tgt)
        ranks.append(ranks_from_scores(scores, tgt).cpu())
        del scores
    if was_training:
        model.train()
    r = torch.cat(ranks).numpy()
    return EvalResult(metrics=ranking_metrics(r, ks), ranks=r, user_idx=table["user_idx"].to_numpy())
