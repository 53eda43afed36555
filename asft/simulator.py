"""The built-in simulator: a seeded, deterministic source of sequential interaction logs.

It is the pipeline's embedded default data source (``data.source: simulator``) and, because it
knows the *true* utility of every item for every user state, it is also the oracle that scores a
policy's recommendations in true reward (:meth:`Simulator.expected_reward`).

Model (all randomness from ``numpy.random`` seeded by ``seed``; same config + seed gives
byte-identical output):

* Users have a base latent taste ``theta_u ~ N(0, I_dim) / sqrt(dim)``; items have latent features
  ``phi_i ~ N(0, I_dim) / sqrt(dim)``, a quality bias ``b_i`` and a Zipf-like popularity
  ``pop_i ∝ rank_i ** -popularity_alpha``, where the ranks follow a noisy ordering by quality (so
  popularity is mildly, not perfectly, correlated with quality).
* Sequential dynamics: the user's taste state starts at ``theta_u`` and after consuming item ``i``
  moves ``z <- (1 - taste_drift) * z + taste_drift * phi_i`` and is renormalised to ``|theta_u|``.
  The order of a history therefore matters.
* True utility: ``u(z, i) = UTILITY_SCALE * sqrt(dim) * z . phi_i + b_i`` (std ~0.9;
  98% within [-2.1, 2.4], extremes ~ +-5 by default).
* Logging policy ``pi_beta``: the next item is drawn from a softmax over the items the user has
  not consumed yet of ``u(z, i) / logging_temperature + exposure_bias * log(pop_i)``.
* Ratings 1-5: ``clip(round(RATING_CENTER + RATING_SLOPE * u_std + N(0, rating_noise)), 1, 5)``,
  ``u_std`` the utility standardised by the catalog-wide mean/std of ``u(theta, .)``.
* History lengths are uniform in ``[min_len, max_len]``. Timestamps (int64 seconds) start at
  ``start_timestamp``; each user starts at a random offset and events are separated by short
  in-session gaps, occasional session breaks and a few exact ties (same second).

The interaction rows are in true event order: sorted by timestamp, ties across users by user
index, and ties within a user in the order the events happened. Downstream code must break
timestamp ties by row order (stable sort).

How it is computed (none of this changes the model above):

* Users are simulated in blocks of ``USER_CHUNK``, all users of a block stepping together (numpy,
  no per-user loop); each block has its own child random stream of the seed, so the log does not
  depend on how many processes generate it (``generate(workers=...)``).
* The logging softmax is sampled exactly without scoring the whole catalog at every step
  (``Simulator._sample_next``): the ``HEAD_ITEMS`` items of largest static weight
  ``b_i / T + exposure_bias * log(pop_i)`` are scored exactly; the others are grouped into cells
  (k-means centres of ``phi``, split by distance to the centre) whose weight is bounded by
  Cauchy-Schwarz, ``z . phi_i <= z . mu_k + |z| R_k``; an item drawn from a cell is accepted with
  probability (true weight) / (bound) and consumed items are rejected, so accepted draws follow the
  softmax over the unconsumed items exactly (rejection sampling). Catalogs no larger than
  ``HEAD_ITEMS`` are sampled by inverse CDF over the exact softmax. (The sizes of the head, the
  cells and the rounds set the speed only: fastest in CPU time of those tried at 60k items.)
* The oracle never builds a users x items matrix: the rating reference (mean/std of
  ``u(theta_u, i)`` over all pairs) is computed in closed form, taste states and event utilities
  replay histories position by position, :meth:`Simulator.expected_reward` scores only the
  recommended items, and :meth:`Simulator.utility_table` gives lazily computed utilities.
  :meth:`Simulator.utility` and :meth:`Simulator.logging_probs` return dense
  ``[n_contexts, n_items]`` arrays: for small sets of contexts.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from asft.config import SimulatorConfig
from asft.data.schema import GENRES, ITEM, RATING, TITLE, TS, USER, InteractionData

__all__ = ["SIMULATOR_FORMAT", "Simulator", "UtilityTable", "simulate"]

SIMULATOR_FORMAT = "simulator"
_NPZ_NAME = "simulator.npz"
_JSON_NAME = "simulator.json"
_FILE_VERSION = 1

# ---- model constants (not configuration: they fix the shape of the simulated world) -------------
UTILITY_SCALE = 0.8  # multiplies sqrt(dim) * z . phi  (z . phi has std ~ 1/sqrt(dim))
BIAS_STD = 0.4  # std of the item quality bias b_i
POP_QUALITY_NOISE = 2.0  # noise (in bias std units) in the quality ordering that sets popularity ranks
SECOND_GENRE_RATIO = 0.7  # an item gets a second genre when its 2nd feature is >= this * the 1st
# Ratings: RATING_CENTER + RATING_SLOPE * u_std (+ noise). u_std is relative to the catalog-wide mean of
# u(theta, .); logged items sit ~1.3 std above it under the default logging policy, so these
# constants give a MovieLens-like mean of ~3.5 there (a more exploratory logging policy rates lower).
RATING_CENTER = 2.3
RATING_SLOPE = 1.0
# Timestamps.
USER_START_SPAN_S = 180 * 86_400  # users start uniformly within ~6 months
TIE_PROB = 0.04  # probability that an event has exactly the same second as the previous one
SESSION_BREAK_PROB = 0.15  # probability that a gap is a break between sessions
IN_SESSION_GAP_MEDIAN_S = 120.0  # log-normal in-session gaps
IN_SESSION_GAP_SIGMA = 1.0
SESSION_BREAK_MEAN_S = 2.0 * 86_400  # exponential session breaks


# Sampler of the logging policy (computation only: the sampled distribution does not depend on these).
HEAD_ITEMS = 128  # items with the largest static weight, scored exactly at every step
TAIL_CENTRES = 128  # k-means centres of the other items' features
RESIDUAL_BINS = 2  # each centre's items split by distance to it: one cell (own radius) per bin
ROUND_DRAWS = 16  # proposals drawn per pending user in the first round (the first accepted one is kept)
MAX_ROUND_DRAWS = 1024  # ... doubling each further round up to this
KMEANS_ITERS = 8
USER_CHUNK = 2048  # users simulated together (each block has its own random stream)


@dataclass(frozen=True)
class _Proposal:
    """Static tables of the logging policy's exact rejection sampler (see ``Simulator._sample_next``).

    Item ``i`` has static log-weight ``la_i = b_i / T + exposure_bias * log(pop_i)`` and logit
    ``la_i + c * z . phi_i`` with ``c = UTILITY_SCALE * sqrt(dim) / T``. The ``n_head`` items of largest
    ``la`` are scored exactly; the others are grouped into k-means centres of ``phi``, and each centre's
    items into ``RESIDUAL_BINS`` cells by their distance to it.
    """

    c: float
    head: np.ndarray  # [H] item indices
    phi_head: np.ndarray  # [H, dim]
    la_head: np.ndarray  # [H]
    weight: np.ndarray  # [n_items] exp(la - max la)
    centers: np.ndarray  # [C, dim]
    cell_center: np.ndarray  # [K] centre of each cell
    radius: np.ndarray  # [K] max |phi_i - centre| over the cell (slightly inflated)
    log_mass: np.ndarray  # [K] log of the cell's static weight (in la units)
    layout: np.ndarray  # tail items ordered by cell
    cell_start: np.ndarray  # [K + 1] offsets into layout
    cell_cum: np.ndarray  # [n_tail] k + normalised cumulative static weight inside cell k
    delta: np.ndarray  # [n_tail, dim] c * (phi_i - centre of its cell), in layout order
    c_radius: np.ndarray  # [K] c * radius

    @property
    def n_head(self) -> int:
        return len(self.head)

    @property
    def n_cells(self) -> int:
        return len(self.radius)

    @classmethod
    def build(cls, sim: Simulator, head: int, centres: int, bins: int = RESIDUAL_BINS) -> _Proposal:
        cfg = sim.cfg
        temp = cfg.logging_temperature
        with np.errstate(divide="ignore"):
            la = sim.bias / temp + cfg.exposure_bias * np.log(sim.pop)
        order = np.argsort(-la, kind="stable")
        head_idx = np.sort(order[: min(max(head, 0), sim.n_items)])
        tail = np.sort(order[len(head_idx):])
        la_max = float(la.max())
        weight = np.exp(la - la_max)
        rng = np.random.default_rng(np.random.SeedSequence(sim.seed).spawn(3)[2])
        centers, assign = _kmeans(sim.phi[tail], min(max(centres, 1), len(tail)), rng)
        resid = np.linalg.norm(sim.phi[tail] - centers[assign], axis=1)
        # Residual bin inside the centre: rank of the residual among the centre's items.
        by = np.lexsort((resid, assign))
        size_c = np.bincount(assign, minlength=len(centers))
        start_c = np.concatenate([[0], np.cumsum(size_c)])
        rank = np.empty(len(tail), dtype=np.int64)
        rank[by] = np.arange(len(tail)) - np.repeat(start_c[:-1], size_c)
        nb = max(int(bins), 1)
        sub = assign * nb + (rank * nb) // np.maximum(size_c[assign], 1)
        used, cell = np.unique(sub, return_inverse=True)
        layout_order = np.argsort(cell, kind="stable")
        layout, cell = tail[layout_order], cell[layout_order]
        size = np.bincount(cell, minlength=len(used))
        start = np.concatenate([[0], np.cumsum(size)])
        radius = np.zeros(len(used))
        np.maximum.at(radius, cell, resid[layout_order])
        radius = radius * (1 + 1e-9) + 1e-12  # keeps the bound above rounding error
        w = weight[layout]
        mass = np.bincount(cell, weights=w, minlength=len(used))
        local = _segment_cumsum(w, start)
        cell_cum = cell + np.divide(local, mass[cell], out=np.ones_like(local), where=mass[cell] > 0)
        cell_cum[start[1:] - 1] = np.arange(len(used)) + 1.0
        with np.errstate(divide="ignore"):
            log_mass = np.log(mass) + la_max
        return cls(c=sim._scale / temp, head=head_idx, phi_head=np.ascontiguousarray(sim.phi[head_idx]),
                   la_head=la[head_idx], weight=weight, centers=centers, cell_center=used // nb,
                   radius=radius, log_mass=log_mass, layout=layout, cell_start=start, cell_cum=cell_cum,
                   delta=np.ascontiguousarray(sim._scale / temp * (sim.phi[layout] - centers[(used // nb)[cell]])),
                   c_radius=sim._scale / temp * radius)


def _segment_cumsum(w: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Cumulative sums of ``w`` restarting at each offset in ``start`` (each segment summed on its own)."""
    out = np.empty_like(w)
    for a, b in itertools.pairwise(start):
        np.cumsum(w[a:b], out=out[a:b])
    return out


