"""Loss math as small pure functions (no orchestration, no state).

Conventions (OpenRLHF-style): a loss over a set of target tokens is a *sum* of per-token terms
divided by a normaliser that is computed over the whole optimizer batch (all micro-batches, all
processes). Each micro-batch therefore contributes ``sum_i(...) / global_normaliser`` and gradient
accumulation or data parallelism cannot change the loss or its gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def target_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] for each row. logits [N, V], targets [N] -> [N] (float32)."""
    logits = logits.float()
    return -F.cross_entropy(logits, targets, reduction="none")


def weighted_nll(
    log_probs: torch.Tensor, weights: torch.Tensor | None = None, normalizer: float | torch.Tensor | None = None
) -> torch.Tensor:
    """``-sum(w * log p) / normalizer``.

    ``weights`` None means all ones (plain SFT / behaviour cloning). ``normalizer`` defaults to
    ``sum(w)`` of this call; pass the global sum over the optimizer batch when accumulating.
    """
    if weights is None:
        total = -log_probs.sum()
        denom = log_probs.numel() if normalizer is None else normalizer
    else:
        if weights.shape != log_probs.shape:
            raise ValueError(f"weights shape {tuple(weights.shape)} != log_probs shape {tuple(log_probs.shape)}")
        total = -(weights.to(log_probs.dtype) * log_probs).sum()
        denom = weights.sum() if normalizer is None else normalizer
    if isinstance(denom, torch.Tensor):
        denom = denom.clamp_min(1e-12)
    elif denom <= 0:
        raise ValueError("normalizer must be positive")
    return total / denom


def sft_loss(logits: torch.Tensor, targets: torch.Tensor, normalizer: float | None = None) -> torch.Tensor:
    """Next-item SFT: mean negative log-likelihood over target tokens (full softmax over the catalog)."""
    return weighted_nll(target_log_probs(logits, targets), None, normalizer)


def _normalise(total: torch.Tensor, normalizer: float | torch.Tensor | None, count: int) -> torch.Tensor:
    denom = count if normalizer is None else normalizer
    if isinstance(denom, torch.Tensor):
        return total / denom.clamp_min(1e-12)
    if denom <= 0:
        raise ValueError("normalizer must be positive")
    return total / denom


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, normalizer: float | torch.Tensor | None = None
) -> torch.Tensor:
    """``-sum(log sigmoid(r_w - r_l)) / normalizer`` (METHODS.md section 4); default: mean over pairs."""
    delta = chosen.float() - rejected.float()
    return _normalise(-F.logsigmoid(delta).sum(), normalizer, delta.numel())


def squared_error_loss(
    pred: torch.Tensor, target: torch.Tensor, normalizer: float | torch.Tensor | None = None
) -> torch.Tensor:
    """``sum((pred - target)^2) / normalizer`` (pointwise rating head); default: mean."""
    err = pred.float() - target.float()
    return _normalise((err * err).sum(), normalizer, err.numel())
