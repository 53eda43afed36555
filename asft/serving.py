"""Serving: top-K recommendations for raw item-id histories, and reward scores for (history, items).

Plain torch/transformers, no orchestration; ``tasks/serving_models.py`` wraps these as MLflow pyfunc
models (so ``mlflow models serve`` answers recommendation requests). The input encoding is the one
the models were trained and evaluated with: the last ``max_len`` items of the history, right-padded,
no BOS; the next-item distribution is read at the last position; special tokens and (by default)
the items already in the history are never recommended.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from asft.evaluation import mask_items, pad_right


def _encode(vocab, history) -> tuple[np.ndarray, list[str]]:
    """Known items as tokens (in order) and the ids that are not in the catalog."""
    known, unknown = [], []
    index = vocab._index
    for raw in history:
        tok = index.get(str(raw))
        if tok is None:
            unknown.append(str(raw))
        else:
            known.append(tok)
    return np.asarray(known, dtype=np.int64), unknown


@dataclass
class Recommendation:
    items: list[str]
    scores: list[float]
    unknown_items: list[str]


class Recommender:
    """A saved generative recommender (``save_pretrained`` dir + item vocabulary) answering top-K."""

    def __init__(self, model, vocab, max_len: int, device: str | torch.device = "cpu"):
        self.model, self.vocab, self.max_len = model.eval(), vocab, max_len
        self.device = torch.device(device)

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "cpu") -> Recommender:
        from asft.models.recommender import load_recommender

        model, vocab, meta = load_recommender(model_dir, device)
        max_len = int(meta.get("max_len") or model.config.max_position_embeddings)
        return cls(model, vocab, max_len, device)

    @torch.no_grad()
    def recommend(self, histories: list[list[str]], k: int = 10, exclude_history: bool = True,
                  batch_size: int = 256) -> list[Recommendation]:
        """Top-``k`` catalog items (ids and log-probabilities) for each history of raw item ids.

        Items missing from the catalog are ignored (and reported); a history with no known item
        raises ``ValueError`` naming its row.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k = min(k, self.vocab.n_items)
        encoded = [_encode(self.vocab, h) for h in histories]
        empty = [i for i, (toks, _) in enumerate(encoded) if len(toks) == 0]
        if empty:
            raise ValueError(f"rows {empty[:10]}: history has no item from the model's catalog")
        out: list[Recommendation] = []
        from asft.models.recommender import mask_special, next_item_logits

        for s in range(0, len(encoded), batch_size):
            chunk = encoded[s : s + batch_size]
            hist = [toks for toks, _ in chunk]
            ids, am = pad_right([h[-self.max_len:] for h in hist])
            logits = mask_special(next_item_logits(self.model, ids.to(self.device), am.to(self.device)).float())
            if exclude_history:
                mask_items(logits, hist)
            logp = torch.log_softmax(logits, dim=-1)
            top = torch.topk(logp, k, dim=-1)
            for (toks, unknown), vals, idx in zip(chunk, top.values.cpu().numpy(), top.indices.cpu().numpy()):
                keep = np.isfinite(vals)
                out.append(Recommendation(items=self.vocab.decode(idx[keep]), scores=[float(v) for v in vals[keep]],
                                          unknown_items=unknown))
        return out


class RewardScorer:
    """A saved reward ensemble scoring candidate items for a history: mean, std, pessimistic."""

    def __init__(self, ensemble):
        self.ensemble = ensemble

    @classmethod
    def load(cls, ensemble_dir: str | Path, device: str = "cpu") -> RewardScorer:
        from asft.models.reward import RewardEnsemble

        return cls(RewardEnsemble.load(ensemble_dir, device))

    def score(self, histories: list[list[str]], items: list[list[str]]) -> list[dict[str, list[float]]]:
        vocab = self.ensemble.vocab
        encoded = [_encode(vocab, h)[0] for h in histories]
        empty = [i for i, t in enumerate(encoded) if len(t) == 0]
        if empty:
            raise ValueError(f"rows {empty[:10]}: history has no item from the reward model's catalog")
        cands = []
        for row, its in enumerate(items):
            toks, unknown = _encode(vocab, its)
            if unknown:
                raise ValueError(f"row {row}: candidate items not in the catalog: {unknown[:10]}")
            cands.append(toks)
        max_len = int(self.ensemble.members[0].config.max_position_embeddings)
        scores = self.ensemble.score_all([t[-max_len:] for t in encoded])
        out = []
        for row, toks in enumerate(cands):
            out.append({key: [float(v) for v in arr[row, toks]] for key, arr in
                        (("mean", scores.mean), ("std", scores.std), ("pessimistic", scores.pessimistic))})
        return out
