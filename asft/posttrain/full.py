"""Full family: full-catalogue A-SFT, a soft-target cross-entropy to the exact tilted policy (no sampling;
the pure target and loss are in :mod:`asft.losses`)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from asft.config import Config
from asft.losses import kl_rows, soft_target_loss, tilted_target, weighted_nll
from asft.posttrain.collate import masked_logits
from asft.sampling import position_rewards


def make_full_loss(cfg: Config, ref, members: list, reward_scale: float) -> Callable:
    """Full-catalogue A-SFT: at each context the target is the exact tilted policy
    ``pi_ref * exp(r / (scale * lambda)) / Z`` over the history-masked catalogue (``r`` the ensemble's
    training reward, ``scale`` its centring std); each context weighs ``n_candidates`` (as many as the
    sampled A-SFT's candidates) and the logged item ``anchor_weight``."""
    n = float(cfg.sampling.n_candidates)
    anchor = cfg.posttrain.anchor_weight
    reward_key = 2 if cfg.advantage.reward == "pessimistic" else 0
    lam = cfg.advantage.lam

    def loss_fn(model, batch: dict, normalizer: float):
        logits = masked_logits(model, batch)
        with torch.no_grad():
            ref_logits = masked_logits(ref, batch)
            r = position_rewards(members, batch["input_ids"], batch["attention_mask"],
                                 cfg.reward.kappa)[reward_key][batch["ctx_b"], batch["ctx_t"]] / reward_scale
            target = tilted_target(ref_logits, torch.nan_to_num(r, neginf=0.0), lam)
        loss = soft_target_loss(logits, target, n, normalizer)
        if anchor > 0:
            lp = torch.log_softmax(logits, dim=-1)[batch["row_ctx"], batch["item"]]
            loss = loss + weighted_nll(lp, torch.full_like(lp, anchor), normalizer)
        kl = kl_rows(logits.detach(), ref_logits)
        return loss, {"kl_sum": float(kl.sum()) * (n + anchor)}

    return loss_fn


def context_weight(cfg: Config) -> float:
    """What one context weighs in the normaliser: ``n_candidates`` plus the anchor."""
    return cfg.sampling.n_candidates + cfg.posttrain.anchor_weight
