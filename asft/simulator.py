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
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from asft.config import SimulatorConfig
from asft.data.schema import GENRES, ITEM, RATING, TITLE, TS, USER, InteractionData

__all__ = ["SIMULATOR_FORMAT", "Simulator", "simulate"]

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
        # Catalog-wide reference for standardising utilities into ratings.
        base = self._utility_from_states(self.theta)
        self.utility_mean = float(base.mean())
        self.utility_std = float(base.std()) or 1.0
        self.genres = self._make_genres()

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

    def _states(self, user_ids: Sequence[str], histories: Sequence[Sequence[str]]) -> np.ndarray:
        if len(user_ids) != len(histories):
            raise ValueError(f"{len(user_ids)} user ids but {len(histories)} histories")
        uidx = self._uidx(user_ids)
        z = self.theta[uidx].copy()
        norms = self._theta_norm[uidx]
        if len(histories) == 0:
            return z
        lens = np.fromiter((len(h) for h in histories), dtype=np.int64, count=len(histories))
        max_len = int(lens.max()) if len(lens) else 0
        if max_len == 0:
            return z
        flat = self._iidx([i for h in histories for i in h])
        padded = np.zeros((len(histories), max_len), dtype=np.int64)
        mask = np.arange(max_len)[None, :] < lens[:, None]
        padded[mask] = flat
        for t in range(max_len):
            self._step_states(z, padded[:, t], norms, mask[:, t])
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
        u = self.utility(user_ids, histories)
        flat = self._iidx([i for r in recommended for i in r])
        rows = np.repeat(np.arange(len(recommended)), lens)
        vals = u[rows, flat]
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

    # ------------------------------------------------------------------ generation
    def _generate_arrays(self) -> dict[str, np.ndarray]:
        cfg = self.cfg
        rng = np.random.default_rng(np.random.SeedSequence(self.seed).spawn(2)[1])
        n_u, n_i = self.n_users, self.n_items
        lengths = rng.integers(cfg.min_len, cfg.max_len + 1, size=n_u)
        steps = int(lengths.max())
        z = self.theta.copy()
        consumed = np.zeros((n_u, n_i), dtype=bool)
        items = np.zeros((n_u, steps), dtype=np.int64)
        util = np.zeros((n_u, steps))
        log_pop = np.log(self.pop)[None, :] * cfg.exposure_bias
        rows = np.arange(n_u)
        for t in range(steps):
            active = t < lengths
            u = self._utility_from_states(z)
            logits = u / cfg.logging_temperature + log_pop
            logits[consumed] = -np.inf
            gumbel = rng.gumbel(size=(n_u, n_i))  # drawn for all users: stream independent of masks
            choice = np.argmax(logits + gumbel, axis=1)
            items[:, t] = choice
            util[:, t] = u[rows, choice]
            consumed[rows[active], choice[active]] = True
            self._step_states(z, choice, self._theta_norm, active)
        noise = rng.standard_normal((n_u, steps))
        ratings = self.ratings_from_utility(util, noise)
        # Timestamps: per-user start offset, then gaps (ties, in-session gaps, session breaks).
        starts = rng.integers(0, USER_START_SPAN_S + 1, size=n_u)
        kind = rng.random((n_u, steps))
        in_session = np.exp(
            np.log(IN_SESSION_GAP_MEDIAN_S) + IN_SESSION_GAP_SIGMA * rng.standard_normal((n_u, steps))
        )
        breaks = rng.exponential(SESSION_BREAK_MEAN_S, size=(n_u, steps))
        gaps = np.where(
            kind < TIE_PROB, 0.0, np.where(kind < TIE_PROB + SESSION_BREAK_PROB, breaks, in_session)
        )
        gaps = np.where(kind < TIE_PROB, 0, np.maximum(np.rint(gaps), 1)).astype(np.int64)
        gaps[:, 0] = 0
        ts = starts[:, None] + np.cumsum(gaps, axis=1)
        mask = np.arange(steps)[None, :] < lengths[:, None]
        user_flat = np.broadcast_to(rows[:, None], (n_u, steps))[mask]
        ts_flat = ts[mask]
        ts_flat = ts_flat - ts_flat.min() + int(cfg.start_timestamp)
        order = np.argsort(ts_flat, kind="stable")  # user-major input: ties keep user, then event order
        return {
            "user": user_flat[order],
            "item": items[mask][order],
            "timestamp": ts_flat[order].astype(np.int64),
            "rating": ratings[mask][order].astype(np.float64),
            "utility": util[mask][order],
            "step": np.broadcast_to(np.arange(steps)[None, :], (n_u, steps))[mask][order],
        }

    def generate(self) -> InteractionData:
        """The logged interactions (user_id, item_id, timestamp, rating) and the item catalog."""
        a = self._generate_arrays()
        user_names = np.array(self.user_ids, dtype=object)
        item_names = np.array(self.item_ids, dtype=object)
        interactions = pd.DataFrame(
            {
                USER: user_names[a["user"]].tolist(),
                ITEM: item_names[a["item"]].tolist(),
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
        """True utility of each logged event given the user's earlier events (rows in event order)."""
        users = interactions[USER].astype(str).to_numpy()
        items = interactions[ITEM].astype(str).to_numpy()
        uidx, iidx = self._uidx(users), self._iidx(items)
        out = np.empty(len(users))
        # Group rows per user keeping row order, then step all users together.
        order = np.argsort(uidx, kind="stable")
        su = uidx[order]
        bounds = np.flatnonzero(np.diff(su)) + 1
        starts = np.concatenate([[0], bounds]) if len(su) else np.zeros(0, dtype=np.int64)
        pos = np.arange(len(su)) - np.repeat(starts, np.diff(np.concatenate([starts, [len(su)]])))
        groups = su[starts]
        lens = np.diff(np.concatenate([starts, [len(su)]]))
        if len(groups) == 0:
            return out
        z = self.theta[groups].copy()
        norms = self._theta_norm[groups]
        padded = np.zeros((len(groups), int(lens.max())), dtype=np.int64)
        gi = np.repeat(np.arange(len(groups)), lens)
        padded[gi, pos] = iidx[order]
        res = np.zeros(padded.shape)
        for t in range(padded.shape[1]):
            active = t < lens
            res[:, t] = (
                self._scale * np.einsum("ud,ud->u", z, self.phi[padded[:, t]]) + self.bias[padded[:, t]]
            )
            self._step_states(z, padded[:, t], norms, active)
        out[order] = res[gi, pos]
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


def simulate(cfg: SimulatorConfig, seed: int) -> InteractionData:
    """Build a :class:`Simulator` and generate its interaction log."""
    return Simulator(cfg, seed).generate()
