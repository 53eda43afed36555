"""Evaluation of post-trained policies (METHODS.md section 7).

On a fixed set of contexts (the valid or test table: each user's history before the held-out item):

- full-ranking HR/NDCG/MRR of the held-out item (history masked, target kept), on all users and on
  the users whose held-out item is rated >= 4;
- the policy as a recommender: its top-1 and top-10 (history masked) and its next-item
  distribution ``pi`` (history and special tokens masked);
- reward of top-1 / top-10 under the *training* ensemble (pessimistic) -- used for selection only --
  and under the held-out *judge* ensemble (other preference fold, other seeds; standardised with its
  centring statistics), plus the judge's expected reward ``sum_a pi(a) r(a)``;
- ``KL(pi || pi_ref)`` and the entropy of ``pi`` (exact, over the catalog), catalog coverage of the
  top-10 lists and the mean training popularity of recommended items;
- on the simulator: the true expected utility of top-1 and top-10.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from asft.data.preprocess import NUM_SPECIAL, ProcessedData
from asft.evaluation import mask_items, pad_right
from asft.losses import entropy_rows, kl_rows
from asft.metrics import ranking_metrics, ranks_from_scores
from asft.models.recommender import mask_special, next_item_logits

SELECTION_PENALTY = 1000.0


@torch.no_grad()
def context_logits(model: torch.nn.Module, inputs: list[np.ndarray], batch_size: int = 512) -> torch.Tensor:
    """Next-item logits [N, V] for each context (float32, on CPU)."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = []
    for s in range(0, len(inputs), batch_size):
        ids, am = pad_right(inputs[s : s + batch_size])
        out.append(next_item_logits(model, ids.to(dev), am.to(dev)).float().cpu())
    if was:
        model.train()
    return torch.cat(out) if out else torch.zeros(0, 0)


@dataclass
class PolicyScorer:
    """Everything about a context set that does not depend on the policy, computed once."""

    inputs: list[np.ndarray]
    histories: list[np.ndarray]
    targets: torch.Tensor
    high_rated: np.ndarray
    ref_masked: torch.Tensor  # pi_ref logits, history + specials masked
    popularity: np.ndarray  # training count per token
    ks: list[int]
    reward: np.ndarray | None = None  # training ensemble, pessimistic [N, V]
    judge: np.ndarray | None = None  # held-out judge, standardised mean [N, V]
    utility: np.ndarray | None = None  # simulator true utility [N, V]
    base_ndcg: float | None = None
    ndcg_tolerance: float = 0.03
    batch_size: int = 512

    @classmethod
    def build(cls, data: ProcessedData, split: str, ref_model, ks, reward_ens=None, judge_ens=None, simulator=None,
              ndcg_tolerance: float = 0.03, batch_size: int = 512) -> PolicyScorer:
        table = data.table(split)
        inputs = [np.asarray(x, dtype=np.int64) for x in table["input"]]
        histories = [np.asarray(x, dtype=np.int64) for x in table["history"]]
        sc = cls(inputs=inputs, histories=histories, targets=torch.from_numpy(table["target"].to_numpy(np.int64)),
                 high_rated=(table["target_rating"].to_numpy() >= 4), ref_masked=torch.zeros(0),
                 popularity=data.item_popularity().astype(np.float64), ks=list(ks), ndcg_tolerance=ndcg_tolerance,
                 batch_size=batch_size)
        sc.ref_masked = sc.masked(context_logits(ref_model, inputs, batch_size))
        if reward_ens is not None:
            sc.reward = reward_ens.score_all(inputs, batch_size=batch_size).pessimistic
        if judge_ens is not None:
            sc.judge = judge_ens.score_all(inputs, standardize=True, batch_size=batch_size).mean
        if simulator is not None:
            from asft.data.preferences import context_utilities

            seqs = data.table("sequences")
            ends = np.array([len(h) for h in histories])
            sc.utility, _ = context_utilities(simulator, data, seqs, table["user_idx"].to_numpy(np.int64), ends)
        sc.base_ndcg = sc.evaluate_logits(context_logits(ref_model, inputs, batch_size))["ndcg@10"]
        return sc

    def masked(self, logits: torch.Tensor) -> torch.Tensor:
        """History and special tokens to -inf (the distribution the policy recommends from)."""
        return mask_items(mask_special(logits.clone()), self.histories)

    def evaluate(self, model) -> dict[str, float]:
        return self.evaluate_logits(context_logits(model, self.inputs, self.batch_size))

    def per_user(self, model) -> dict[str, np.ndarray]:
        """Per-context values for paired comparisons: NDCG@10, rank, and the top-10 reward under the
        judge and (simulator) the true utility; ``high_rated`` marks targets rated >= 4."""
        from asft.metrics import ndcg_per_user

        logits = context_logits(model, self.inputs, self.batch_size)
        ranked = mask_items(mask_special(logits.clone()), self.histories, keep=self.targets)
        ranks = ranks_from_scores(ranked, self.targets).numpy()
        out = {"rank": ranks, "ndcg@10": ndcg_per_user(ranks, 10), "high_rated": self.high_rated.copy()}
        top = torch.topk(self.masked(logits), 10, dim=1).indices.numpy()
        rows = np.arange(len(top))[:, None]
        for name, table in (("judged", self.judge), ("true", self.utility)):
            if table is not None:
                out[f"{name}_top10"] = table[rows, top].mean(axis=1)
        return out

    def evaluate_logits(self, logits: torch.Tensor) -> dict[str, float]:
        ranked = mask_items(mask_special(logits.clone()), self.histories, keep=self.targets)
        ranks = ranks_from_scores(ranked, self.targets).numpy()
        out = ranking_metrics(ranks, self.ks)
        if self.high_rated.any():
            out.update({f"high_rated/{k}": v for k, v in ranking_metrics(ranks[self.high_rated], self.ks).items()})
        pol = self.masked(logits)
        if self.ref_masked.numel():
            out["kl_ref"] = float(kl_rows(pol, self.ref_masked).mean())
        out["entropy"] = float(entropy_rows(pol).mean())
        top = torch.topk(pol, 10, dim=1).indices.numpy()
        rows = np.arange(len(top))[:, None]
        n_items = pol.shape[1] - NUM_SPECIAL
        out["coverage@10"] = float(len(np.unique(top)) / n_items)
        out["popularity@10"] = float(self.popularity[top].mean())
        p = torch.softmax(pol, dim=1).numpy()
        for name, table in (("reward", self.reward), ("judged", self.judge), ("true", self.utility)):
            if table is None:
                continue
            out[f"{name}_top1"] = float(table[rows[:, 0], top[:, 0]].mean())
            out[f"{name}_top10"] = float(table[rows, top].mean())
            if name == "judged":
                out["judged_expected"] = float(np.where(p > 0, p * np.nan_to_num(table, neginf=0.0), 0).sum(1).mean())
        if self.reward is not None and self.base_ndcg is not None:
            ok = out["ndcg@10"] >= (1.0 - self.ndcg_tolerance) * self.base_ndcg
            out["selection"] = out["reward_top10"] - (0.0 if ok else SELECTION_PENALTY)
        return out
