"""Serving: top-K recommendations for raw item-id histories, and reward scores for (history, items).

Plain torch/transformers, no orchestration; ``tasks/pyfunc_model.py`` wraps these as MLflow pyfunc
models (so ``mlflow models serve`` answers recommendation requests). The input encoding is the one
the models were trained and evaluated with: the last ``max_len`` items of the history, right-padded,
no BOS; the next-item distribution is read at the last position; special tokens and (by default)
the items already in the history are never recommended.

Requests the model cannot answer as asked (``k`` < 1 or not an integer, a history that is not a
list of ids, unknown candidate items, a request over the :class:`ServingLimits`) raise
:class:`ServingInputError` naming the rows: a client error (HTTP 400 when served), never a crash.

**Cold start.** A history with no item of the model's catalog (empty, or only unknown ids) gets the
most popular items of the training data instead (:class:`Popularity`, saved with the served model
as ``popularity.json``): ranked by training-event count, scored by their add-one-smoothed
log-probability ``log((count + 1) / (events + items))``, flagged ``fallback == "popular"``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from asft.data.preprocess import NUM_SPECIAL, ItemVocab
from asft.evaluation import EVAL_COPIES, mask_items, pad_right, rows_per_chunk

POPULARITY_FILE = "popularity.json"
POPULAR = "popular"  # the ``fallback`` flag of a cold-start answer
MEMORY_MB = 256  # budget of one chunk of whole-catalogue scores while answering a request


class ServingInputError(ValueError):
    """A request the model cannot answer as asked: the client's error (HTTP 400 when served)."""


def _rows(rows: list[int], limit: int = 10) -> str:
    more = f" (+{len(rows) - limit} more)" if len(rows) > limit else ""
    return f"rows {rows[:limit]}{more}"


@dataclass(frozen=True)
class ServingLimits:
    """Bounds on one request (``None``: unbounded): rows per request and ids per history/candidate list."""

    max_rows: int | None = None
    max_history: int | None = None

    def check(self, histories: list, what: str = "history") -> None:
        if self.max_rows is not None and len(histories) > self.max_rows:
            raise ServingInputError(f"{len(histories)} rows in one request; at most {self.max_rows}"
                                    " (split the request)")
        if self.max_history is not None:
            long = [i for i, h in enumerate(histories) if len(h) > self.max_history]
            if long:
                raise ServingInputError(f"{_rows(long)}: {what} longer than {self.max_history} item ids"
                                        " (send the most recent ones)")


def check_histories(histories, what: str = "history") -> list[list[str]]:
    """Each row a list of item ids (strings or integers; ``None`` = empty), as strings."""
    if isinstance(histories, (str, bytes)) or not hasattr(histories, "__len__"):
        raise ServingInputError(f"{what}: expected one list of item ids per row, got {type(histories).__name__}")
    out, bad = [], []
    for row, h in enumerate(histories):
        if h is None:
            out.append([])
            continue
        if isinstance(h, (str, bytes, dict)) or not isinstance(h, (list, tuple, np.ndarray)):
            bad.append(row)
            continue
        ids = []
        for x in (h.tolist() if isinstance(h, np.ndarray) else h):
            if isinstance(x, (bool, np.bool_)) or not isinstance(x, (str, int, np.integer)) or x == "":
                bad.append(row)
                break
            ids.append(str(x))
        else:
            out.append(ids)
    if bad:
        raise ServingInputError(f"{_rows(bad)}: {what} must be a list of item ids (strings or integers)")
    return out


