"""Preference datasets: (context, chosen > rejected) pairs built from the training part of the logs.

A *context* is a prefix ``items[:context_end]`` of a user's token sequence that ends inside the
training part (``context_end <= len(items) - 2``). For each sampled context, pairs come from
(METHODS.md section 3):

* ``explicit``: the user's next ``horizon`` training items, ranked by their logged rating; every
  pair with different ratings (ties skipped), ``margin`` = rating difference.
* ``implicit``: the consumed next item against ``implicit_negatives`` items the user never
  consumed, drawn from the same popularity bin (popularity-matched negatives), ``margin`` = 1.
* ``human`` (``preferences.extra_pairs_file``): externally collected judgments, validated like
  the rest.
* ``ranking`` / ``best_of_n`` / ``pairwise`` (simulator only): a simulated judge sees
  ``ranking_size`` / ``best_of_n`` / 2 candidate items in a presented order and ranks them (all
  N(N-1)/2 pairs), picks the best (N-1 pairs), or picks one of two. Judges see the true utility
  plus Gaussian noise; some labels are flipped; with probability ``position_bias`` a judge takes the
  first-presented option; a share of judges is lazy (random answers). Honeypot tasks (the context's
  best against its worst item, a known answer) are mixed in; judges whose honeypot accuracy is
  below ``honeypot_min_accuracy`` are dropped with all their pairs. Honeypots never become pairs.

Leakage rule: a user's validation and test items are never a chosen or rejected item, and
contexts end inside the training part, so no pair is built from held-out events.

Users are split into ``train`` / ``valid`` / ``test`` (pairs of a user share a split) and into two
``fold`` halves (so a second reward ensemble can be trained on other data).

Output directory (written atomically): ``pairs.parquet`` (schema :data:`PAIR_SCHEMA`, documented in
:data:`PAIR_COLUMNS`), ``stats.json`` (counts per source and split) and ``judges.json`` (the
honeypot audit, simulator only).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pac
import pyarrow.parquet as pq

from asft.config import Config, PreferenceConfig
from asft.data.paths import PathContainmentError, require_data_root
from asft.data.preprocess import NUM_SPECIAL, ProcessedData
from asft.data.schema import DataFormatError
from asft.utils import atomic_dir, write_json

SOURCES = ("explicit", "implicit", "ranking", "best_of_n", "pairwise", "human")
EXTRA_COLUMNS = ("user_id", "context_end", "chosen_item", "rejected_item")
JUDGE_SOURCES = ("ranking", "best_of_n", "pairwise")
SPLITS = ("train", "valid", "test")
PAIRS_FILE = "pairs.parquet"

PAIR_COLUMNS = {
    "pair_id": "int64, unique id of the pair",
    "user_idx": "int32, user (row of the processed sequences)",
    "context_id": "int64, one id per (user_idx, context_end)",
    "context_end": "int32, the context is the user's sequence items[:context_end]",
    "context": "list<int32>, the last <= preprocess.max_len tokens of the context (model input)",
    "chosen": "int32, token of the preferred item",
    "rejected": "int32, token of the other item",
    "source": "string, one of explicit, implicit, ranking, best_of_n, pairwise",
    "margin": "float32 > 0: rating difference (explicit), rank distance (ranking) or 1",
    "chosen_rating": "float32, logged rating of the chosen item when known, else NaN",
    "rejected_rating": "float32, logged rating of the rejected item when known, else NaN",
    "judge": "int32, simulated judge id; -1 when the pair does not come from a judge",
    "split": "string, train / valid / test (by user)",
    "fold": "int8, 0 or 1: half of the users (for a second, held-out reward ensemble)",
}

PAIR_SCHEMA = pa.schema(
    [
        ("pair_id", pa.int64()),
        ("user_idx", pa.int32()),
        ("context_id", pa.int64()),
        ("context_end", pa.int32()),
        ("context", pa.list_(pa.int32())),
        ("chosen", pa.int32()),
        ("rejected", pa.int32()),
        ("source", pa.string()),
        ("margin", pa.float32()),
        ("chosen_rating", pa.float32()),
        ("rejected_rating", pa.float32()),
        ("judge", pa.int32()),
        ("split", pa.string()),
        ("fold", pa.int8()),
    ]
)


class PreferenceConfigError(ValueError):
    pass


def resolve_sources(cfg: PreferenceConfig, has_ratings: bool, has_simulator: bool) -> list[str]:
    if cfg.sources == "auto":
        out = (["explicit"] if has_ratings else []) + ["implicit"]
        return out + (list(JUDGE_SOURCES) if has_simulator else [])
    srcs = list(dict.fromkeys(cfg.sources))
    if not srcs:
        raise PreferenceConfigError("preferences.sources is empty")
    if "explicit" in srcs and not has_ratings:
        raise PreferenceConfigError("preferences.sources has 'explicit' but the dataset has no ratings")
    judge = [s for s in srcs if s in JUDGE_SOURCES]
    if judge and not has_simulator:
        raise PreferenceConfigError(
            f"preferences.sources {judge} need a judge: only the simulator provides one (data.source=simulator)"
        )
    return srcs


def user_splits(n_users: int, cfg: PreferenceConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split users into train/valid/test (codes 0/1/2) and into two folds; a pure function of the seed."""
    rng = np.random.default_rng([seed, 0x5EED, 1])
    perm = rng.permutation(n_users)
    n_test = round(cfg.test_share * n_users)
    n_valid = round(cfg.valid_share * n_users)
    split = np.zeros(n_users, dtype=np.int8)
    split[perm[:n_test]] = 2
    split[perm[n_test : n_test + n_valid]] = 1
    fold = np.zeros(n_users, dtype=np.int8)
    fold[rng.permutation(n_users)[: n_users // 2]] = 1
    return split, fold


def popularity_bins(pop: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin id per token (items only; specials -1): equal-size bins over items ranked by popularity."""
    n_items = len(pop) - NUM_SPECIAL
    order = np.argsort(-pop[NUM_SPECIAL:], kind="stable")
    bins = np.full(len(pop), -1, dtype=np.int64)
    bins[NUM_SPECIAL + order] = (np.arange(n_items) * n_bins) // max(n_items, 1)
    return bins


class _PairBuffer:
    def __init__(self) -> None:
        self.cols: dict[str, list] = {k: [] for k in ("user_idx", "context_id", "context_end", "chosen", "rejected",
                                                      "source", "margin", "chosen_rating", "rejected_rating", "judge")}

    def add(self, user: int, ctx_id: int, ctx_end: int, chosen, rejected, source: str, margin, cr=np.nan,
            rr=np.nan, judge: int = -1) -> None:
        n = len(chosen)
        c = self.cols
        c["user_idx"] += [user] * n
        c["context_id"] += [ctx_id] * n
        c["context_end"] += [ctx_end] * n
        c["chosen"] += list(chosen)
        c["rejected"] += list(rejected)
        c["source"] += [source] * n
        c["margin"] += list(np.broadcast_to(margin, n))
        c["chosen_rating"] += list(np.broadcast_to(cr, n))
        c["rejected_rating"] += list(np.broadcast_to(rr, n))
        c["judge"] += [judge] * n

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.cols)


class SimulatedJudges:
    """Annotators judging candidate lists with the simulator's true utility plus noise (see module doc)."""

    def __init__(self, cfg: PreferenceConfig, rng: np.random.Generator):
        jc = cfg.judge
        self.cfg, self.rng = jc, rng
        n_lazy = round(jc.lazy_share * jc.n_judges)
        self.lazy = np.zeros(jc.n_judges, dtype=bool)
        self.lazy[rng.permutation(jc.n_judges)[:n_lazy]] = True
        self.hp_total = np.zeros(jc.n_judges, dtype=np.int64)
        self.hp_correct = np.zeros(jc.n_judges, dtype=np.int64)

    def order(self, judge: int, utilities: np.ndarray) -> np.ndarray:
        """The judge's ranking (best first) of candidates presented in the given order."""
        n = len(utilities)
        if self.lazy[judge]:
            return self.rng.permutation(n)
        scores = utilities + self.cfg.noise * self.rng.standard_normal(n)
        ranking = np.argsort(-scores, kind="stable")
        if self.rng.random() < self.cfg.position_bias:  # the first-presented option wins
            ranking = np.concatenate([[0], ranking[ranking != 0]])
        return ranking

    def flip(self, n: int) -> np.ndarray:
        return self.rng.random(n) < self.cfg.flip_prob

    def honeypot(self, judge: int, best_first: bool) -> None:
        """Best vs worst item of a context, presented in a random order; records the answer."""
        u = np.array([1.0, -1.0]) * (1 if best_first else -1) * 1e3  # a gap no noise can hide
        top = self.order(judge, u)[0]
        correct = (top == 0) == best_first
        if self.flip(1)[0]:
            correct = not correct
        self.hp_total[judge] += 1
        self.hp_correct[judge] += int(correct)

    def audit(self, min_honeypots: int = 3) -> dict:
        acc = np.where(self.hp_total > 0, self.hp_correct / np.maximum(self.hp_total, 1), np.nan)
        dropped = (self.hp_total >= min_honeypots) & (acc < self.cfg.honeypot_min_accuracy)
        return {
            "judges": [
                {"judge": j, "lazy": bool(self.lazy[j]), "honeypots": int(self.hp_total[j]),
                 "honeypot_accuracy": None if np.isnan(acc[j]) else float(acc[j]), "dropped": bool(dropped[j])}
                for j in range(len(self.lazy))
            ],
            "lazy_judges": int(self.lazy.sum()),
            "dropped_judges": int(dropped.sum()),
            "lazy_caught": int((dropped & self.lazy).sum()),
            "honest_dropped": int((dropped & ~self.lazy).sum()),
            "dropped": [int(j) for j in np.flatnonzero(dropped)],
        }


def build_preferences(
    processed_dir: str | Path,
    cfg: Config,
    out_dir: str | Path,
    simulator=None,
    validate_fn: Callable[[pd.DataFrame, Path], dict] | None = None,
) -> dict:
    """Build the preference dataset of ``processed_dir`` into ``out_dir``; returns its statistics.

    ``simulator`` (an :class:`asft.simulator.Simulator`) enables the judge sources.
    ``validate_fn(pairs, tmp_dir)`` runs before anything is published; raising stops the stage.
    """
    pc = cfg.preferences
    data = ProcessedData.open(processed_dir)
    seqs = data.table("sequences")
    has_ratings = bool(data.stats.get("has_ratings"))
    sources = resolve_sources(pc, has_ratings, simulator is not None)
    valid_t = data.table("valid").set_index("user_idx")["target"]
    test_t = data.table("test").set_index("user_idx")["target"]
    n_users = len(seqs)
    split, fold = user_splits(n_users, pc, cfg.seed)
    rng = np.random.default_rng([cfg.seed, 0x5EED, 2])
    max_len = cfg.preprocess.max_len

    pop = data.item_popularity()
    bins = popularity_bins(pop, pc.popularity_bins)
    bin_members = [np.flatnonzero(bins == b) for b in range(pc.popularity_bins)]

    # Contexts: (user, context_end) with at least one next training item.
    ctx_user, ctx_end = [], []
    for row in seqs.itertuples(index=False):
        n_train = len(row.items) - 2
        ends = np.arange(pc.min_context, n_train)  # next item items[t] is a training event
        if len(ends) == 0:
            continue
        take = np.sort(rng.choice(ends, size=min(pc.contexts_per_user, len(ends)), replace=False))
        ctx_user += [int(row.user_idx)] * len(take)
        ctx_end += take.tolist()
    ctx_user_a = np.asarray(ctx_user, dtype=np.int64)
    ctx_end_a = np.asarray(ctx_end, dtype=np.int64)
    items_of = [np.asarray(x, dtype=np.int64) for x in seqs["items"]]
    ratings_of = [None if r is None else np.asarray(r, dtype=np.float64) for r in seqs["ratings"]] if has_ratings \
        else [None] * n_users
    heldout = {int(u): {int(valid_t[u]), int(test_t[u])} for u in valid_t.index}

    buf = _PairBuffer()
    judges = SimulatedJudges(pc, np.random.default_rng([cfg.seed, 0x5EED, 3])) if simulator is not None else None
    utilities = None
    if judges is not None and any(s in JUDGE_SOURCES for s in sources):
        utilities, tok_of_sim = context_utilities(simulator, data, seqs, ctx_user_a, ctx_end_a)

    for c, (u, t) in enumerate(zip(ctx_user_a, ctx_end_a)):
        items = items_of[u]
        n_train = len(items) - 2
        held = heldout[int(u)]
        consumed = set(items.tolist())
        if "explicit" in sources and ratings_of[u] is not None:
            nxt = np.arange(t, min(t + pc.horizon, n_train))
            nxt = nxt[[int(items[k]) not in held for k in nxt]]
            r = ratings_of[u][nxt]
            ii, jj = np.triu_indices(len(nxt), k=1)
            keep = r[ii] != r[jj]
            ii, jj = ii[keep], jj[keep]
            hi = np.where(r[ii] > r[jj], ii, jj)
            lo = np.where(r[ii] > r[jj], jj, ii)
            if len(hi):
                buf.add(u, c, t, items[nxt[hi]], items[nxt[lo]], "explicit", np.abs(r[hi] - r[lo]), r[hi], r[lo])
        if "implicit" in sources and int(items[t]) not in held:
            pos = int(items[t])
            negs = _popularity_matched(pos, bins, bin_members, consumed, pc.implicit_negatives, rng)
            if len(negs):
                pr = ratings_of[u][t] if ratings_of[u] is not None else np.nan
                buf.add(u, c, t, [pos] * len(negs), negs, "implicit", 1.0, pr)
        if utilities is not None:
            _judge_context(buf, judges, pc, sources, u, c, t, utilities[c], tok_of_sim, consumed, held, items[:t],
                           rng)

    pairs = buf.frame()
    if pc.extra_pairs_file:
        extra = read_extra_pairs(pc.extra_pairs_file, data, seqs, first_context_id=len(ctx_user_a))
        pairs = pd.concat([pairs, extra], ignore_index=True)
        sources = sources + sorted(set(extra["source"]) - set(sources))
    judge_audit = None
    if judges is not None:
        judge_audit = judges.audit()
        if judge_audit["dropped"]:
            pairs = pairs[~pairs["judge"].isin(judge_audit["dropped"])]
    if pairs.empty:
        raise PreferenceConfigError(f"{processed_dir}: no preference pairs could be built with sources {sources}")
    pairs = pairs.reset_index(drop=True)
    pairs["context_id"] = pairs.groupby(["user_idx", "context_end"], sort=True).ngroup().astype(np.int64)
    pairs.insert(0, "pair_id", np.arange(len(pairs), dtype=np.int64))
    pairs["context"] = [items_of[u][max(0, t - max_len) : t].astype(np.int32) if 0 <= u < n_users
                        else np.zeros(0, dtype=np.int32) for u, t in zip(pairs["user_idx"], pairs["context_end"])]
    uidx = pairs["user_idx"].to_numpy()
    known = (uidx >= 0) & (uidx < n_users)
    pairs["split"] = np.where(known, np.asarray(SPLITS, dtype=object)[split[np.where(known, uidx, 0)]], "train")
    pairs["fold"] = np.where(known, fold[np.where(known, uidx, 0)], 0).astype(np.int8)
    pairs = pairs[list(PAIR_SCHEMA.names)]

    stats = _stats(pairs, sources, len(ctx_user_a), judge_audit)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        if validate_fn is not None:  # before the int32/float32 conversion: validation names bad values
            stats["validation"] = validate_fn(pairs, tmp)
        try:
            table = pa.Table.from_pandas(pairs, schema=PAIR_SCHEMA, preserve_index=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError) as e:
            raise DataFormatError(Path(out_dir) / PAIRS_FILE, f"pairs do not fit the pair schema: {e}") from None
        pq.write_table(table, tmp / PAIRS_FILE)
        write_json(tmp / "stats.json", stats)
        if judge_audit is not None:
            write_json(tmp / "judges.json", judge_audit)
        (tmp / "SCHEMA.md").write_text("# pairs.parquet\n\n" + "\n".join(f"- `{k}`: {v}" for k, v in
                                                                          PAIR_COLUMNS.items()) + "\n")
    return stats


def _stats(pairs: pd.DataFrame, sources: list[str], n_contexts: int, audit: dict | None) -> dict:
    by_source = pairs["source"].value_counts()
    out = {
        "pairs": len(pairs),
        "contexts": int(pairs["context_id"].nunique()),
        "contexts_sampled": n_contexts,
        "users": int(pairs["user_idx"].nunique()),
        "sources": sources,
        "pairs_by_source": {s: int(by_source.get(s, 0)) for s in sources},
        "pairs_by_split": {s: int((pairs["split"] == s).sum()) for s in SPLITS},
        "mean_pairs_per_context": float(len(pairs) / max(pairs["context_id"].nunique(), 1)),
        "mean_context_length": float(pairs["context"].map(len).mean()),
    }
    if audit is not None:
        out["judges"] = {k: v for k, v in audit.items() if k not in ("judges",)}
    return out


def _popularity_matched(pos: int, bins: np.ndarray, members: list[np.ndarray], consumed: set, k: int,
                        rng: np.random.Generator) -> list[int]:
    """k distinct items the user never consumed from the positive's popularity bin (widened if needed)."""
    b = int(bins[pos])
    for width in range(len(members)):
        lo, hi = max(0, b - width), min(len(members), b + width + 1)
        pool = np.concatenate(members[lo:hi])
        pool = pool[[int(x) not in consumed for x in pool]] if len(consumed) < 4 * len(pool) else \
            np.setdiff1d(pool, np.fromiter(consumed, dtype=np.int64))
        if len(pool) >= k or (lo == 0 and hi == len(members)):
            return rng.choice(pool, size=min(k, len(pool)), replace=False).tolist() if len(pool) else []
    return []


def context_utilities(simulator, data: ProcessedData, seqs: pd.DataFrame, users: np.ndarray, ends: np.ndarray):
    """True utility of every vocabulary item after each context: [n_contexts, vocab_size] (-inf off-catalog),
    as a lazy :class:`asft.simulator.UtilityTable` (entries computed when indexed: memory bounded by the
    request, never contexts x items)."""
    vocab = data.vocab
    user_ids = seqs["user_id"].astype(str).tolist()
    hist = [vocab.decode(np.asarray(seqs["items"].iloc[u])[:t]) for u, t in zip(users, ends)]
    tok_of_sim = np.full(simulator.n_items, -1, dtype=np.int64)
    in_vocab = [k for k, raw in enumerate(simulator.item_ids) if raw in vocab._index]
    tok_of_sim[in_vocab] = vocab.encode([simulator.item_ids[k] for k in in_vocab])
    sim_of_tok = np.full(vocab.size, -1, dtype=np.int64)
    sim_of_tok[tok_of_sim[in_vocab]] = in_vocab
    return simulator.utility_table([user_ids[u] for u in users], hist, sim_of_tok), tok_of_sim


def _judge_context(buf: _PairBuffer, judges: SimulatedJudges, pc: PreferenceConfig, sources: list[str], u: int,
                   c: int, t: int, util: np.ndarray, tok_of_sim, consumed: set, held: set, context: np.ndarray,
                   rng: np.random.Generator) -> None:
    """Judge tasks for one context: one per judge source, plus honeypots at ``honeypot_rate``."""
    eligible = np.flatnonzero(np.isfinite(util))
    seen = set(context.tolist()) | held
    eligible = eligible[[int(x) not in seen for x in eligible]]
    sizes = {"ranking": pc.ranking_size, "best_of_n": pc.best_of_n, "pairwise": 2}
    for src in (s for s in JUDGE_SOURCES if s in sources):
        n = sizes[src]
        if len(eligible) < n:
            continue
        if rng.random() < pc.judge.honeypot_rate:  # this judge gets a honeypot first
            j = int(rng.integers(len(judges.lazy)))
            judges.honeypot(j, best_first=bool(rng.random() < 0.5))
        shown = rng.choice(eligible, size=n, replace=False)
        j = int(rng.integers(len(judges.lazy)))
        rank = judges.order(j, util[shown])
        ordered = shown[rank]  # best first, in the judge's opinion
        if src == "ranking":
            ii, jj = np.triu_indices(n, k=1)
            margin = (jj - ii).astype(np.float64)
        elif src == "best_of_n":
            ii, jj = np.zeros(n - 1, dtype=np.int64), np.arange(1, n)
            margin = np.ones(n - 1)
        else:
            ii, jj = np.array([0]), np.array([1])
            margin = np.ones(1)
        ch, rj = ordered[ii].copy(), ordered[jj].copy()
        flip = judges.flip(len(ch))
        ch[flip], rj[flip] = rj[flip], ch[flip].copy()
        buf.add(u, c, t, ch, rj, src, margin, judge=j)


_INT32 = (-(2**31), 2**31 - 1)


def read_extra_pairs(path: str | Path, data: ProcessedData, seqs: pd.DataFrame, first_context_id: int) -> pd.DataFrame:
    """Externally collected judgments -> pair rows (tokens). Unknown users/items become -1 so that the
    preference suite reports them (file, column, rows) instead of silently dropping them.

    A malformed file raises :class:`DataFormatError` naming the file, the column and the 0-based data
    rows; the file must lie inside a data root (see :mod:`asft.data.paths`)."""
    path = Path(path)
    try:
        require_data_root(path, "preferences.extra_pairs_file")
        exists = path.is_file()
    except PathContainmentError as e:
        raise DataFormatError(path, str(e)) from None
    except (OSError, ValueError) as e:
        raise DataFormatError(path, f"cannot access preferences.extra_pairs_file: {e}") from None
    if not exists:
        raise DataFormatError(path, "preferences.extra_pairs_file does not exist")
    parquet = path.suffix.lower() in (".parquet", ".pq")
    try:
        if parquet:
            names = pq.read_schema(path).names
            dup = sorted({c for c in names if names.count(c) > 1})
            if dup:
                raise DataFormatError(path, f"duplicated column names {dup}")
            df = pd.read_parquet(path)
        else:
            with open(path, "rb") as fh:
                if fh.read(2) in (b"\xff\xfe", b"\xfe\xff"):
                    raise DataFormatError(path, "file is UTF-16 encoded; save it as UTF-8 (or latin-1)")
            try:
                df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""], encoding="utf-8-sig")
            except UnicodeDecodeError:  # like the interaction loaders: latin-1 when it is not UTF-8
                df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""], encoding="latin-1")
    except DataFormatError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure is a malformed file
        what = "Parquet file (corrupt or truncated?)" if parquet else "CSV file"
        raise DataFormatError(path, f"cannot read judgments {what}: {type(e).__name__}: {str(e)[:300]}") from None
    dup = sorted({str(c) for c in df.columns[df.columns.duplicated()]})
    if dup:
        raise DataFormatError(path, f"duplicated column names {dup}")
    for col in EXTRA_COLUMNS:
        if col not in df.columns:
            raise DataFormatError(path, f"missing column (have {[str(c) for c in df.columns][:20]})", column=col)
    if df.empty:
        raise DataFormatError(path, "judgments file has no rows")
    df = df.reset_index(drop=True)

    def numbers(col: str) -> pd.Series:
        s = df[col]
        if s.map(lambda v: isinstance(v, (list, tuple, dict, set, bytes, np.ndarray))).any():
            return pd.Series(np.nan, index=df.index)
        return pd.to_numeric(s.map(lambda v: v.strip() if isinstance(v, str) else v), errors="coerce")

    def rows(mask: pd.Series | np.ndarray) -> list[int]:
        return np.flatnonzero(np.asarray(mask, dtype=bool)).tolist()

    for col in ("user_id", "context_end", "chosen_item", "rejected_item"):
        s = df[col]
        missing = s.isna().to_numpy(dtype=bool) | s.map(lambda x: isinstance(x, str) and not x.strip()).to_numpy(bool)
        if missing.any():
            raise DataFormatError(path, f"missing {col} (null or empty; 0-based data rows)", column=col,
                                  rows=rows(missing))
    ends = numbers("context_end").astype(np.float64)
    v = ends.to_numpy()
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(v) | (v != np.round(v)) | (v < _INT32[0]) | (v > _INT32[1])
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise DataFormatError(path, f"context_end must be an integer (int32), e.g. row {k} has"
                              f" {str(df['context_end'].iloc[k])[:40]!r} (0-based data rows)", column="context_end",
                              rows=rows(bad))
    user_of = {str(u): i for u, i in zip(seqs["user_id"], seqs["user_idx"])}
    index = data.vocab._index

    def tok(col: str) -> list[int]:
        return [index.get(str(x), -1) for x in df[col]]

    n = len(df)
    if "margin" in df.columns:
        raw_margin = df["margin"]
        margin = numbers("margin")
        given = raw_margin.notna() & ~raw_margin.map(lambda x: isinstance(x, str) and not x.strip())
        bad = (given & margin.isna()).to_numpy(dtype=bool)
        if bad.any():
            raise DataFormatError(path, "margin is not a number (leave it empty for 1; 0-based data rows)",
                                  column="margin", rows=rows(bad))
        margin = margin.fillna(1.0).to_numpy(dtype=np.float64)
    else:
        margin = np.ones(n)
    if "source" in df.columns:
        source = df["source"].map(lambda x: None if x is None or (isinstance(x, float) and np.isnan(x)) else str(x))
        missing = source.isna().to_numpy(dtype=bool)
        if missing.any():
            raise DataFormatError(path, "missing source (null; leave the column out for 'human'; 0-based data rows)",
                                  column="source", rows=rows(missing))
        source = source.to_numpy(dtype=object)
    else:
        source = "human"
    end = ends.astype(np.int64).to_numpy()
    users = np.array([user_of.get(str(u), -1) for u in df["user_id"]], dtype=np.int64)
    return pd.DataFrame({
        "user_idx": users, "context_id": first_context_id + pd.factorize(pd.Series(list(zip(users, end))))[0],
        "context_end": end, "chosen": tok("chosen_item"), "rejected": tok("rejected_item"),
        "source": source, "margin": margin, "chosen_rating": np.nan, "rejected_rating": np.nan, "judge": -1,
    })


