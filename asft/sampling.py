"""Candidate sampling from pi_ref, scored by the reward ensemble (METHODS.md section 5, data option b).

A *context* is every prefix of every training window that has a logged next item, exactly the
positions the base SFT was trained on: window ``w`` at position ``p`` is the history
``w[:p+1]`` (plus the user's items before the window, for masking) with logged action ``w[p+1]``.
One causal forward pass over a window therefore gives pi_ref's next-item distribution, and each
reward member's scores for the whole catalog, at *all* its contexts at once.

Per context we draw N distinct candidates (Gumbel top-k = sequential sampling without
replacement) from ``q = softmax(filter(logits) / temperature)`` where ``filter`` masks special
tokens and, optionally, the user's history, then applies top-k / top-p. Stored per context:

- ``candidates`` [N] item tokens, ``ref_logp`` [N] = log pi_ref(a|s) (full softmax),
  ``ref_logp_masked`` [N] (pi_ref with history and specials masked: the policy the trainers
  fit by default), ``sample_logp`` [N] = log q(a|s), and
  ``sample_iw`` [N] = q(a|s) / P(a in sample), the importance weights that make weighted sums over
  the without-replacement sample unbiased estimates of expectations under q;
- ensemble rewards of the candidates (``r_mean``, ``r_std``, ``r_pess``; per-context centred) and of
  the logged action, and the exact expected reward ``E_q[r]`` (the 'expectation' baseline);
- the logged action, its rating (if any) and its ``ref_logp``.

Also here: autoregressive slates of K items with a KV cache (:func:`sample_slates`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from asft.config import Config, SamplingConfig
from asft.data.preprocess import NUM_SPECIAL, PAD, ProcessedData
from asft.evaluation import pad_right, rows_per_chunk
from asft.models.recommender import backbone

CANDIDATES_FILE = "candidates.parquet"
SLATES_FILE = "slates.parquet"


# ---------------------------------------------------------------------------- training contexts
@dataclass
class TrainContexts:
    """Training windows with the bookkeeping needed to turn their positions into contexts."""

    windows: list[np.ndarray]  # token windows (as in processed/train.parquet)
    first: np.ndarray  # first scored position of each window
    user: np.ndarray  # user_idx of each window
    start: np.ndarray  # offset of the window in the user's full item sequence
    items_of: list[np.ndarray]  # each user's full sequence (train part = all but the last two)
    ratings_of: list[np.ndarray | None]
    vocab_size: int

    @classmethod
    def from_processed(cls, data: ProcessedData) -> TrainContexts:
        t = data.table("train")
        seqs = data.table("sequences")
        windows = [np.asarray(x, dtype=np.int64) for x in t["tokens"]]
        first = t["first_label"].to_numpy(np.int64)
        user = t["user_idx"].to_numpy(np.int64)
        # Windows of a user are consecutive; each starts so that its first scored label follows the
        # previous window's last token (see asft.data.preprocess._windows).
        start = np.zeros(len(windows), dtype=np.int64)
        prev_user, prev_end = -1, 0
        for i, (w, f, u) in enumerate(zip(windows, first, user)):
            s = 0 if u != prev_user else prev_end - f - 1
            start[i] = s
            prev_user, prev_end = u, s + len(w)
        items_of = [np.asarray(x, dtype=np.int64) for x in seqs["items"]]
        has_r = bool(data.stats.get("has_ratings"))
        ratings_of = [np.asarray(r, dtype=np.float64) if (has_r and r is not None) else None for r in seqs["ratings"]]
        for i in range(min(len(windows), 50)):  # cheap consistency check of the offsets
            seq = items_of[user[i]]
            if not np.array_equal(seq[start[i] : start[i] + len(windows[i])], windows[i]):
                raise ValueError(f"{data.root}: training window {i} does not match the user's sequence")
        return cls(windows, first, user, start, items_of, ratings_of, data.vocab.size)

    def positions(self, i: int) -> np.ndarray:
        """Scored positions of window i (each is a context with a logged next item)."""
        return np.arange(self.first[i], len(self.windows[i]) - 1)

    def n_contexts(self) -> int:
        return int(sum(len(w) - 1 - f for w, f in zip(self.windows, self.first)))

    def before(self, i: int) -> np.ndarray:
        """The user's items before window i (masked as history, never fed to the model)."""
        return self.items_of[self.user[i]][: self.start[i]]

    def next_items(self, i: int, p: int, horizon: int) -> np.ndarray:
        """The user's real next ``horizon`` *training* items after context (i, p) (never valid/test)."""
        seq = self.items_of[self.user[i]]
        a = self.start[i] + p + 1
        return seq[a : min(a + horizon, len(seq) - 2)]

    def logged_rating(self, i: int, p: int) -> float:
        r = self.ratings_of[self.user[i]]
        return float(r[self.start[i] + p + 1]) if r is not None else float("nan")