def check_k(k) -> int:
    """``k`` as an int >= 1 (an integral float such as 5.0 is accepted)."""
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer, float, np.floating)):
        raise ServingInputError(f"k must be an integer >= 1, got {k!r}")
    if isinstance(k, (float, np.floating)) and not (math.isfinite(k) and float(k).is_integer()):
        raise ServingInputError(f"k must be an integer >= 1, got {k!r}")
    if int(k) < 1:
        raise ServingInputError(f"k must be an integer >= 1, got {int(k)}")
    return int(k)


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
class Popularity:
    """Training-event count of every catalog item: the cold-start ranking (most popular first)."""

    items: list[str]  # catalog order
    counts: np.ndarray  # int64, aligned with ``items``

    @classmethod
    def from_counts(cls, vocab: ItemVocab, token_counts: np.ndarray) -> Popularity:
        """From per-token counts (``ProcessedData.item_popularity()``: special tokens first)."""
        token_counts = np.asarray(token_counts, dtype=np.int64)
        if token_counts.shape != (vocab.size,):
            raise ValueError(f"popularity: {token_counts.shape[0]} token counts for a vocabulary of {vocab.size}")
        return cls(items=list(vocab.items), counts=token_counts[NUM_SPECIAL:].copy())

    def to_json(self) -> dict:
        order = self.ranking()
        return {"description": "training-event count per catalog item, most popular first; the cold-start"
                " fallback of the served recommender", "events": int(self.counts.sum()),
                "items": [self.items[i] for i in order], "counts": [int(self.counts[i]) for i in order]}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json()))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Popularity:
        d = json.loads(Path(path).read_text())
        items, counts = [str(x) for x in d["items"]], np.asarray(d["counts"], dtype=np.int64)
        if len(items) != len(counts) or (counts < 0).any():
            raise ValueError(f"{path}: malformed popularity ({len(items)} items, {len(counts)} counts)")
        return cls(items=items, counts=counts)

    def ranking(self) -> np.ndarray:
        """Item positions by count, descending; ties in catalog order."""
        return np.argsort(-self.counts, kind="stable")

    def for_vocab(self, vocab: ItemVocab) -> tuple[np.ndarray, np.ndarray]:
        """(tokens most popular first, smoothed log-probability of each) over ``vocab``'s items."""
        by_id = dict(zip(self.items, self.counts.tolist()))
        missing = [i for i in vocab.items if i not in by_id]
        if missing:
            raise ValueError(f"popularity has no count for {len(missing)} catalog item(s), e.g. {missing[:5]}")
        counts = np.asarray([by_id[i] for i in vocab.items], dtype=np.int64)
        order = np.argsort(-counts, kind="stable")
        logp = np.log((counts[order] + 1.0) / (counts.sum() + len(counts)))
        return order + NUM_SPECIAL, logp


@dataclass
class Recommendation:
    items: list[str]
    scores: list[float]
    unknown_items: list[str]
    fallback: str | None = None  # "popular": a cold-start answer (no known item in the history)


class Recommender:
    """A saved generative recommender (``save_pretrained`` dir + item vocabulary) answering top-K."""

    def __init__(self, model, vocab, max_len: int, device: str | torch.device = "cpu",
                 popularity: Popularity | None = None, limits: ServingLimits | None = None,
                 memory_mb: float | None = MEMORY_MB):
        self.model, self.vocab, self.max_len, self.memory_mb = model.eval(), vocab, max_len, memory_mb
        self.device = torch.device(device)
        self.limits = limits or ServingLimits()
        self.popular = popularity.for_vocab(vocab) if popularity is not None else None

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "cpu", popularity: str | Path | None = None,
             limits: ServingLimits | None = None, memory_mb: float | None = MEMORY_MB) -> Recommender:
        """``popularity``: a ``popularity.json`` (the cold-start fallback); without it a history with
        no known item is refused."""
        from asft.models.recommender import load_recommender

        model, vocab, meta = load_recommender(model_dir, device)
        max_len = int(meta.get("max_len") or model.config.max_position_embeddings)
        pop = Popularity.load(popularity) if popularity is not None else None
        return cls(model, vocab, max_len, device, pop, limits, memory_mb)

    def _popular(self, exclude: np.ndarray, k: int) -> tuple[list[str], list[float]]:
        tokens, logp = self.popular
        if len(exclude):
            keep = ~np.isin(tokens, exclude)
            tokens, logp = tokens[keep], logp[keep]
        return self.vocab.decode(tokens[:k]), [float(v) for v in logp[:k]]

    @torch.no_grad()
    def recommend(self, histories: list[list[str]], k: int = 10, exclude_history: bool = True,
                  batch_size: int = 256) -> list[Recommendation]:
        """Top-``k`` catalog items (ids and log-probabilities) for each history of raw item ids.

        Items missing from the catalog are ignored (and reported). A history with no known item gets
        the popularity fallback (flagged ``"popular"``), or raises :class:`ServingInputError` naming
        its rows when the model carries none. ``k`` above the catalog size returns the whole catalog.
        At most ``batch_size`` histories are scored at once, fewer when their whole-catalogue scores
        would not fit ``memory_mb``.
        """
        k = check_k(k)
        histories = check_histories(histories)
        self.limits.check(histories)
        k = min(k, self.vocab.n_items)
        encoded = [_encode(self.vocab, h) for h in histories]
        cold = [i for i, (toks, _) in enumerate(encoded) if len(toks) == 0]
        if cold and self.popular is None:
            raise ServingInputError(f"{_rows(cold)}: history has no item from the model's catalog (and this"
                                    " model carries no popularity fallback)")
        out: list[Recommendation | None] = [None] * len(encoded)
        for i in cold:
            items, scores = self._popular(encoded[i][0], k)
            out[i] = Recommendation(items=items, scores=scores, unknown_items=encoded[i][1], fallback=POPULAR)
        warm = [i for i, (toks, _) in enumerate(encoded) if len(toks)]
        from asft.models.recommender import mask_special, next_item_logits

        step = rows_per_chunk(EVAL_COPIES * 4 * self.vocab.size, self.memory_mb, batch_size)
        for s in range(0, len(warm), step):
            rows = warm[s : s + step]
            hist = [encoded[i][0] for i in rows]
            ids, am = pad_right([h[-self.max_len:] for h in hist])
            logits = mask_special(next_item_logits(self.model, ids.to(self.device), am.to(self.device)).float())
            if exclude_history:
                mask_items(logits, hist)
            logp = torch.log_softmax(logits, dim=-1)
            top = torch.topk(logp, k, dim=-1)
            for i, vals, idx in zip(rows, top.values.cpu().numpy(), top.indices.cpu().numpy()):
                keep = np.isfinite(vals)
                out[i] = Recommendation(items=self.vocab.decode(idx[keep]), scores=[float(v) for v in vals[keep]],
                                        unknown_items=encoded[i][1])
        return out


