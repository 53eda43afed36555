"""Baselines, advantage estimators and weight transforms for A-SFT, registered by name (verl-style).

Rewards come as a dense ``[C, M]`` array: C contexts, M actions per context. The first ``n_sampled``
columns are candidates sampled from pi_ref (they define the per-context baselines); any further
columns (e.g. the logged action in the "mix" variant) get the same baseline. Candidates drawn
*without replacement* carry importance weights ``s`` (``sample_iw``, self-normalised per context)
so that sums over them estimate expectations under pi_ref:

    A(s, a) = r(s, a) - b(s)            (BASELINES; 'mean' and 'loo' are s-weighted means)
    A <- A / std(A)                     (optional global standardisation: lambda in units of std)
    w = T(A; lambda, ...) * s           (TRANSFORMS; per-context transforms are renormalised)

Adding an estimator or a transform is one decorated function. All transforms return non-negative
weights; the training loss divides by the global weight sum, so only relative weights matter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the config imports this module (lazily) to validate names: no runtime import back
    from asft.config import AdvantageConfig

BaselineFn = Callable[[np.ndarray, int, np.ndarray | None, np.ndarray], np.ndarray]
TransformFn = Callable[[np.ndarray, "AdvantageConfig"], tuple[np.ndarray, np.ndarray]]

# name -> function; filled by the decorators below at import (numpy only: no torch, no config)
BASELINES: dict[str, BaselineFn] = {}
TRANSFORMS: dict[str, TransformFn] = {}


def register_baseline(name: str):
    def deco(fn: BaselineFn) -> BaselineFn:
        BASELINES[name] = fn
        return fn

    return deco


def register_transform(name: str):
    def deco(fn: TransformFn) -> TransformFn:
        TRANSFORMS[name] = fn
        return fn

    return deco


def baseline_names() -> tuple[str, ...]:
    """Registered baselines b(s) (valid ``advantage.baseline`` values), in registration order."""
    return tuple(BASELINES)


def transform_names() -> tuple[str, ...]:
    """Registered weight transforms (valid ``advantage.transform`` values), in registration order."""
    return tuple(TRANSFORMS)


def _lookup(registry: dict, name: str, kind: str):
    if name not in registry:
        raise ValueError(f"unknown {kind} '{name}'; registered: {sorted(registry)}")
    return registry[name]


# ---------------------------------------------------------------------------- baselines b(s)
@register_baseline("mean")
def _mean(r: np.ndarray, n_sampled: int, expectation: np.ndarray | None, sw: np.ndarray) -> np.ndarray:
    """Mean reward of the sampled candidates of the context (importance-weighted)."""
    return np.broadcast_to((sw * r[:, :n_sampled]).sum(axis=1, keepdims=True), r.shape)


@register_baseline("loo")
def _loo(r: np.ndarray, n_sampled: int, expectation: np.ndarray | None, sw: np.ndarray) -> np.ndarray:
    """Leave-one-out mean (RLOO): a sampled candidate's baseline excludes itself; extra columns use the mean."""
    if n_sampled < 2:
        raise ValueError("the leave-one-out baseline needs at least 2 sampled candidates per context")
    rs = r[:, :n_sampled]
    tot, wsum = (sw * rs).sum(axis=1, keepdims=True), sw.sum(axis=1, keepdims=True)
    b = np.broadcast_to(tot / wsum, r.shape).copy()
    b[:, :n_sampled] = (tot - sw * rs) / np.maximum(wsum - sw, 1e-12)
    return b


@register_baseline("expectation")
def _expectation(r: np.ndarray, n_sampled: int, expectation: np.ndarray | None, sw: np.ndarray) -> np.ndarray:
    """Exact ``sum_a pi_ref(a|s) r(s,a)`` (computed over the whole catalog at sampling time)."""
    if expectation is None:
        raise ValueError("baseline 'expectation' needs the exact expected reward per context")
    return np.broadcast_to(np.asarray(expectation, dtype=np.float64)[:, None], r.shape)


@register_baseline("global_mean")
def _global_mean(r: np.ndarray, n_sampled: int, expectation: np.ndarray | None, sw: np.ndarray) -> np.ndarray:
    """One constant for all contexts (logged rewards: the mean observed rating)."""
    return np.full(r.shape, float(r.mean()) if r.size else 0.0)


@register_baseline("none")
def _none(r: np.ndarray, n_sampled: int, expectation: np.ndarray | None, sw: np.ndarray) -> np.ndarray:
    return np.zeros_like(r)


def _normalised_sample_weights(sample_weights: np.ndarray | None, c: int, n: int) -> np.ndarray:
    """Per-context self-normalised importance weights of the sampled columns ([C, n], rows sum to 1)."""
    if sample_weights is None:
        return np.full((c, n), 1.0 / n) if n else np.zeros((c, 0))
    sw = np.asarray(sample_weights, dtype=np.float64)
    if sw.shape != (c, n) or not np.isfinite(sw).all() or (sw < 0).any():
        raise ValueError(f"sample weights must be finite, non-negative and of shape {(c, n)}")
    return sw / np.maximum(sw.sum(axis=1, keepdims=True), 1e-300)