_NULLABLE = ("chosen_rating", "rejected_rating")


def read_pairs(pref_dir: str | Path, split: str | None = None) -> pd.DataFrame:
    """``pairs.parquet`` of a preference dataset, checked against :data:`PAIR_SCHEMA` on the way in.

    A missing, unreadable or malformed file (missing or duplicated columns, types that do not convert
    to the schema, nulls, splits or folds outside their sets) raises :class:`DataFormatError` naming the
    file, the column and the 0-based rows. Content checks against the processed data are the
    preference suite's (:func:`asft.data.expectations.validate_preferences`)."""
    path = Path(pref_dir) / PAIRS_FILE
    try:
        exists = path.is_file()
    except (OSError, ValueError) as e:
        raise DataFormatError(path, f"cannot access preference pairs: {e}") from None
    if not exists:
        raise DataFormatError(path, "preference pairs file not found (run the preferences stage first)")
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for broken files
        raise DataFormatError(path, f"not a readable Parquet file (corrupt or truncated?): {type(e).__name__}:"
                              f" {str(e)[:300]}") from None
    names = table.column_names
    dup = sorted({c for c in names if names.count(c) > 1})
    if dup:
        raise DataFormatError(path, f"duplicated column names {dup}")
    cols = {}
    for field in PAIR_SCHEMA:
        if field.name not in names:
            raise DataFormatError(path, f"missing column (have {names[:20]})", column=field.name)
        col = table.column(field.name)
        if col.type != field.type:
            try:
                col = col.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
                raise DataFormatError(path, f"type {table.column(field.name).type} does not convert to"
                                      f" {field.type}: {str(e)[:200]}", column=field.name) from None
        nulls = _null_rows(col) if field.name not in _NULLABLE else []
        if nulls:
            raise DataFormatError(path, f"null values in {field.name} (0-based rows)", column=field.name, rows=nulls)
        if field.name == "context" and pac.list_flatten(col).null_count:
            inner = [i for i, v in enumerate(col.to_pylist()) if any(x is None for x in v)]
            if inner:
                raise DataFormatError(path, "null token inside a context list (0-based rows)", column="context",
                                      rows=inner[:20])
        cols[field.name] = col
    for name, allowed in (("split", list(SPLITS)), ("fold", [0, 1])):
        ok = pac.is_in(cols[name], value_set=pa.array(allowed, type=PAIR_SCHEMA.field(name).type))
        bad = np.flatnonzero(~ok.to_numpy(zero_copy_only=False))
        if len(bad):
            raise DataFormatError(path, f"{name} outside {allowed}, e.g. {cols[name][int(bad[0])].as_py()!r}"
                                  " (0-based rows)", column=name, rows=bad[:20].tolist())
    df = pa.table(cols, schema=PAIR_SCHEMA).to_pandas()
    return df if split is None else df[df["split"] == split].reset_index(drop=True)


def _null_rows(col) -> list[int]:
    if col.null_count == 0:
        return []
    return np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False)).tolist()[:20]


def load_stats(pref_dir: str | Path) -> dict:
    return json.loads((Path(pref_dir) / "stats.json").read_text())