def _kmeans(x: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means (seeded, ``KMEANS_ITERS`` rounds): centres ``[k', dim]`` and assignments (empty
    cells dropped). Only the sampler's speed depends on how good the cells are."""
    if len(x) == 0:
        return np.zeros((0, x.shape[1])), np.zeros(0, dtype=np.int64)
    centers = x[np.sort(rng.choice(len(x), size=k, replace=False))].copy()
    for _ in range(KMEANS_ITERS + 1):
        assign = _nearest(x, centers)
        counts = np.bincount(assign, minlength=len(centers))
        keep = counts > 0
        sums = np.stack([np.bincount(assign, weights=x[:, j], minlength=len(centers)) for j in range(x.shape[1])], 1)
        centers = sums[keep] / counts[keep, None]
    return centers, _nearest(x, centers)


def _nearest(x: np.ndarray, centers: np.ndarray, chunk: int = 65536) -> np.ndarray:
    c2 = (centers**2).sum(axis=1)
    return np.concatenate([np.argmin(c2[None, :] - 2.0 * (x[a:a + chunk] @ centers.T), axis=1)
                           for a in range(0, len(x), chunk)])


class Simulator:
    """A seeded synthetic world of users and items with known true utilities.

    Parameters are built in ``__init__`` from ``np.random.SeedSequence(seed)``; :meth:`generate`
    draws the interaction log from an independent child stream of the same seed, so calling it
    again (or on a re-loaded simulator) reproduces the same log.
    """

    def __init__(self, cfg: SimulatorConfig, seed: int):
        seed = int(seed)
        if seed < 0:
            raise ValueError(f"simulator seed must be a non-negative integer, got {seed}")
        if cfg.min_len > cfg.max_len:
            raise ValueError(
                f"simulator.min_len ({cfg.min_len}) must be <= simulator.max_len ({cfg.max_len})"
            )
        if cfg.max_len > cfg.n_items:
            raise ValueError(
                f"simulator.max_len ({cfg.max_len}) must be <= simulator.n_items ({cfg.n_items}):"
                " a user never consumes the same item twice"
            )
        self.cfg = cfg
        self.seed = seed
        params_rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[0])
        d, n_u, n_i = cfg.dim, cfg.n_users, cfg.n_items

        theta = params_rng.standard_normal((n_u, d)) / math.sqrt(d)
        phi = params_rng.standard_normal((n_i, d)) / math.sqrt(d)
        bias = BIAS_STD * params_rng.standard_normal(n_i)
        # Popularity: Zipf over a noisy quality ordering (rank 1 = most popular).
        key = bias / BIAS_STD + POP_QUALITY_NOISE * params_rng.standard_normal(n_i)
        ranks = np.empty(n_i, dtype=np.int64)
        ranks[np.argsort(-key, kind="stable")] = np.arange(1, n_i + 1)
        pop = ranks.astype(np.float64) ** (-cfg.popularity_alpha)
        pop /= pop.sum()
        self._set_params(theta, phi, bias, pop)

    # ------------------------------------------------------------------ parameters and ids
    def _set_params(self, theta: np.ndarray, phi: np.ndarray, bias: np.ndarray, pop: np.ndarray) -> None:
        self.theta = np.ascontiguousarray(theta, dtype=np.float64)
        self.phi = np.ascontiguousarray(phi, dtype=np.float64)
        self.bias = np.ascontiguousarray(bias, dtype=np.float64)
        self.pop = np.ascontiguousarray(pop, dtype=np.float64)
        self.n_users, self.n_items = self.theta.shape[0], self.phi.shape[0]
        self.dim = self.theta.shape[1]
        self.user_ids: list[str] = [f"u{k}" for k in range(self.n_users)]
        self.item_ids: list[str] = [f"i{k}" for k in range(self.n_items)]
        self._user_index = {u: k for k, u in enumerate(self.user_ids)}
        self._item_index = {i: k for k, i in enumerate(self.item_ids)}
        self._theta_norm = np.linalg.norm(self.theta, axis=1)
        self._scale = UTILITY_SCALE * math.sqrt(self.dim)
        # Catalog-wide reference for standardising utilities into ratings: mean and std of u(theta_u, i)
        # over all (user, item) pairs, in closed form (no users x items matrix).
        self.utility_mean, self.utility_std = self._base_utility_moments()
        self.genres = self._make_genres()

    def _base_utility_moments(self) -> tuple[float, float]:
        """Mean and (population) std of ``u(theta_u, i) = s * theta_u . phi_i + b_i`` over all pairs.

        ``E[(s theta.phi + b)^2] = s^2 tr(E[theta theta^T] E[phi phi^T]) + 2 s E[theta] . E[phi b] + E[b^2]``
        since users and items are crossed: O((users + items) * dim^2) instead of users x items."""
        s, th, ph, b = self._scale, self.theta, self.phi, self.bias
        m_th, m_ph = th.mean(axis=0), ph.mean(axis=0)
        mean = float(s * (m_th @ m_ph) + b.mean())
        second = (s * s * float(np.sum((th.T @ th / len(th)) * (ph.T @ ph / len(ph))))
                  + 2.0 * s * float(m_th @ (ph.T @ b / len(b))) + float(np.mean(b * b)))
        var = max(second - mean * mean, 0.0)
        return mean, math.sqrt(var) or 1.0

    def _make_genres(self) -> list[str]:
        order = np.argsort(-self.phi, axis=1, kind="stable")
        top1 = order[:, 0]
        top2 = order[:, 1] if self.dim > 1 else order[:, 0]
        rows = np.arange(self.n_items)
        v1, v2 = self.phi[rows, top1], self.phi[rows, top2]
        second = (self.dim > 1) & (v2 > 0) & (v2 >= SECOND_GENRE_RATIO * v1)
        out = []
        for k in range(self.n_items):
            names = [f"genre_{top1[k]}"]
            if second[k]:
                names.append(f"genre_{top2[k]}")
            out.append("|".join(names))
        return out

    @staticmethod
    def _lookup(index: dict, ids: Sequence[str], kind: str, prefix: str, n: int) -> np.ndarray:
        try:
            return np.fromiter((index[str(x)] for x in ids), dtype=np.int64, count=len(ids))
        except KeyError as e:
            raise KeyError(
                f"unknown simulator {kind} id {e.args[0]!r} (expected '{prefix}0'..'{prefix}{n - 1}')"
            ) from None

    def _uidx(self, user_ids: Sequence[str]) -> np.ndarray:
        return self._lookup(self._user_index, user_ids, "user", "u", self.n_users)

    def _iidx(self, item_ids: Sequence[str]) -> np.ndarray:
        return self._lookup(self._item_index, item_ids, "item", "i", self.n_items)

    # ------------------------------------------------------------------ dynamics and utility
    def _step_states(self, z: np.ndarray, items: np.ndarray, norms: np.ndarray, active: np.ndarray) -> None:
        """In place: move the states ``z[active]`` toward ``phi[items[active]]``."""
        drift = self.cfg.taste_drift
        if drift == 0 or not active.any():
            return
        new = (1.0 - drift) * z[active] + drift * self.phi[items[active]]
        n = np.linalg.norm(new, axis=1)
        new *= (norms[active] / np.where(n > 0, n, 1.0))[:, None]
        z[active] = new

    def _utility_from_states(self, z: np.ndarray, item_idx: np.ndarray | None = None) -> np.ndarray:
        if item_idx is None:
            return self._scale * (z @ self.phi.T) + self.bias[None, :]
        return self._scale * (z @ self.phi[item_idx].T) + self.bias[item_idx][None, :]

    def _walk(self, z: np.ndarray, rows: np.ndarray, pos: np.ndarray, items: np.ndarray,
              score: bool = False) -> np.ndarray | None:
        """In place: move ``z[rows[e]]`` toward ``phi[items[e]]`` for the events ``e`` in the order of
        ``pos`` (an event's position in its row's history); optionally return each event's utility under
        the state before it. Memory O(events + rows), no padding."""
        out = np.empty(len(items)) if score else None
        if len(items) == 0:
            return out
        norms = np.linalg.norm(z, axis=1)
        by_pos = np.argsort(pos, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(np.bincount(pos))])
        drift = self.cfg.taste_drift
        for t in range(len(bounds) - 1):
            sel = by_pos[bounds[t]:bounds[t + 1]]
            r, it = rows[sel], items[sel]
            if score:
                out[sel] = self._scale * np.einsum("nd,nd->n", z[r], self.phi[it]) + self.bias[it]
            if drift:
                new = (1.0 - drift) * z[r] + drift * self.phi[it]
                n = np.linalg.norm(new, axis=1)
                new *= (norms[r] / np.where(n > 0, n, 1.0))[:, None]
                z[r] = new
        return out

    def _states(self, user_ids: Sequence[str], histories: Sequence[Sequence[str]]) -> np.ndarray:
        if len(user_ids) != len(histories):
            raise ValueError(f"{len(user_ids)} user ids but {len(histories)} histories")
        z = self.theta[self._uidx(user_ids)].copy()
        lens = np.fromiter((len(h) for h in histories), dtype=np.int64, count=len(histories))
        if lens.sum() == 0:
            return z
        flat = self._iidx([i for h in histories for i in h])
        rows = np.repeat(np.arange(len(histories)), lens)
        pos = np.arange(len(flat)) - np.repeat(np.cumsum(lens) - lens, lens)
        self._walk(z, rows, pos, flat)
        return z

    def state(self, user_id: str, history: Sequence[str]) -> np.ndarray:
        """The taste state after consuming ``history`` (raw item ids, in order), starting at theta_u."""
        return self._states([user_id], [list(history)])[0]

    def utility(
        self,
        user_ids: Sequence[str],
        histories: Sequence[Sequence[str]],
        item_ids: Sequence[str] | None = None,
    ) -> np.ndarray:
        """True utility ``[n_contexts, n_items]`` (or ``[n_contexts, len(item_ids)]``) after each history."""
        z = self._states(user_ids, histories)
        return self._utility_from_states(z, None if item_ids is None else self._iidx(list(item_ids)))

    def utility_table(self, user_ids: Sequence[str], histories: Sequence[Sequence[str]],
                      columns: np.ndarray | None = None) -> UtilityTable:
        """The true utilities of ``utility()`` without the ``[n_contexts, n_items]`` matrix: a lazy table
        over the contexts' taste states (``[n_contexts, dim]``) that computes the entries it is indexed
        with. ``columns`` maps each column to a simulator item index (-1: not an item, reads -inf)."""
        cols = np.arange(self.n_items) if columns is None else np.asarray(columns, dtype=np.int64)
        return UtilityTable(self, self._states(user_ids, histories), cols)

    def expected_reward(
        self,
        user_ids: Sequence[str],
        histories: Sequence[Sequence[str]],
        recommended: Sequence[Sequence[str]],
    ) -> np.ndarray:
        """Mean true utility of each context's recommended list (lists may differ in length): ``[n_contexts]``."""
        if len(recommended) != len(user_ids):
            raise ValueError(f"{len(user_ids)} contexts but {len(recommended)} recommendation lists")
        lens = np.fromiter((len(r) for r in recommended), dtype=np.int64, count=len(recommended))
        if (lens == 0).any():
            raise ValueError(f"empty recommendation list for context {int(np.argmin(lens))}")
        if len(recommended) == 0:
            return np.zeros(0)
        z = self._states(user_ids, histories)  # [n_contexts, dim]: no contexts x items matrix
        flat = self._iidx([i for r in recommended for i in r])
        rows = np.repeat(np.arange(len(recommended)), lens)
        vals = self._scale * np.einsum("nd,nd->n", z[rows], self.phi[flat]) + self.bias[flat]
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
        return np.add.reduceat(vals, starts) / lens

    def logging_logits(self, user_ids: Sequence[str], histories: Sequence[Sequence[str]]) -> np.ndarray:
        """Logits of the logging policy pi_beta ``[n_contexts, n_items]``; consumed items are -inf."""
        u = self.utility(user_ids, histories)
        logits = u / self.cfg.logging_temperature + self.cfg.exposure_bias * np.log(self.pop)[None, :]
        for r, h in enumerate(histories):
            if len(h):
                logits[r, self._iidx(list(h))] = -np.inf
        return logits

    def logging_probs(self, user_ids: Sequence[str], histories: Sequence[Sequence[str]]) -> np.ndarray:
        """Next-item probabilities of the logging policy pi_beta ``[n_contexts, n_items]``."""
        logits = self.logging_logits(user_ids, histories)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def ratings_from_utility(self, utility: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        """Map true utilities (plus standard-normal ``noise`` times rating_noise) to 1-5 ratings."""
        u_std = (np.asarray(utility, dtype=np.float64) - self.utility_mean) / self.utility_std
        latent = RATING_CENTER + RATING_SLOPE * u_std
        if noise is not None:
            latent = latent + self.cfg.rating_noise * noise
        return np.clip(np.rint(latent), 1.0, 5.0)

    # ------------------------------------------------------------------ the logging policy's sampler
    def _proposal(self, head: int | None = None, cells: int | None = None) -> _Proposal:
        """The static tables of the exact rejection sampler (cached per ``(head, cells)``)."""
        key = (HEAD_ITEMS if head is None else int(head), TAIL_CENTRES if cells is None else int(cells))
        cache = self.__dict__.setdefault("_proposals", {})
        if key not in cache:
            cache[key] = _Proposal.build(self, *key)
        return cache[key]

    def _sample_next(self, prop: _Proposal, z: np.ndarray, znorm: np.ndarray, consumed: np.ndarray,
                     act: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One exact draw per row from pi_beta: the softmax over the row's unconsumed items of
        ``u(z, i) / logging_temperature + exposure_bias * log(pop_i)``.

        Row ``r`` has taste state ``z[r]`` (norm ``znorm[r]``) and consumed items ``consumed[act[r]]``.
        Rejection sampling: a head item enters the proposal with its exact weight (zero once consumed)
        and is always accepted; a tail cell ``k`` enters with its static weight times
        ``exp(c * (z . mu_k + |z| R_k))``, an upper bound on ``exp(c * z . phi_i)`` for each of its items
        (Cauchy-Schwarz, ``R_k`` the cell's radius around its centre ``mu_k``); an item drawn from the cell
        by static weight is rejected if consumed and otherwise accepted with probability
        ``exp(c * (z . phi_i - z . mu_k - |z| R_k)) <= 1``. Accepted draws follow the target exactly.
        Each round draws candidates for every pending row (``ROUND_DRAWS``, doubling each round) and keeps
        the first accepted one.
        """
        n = z.shape[0]
        c, H, m = prop.c, prop.n_head, ROUND_DRAWS
        width = H + prop.n_cells
        logw = np.empty((n, width))
        if H:
            np.matmul(z, prop.phi_head.T, out=logw[:, :H])
            logw[:, :H] *= c
            logw[:, :H] += prop.la_head[None, :]
            logw[:, :H][consumed[np.ix_(act, prop.head)]] = -np.inf
        zmu = None
        if prop.n_cells:
            zmu = z @ prop.centers.T  # [n, centres]
            logw[:, H:] = zmu[:, prop.cell_center]
            logw[:, H:] += znorm[:, None] * prop.radius[None, :]
            logw[:, H:] *= c
            logw[:, H:] += prop.log_mass[None, :]
        logw -= logw.max(axis=1, keepdims=True)
        cum = np.cumsum(np.exp(logw, out=logw), axis=1, out=logw)
        cum /= cum[:, -1:]
        cum += np.arange(n, dtype=np.float64)[:, None]  # rows side by side: one sorted array
        flat = cum.ravel()
        choice = np.full(n, -1, dtype=np.int64)
        pending = np.arange(n)
        while pending.size:
            rows = np.repeat(pending, m)
            m = min(2 * m, MAX_ROUND_DRAWS)  # rows still pending have a low acceptance: draw more next round
            j = np.searchsorted(flat, rows + rng.random(rows.size), side="right") - rows * width
            j = np.clip(j, 0, width - 1)
            item = np.empty(rows.size, dtype=np.int64)
            ok = np.ones(rows.size, dtype=bool)
            in_head = j < H
            item[in_head] = prop.head[j[in_head]]
            tail = np.flatnonzero(~in_head)
            u2 = rng.random(tail.size)
            u3 = rng.random(tail.size)
            if tail.size:
                k = j[tail] - H
                pos = np.clip(np.searchsorted(prop.cell_cum, k + u2, side="right"), prop.cell_start[k],
                              prop.cell_start[k + 1] - 1)
                it = prop.layout[pos]
                item[tail] = it
                r = rows[tail]
                gap = np.einsum("nd,nd->n", z[r], prop.delta[pos]) - znorm[r] * prop.c_radius[k]
                ok[tail] = (u3 < np.exp(np.minimum(gap, 0.0))) & ~consumed[act[r], it]
            ok = ok.reshape(pending.size, -1)
            got = ok.any(axis=1)
            first = np.argmax(ok, axis=1)
            choice[pending[got]] = item.reshape(pending.size, -1)[np.flatnonzero(got), first[got]]
            pending = pending[~got]
        return choice

    # ------------------------------------------------------------------ generation
    def _chunk(self, job: tuple[int, np.ndarray, np.random.SeedSequence]) -> dict[str, np.ndarray]:
        b, lengths, seq = job
        users = np.arange(b * USER_CHUNK, b * USER_CHUNK + len(lengths))
        return self._generate_chunk(users, lengths, seq, self._proposal())

    def _generate_chunk(self, users: np.ndarray, lengths: np.ndarray, seq: np.random.SeedSequence,
                        prop: _Proposal) -> dict[str, np.ndarray]:
        """The events of one block of users, user-major (user, then step); timestamps not yet shifted."""
        choice_rng, noise_rng = (np.random.default_rng(s) for s in seq.spawn(2))
        n, steps = len(users), int(lengths.max())
        z = self.theta[users].copy()
        znorm = self._theta_norm[users]
        consumed = np.zeros((n, self.n_items), dtype=bool)
        items = np.zeros((n, steps), dtype=np.int64)
        util = np.zeros((n, steps))
        for t in range(steps):
            act = np.flatnonzero(t < lengths)
            pick = self._sample_next(prop, z[act], znorm[act], consumed, act, choice_rng)
            items[act, t] = pick
            util[act, t] = self._scale * np.einsum("nd,nd->n", z[act], self.phi[pick]) + self.bias[pick]
            consumed[act, pick] = True
            self._step_states(z, items[:, t], znorm, t < lengths)
        del consumed
        ratings = self.ratings_from_utility(util, noise_rng.standard_normal((n, steps)))
        # Timestamps: per-user start offset, then gaps (ties, in-session gaps, session breaks).
        starts = noise_rng.integers(0, USER_START_SPAN_S + 1, size=n)
        kind = noise_rng.random((n, steps))
        in_session = np.exp(
            np.log(IN_SESSION_GAP_MEDIAN_S) + IN_SESSION_GAP_SIGMA * noise_rng.standard_normal((n, steps))
        )
        breaks = noise_rng.exponential(SESSION_BREAK_MEAN_S, size=(n, steps))
        gaps = np.where(kind < TIE_PROB + SESSION_BREAK_PROB, breaks, in_session)
        gaps = np.where(kind < TIE_PROB, 0, np.maximum(np.rint(gaps), 1)).astype(np.int64)
        gaps[:, 0] = 0
        ts = starts[:, None] + np.cumsum(gaps, axis=1)
        mask = np.arange(steps)[None, :] < lengths[:, None]
        return {
            "user": np.broadcast_to(users[:, None], (n, steps))[mask].astype(np.int32),  # (memory at 25M events)
            "item": items[mask].astype(np.int32),
            "timestamp": ts[mask],
            "rating": ratings[mask],
            "utility": util[mask],
            "step": np.broadcast_to(np.arange(steps, dtype=np.int32)[None, :], (n, steps))[mask],
        }

    def _generate_arrays(self, workers: int = 1) -> dict[str, np.ndarray]:
        """The log as arrays in event order. Users are simulated in blocks of ``USER_CHUNK``, each with
        its own random stream, so the result does not depend on ``workers`` (processes, one block each
        at a time)."""
        cfg = self.cfg
        gen_seq = np.random.SeedSequence(self.seed).spawn(2)[1]
        len_seq, *chunk_seqs = gen_seq.spawn(1 + -(-self.n_users // USER_CHUNK))
        lengths = np.random.default_rng(len_seq).integers(cfg.min_len, cfg.max_len + 1, size=self.n_users)
        self._proposal()
        jobs = [(b, lengths[b * USER_CHUNK:(b + 1) * USER_CHUNK], seq) for b, seq in enumerate(chunk_seqs)]
        if workers > 1 and len(jobs) > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            global _WORKER_SIM
            _WORKER_SIM = self  # inherited by the forked workers (no pickling of the parameters)
            try:
                with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=mp.get_context("fork")) as ex:
                    parts = list(ex.map(_chunk_worker, jobs))
            finally:
                _WORKER_SIM = None
        else:
            parts = [self._chunk(job) for job in jobs]
        out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        del parts
        ts = out["timestamp"]
        ts -= ts.min() - int(cfg.start_timestamp)
        order = np.argsort(ts, kind="stable")  # user-major input: ties keep user, then event order
        return {k: v[order] for k, v in out.items()}

    def generate(self, workers: int = 1) -> InteractionData:
        """The logged interactions (user_id, item_id, timestamp, rating) and the item catalog.

        ``workers`` > 1 simulates blocks of users in that many processes: same output, less wall time."""
        import pyarrow as pa

        a = self._generate_arrays(workers)
        users = pa.array(self.user_ids, type=pa.string()).take(pa.array(a.pop("user")))
        items = pa.array(self.item_ids, type=pa.string()).take(pa.array(a.pop("item")))
        interactions = pd.DataFrame(
            {
                USER: pd.Series(users.to_pandas(), copy=False),
                ITEM: pd.Series(items.to_pandas(), copy=False),
                TS: a["timestamp"],
                RATING: a["rating"],
            }
        )
        items = pd.DataFrame(
            {
                ITEM: list(self.item_ids),
                TITLE: [f"Item {k}" for k in range(self.n_items)],
                GENRES: list(self.genres),
            }
        )
        return InteractionData(
            interactions=interactions,
            items=items,
            source=SIMULATOR_FORMAT,
            format=SIMULATOR_FORMAT,
            extra={"seed": self.seed, "config": self.cfg.model_dump(mode="json")},
        )

    def event_utility(self, interactions: pd.DataFrame) -> np.ndarray:
        """True utility of each logged event given the user's earlier events (rows in event order).
        Memory O(events + users)."""
        uidx = self._uidx(interactions[USER].astype(str).to_numpy())
        iidx = self._iidx(interactions[ITEM].astype(str).to_numpy())
        if len(uidx) == 0:
            return np.empty(0)
        order = np.argsort(uidx, kind="stable")  # per user, keeping row order
        su = uidx[order]
        first = np.flatnonzero(np.concatenate([[True], su[1:] != su[:-1]]))
        lens = np.diff(np.concatenate([first, [len(su)]]))
        rows = np.repeat(np.arange(len(first)), lens)
        pos = np.arange(len(su)) - np.repeat(first, lens)
        z = self.theta[su[first]].copy()
        out = np.empty(len(uidx))
        out[order] = self._walk(z, rows, pos, iidx[order], score=True)
        return out

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        """Write ``simulator.npz`` (latent parameters) and ``simulator.json`` (seed, config) to ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        np.savez(d / _NPZ_NAME, theta=self.theta, phi=self.phi, bias=self.bias, pop=self.pop)
        meta = {
            "version": _FILE_VERSION,
            "seed": self.seed,
            "config": self.cfg.model_dump(mode="json"),
            "n_users": self.n_users,
            "n_items": self.n_items,
            "dim": self.dim,
            "constants": {
                "UTILITY_SCALE": UTILITY_SCALE,
                "RATING_CENTER": RATING_CENTER,
                "RATING_SLOPE": RATING_SLOPE,
            },
        }
        (d / _JSON_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
        return d

    @classmethod
    def load(cls, directory: str | Path) -> Simulator:
        """Re-create a saved simulator from its parameters (no re-sampling)."""
        d = Path(directory)
        meta_path, npz_path = d / _JSON_NAME, d / _NPZ_NAME
        if not meta_path.is_file() or not npz_path.is_file():
            raise FileNotFoundError(f"{d}: no saved simulator ({_JSON_NAME} and {_NPZ_NAME} expected)")
        meta = json.loads(meta_path.read_text())
        if meta.get("version") != _FILE_VERSION:
            raise ValueError(f"{meta_path}: unsupported simulator file version {meta.get('version')!r}")
        with np.load(npz_path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("theta", "phi", "bias", "pop")}
        obj = cls.__new__(cls)
        obj.cfg = SimulatorConfig.model_validate(meta["config"])
        obj.seed = int(meta["seed"])
        obj._set_params(arrays["theta"], arrays["phi"], arrays["bias"], arrays["pop"])
        return obj


class UtilityTable:
    """True utility ``u(z_c, item)`` of contexts x columns, computed when indexed (memory bounded by the
    request, not by contexts x items). Indexing as a 2-d array: ``t[c]`` (one row), ``t[rows, cols]``
    with integer arrays (broadcast, pairwise), ``t[a:b]`` / ``t[a:b, cols]`` (a block)."""

    def __init__(self, sim: Simulator, states: np.ndarray, columns: np.ndarray):
        self.sim, self.states, self.columns = sim, states, columns
        self.shape = (len(states), len(columns))
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def _pairs(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        rows, cols = np.broadcast_arrays(np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64))
        item = self.columns[cols]
        safe = np.where(item >= 0, item, 0)
        s = self.sim
        vals = s._scale * np.einsum("...d,...d->...", self.states[rows], s.phi[safe]) + s.bias[safe]
        return np.where(item >= 0, vals, -np.inf)

    def __getitem__(self, key):
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        if isinstance(rows, (slice, int, np.integer)) or isinstance(cols, slice):
            r = np.arange(self.shape[0])[rows]
            c = np.arange(self.shape[1])[cols]
            r2, c2 = np.atleast_1d(r), np.atleast_1d(c)
            out = self._pairs(r2[:, None], c2[None, :]) if np.ndim(r) or np.ndim(c) else self._pairs(r2, c2)
            if np.ndim(r) == 0:
                out = out[0]
            if np.ndim(c) == 0 and out.ndim:
                out = out[..., 0]
            return out
        return self._pairs(rows, cols)

    def __array__(self, dtype=None, copy=None):
        """The dense matrix (only for small tables)."""
        out = self[:, :]
        return out if dtype is None else out.astype(dtype)


_WORKER_SIM: Simulator | None = None


def _chunk_worker(job: tuple[int, np.ndarray, np.random.SeedSequence]) -> dict[str, np.ndarray]:
    assert _WORKER_SIM is not None
    return _WORKER_SIM._chunk(job)


def simulate(cfg: SimulatorConfig, seed: int) -> InteractionData:
    """Build a :class:`Simulator` and generate its interaction log."""
    return Simulator(cfg, seed).generate()
