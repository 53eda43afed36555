"""Online family: RLOO, GRPO and Rec-R1, on-policy policy gradients with a PPO clip and a KL penalty to
pi_ref (the pure losses and group advantages are in :mod:`asft.losses`)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from asft.config import Config
from asft.losses import (
    clip_fraction,
    entropy_rows,
    group_advantages,
    kl_rows,
    policy_gradient_loss,
    weighted_nll,
)
from asft.posttrain.collate import masked_logits
from asft.sampling import gumbel_topk, position_rewards

# method -> group-advantage estimator (asft.losses.group_advantages)
ADVANTAGE_KIND = {"rloo": "rloo", "grpo": "grpo", "rec_r1": "grpo"}
SLATE_METHODS = {"rec_r1"}  # actions are ordered slates rewarded by NDCG against the real next items


def slate_ndcg(slates: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """NDCG@K of each slate [S, K] against its relevant items [S, H] (-1 = none): binary gains,
    ``1/log2(rank+2)``; 0 when nothing is relevant."""
    k = slates.shape[1]
    hits = (slates.unsqueeze(-1) == relevant.unsqueeze(1)).any(-1).float()  # [S, K]
    disc = 1.0 / torch.log2(torch.arange(k, device=slates.device, dtype=torch.float32) + 2.0)
    dcg = (hits * disc).sum(-1)
    n_rel = (relevant >= 0).sum(-1).clamp(max=k)
    idcg = torch.cumsum(disc, 0)[(n_rel - 1).clamp_min(0)]
    return torch.where(n_rel > 0, dcg / idcg, torch.zeros_like(dcg))


def plackett_luce_logp(logp: torch.Tensor, slates: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """log-probability of ordered slates [S, K] drawn without replacement from the rows' distributions:
    ``sum_k log p(a_k) - log(1 - sum_{j<k} p(a_j))``."""
    lp = logp[rows[:, None], slates]
    p = lp.exp()
    before = torch.cumsum(p, dim=1) - p
    return (lp - torch.log1p(-before.clamp(max=1.0 - 1e-6))).sum(dim=1)


def online_horizon(method: str, cfg: Config) -> int:
    """How many real next items each context's batch carries (the slate methods' relevant items)."""
    return cfg.posttrain.rec_r1.horizon if method in SLATE_METHODS else 0


def make_online_loss(method: str, cfg: Config, ref, members: list | None, anchor: float = 0.0) -> Callable:
    """RLOO / GRPO / Rec-R1 loss. With ``pg.ppo_epochs`` K > 1 the trainer takes K optimizer steps on each
    batch: the first pass samples the actions from the current policy and freezes them with their
    log-probabilities (pi_old), their rewards and advantages; later passes reuse them, so the ratio
    pi / pi_old moves away from 1 and the clip can bind (``clip_frac``)."""
    if method not in ADVANTAGE_KIND:
        raise ValueError(f"'{method}' is not an online method; choose from {sorted(ADVANTAGE_KIND)}")
    pg = cfg.posttrain.pg
    g = pg.group_size
    slates = method in SLATE_METHODS
    kind = ADVANTAGE_KIND[method]
    reward_key = 2 if cfg.advantage.reward == "pessimistic" else 0
    frozen: dict[bytes, list] = {}  # micro-batch -> [passes left, acts, old logp, adv, reward]

    def batch_key(batch: dict) -> bytes:
        return b"".join(batch[k].cpu().numpy().tobytes() for k in ("input_ids", "ctx_b", "ctx_t"))

    def draw(logits: torch.Tensor, logp_all: torch.Tensor, rows: torch.Tensor, batch: dict):
        """First pass: G actions per context from the current policy, their rewards [C, G] and advantages."""
        c = logits.shape[0]
        if slates:
            acts = gumbel_topk(logits[rows], cfg.posttrain.rec_r1.slate_size)  # [C*G, K], without replacement
            reward = slate_ndcg(acts, batch["next_items"][rows]).view(c, g)
        else:
            acts = torch.multinomial(logp_all.exp(), g, replacement=True)  # [C, G]
            scores = position_rewards(members, batch["input_ids"], batch["attention_mask"],
                                      cfg.reward.kappa)[reward_key][batch["ctx_b"], batch["ctx_t"]]
            reward = scores.gather(1, acts)
        return acts, reward, group_advantages(reward, kind, pg.std_eps)

    def loss_fn(model, batch: dict, normalizer: float):
        logits = masked_logits(model, batch)
        logp_all = torch.log_softmax(logits, dim=-1)
        c = logits.shape[0]
        rows = torch.arange(c, device=logits.device).repeat_interleave(g)
        key = batch_key(batch) if pg.ppo_epochs > 1 else b""
        with torch.no_grad():
            ref_logits = masked_logits(ref, batch)
            ref_all = torch.log_softmax(ref_logits, dim=-1)
            if key in frozen:
                entry = frozen[key]
                entry[0] -= 1
                _, acts, old_logp, adv, reward = entry
                if entry[0] <= 0:
                    del frozen[key]
            else:
                acts, reward, adv = draw(logits.detach(), logp_all.detach(), rows, batch)
                old_logp = None
        if slates:
            logp = plackett_luce_logp(logp_all, acts, rows).view(c, g)
            ref_lp = plackett_luce_logp(ref_all, acts, rows).view(c, g)
        else:
            logp, ref_lp = logp_all.gather(1, acts), ref_all.gather(1, acts)
        if old_logp is None:  # first pass: pi_old is the policy that drew the actions
            old_logp = logp.detach()
            if pg.ppo_epochs > 1:
                frozen[key] = [pg.ppo_epochs - 1, acts, old_logp, adv, reward]
        kl = kl_rows(logits, ref_logits)[:, None].expand(c, g) if pg.kl_estimator == "exact" else None
        loss, kl_s = policy_gradient_loss(logp, old_logp, ref_lp, adv, pg.clip, pg.kl_coef, normalizer, kl=kl)
        ent = entropy_rows(logits)
        loss = loss - pg.entropy_coef * ent.sum() * g / normalizer
        if anchor > 0:  # mean over contexts of -log pi(logged item); the normaliser counts C * G samples
            loss = loss + anchor * g * weighted_nll(logp_all[batch["row_ctx"], batch["item"]], None, normalizer)
        return loss, {"reward_sum": float(reward.sum()), "kl_sum": float(kl_s.detach().sum()),
                      "entropy_sum": float(ent.detach().sum()) * g,
                      "clip_frac_sum": float(clip_fraction(logp, old_logp, adv, pg.clip)) * c * g}

    return loss_fn