def advantages(rewards: np.ndarray, baseline: str, n_sampled: int | None = None,
               expectation: np.ndarray | None = None, standardize: bool = False,
               sample_weights: np.ndarray | None = None) -> np.ndarray:
    """``A = r - b(s)`` ([C, M]), optionally divided by its global std."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 2:
        raise ValueError(f"rewards must be [contexts, actions], got shape {r.shape}")
    if not np.isfinite(r).all():
        bad = np.argwhere(~np.isfinite(r))[:5].tolist()
        raise ValueError(f"non-finite rewards at (context, action) {bad}")
    n = r.shape[1] if n_sampled is None else n_sampled
    sw = _normalised_sample_weights(sample_weights, r.shape[0], n)
    a = r - _lookup(BASELINES, baseline, "baseline")(r, n, expectation, sw)
    if standardize:
        sd = float(a.std())
        a = a / sd if sd > 0 else a
    return a


# ---------------------------------------------------------------------------- weight transforms
@register_transform("exp")
def _exp(a: np.ndarray, cfg: AdvantageConfig) -> tuple[np.ndarray, np.ndarray]:
    """Global ``exp(A / lambda)``, clipped at ``w_max`` (as in AWR)."""
    z = a / cfg.lam
    cap = np.log(cfg.w_max)
    clipped = z > cap
    return np.exp(np.minimum(z, cap)), clipped


@register_transform("softmax")
def _softmax(a: np.ndarray, cfg: AdvantageConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per-context self-normalised ``softmax(A / lambda)`` over the context's actions, times M (mean 1)."""
    z = a / cfg.lam
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True) * a.shape[1], np.zeros(a.shape, dtype=bool)


@register_transform("linear")
def _linear(a: np.ndarray, cfg: AdvantageConfig) -> tuple[np.ndarray, np.ndarray]:
    """``w = A`` (reward-weighted regression), shifted up by the global minimum when A can be negative."""
    lo = min(0.0, float(a.min())) if a.size else 0.0
    return a - lo, np.zeros(a.shape, dtype=bool)


@register_transform("top_q")
def _top_q(a: np.ndarray, cfg: AdvantageConfig) -> tuple[np.ndarray, np.ndarray]:
    """Weight 1 for the top ``ceil(q * M)`` actions of each context by advantage, 0 otherwise."""
    m = a.shape[1]
    keep = max(1, int(np.ceil(cfg.top_q * m)))
    order = np.argsort(-a, axis=1, kind="stable")
    w = np.zeros_like(a)
    np.put_along_axis(w, order[:, :keep], 1.0, axis=1)
    return w, np.zeros(a.shape, dtype=bool)


@register_transform("ones")
def _ones(a: np.ndarray, cfg: AdvantageConfig) -> tuple[np.ndarray, np.ndarray]:
    """All weights 1: plain SFT on the actions."""
    return np.ones_like(a), np.zeros(a.shape, dtype=bool)


@dataclass
class Weights:
    advantages: np.ndarray  # [C, M]
    weights: np.ndarray  # [C, M], mean 1 over all entries (unless all zero)
    clipped: np.ndarray  # [C, M] bool
    stats: dict[str, float]


def weight_stats(w: np.ndarray, clipped: np.ndarray) -> dict[str, float]:
    """Effective sample size (share of n), share clipped, share zero and the spread of the weights."""
    w = np.asarray(w, dtype=np.float64).ravel()
    s, s2 = w.sum(), (w * w).sum()
    return {"n": float(w.size), "mean": float(w.mean()) if w.size else 0.0, "std": float(w.std()) if w.size else 0.0,
            "max": float(w.max()) if w.size else 0.0, "ess": float(s * s / s2) if s2 > 0 else 0.0,
            "ess_share": float(s * s / s2 / w.size) if s2 > 0 else 0.0,
            "clipped_share": float(np.asarray(clipped).mean()) if w.size else 0.0,
            "zero_share": float((w == 0).mean()) if w.size else 0.0}


PER_CONTEXT_TRANSFORMS = {"softmax"}


def compute_weights(rewards: np.ndarray, cfg: AdvantageConfig, n_sampled: int | None = None,
                    expectation: np.ndarray | None = None, baseline: str | None = None,
                    transform: str | None = None, sample_weights: np.ndarray | None = None) -> Weights:
    """Advantages and weights of ``rewards`` [C, M] with the configured (or given) estimator and transform.

    ``sample_weights`` [C, n_sampled] are the candidates' importance weights (see
    :func:`asft.sampling.inclusion_weights`); each sampled column's weight is multiplied by its
    self-normalised importance weight (times n_sampled, so uniform sampling leaves it unchanged).
    Weights are rescaled to mean 1 (a no-op for the loss, which divides by the weight sum) so that
    their statistics are comparable across methods."""
    r = np.asarray(rewards, dtype=np.float64)
    n = r.shape[1] if n_sampled is None else n_sampled
    name = transform or cfg.transform
    a = advantages(r, baseline or cfg.baseline, n, expectation, cfg.standardize, sample_weights)
    w, clipped = _lookup(TRANSFORMS, name, "weight transform")(a, cfg)
    if sample_weights is not None:
        factor = np.ones_like(w)
        factor[:, :n] = _normalised_sample_weights(sample_weights, r.shape[0], n) * n
        w = w * factor
        if name in PER_CONTEXT_TRANSFORMS:
            w = w / np.maximum(w.sum(axis=1, keepdims=True), 1e-300) * w.shape[1]
    mean = float(w.mean()) if w.size else 0.0
    if mean > 0:
        w = w / mean
    return Weights(a, w, clipped, weight_stats(w, clipped))
