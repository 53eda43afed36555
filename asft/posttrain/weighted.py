"""Weighted family: SFT, RWR and the A-SFT variants (and the rounds of RFT).

Each method's builder maps the scored candidate frame to items [C, M] and their :class:`Weights`;
the loss is ``-sum(w * log pi(a|s)) / sum(w)`` over the optimizer batch (the global weight sum:
gradient accumulation and data parallelism do not change it). With ``posttrain.mask_history``
``pi`` is the history-masked policy, the distribution the candidates were sampled from."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd

from asft.advantages import Weights, compute_weights
from asft.config import Config
from asft.losses import weighted_nll
from asft.posttrain.collate import Example, context_log_probs, group_rows
from asft.posttrain.registry import get_method
from asft.sampling import stack


# ---------------------------------------------------------------------------- loss and rows
def weighted_loss(model, batch: dict, normalizer: float):
    """``-sum(w log pi(a|s)) / normalizer`` with ``normalizer`` the optimizer batch's global weight sum."""
    logp = context_log_probs(model, batch)
    lp = logp[batch["row_ctx"], batch["item"]]
    return weighted_nll(lp, batch["weight"], normalizer), {"weighted_logp": float((lp * batch["weight"]).sum().detach())}


def count_weight(batch: dict) -> float:
    return float(batch["weight"].sum())


def weighted_examples(frame: pd.DataFrame, items: np.ndarray, weights: np.ndarray) -> list[Example]:
    """Rows (context, item, weight) with a positive weight, grouped by window."""
    c, m = items.shape
    keep = weights.ravel() > 0
    rep = np.repeat(np.arange(c), m)[keep]
    return group_rows(frame["window"].to_numpy()[rep], frame["pos"].to_numpy()[rep],
                      {"item": items.ravel()[keep].astype(np.int64), "weight": weights.ravel()[keep].astype(np.float64)})


def with_anchor(items: np.ndarray, w: np.ndarray, frame: pd.DataFrame, anchor: float) -> tuple[np.ndarray, np.ndarray]:
    """Each context's logged item appended with weight ``anchor`` (unchanged when ``anchor`` <= 0)."""
    if anchor <= 0:
        return items, w
    logged = _logged(frame)
    return np.concatenate([items, logged], axis=1), np.concatenate([w, np.full(logged.shape, anchor)], axis=1)


# ---------------------------------------------------------------------------- per-method weights
def _logged(frame: pd.DataFrame) -> np.ndarray:
    return frame["logged"].to_numpy(np.int64)[:, None]


def _logged_ratings(frame: pd.DataFrame) -> tuple[np.ndarray, bool]:
    """The logged items' ratings and whether every context has one."""
    rating = frame["logged_rating"].to_numpy(np.float64)
    return rating, bool(np.isfinite(rating).all()) and len(rating) > 0


class _Candidates(NamedTuple):
    items: np.ndarray  # [C, N] sampled candidates
    rewards: np.ndarray  # [C, N] ensemble reward (advantage.reward: mean or pessimistic)
    logged_reward: np.ndarray  # [C]
    expected: np.ndarray  # [C] exact expected reward under pi_ref
    sample_iw: np.ndarray | None  # [C, N] inclusion weights of sampling without replacement


def _candidates(frame: pd.DataFrame, cfg: Config) -> _Candidates:
    key = "pess" if cfg.advantage.reward == "pessimistic" else "mean"
    return _Candidates(stack(frame, "candidates").astype(np.int64), stack(frame, f"r_{key}"),
                       frame[f"logged_r_{key}"].to_numpy(), frame[f"expected_r_{key}"].to_numpy(),
                       stack(frame, "sample_iw") if "sample_iw" in frame else None)


def sft_weights(frame: pd.DataFrame, cfg: Config) -> tuple[np.ndarray, Weights]:
    logged = _logged(frame)
    return logged, compute_weights(np.zeros(logged.shape), cfg.advantage, baseline="none", transform="ones")


def anchor_only_weights(frame: pd.DataFrame, cfg: Config) -> tuple[np.ndarray, Weights]:
    cands = stack(frame, "candidates").astype(np.int64)
    return cands, compute_weights(np.zeros(cands.shape), cfg.advantage, baseline="none", transform="ones")


def rwr_weights(frame: pd.DataFrame, cfg: Config) -> tuple[np.ndarray, Weights]:
    """w = r, the logged rating where every context has one, else the ensemble's reward of the logged item."""
    rating, has_rating = _logged_ratings(frame)
    r = rating if has_rating else frame["logged_r_mean"].to_numpy(np.float64)
    return _logged(frame), compute_weights(r[:, None], cfg.advantage, baseline="none", transform="linear")


def asft_logged_weights(frame: pd.DataFrame, cfg: Config) -> tuple[np.ndarray, Weights]:
    rating, has_rating = _logged_ratings(frame)
    if not has_rating:
        raise ValueError("asft_logged needs logged ratings (this dataset has none); use asft or asft_mix")
    return _logged(frame), compute_weights(rating[:, None], cfg.advantage, baseline="global_mean", transform="exp")


def asft_weights(frame: pd.DataFrame, cfg: Config) -> tuple[np.ndarray, Weights]:
    c = _candidates(frame, cfg)
    return c.items, compute_weights(c.rewards, cfg.advantage, n_sampled=c.items.shape[1], expectation=c.expected,
                                    sample_weights=c.sample_iw)


def asft_mix_weights(frame: pd.DataFrame, cfg: Config) -> tuple[np.ndarray, Weights]:
    c = _candidates(frame, cfg)
    return (np.concatenate([c.items, _logged(frame)], axis=1),
            compute_weights(np.concatenate([c.rewards, c.logged_reward[:, None]], axis=1), cfg.advantage,
                            n_sampled=c.items.shape[1], expectation=c.expected, sample_weights=c.sample_iw))


def filter_weights(frame: pd.DataFrame, cfg: Config, keep_frac: float) -> tuple[np.ndarray, Weights]:
    """Rejection sampling: weight 1 for the top ``keep_frac`` share of each context's candidates by reward."""
    c = _candidates(frame, cfg)
    return c.items, compute_weights(c.rewards, cfg.advantage.model_copy(update={"top_q": keep_frac}),
                                    baseline="none", transform="top_q", sample_weights=c.sample_iw)


def method_weights(method: str, frame: pd.DataFrame, cfg: Config, keep_frac: float | None = None
                   ) -> tuple[np.ndarray, Weights]:
    """Items [C, M] and their weights for a weighted-family method, or with ``keep_frac`` an RFT round's."""
    if keep_frac is not None:
        return filter_weights(frame, cfg, keep_frac)
    spec = get_method(method)
    if spec.family != "weighted":
        raise ValueError(f"method '{method}' is of the {spec.family} family; weights exist for the weighted family")
    return spec.load_builder()(frame, cfg)
