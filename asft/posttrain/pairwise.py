"""Pairwise family: DPO and IPO on pairs of sampled candidates whose ensemble reward intervals do not
overlap (the pure losses are in :mod:`asft.losses`)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from asft.losses import dpo_loss, ipo_loss, weighted_nll
from asft.posttrain.collate import Example, context_log_probs, group_rows
from asft.sampling import TrainContexts, stack

PAIR_LOSSES = {"dpo": dpo_loss, "ipo": ipo_loss}


def preference_pairs(frame: pd.DataFrame, z: float, per_context: int, ref_col: str = "ref_logp") -> pd.DataFrame:
    """Pairs of sampled candidates ranked by the ensemble mean: best vs worst, second vs second-worst,
    ...; kept only where ``[mean - z std, mean + z std]`` intervals do not overlap."""
    mean, std = stack(frame, "r_mean"), stack(frame, "r_std")
    cands, ref = stack(frame, "candidates").astype(np.int64), stack(frame, ref_col)
    order = np.argsort(-mean, axis=1, kind="stable")
    rows = []
    n = mean.shape[1]
    ar = np.arange(len(frame))
    for j in range(min(per_context, n // 2)):
        w, lo = order[:, j], order[:, n - 1 - j]
        ok = mean[ar, w] - z * std[ar, w] > mean[ar, lo] + z * std[ar, lo]
        rows.append(pd.DataFrame({"window": frame["window"].to_numpy()[ok], "pos": frame["pos"].to_numpy()[ok],
                                  "chosen": cands[ar, w][ok], "rejected": cands[ar, lo][ok],
                                  "ref_w": ref[ar, w][ok], "ref_l": ref[ar, lo][ok]}))
    return pd.concat(rows, ignore_index=True)


def pair_examples(pairs: pd.DataFrame, tc: TrainContexts) -> list[Example]:
    """The pairs grouped by window, each with its context's logged next item (``item``, for the anchor)."""
    logged = np.array([tc.windows[w][p + 1] for w, p in zip(pairs["window"], pairs["pos"])], dtype=np.int64)
    return group_rows(pairs["window"].to_numpy(), pairs["pos"].to_numpy(),
                      {**{k: pairs[k].to_numpy() for k in ("chosen", "rejected", "ref_w", "ref_l")}, "item": logged})


def pairs_summary(pairs: pd.DataFrame, n_contexts: int) -> dict:
    return {"pairs": len(pairs), "contexts_with_pairs": int(pairs[["window", "pos"]].drop_duplicates().shape[0]),
            "contexts": n_contexts}


def count_rows(batch: dict) -> float:
    """Normaliser contribution of a batch of pairs: each pair weighs 1."""
    return float(len(batch["row_ctx"]))


def make_pair_loss(kind: str, beta: float, anchor: float = 0.0) -> Callable:
    """DPO/IPO loss over a batch of pairs; with ``anchor`` > 0 plus ``anchor`` x the mean over pairs of
    ``-log pi(logged item of the pair's context)``."""
    if kind not in PAIR_LOSSES:
        raise ValueError(f"unknown pair loss '{kind}'; choose from {sorted(PAIR_LOSSES)}")
    fn = PAIR_LOSSES[kind]

    def loss_fn(model, batch: dict, normalizer: float):
        logp = context_log_probs(model, batch)
        rc = batch["row_ctx"]
        pw, pl = logp[rc, batch["chosen"]], logp[rc, batch["rejected"]]
        loss = fn(pw, pl, batch["ref_w"], batch["ref_l"], beta, normalizer)
        if anchor > 0:
            loss = loss + anchor * weighted_nll(logp[rc, batch["item"]], None, normalizer)
        h = (pw.detach() - batch["ref_w"]) - (pl.detach() - batch["ref_l"])
        return loss, {"margin_sum": float(h.sum()), "pair_correct": float((h > 0).sum())}

    return loss_fn