class RewardScorer:
    """A saved reward ensemble scoring candidate items for a history: mean, std, pessimistic."""

    def __init__(self, ensemble, limits: ServingLimits | None = None, memory_mb: float | None = MEMORY_MB):
        self.ensemble, self.memory_mb = ensemble, memory_mb
        self.limits = limits or ServingLimits()

    @classmethod
    def load(cls, ensemble_dir: str | Path, device: str = "cpu", limits: ServingLimits | None = None,
             memory_mb: float | None = MEMORY_MB) -> RewardScorer:
        from asft.models.reward import RewardEnsemble

        return cls(RewardEnsemble.load(ensemble_dir, device), limits, memory_mb)

    def score(self, histories: list[list[str]], items: list[list[str]]) -> list[dict[str, list[float]]]:
        """Rewards of each row's candidate ``items`` after its history. A history with no known item
        and candidates outside the catalog raise :class:`ServingInputError` naming the rows (a reward
        has no cold-start answer)."""
        histories, items = check_histories(histories), check_histories(items, "items")
        if len(histories) != len(items):
            raise ServingInputError(f"{len(histories)} histories but {len(items)} candidate lists")
        self.limits.check(histories)
        self.limits.check(items, "items")
        vocab = self.ensemble.vocab
        encoded = [_encode(vocab, h)[0] for h in histories]
        empty = [i for i, t in enumerate(encoded) if len(t) == 0]
        if empty:
            raise ServingInputError(f"{_rows(empty)}: history has no item from the reward model's catalog")
        cands, bad = [], {}
        for row, its in enumerate(items):
            toks, unknown = _encode(vocab, its)
            if unknown:
                bad[row] = unknown
            cands.append(toks)
        if bad:
            row, unknown = next(iter(bad.items()))
            raise ServingInputError(f"{_rows(list(bad))}: candidate items not in the catalog (row {row}:"
                                    f" {unknown[:10]})")
        max_len = int(self.ensemble.members[0].config.max_position_embeddings)
        out = []
        # the ensemble scores the whole catalog per row (members x rows x items): in chunks of rows
        # that fit memory_mb
        for start, scores in self.ensemble.score_chunks([t[-max_len:] for t in encoded], memory_mb=self.memory_mb):
            for row in range(scores.mean.shape[0]):
                toks = cands[start + row]
                out.append({key: [float(v) for v in arr[row, toks]] for key, arr in
                            (("mean", scores.mean), ("std", scores.std), ("pessimistic", scores.pessimistic))})
        return out
