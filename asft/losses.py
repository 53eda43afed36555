"""Loss math as small pure functions (no orchestration, no state).

Conventions (OpenRLHF-style): a loss over a set of target tokens is a *sum* of per-token terms
divided by a normaliser that is computed over the whole optimizer batch (all micro-batches, all
processes). Each micro-batch therefore contributes ``sum_i(...) / global_normaliser`` and gradient
accumulation or data parallelism cannot change the loss or its gradient.
"""

from __future__ import annotations

import math

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


def masked_sft_loss(logits: torch.Tensor, targets: torch.Tensor, banned: torch.Tensor | None = None,
                    label_smoothing: float = 0.0, normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
    """Next-item SFT of the *history-masked* policy: ``banned`` [N, V] items (already consumed, special
    tokens) are removed from each row's softmax; a banned target is kept (a repeat consumption stays a
    valid label). With ``label_smoothing`` eps the per-row loss is ``(1 - eps) * NLL(target) +
    eps * mean over allowed items of -log p``. ``banned`` None and eps 0 is :func:`sft_loss`."""
    logits = logits.float()
    if banned is not None:
        banned = banned.clone()
        banned[torch.arange(len(targets), device=banned.device), targets] = False
        logits = logits.masked_fill(banned, float("-inf"))
    logp = torch.log_softmax(logits, dim=-1)
    nll = -logp.gather(1, targets.view(-1, 1)).squeeze(1)
    if label_smoothing > 0:
        if banned is None:
            uniform = -logp.mean(dim=-1)
        else:
            allowed = (~banned).sum(dim=-1).clamp_min(1)
            uniform = -logp.masked_fill(banned, 0.0).sum(dim=-1) / allowed
        nll = (1.0 - label_smoothing) * nll + label_smoothing * uniform
    return _normalise(nll.sum(), normalizer, nll.numel())


def tilted_target(ref_logits: torch.Tensor, advantages: torch.Tensor, lam: float) -> torch.Tensor:
    """The KL-regularised optimum over the whole catalogue: ``pi*(a|s) = pi_ref(a|s) exp(A(s,a)/lam) / Z(s)``
    per row (METHODS.md 5). ``-inf`` reference logits (masked items) get zero mass; any per-row
    baseline in ``A`` cancels in ``Z``."""
    return torch.softmax(ref_logits.float() + advantages.float() / lam, dim=-1)


def soft_target_loss(logits: torch.Tensor, target: torch.Tensor, weight: float = 1.0,
                     normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
    """Full-catalogue A-SFT: ``sum_rows weight * (-sum_a target(a) log softmax(logits)(a)) / normalizer``
    (a soft-target cross-entropy; items with zero target mass contribute nothing even where
    ``logits`` is ``-inf``). Default normaliser: the number of rows times ``weight``."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    ce = -(target * torch.where(target > 0, logp, torch.zeros_like(logp))).sum(dim=-1)
    return _normalise(weight * ce.sum(), normalizer, ce.numel() * weight)


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


# ---------------------------------------------------------------------------- preference optimisation
def dpo_margin(pi_w: torch.Tensor, pi_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor) -> torch.Tensor:
    """``h = (log pi(w) - log pi_ref(w)) - (log pi(l) - log pi_ref(l))`` per pair."""
    return (pi_w.float() - ref_w.float()) - (pi_l.float() - ref_l.float())


def dpo_loss(pi_w, pi_l, ref_w, ref_l, beta: float, normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
    """DPO: ``-sum(log sigma(beta * h)) / normalizer`` (METHODS.md section 6); default: mean over pairs."""
    h = dpo_margin(pi_w, pi_l, ref_w, ref_l)
    return _normalise(-F.logsigmoid(beta * h).sum(), normalizer, h.numel())


def ipo_loss(pi_w, pi_l, ref_w, ref_l, beta: float, normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
    """IPO: ``sum((h - 1/(2 beta))^2) / normalizer``; default: mean over pairs."""
    h = dpo_margin(pi_w, pi_l, ref_w, ref_l)
    return _normalise(((h - 1.0 / (2.0 * beta)) ** 2).sum(), normalizer, h.numel())


# ---------------------------------------------------------------------------- policy gradient
def group_advantages(rewards: torch.Tensor, kind: str = "grpo", eps: float = 1e-6) -> torch.Tensor:
    """Advantages within each group of G samples (rows of ``rewards`` [C, G]).

    ``grpo``: ``(R - mean) / (std + eps)`` (population std); ``rloo``: ``R_i - mean_{j != i} R_j``.
    """
    r = rewards.float()
    g = r.shape[-1]
    if g < 2:
        raise ValueError("group advantages need at least 2 samples per group")
    mean = r.mean(dim=-1, keepdim=True)
    if kind == "grpo":
        return (r - mean) / (r.std(dim=-1, unbiased=False, keepdim=True) + eps)
    if kind == "rloo":
        return r - (r.sum(dim=-1, keepdim=True) - r) / (g - 1)
    raise ValueError(f"unknown group advantage '{kind}' (grpo, rloo)")


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-sample k3 estimate of KL(pi || pi_ref) at actions drawn from pi: ``exp(q) - q - 1``,
    ``q = log pi_ref - log pi`` (non-negative, unbiased)."""
    q = ref_logp.float() - logp.float()
    return torch.exp(q) - q - 1.0


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, clip: float) -> torch.Tensor:
    """Per-sample PPO surrogate ``-min(rho * A, clip(rho, 1-c, 1+c) * A)``, ``rho = exp(logp - old_logp)``."""
    ratio = torch.exp(logp.float() - old_logp.float())
    return -torch.minimum(ratio * adv, ratio.clamp(1.0 - clip, 1.0 + clip) * adv)


def clip_fraction(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, clip: float) -> torch.Tensor:
    """Share of samples whose PPO clip binds (the clipped branch is the minimum, so their gradient is 0):
    ``rho > 1 + c`` with ``A > 0``, or ``rho < 1 - c`` with ``A < 0``."""
    ratio = torch.exp(logp.detach().float() - old_logp.float())
    binds = ((ratio > 1.0 + clip) & (adv > 0)) | ((ratio < 1.0 - clip) & (adv < 0))
    return binds.float().mean() if binds.numel() else torch.zeros(())


def policy_gradient_loss(logp, old_logp, ref_logp, adv, clip: float, kl_coef: float,
                         normalizer: float | torch.Tensor | None = None, kl: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum(PPO surrogate + kl_coef * KL) / normalizer`` over samples; the KL term is *added* (a penalty).
    ``kl`` None: the per-sample k3 estimate at the sampled actions; otherwise a per-sample penalty given
    by the caller (e.g. the exact full-catalogue KL of the sample's context). Returns (loss, per-sample KL)."""
    kl = kl_k3(logp, ref_logp) if kl is None else kl
    total = (clipped_policy_loss(logp, old_logp, adv, clip) + kl_coef * kl).sum()
    return _normalise(total, normalizer, logp.numel()), kl


# ---------------------------------------------------------------------------- distributions
def entropy_rows(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per row (``-inf`` logits have zero mass)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(dim=-1)


def kl_rows(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Exact KL(softmax(logits) || softmax(ref_logits)) per row."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    ref = torch.log_softmax(ref_logits.float(), dim=-1)
    p = logp.exp()
    return (p * torch.where(p > 0, logp - ref, torch.zeros_like(logp))).sum(dim=-1)


# ---------------------------------------------------------------------------- sampled softmax
def sampled_softmax_loss(pos_logits: torch.Tensor, neg_logits: torch.Tensor, targets: torch.Tensor,
                         neg_items: torch.Tensor, log_expected: torch.Tensor | None = None,
                         banned: torch.Tensor | None = None, label_smoothing: float = 0.0,
                         normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
    """Sampled softmax over ``{target} + negatives`` with logQ correction (Bengio & Senecal 2008;
    Jean et al. 2015; Yi et al. 2019 for in-batch negatives; Yang et al. 2020 for mixing sources).

    ``pos_logits`` [N]: each row's logit of its own target; ``neg_logits`` [N, C]: the logits of the
    ``C`` negatives ``neg_items`` [C] (shared by all rows: sampled and/or in-batch). ``log_expected``
    [C] is ``log E[count of the item among the C negatives]`` (``log(K q(j))`` for K draws from q; for a
    mix of sources the sum of their expected counts); it is subtracted from each negative's logit, so
    ``sum_neg exp(o_j) / E[count_j]`` is an unbiased estimate of the partition function over the
    other items and the loss estimates the full softmax's. The positive's logit is not corrected: it
    is in the softmax with certainty, not drawn. ``None``: no correction. ``banned`` [N, C]: negatives
    removed from a row's softmax (the user's history, as in the history-masked full softmax). A
    negative equal to the row's target (an accidental hit) is always removed.

    ``label_smoothing`` eps: ``(1 - eps) * NLL(target) + eps * U`` where ``U`` estimates the mean of
    ``-log p`` over the allowed catalogue by the self-normalised importance-weighted mean over the
    candidates (weight 1 for the target, ``1 / E[count_j]`` for negative ``j``, 0 where removed). With
    all items as negatives and no correction the loss *is* :func:`masked_sft_loss`."""
    pos = pos_logits.float().view(-1, 1)
    neg = neg_logits.float()
    if neg.shape != (pos.shape[0], neg_items.shape[0]):
        raise ValueError(f"neg_logits shape {tuple(neg.shape)} != [{pos.shape[0]}, {neg_items.shape[0]}]")
    drop = neg_items.view(1, -1) == targets.view(-1, 1)
    if banned is not None:
        drop = drop | banned
    if log_expected is not None:
        neg = neg - log_expected.float().view(1, -1)
    neg = neg.masked_fill(drop, float("-inf"))
    logits = torch.cat([pos, neg], dim=1)
    logp = torch.log_softmax(logits, dim=-1)
    nll = -logp[:, 0]
    if label_smoothing > 0:
        w_neg = torch.ones_like(neg) if log_expected is None else torch.exp(-log_expected.float()).expand_as(neg)
        w = torch.cat([torch.ones_like(pos), w_neg.masked_fill(drop, 0.0)], dim=1)
        # -log p of a candidate under the (estimated) full softmax: log Z_hat - o; o uncorrected
        raw = torch.cat([pos, neg_logits.float()], dim=1)
        neglogp = (torch.logsumexp(logits, dim=-1, keepdim=True) - raw).masked_fill(w == 0, 0.0)
        uniform = (w * neglogp).sum(dim=-1) / w.sum(dim=-1)
        nll = (1.0 - label_smoothing) * nll + label_smoothing * uniform
    return _normalise(nll.sum(), normalizer, nll.numel())


def log_expected_counts(items: torch.Tensor, log_q: torch.Tensor, n_sampled: int,
                        n_in_batch: int = 0, log_pop: torch.Tensor | None = None) -> torch.Tensor:
    """``log E[count]`` of each of ``items`` among the negatives: ``n_sampled`` draws (with replacement)
    from the sampler's distribution ``exp(log_q)`` [V] plus ``n_in_batch`` targets drawn from the
    batch, whose marginal is the training targets' popularity ``exp(log_pop)`` [V] (Yi et al. 2019)."""
    lq = log_q[items].float()
    out = lq + math.log(n_sampled) if n_sampled > 0 else torch.full_like(lq, float("-inf"))
    if n_in_batch > 0:
        if log_pop is None:
            raise ValueError("in-batch negatives need the targets' popularity (log_pop)")
        out = torch.logaddexp(out, log_pop[items].float() + math.log(n_in_batch))
    return out
