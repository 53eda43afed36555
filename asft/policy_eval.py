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
from asft.evaluation import mask_items, pad_right, rows_per_chunk
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
    """Everything about a context set that does not depend on the policy.

    The policy is scored in chunks of contexts (:attr:`chunk`) and only per-context values are kept,
    so memory is bounded at any catalogue size. The per-context ``[N, V]`` tables the metrics read
    (pi_ref's masked logits, the training ensemble's pessimistic reward, the judge's standardised mean,
    the simulator's true utility) are computed once and cached when all of them fit ``memory_mb``;
    otherwise they are recomputed chunk by chunk at every evaluation (bounded memory, more compute).
    Either way the values are the same."""

    inputs: list[np.ndarray]
    histories: list[np.ndarray]
    targets: torch.Tensor
    high_rated: np.ndarray
    ref_masked: torch.Tensor  # pi_ref logits, history + specials masked (empty: recomputed per chunk)
    popularity: np.ndarray  # training count per token
    ks: list[int]
    reward: np.ndarray | None = None  # training ensemble, pessimistic [N, V] (cached)
    judge: np.ndarray | None = None  # held-out judge, standardised mean [N, V] (cached)
    utility: np.ndarray | None = None  # simulator true utility [N, V] (cached)
    base_ndcg: float | None = None
    ndcg_tolerance: float = 0.03
    batch_size: int = 512
    memory_mb: float | None = 1024
    chunk: int = 0  # contexts per chunk (0: all)
    sources: dict | None = None  # uncached tables: name -> function(rows slice) -> [n, V]

    @classmethod
    def build(cls, data: ProcessedData, split: str, ref_model, ks, reward_ens=None, judge_ens=None, simulator=None,
              ndcg_tolerance: float = 0.03, batch_size: int = 512, memory_mb: float | None = 1024) -> PolicyScorer:
        table = data.table(split)
        inputs = [np.asarray(x, dtype=np.int64) for x in table["input"]]
        histories = [np.asarray(x, dtype=np.int64) for x in table["history"]]
        sc = cls(inputs=inputs, histories=histories, targets=torch.from_numpy(table["target"].to_numpy(np.int64)),
                 high_rated=(table["target_rating"].to_numpy() >= 4), ref_masked=torch.zeros(0),
                 popularity=data.item_popularity().astype(np.float64), ks=list(ks), ndcg_tolerance=ndcg_tolerance,
                 batch_size=batch_size, memory_mb=memory_mb)
        n, v = len(inputs), data.vocab.size
        sources = {"ref": lambda sl: sc.masked(context_logits(ref_model, inputs[sl], batch_size), sl)}
        if reward_ens is not None:
            sources["reward"] = lambda sl: reward_ens.score_all(inputs[sl], batch_size=batch_size).pessimistic
        if judge_ens is not None:
            sources["judge"] = lambda sl: judge_ens.score_all(inputs[sl], standardize=True,
                                                              batch_size=batch_size).mean
        if simulator is not None:
            from asft.data.preferences import context_utilities

            seqs = data.table("sequences")
            users = table["user_idx"].to_numpy(np.int64)
            ends = np.array([len(h) for h in histories])
            sources["utility"] = lambda sl: context_utilities(simulator, data, seqs, users[sl], ends[sl])[0]
        # per chunk: the policy's logits and their masked copy, softmax, ranking copies, and the tables
        per_context = 4 * v * (6 + 2 * len(sources) + 2 * len(reward_ens.members if reward_ens else [])
                               + 2 * len(judge_ens.members if judge_ens else []))
        sc.chunk = rows_per_chunk(per_context, memory_mb, max(1, n))
        if rows_per_chunk(4 * v * len(sources), memory_mb, max(1, n)) >= n:  # all tables fit: cache them
            whole = slice(0, n)
            sc.ref_masked = sources.pop("ref")(whole)
            for name in list(sources):
                setattr(sc, name, sources.pop(name)(whole))
        sc.sources = sources
        sc.base_ndcg = sc.evaluate(ref_model)["ndcg@10"]
        return sc

    def masked(self, logits: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """History and special tokens to -inf (the distribution the policy recommends from); ``rows``: the
        contexts of ``logits`` (default: all)."""
        hist = self.histories if rows is None else self.histories[rows]
        return mask_items(mask_special(logits.clone()), hist)

    def _table(self, name: str, rows: slice):
        cached = self.ref_masked if name == "ref" else getattr(self, name)
        if name == "ref" and cached.numel():
            return cached[rows]
        if name != "ref" and cached is not None:
            return cached[rows]
        if self.sources and name in self.sources:
            return self.sources[name](rows)
        return None

    def _chunks(self):
        step = self.chunk or max(1, len(self.inputs))
        return [slice(s, min(s + step, len(self.inputs))) for s in range(0, len(self.inputs), step)]

    def evaluate(self, model) -> dict[str, float]:
        parts = [self._chunk_values(context_logits(model, self.inputs[sl], self.batch_size), sl)
                 for sl in self._chunks()]
        return self._aggregate(parts)

    def per_user(self, model) -> dict[str, np.ndarray]:
        """Per-context values for paired comparisons: NDCG@10, rank, and the top-10 reward under the
        judge and (simulator) the true utility; ``high_rated`` marks targets rated >= 4."""
        from asft.metrics import ndcg_per_user

        ranks, tables = [], {"judged": [], "true": []}
        for sl in self._chunks():
            logits = context_logits(model, self.inputs[sl], self.batch_size)
            ranked = mask_items(mask_special(logits.clone()), self.histories[sl], keep=self.targets[sl])
            ranks.append(ranks_from_scores(ranked, self.targets[sl]).numpy())
            top = torch.topk(self.masked(logits, sl), 10, dim=1).indices.numpy()
            rows = np.arange(len(top))[:, None]
            for name, key in (("judged", "judge"), ("true", "utility")):
                table = self._table(key, sl)
                if table is not None:
                    tables[name].append(table[rows, top].mean(axis=1))
        r = np.concatenate(ranks)
        out = {"rank": r, "ndcg@10": ndcg_per_user(r, 10), "high_rated": self.high_rated.copy()}
        out.update({f"{name}_top10": np.concatenate(v) for name, v in tables.items() if v})
        return out

    def evaluate_logits(self, logits: torch.Tensor) -> dict[str, float]:
        """The metrics of given next-item logits ``[N, V]`` of all contexts."""
        return self._aggregate([self._chunk_values(logits[sl], sl) for sl in self._chunks()])

    def _chunk_values(self, logits: torch.Tensor, sl: slice) -> dict[str, np.ndarray]:
        """Per-context values of one chunk of contexts (``logits`` [n, V] of contexts ``sl``)."""
        ranked = mask_items(mask_special(logits.clone()), self.histories[sl], keep=self.targets[sl])
        out: dict[str, np.ndarray] = {"rank": ranks_from_scores(ranked, self.targets[sl]).numpy()}
        del ranked
        pol = self.masked(logits, sl)
        ref = self._table("ref", sl)
        if ref is not None and ref.numel():
            out["kl_ref"] = kl_rows(pol, ref).numpy()
        out["entropy"] = entropy_rows(pol).numpy()
        top = torch.topk(pol, 10, dim=1).indices.numpy()
        rows = np.arange(len(top))[:, None]
        out["top"] = top
        out["popularity"] = self.popularity[top].mean(axis=1)
        p = torch.softmax(pol, dim=1).numpy()
        for name, key in (("reward", "reward"), ("judged", "judge"), ("true", "utility")):
            table = self._table(key, sl)
            if table is None:
                continue
            out[f"{name}_top1"] = table[rows[:, 0], top[:, 0]]
            out[f"{name}_top10"] = table[rows, top].mean(axis=1)
            if name == "judged":
                out["judged_expected"] = np.where(p > 0, p * np.nan_to_num(table, neginf=0.0), 0).sum(1)
        out["n_items"] = np.array([pol.shape[1] - NUM_SPECIAL])
        return out

    def _aggregate(self, parts: list[dict[str, np.ndarray]]) -> dict[str, float]:
        cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k != "n_items"}
        ranks = cat.pop("rank")
        out = ranking_metrics(ranks, self.ks)
        if self.high_rated.any():
            out.update({f"high_rated/{k}": v for k, v in ranking_metrics(ranks[self.high_rated], self.ks).items()})
        if "kl_ref" in cat:
            out["kl_ref"] = float(cat["kl_ref"].mean())
        out["entropy"] = float(cat["entropy"].mean())
        out["coverage@10"] = float(len(np.unique(cat["top"])) / int(parts[0]["n_items"][0]))
        out["popularity@10"] = float(cat["popularity"].mean())
        for name in ("reward", "judged", "true"):
            if f"{name}_top1" in cat:
                out[f"{name}_top1"] = float(cat[f"{name}_top1"].mean())
                out[f"{name}_top10"] = float(cat[f"{name}_top10"].mean())
        if "judged_expected" in cat:
            out["judged_expected"] = float(cat["judged_expected"].mean())
        if "reward_top10" in out and self.base_ndcg is not None:
            ok = out["ndcg@10"] >= (1.0 - self.ndcg_tolerance) * self.base_ndcg
            out["selection"] = out["reward_top10"] - (0.0 if ok else SELECTION_PENALTY)
        return out