def collate_inputs(tc: TrainContexts, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Model inputs of windows ``idx``: every token but the last (whose next item is unknown)."""
    return pad_right([tc.windows[i][:-1] for i in idx])


# ---------------------------------------------------------------------------- masks and filters
def history_mask(ids: torch.Tensor, vocab_size: int, before: list[np.ndarray] | None = None) -> torch.Tensor:
    """``[B, T, V]`` bool: item v is in the history of context (b, t), i.e. in ``ids[b, :t+1]`` or in
    ``before[b]``."""
    b, t = ids.shape
    # first position of each item in each row (t if absent); item v is history at t iff first <= t
    pos = torch.arange(t, device=ids.device).expand(b, t)
    first = torch.full((b, vocab_size), t, dtype=torch.long, device=ids.device)
    first.scatter_reduce_(1, ids, pos, reduce="amin")
    mask = first.unsqueeze(1) <= torch.arange(t, device=ids.device).view(1, t, 1)
    if before is not None:
        for r, items in enumerate(before):
            if len(items):
                mask[r, :, torch.as_tensor(items, device=ids.device)] = True
    return mask


def filter_logits(logits: torch.Tensor, mask: torch.Tensor | None, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, min_keep: int = 1) -> torch.Tensor:
    """Sampling logits: specials and ``mask`` to -inf, then / temperature, top-k, top-p (keeping at
    least ``min_keep`` items)."""
    z = logits.float() / temperature
    z[..., :NUM_SPECIAL] = float("-inf")
    if mask is not None:
        z = z.masked_fill(mask, float("-inf"))
    if top_k and top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        probs = torch.softmax(sorted_z, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass strictly above each item
        drop = before >= top_p
        drop[..., :min_keep] = False
        z = z.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return z


def gumbel_topk(z: torch.Tensor, n: int, generator: torch.Generator | None = None, return_threshold: bool = False):
    """n distinct indices per row sampled without replacement from softmax(z) (Gumbel top-k).

    With ``return_threshold`` also returns kappa, the (n+1)-th largest perturbed key, from which
    :func:`inclusion_weights` computes importance weights (-inf when at most n items can be drawn)."""
    finite = torch.isfinite(z).sum(dim=-1)
    if (finite < n).any():
        raise ValueError(f"a context has only {int(finite.min())} items left to sample but {n} candidates were"
                         " asked for (lower sampling.n_candidates or disable sampling.mask_history)")
    u = torch.rand(z.shape, generator=generator, device=z.device).clamp_(1e-20, 1.0 - 1e-7)
    keys = z - torch.log(-torch.log(u))
    top = torch.topk(keys, min(n + 1, z.shape[-1]), dim=-1)
    idx = top.indices[..., :n]
    if not return_threshold:
        return idx
    kappa = top.values[..., n] if z.shape[-1] > n else torch.full(z.shape[:-1], float("-inf"), device=z.device)
    return idx, kappa


def inclusion_weights(z: torch.Tensor, idx: torch.Tensor, kappa: torch.Tensor) -> torch.Tensor:
    """Importance weights ``p(a) / P(a in S)`` of a Gumbel top-k sample S (priority sampling, as in
    Kool et al. 2019), with ``P(a in S) ~= P(z_a + G > kappa) = 1 - exp(-exp(z_a - kappa))``.

    ``sum_{a in S} w_a f(a)`` is an unbiased estimate of ``E_{a ~ softmax(z)}[f(a)]``: without it,
    uniform weights on a without-replacement sample over-represent unlikely items (the sample is
    flatter than the distribution it came from)."""
    p = torch.softmax(z, dim=-1).gather(-1, idx)
    incl = -torch.expm1(-torch.exp(z.gather(-1, idx) - kappa.unsqueeze(-1)))
    return p / incl.clamp_min(1e-30)


def expected_under(z: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``sum_a softmax(z)_a * values_a`` per row, ignoring items with zero probability."""
    p = torch.softmax(z, dim=-1)
    return (p * torch.where(p > 0, values, torch.zeros_like(values))).sum(dim=-1)


def batch_generator(seed: int, *key: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from (seed, key...): reproducible whatever the batch composition order."""
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.SeedSequence([seed, *key]).generate_state(1)[0]))
    return g


# ---------------------------------------------------------------------------- reward scores at all positions
def position_rewards(members: list[torch.nn.Module], ids: torch.Tensor, am: torch.Tensor, kappa: float):
    """Ensemble rewards of every vocabulary item at every position: (mean, std, pessimistic), each
    ``[B, T, V]`` with special tokens at -inf (std 0). Members are centred per context over the catalog."""
    per = []
    for m in members:
        h = backbone(m)(input_ids=ids, attention_mask=am).last_hidden_state
        r = m.rewards(h)[..., NUM_SPECIAL:].float()
        per.append(r - r.mean(dim=-1, keepdim=True))
    stack = torch.stack(per)
    mean, std = stack.mean(dim=0), stack.std(dim=0, unbiased=False)

    def widen(x, fill):
        out = torch.full((*x.shape[:-1], x.shape[-1] + NUM_SPECIAL), fill, device=x.device)
        out[..., NUM_SPECIAL:] = x
        return out

    return widen(mean, float("-inf")), widen(std, 0.0), widen(mean - kappa * std, float("-inf"))


# ---------------------------------------------------------------------------- candidate sampling
def _window_contexts(tc: TrainContexts, idx: list[int], device) -> tuple[tuple[torch.Tensor, torch.Tensor], list, list]:
    sel_b, sel_t = [], []
    for r, i in enumerate(idx):
        pos = tc.positions(i)
        sel_b += [r] * len(pos)
        sel_t += pos.tolist()
    return (torch.tensor(sel_b, device=device, dtype=torch.long),
            torch.tensor(sel_t, device=device, dtype=torch.long)), sel_b, sel_t


def _sampling_logits(policy, tc: TrainContexts, idx: list[int], cfg: SamplingConfig, device, with_mask: bool = False):
    from asft.models.recommender import all_position_logits

    ids, am = collate_inputs(tc, idx)
    ids, am = ids.to(device), am.to(device)
    logits = all_position_logits(policy, ids, am).float()  # [B, T, V]
    mask = history_mask(ids, logits.shape[-1], [tc.before(i) for i in idx]) if cfg.mask_history else None
    z = filter_logits(logits, mask, cfg.temperature, cfg.top_k, cfg.top_p, min_keep=cfg.n_candidates)
    return (ids, am, logits, z, mask) if with_mask else (ids, am, logits, z)


@torch.no_grad()
def sample_candidates(policy: torch.nn.Module, tc: TrainContexts, cfg: SamplingConfig, seed: int,
                      windows: list[int] | None = None, progress: bool = True,
                      device: str | torch.device = "cpu") -> pd.DataFrame:
    """Sample ``cfg.n_candidates`` distinct items per context of ``windows`` (default: all) from
    ``policy``. One row per context (window order, then position)."""
    policy.eval()
    idx_all = list(range(len(tc.windows))) if windows is None else list(windows)
    n = cfg.n_candidates
    cols: dict[str, list] = {k: [] for k in ("window", "pos", "user_idx", "context_end", "logged", "logged_rating",
                                             "candidates", "ref_logp", "ref_logp_masked", "sample_logp", "sample_iw",
                                             "logged_ref_logp")}
    bar = tqdm(range(0, len(idx_all), cfg.batch_size), desc="sampling", leave=False, disable=not progress,
               mininterval=1.0)
    for s in bar:
        batch = idx_all[s : s + cfg.batch_size]
        gen = batch_generator(seed, batch[0], len(batch), device=device)
        # Within a batch, as many windows at a time as the memory budget allows: the Gumbel noise is
        # drawn from the batch's generator in the same row order, so the draws do not depend on it (CPU).
        step = rows_per_chunk(SAMPLE_COPIES * 4 * tc.vocab_size * max(len(tc.windows[i]) for i in batch),
                              cfg.memory_mb, len(batch))
        for s2 in range(0, len(batch), step):
            _sample_windows(policy, tc, batch[s2 : s2 + step], cfg, n, gen, cols, device)
    return pd.DataFrame(cols)


# Live [contexts, V] float copies while sampling one chunk (logits, filtered, log-softmaxes, masks, noise).
SAMPLE_COPIES = 10


def _sample_windows(policy, tc: TrainContexts, idx: list[int], cfg: SamplingConfig, n: int, gen, cols: dict,
                    device) -> None:
    """Sample the contexts of windows ``idx`` into ``cols`` (see :func:`sample_candidates`)."""
    _, _, logits, z, mask = _sampling_logits(policy, tc, idx, cfg, device, with_mask=True)
    b_t, sel_b, sel_t = _window_contexts(tc, idx, device)
    zc = z[b_t]
    cand, kappa = gumbel_topk(zc, n, gen, return_threshold=True)
    ref_lp = torch.log_softmax(logits[b_t], dim=-1)
    q_lp = torch.log_softmax(zc, dim=-1)
    logged = torch.tensor([int(tc.windows[idx[b]][t + 1]) for b, t in zip(sel_b, sel_t)], device=device)
    cols["window"] += [idx[b] for b in sel_b]
    cols["pos"] += sel_t
    cols["user_idx"] += [int(tc.user[idx[b]]) for b in sel_b]
    cols["context_end"] += [int(tc.start[idx[b]] + t + 1) for b, t in zip(sel_b, sel_t)]
    cols["logged"] += logged.tolist()
    cols["logged_rating"] += [tc.logged_rating(idx[b], t) for b, t in zip(sel_b, sel_t)]
    cols["candidates"] += list(cand.cpu().numpy().astype(np.int32))
    cols["ref_logp"] += list(ref_lp.gather(1, cand).cpu().numpy().astype(np.float32))
    banned = torch.isinf(filter_logits(logits[b_t], None if mask is None else mask[b_t]))
    ref_m = torch.log_softmax(logits[b_t].masked_fill(banned, float("-inf")), dim=-1)
    cols["ref_logp_masked"] += list(ref_m.gather(1, cand).cpu().numpy().astype(np.float32))
    cols["sample_logp"] += list(q_lp.gather(1, cand).cpu().numpy().astype(np.float32))
    cols["sample_iw"] += list(inclusion_weights(zc, cand, kappa).cpu().numpy().astype(np.float32))
    cols["logged_ref_logp"] += ref_lp.gather(1, logged[:, None])[:, 0].cpu().tolist()


SCORE_COLUMNS = ("r_mean", "r_std", "r_pess", "logged_r_mean", "logged_r_pess", "expected_r_mean", "expected_r_pess")


@torch.no_grad()
def score_candidates(frame: pd.DataFrame, policy: torch.nn.Module, members: list[torch.nn.Module], tc: TrainContexts,
                     cfg: SamplingConfig, kappa: float, progress: bool = True,
                     device: str | torch.device = "cpu") -> pd.DataFrame:
    """Add the reward ensemble's scores to sampled candidates (one forward per window for each member),
    and the exact expected reward under the sampling distribution of ``policy`` (the 'expectation'
    baseline). ``frame`` rows must be in window/position order, as :func:`sample_candidates` writes them."""
    if frame.empty:
        return frame.assign(**{c: [] for c in SCORE_COLUMNS})
    windows = frame["window"].to_numpy()
    if (np.diff(windows) < 0).any():
        raise ValueError("candidate rows are not in window order; cannot score them")
    uniq = np.unique(windows)
    out: dict[str, list] = {c: [] for c in SCORE_COLUMNS}
    cand_all = stack(frame, "candidates").astype(np.int64)
    logged_all = frame["logged"].to_numpy(np.int64)
    pos_all = frame["pos"].to_numpy(np.int64)
    # Windows per forward pass: at most cfg.batch_size, fewer when their per-position scores of every item
    # (logits, the members' rewards and their statistics) would exceed the memory budget.
    step = rows_per_chunk((len(members) + SAMPLE_COPIES) * 4 * tc.vocab_size * max(len(w) for w in tc.windows),
                          cfg.memory_mb, cfg.batch_size)
    bar = tqdm(range(0, len(uniq), step), desc="scoring", leave=False, disable=not progress, mininterval=1.0)
    row = 0
    for s in bar:
        idx = uniq[s : s + step].tolist()
        ids, am, _, z = _sampling_logits(policy, tc, idx, cfg, device)
        mean, std, pess = position_rewards(members, ids, am, kappa)
        end = int(np.searchsorted(windows, idx[-1], side="right"))
        sl = slice(row, end)
        b = torch.as_tensor(np.searchsorted(np.asarray(idx), windows[sl]).copy(), device=device)
        t = torch.as_tensor(pos_all[sl].copy(), device=device)
        cand = torch.as_tensor(cand_all[sl].copy(), device=device)
        logged = torch.as_tensor(logged_all[sl].copy(), device=device)[:, None]
        m, sd, pe, zc = mean[b, t], std[b, t], pess[b, t], z[b, t]
        out["r_mean"] += list(m.gather(1, cand).cpu().numpy())
        out["r_std"] += list(sd.gather(1, cand).cpu().numpy())
        out["r_pess"] += list(pe.gather(1, cand).cpu().numpy())
        out["logged_r_mean"] += m.gather(1, logged)[:, 0].cpu().tolist()
        out["logged_r_pess"] += pe.gather(1, logged)[:, 0].cpu().tolist()
        out["expected_r_mean"] += expected_under(zc, m).cpu().tolist()
        out["expected_r_pess"] += expected_under(zc, pe).cpu().tolist()
        row = end
    return frame.assign(**out)


def shard_by_batches(items: list[int], batch_size: int, rank: int, world: int) -> list[int]:
    """This process's share of ``items``: every ``world``-th batch of ``batch_size``, starting at ``rank``.

    Batch boundaries are those of a single process, and :func:`sample_candidates` seeds each batch's
    random stream by its first window, so the shards together hold exactly the single-process rows.
    """
    out: list[int] = []
    for b, s in enumerate(range(0, len(items), batch_size)):
        if b % world == rank:
            out.extend(items[s : s + batch_size])
    return out


def write_candidates(frame: pd.DataFrame, tmp_dir: Path) -> None:
    list_cols = [c for c in frame.columns if isinstance(frame[c].iloc[0], np.ndarray)] if len(frame) else []
    fields = []
    for c in frame.columns:
        if c in list_cols:
            typ = pa.list_(pa.int32()) if c == "candidates" else pa.list_(pa.float32())
        elif c in ("window", "pos", "user_idx", "context_end", "logged"):
            typ = pa.int64()
        else:
            typ = pa.float64()
        fields.append((c, typ))
    table = pa.Table.from_pandas(frame, schema=pa.schema(fields), preserve_index=False)
    pq.write_table(table, tmp_dir / CANDIDATES_FILE)


def read_candidates(cand_dir: str | Path) -> pd.DataFrame:
    path = Path(cand_dir) / CANDIDATES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{cand_dir}: no {CANDIDATES_FILE} (run the sample stage first)")
    return pd.read_parquet(path)


def stack(frame: pd.DataFrame, col: str) -> np.ndarray:
    """A list column as a dense [C, N] array."""
    return np.stack(frame[col].to_numpy()) if len(frame) else np.zeros((0, 0))


# ---------------------------------------------------------------------------- slates with a KV cache
@torch.no_grad()
def sample_slates(model: torch.nn.Module, contexts: list[np.ndarray], k: int, generator: torch.Generator | None = None,
                  temperature: float = 1.0, mask_history: bool = True, greedy: bool = False
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Autoregressive slates: item j is drawn from the model's next-item distribution given the
    context plus items 1..j-1, reusing the KV cache (one new token per step). Items already in the
    context or the slate are masked. Returns (slates [B, K], log-probs [B, K] of each pick)."""
    model.eval()
    n_pos = model.config.max_position_embeddings
    ctx = [np.asarray(c, dtype=np.int64)[-(n_pos - k):] for c in contexts]
    dev = next(model.parameters()).device
    lens = torch.tensor([len(c) for c in ctx])
    t = int(lens.max())
    ids = torch.full((len(ctx), t), PAD, dtype=torch.long)
    for r, c in enumerate(ctx):
        ids[r, t - len(c):] = torch.from_numpy(c)  # left padding
    am = (torch.arange(t)[None, :] >= (t - lens)[:, None]).long()
    pos = (am.cumsum(dim=1) - 1).clamp_min(0)
    ids, am, pos = ids.to(dev), am.to(dev), pos.to(dev)
    vocab = model.config.vocab_size
    seen = torch.zeros(len(ctx), vocab, dtype=torch.bool, device=dev)
    if mask_history:
        seen.scatter_(1, ids, True)
    out = backbone(model)(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=True)
    cache, h = out.past_key_values, out.last_hidden_state[:, -1]
    last_pos = pos[:, -1:]
    picks, logps = [], []
    for _ in range(k):
        z = filter_logits(model.lm_head(h), seen, temperature)
        a = z.argmax(dim=-1, keepdim=True) if greedy else gumbel_topk(z, 1, generator)
        logps.append(torch.log_softmax(z, dim=-1).gather(1, a))
        picks.append(a)
        seen.scatter_(1, a, True)
        am = torch.cat([am, torch.ones_like(a)], dim=1)
        last_pos = last_pos + 1
        out = backbone(model)(input_ids=a, attention_mask=am, position_ids=last_pos, past_key_values=cache,
                                use_cache=True)
        cache, h = out.past_key_values, out.last_hidden_state[:, -1]
    return torch.cat(picks, 1).cpu().numpy(), torch.cat(logps, 1).cpu().numpy()


@torch.no_grad()
def slate_logprobs(model: torch.nn.Module, contexts: list[np.ndarray], slates: np.ndarray, temperature: float = 1.0,
                   mask_history: bool = True) -> np.ndarray:
    """Log-probs of given slates recomputed without a cache (one full forward per step): the reference
    for :func:`sample_slates`."""
    n_pos = model.config.max_position_embeddings
    k = slates.shape[1]
    out = np.zeros(slates.shape)
    for r, c in enumerate(contexts):
        c = np.asarray(c, dtype=np.int64)[-(n_pos - k):]
        for j in range(k):
            seq = np.concatenate([c, slates[r, :j]])
            ids = torch.from_numpy(seq)[None]
            logits = model.lm_head(backbone(model)(input_ids=ids).last_hidden_state[:, -1])
            seen = torch.zeros_like(logits, dtype=torch.bool)
            if mask_history:
                seen[0, ids[0]] = True
            z = filter_logits(logits, seen, temperature)
            out[r, j] = float(torch.log_softmax(z, dim=-1)[0, int(slates[r, j])])
    return out


def write_slates(model, data: ProcessedData, cfg: SamplingConfig, seed: int, tmp_dir: Path) -> dict:
    """``slates_per_user`` slates for every user's validation context (the history before the valid item)."""
    valid = data.table("valid")
    ctx = [np.asarray(x, dtype=np.int64) for x in valid["input"]]
    rows = []
    t0 = time.perf_counter()
    for j in range(cfg.slates_per_user):
        for s in range(0, len(ctx), cfg.batch_size):
            g = batch_generator(seed, 0x51A7E, j, s)
            sl, lp = sample_slates(model, ctx[s : s + cfg.batch_size], cfg.slate_size, g, cfg.temperature,
                                   cfg.mask_history)
            for r in range(len(sl)):
                rows.append({"user_idx": int(valid["user_idx"].iloc[s + r]), "slate_id": j,
                             "slate": sl[r].astype(np.int32), "logp": lp[r].astype(np.float32)})
    secs = time.perf_counter() - t0
    pd.DataFrame(rows).to_parquet(tmp_dir / SLATES_FILE, index=False)
    return {"slates": len(rows), "slate_size": cfg.slate_size, "slates_per_s": len(rows) / secs if secs else 0.0}


def sampling_summary(frame: pd.DataFrame, seconds: float, n: int) -> dict:
    out = {"contexts": len(frame), "candidates": int(len(frame) * n), "seconds": seconds,
           "candidates_per_s": float(len(frame) * n / seconds) if seconds > 0 else 0.0}
    if len(frame) and "sample_iw" in frame:
        iw = stack(frame, "sample_iw")
        iw = iw / iw.sum(axis=1, keepdims=True)
        out["sample_iw_ess_share"] = float((1.0 / (iw * iw).sum(axis=1)).mean() / iw.shape[1])
    if len(frame) and "r_mean" in frame:
        rm = stack(frame, "r_mean")
        out.update(reward_mean=float(rm.mean()), reward_std_within_context=float(rm.std(axis=1).mean()),
                   logged_reward_mean=float(frame["logged_r_mean"].mean()),
                   logged_in_candidates=float(np.mean([lg in set(c.tolist()) for lg, c in
                                                       zip(frame["logged"], frame["candidates"])])))
    return out


def save_sampling_meta(tmp_dir: Path, summary: dict, cfg: Config) -> None:
    (tmp_dir / "sampling.json").write_text(json.dumps({"summary": summary, "sampling": cfg.sampling.model_dump(),
                                                       "kappa": cfg.reward.kappa, "seed": cfg.seed}, indent=2))
