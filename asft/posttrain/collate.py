"""Training rows of post-training: examples (one per window), their collation into model inputs with
the distinct context positions, and the policy's log-probabilities at those contexts."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from asft.data.preprocess import NUM_SPECIAL
from asft.models.recommender import backbone
from asft.sampling import TrainContexts, collate_inputs, history_mask


@dataclass
class Example:
    """Training rows of one window: ``pos`` [M] context positions and per-row payload arrays."""

    window: int
    pos: np.ndarray
    data: dict[str, np.ndarray]


def group_rows(windows: np.ndarray, pos: np.ndarray, payload: dict[str, np.ndarray]) -> list[Example]:
    """Rows (one per window/position/...) grouped into one Example per window (windows ascending)."""
    order = np.lexsort((pos, windows))
    windows, pos = windows[order], pos[order]
    payload = {k: v[order] for k, v in payload.items()}
    uniq, first = np.unique(windows, return_index=True)
    bounds = list(first[1:]) + [len(windows)]
    return [Example(int(w), pos[a:b], {k: v[a:b] for k, v in payload.items()}) for w, a, b in zip(uniq, first, bounds)]


def context_examples(tc: TrainContexts) -> list[Example]:
    """Every scored position of every training window, with its logged next item (``item``)."""
    return [Example(i, tc.positions(i), {"item": tc.windows[i][tc.positions(i) + 1]}) for i in range(len(tc.windows))]


def collate_examples(tc: TrainContexts, examples: list[Example], with_history: bool = False,
                     next_horizon: int = 0) -> dict:
    """Inputs of the examples' windows, the distinct context positions (``ctx_b``, ``ctx_t``), a
    row -> context index (``row_ctx``), the payload arrays concatenated, and optionally each
    context's history mask [C, V] and real next items [C, H] (-1 padded)."""
    ids, am = collate_inputs(tc, [e.window for e in examples])
    ctx_b, ctx_t, row_ctx = [], [], []
    offset = 0
    for b, e in enumerate(examples):
        uniq = np.unique(e.pos)
        ctx_b.append(np.full(len(uniq), b))
        ctx_t.append(uniq)
        row_ctx.append(offset + np.searchsorted(uniq, e.pos))
        offset += len(uniq)
    batch = {"input_ids": ids, "attention_mask": am,
             "ctx_b": torch.from_numpy(np.concatenate(ctx_b).astype(np.int64)),
             "ctx_t": torch.from_numpy(np.concatenate(ctx_t).astype(np.int64)),
             "row_ctx": torch.from_numpy(np.concatenate(row_ctx).astype(np.int64))}
    for k in examples[0].data:
        v = np.concatenate([e.data[k] for e in examples])
        batch[k] = torch.from_numpy(v.astype(np.float32 if v.dtype.kind == "f" else np.int64))
    if with_history:
        batch["hist_mask"] = _history_mask(tc, examples, batch)
    if next_horizon:
        batch["next_items"] = _next_items(tc, examples, batch, next_horizon)
    return batch


def _history_mask(tc: TrainContexts, examples: list[Example], batch: dict) -> torch.Tensor:
    """[C, V]: True for the specials and the items consumed before each context, except the row's
    own logged/chosen/rejected item (a logged repeat consumption stays a valid target)."""
    hm = history_mask(batch["input_ids"], tc.vocab_size,
                      [tc.before(e.window) for e in examples])[batch["ctx_b"], batch["ctx_t"]]
    hm[:, :NUM_SPECIAL] = True
    for key in ("item", "chosen", "rejected"):
        if key in batch:
            hm[batch["row_ctx"], batch[key]] = False
    return hm


def _next_items(tc: TrainContexts, examples: list[Example], batch: dict, horizon: int) -> torch.Tensor:
    """[C, horizon]: each context's real next training items, -1 padded."""
    nxt = np.full((len(batch["ctx_b"]), horizon), -1, dtype=np.int64)
    for c, (b, t) in enumerate(zip(batch["ctx_b"].tolist(), batch["ctx_t"].tolist())):
        items = tc.next_items(examples[b].window, t, horizon)
        nxt[c, : len(items)] = items
    return torch.from_numpy(nxt)


def context_log_probs(model, batch: dict) -> torch.Tensor:
    """log pi(.|s) at the batch's distinct contexts: [C, V]. With a ``hist_mask`` in the batch this is
    the history-masked policy (the distribution recommendations and candidates are drawn from);
    without, the full softmax of SFT."""
    h = backbone(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    logits = model.lm_head(h[batch["ctx_b"], batch["ctx_t"]]).float()
    if "hist_mask" in batch:
        logits = logits.masked_fill(batch["hist_mask"], float("-inf"))
    return torch.log_softmax(logits, dim=-1)


def masked_logits(model, batch: dict) -> torch.Tensor:
    """Float logits [C, V] at the batch's distinct contexts with the history mask applied (-inf)."""
    h = backbone(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return model.lm_head(h[batch["ctx_b"], batch["ctx_t"]]).float().masked_fill(batch["hist_mask"], float("-inf"))

