"""Raw interactions -> token sequences and a chronological leave-one-out split.

Steps (METHODS.md section 7):

1. optional k-core filter (users and items, iterated to a fixed point);
2. users with fewer than ``min_user_events`` events are dropped (leave-one-out needs at least one
   training item, one validation item and one test item); the count is reported in the stats;
3. events are ordered per user by ``timestamp`` (int64) with a stable tie-break on the original row
   order of the source file;
4. items get contiguous tokens after the reserved special tokens (``[PAD]=0, [BOS]=1, [EOS]=2,
   [MASK]=3``), in natural order of their raw ids;
5. per user: last item = test target, second-to-last = validation target, the rest = training;
6. written as Parquet (see :data:`OUTPUT_FILES`), with model inputs truncated to ``max_len``.

Training windows contain only training events, so no validation or test item reaches training.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from asft.config import PreprocessConfig
from asft.data.schema import ITEM, RATING, TS, USER, DataFormatError, InteractionData
from asft.utils import atomic_dir

PAD, BOS, EOS, MASK = 0, 1, 2, 3
SPECIAL_TOKENS = ("[PAD]", "[BOS]", "[EOS]", "[MASK]")
NUM_SPECIAL = len(SPECIAL_TOKENS)

OUTPUT_FILES = {
    "sequences.parquet": "one row per user: user_id, user_idx, items (full token sequence), ratings, timestamps",
    "train.parquet": "training windows: user_idx, tokens (<= max_len+1 tokens; inputs tokens[:-1], labels"
    " tokens[1:]), first_label (labels before it belong to an earlier overlapping window)",
    "valid.parquet": "user_idx, input (last max_len tokens before the target), target, target_rating, history",
    "test.parquet": "same as valid.parquet for the last event; history includes the validation item",
    "vocab.json": "special tokens and raw item ids in token order",
    "stats.json": "dataset statistics",
}


def _natural_key(values: list[str]) -> list:
    if all(v.isdigit() for v in values):
        return sorted(values, key=int)
    return sorted(values)


@dataclass
class ItemVocab:
    """Item <-> token mapping. Token ``NUM_SPECIAL + k`` is ``items[k]``."""

    items: list[str]

    def __post_init__(self) -> None:
        self._index = {raw: i + NUM_SPECIAL for i, raw in enumerate(self.items)}

    @property
    def size(self) -> int:
        """Vocabulary size including special tokens."""
        return NUM_SPECIAL + len(self.items)

    @property
    def n_items(self) -> int:
        return len(self.items)

    def encode(self, raw_ids) -> np.ndarray:
        try:
            return np.fromiter((self._index[r] for r in raw_ids), dtype=np.int64)
        except KeyError as e:
            raise KeyError(f"item {e.args[0]!r} is not in the vocabulary") from None

    def decode(self, tokens) -> list[str]:
        return [self.items[int(t) - NUM_SPECIAL] for t in tokens]

    def to_json(self) -> dict:
        return {"special_tokens": list(SPECIAL_TOKENS), "num_special": NUM_SPECIAL, "items": self.items}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: str | Path) -> ItemVocab:
        path = Path(path)
        if path.is_dir():
            path = path / "vocab.json"
        d = json.loads(path.read_text())
        if d.get("num_special") != NUM_SPECIAL or d.get("special_tokens") != list(SPECIAL_TOKENS):
            raise DataFormatError(path, "vocabulary was written with different special tokens")
        return cls(items=[str(x) for x in d["items"]])


def kcore_filter(df: pd.DataFrame, user_core: int, item_core: int, max_iter: int = 100) -> pd.DataFrame:
    """Iteratively drop users/items with fewer than k events until both constraints hold."""
    if user_core <= 1 and item_core <= 1:
        return df
    for _ in range(max_iter):
        n = len(df)
        if item_core > 1:
            cnt = df[ITEM].map(df[ITEM].value_counts())
            df = df[cnt >= item_core]
        if user_core > 1:
            cnt = df[USER].map(df[USER].value_counts())
            df = df[cnt >= user_core]
        if len(df) == n:
            break
    return df


def order_events(df: pd.DataFrame) -> pd.DataFrame:
    """Sort by user, then timestamp, ties broken by original row order (stable)."""
    if df[TS].dtype != np.int64:
        raise DataFormatError("<interactions>", f"timestamp must be int64, got {df[TS].dtype}", column=TS)
    out = df.copy()
    out["_row"] = np.arange(len(out), dtype=np.int64)
    return out.sort_values([USER, TS, "_row"], kind="mergesort").reset_index(drop=True)


def _windows(seq: np.ndarray, max_len: int, mode: str, stride: int = 0) -> list[tuple[np.ndarray, int]]:
    """Cut a training sequence into windows of at most max_len+1 tokens.

    Returns (tokens, first_label) pairs: labels ``tokens[1:]`` before index ``first_label`` were
    already scored by an earlier window and are ignored, so every target counts exactly once.
    With ``stride < max_len`` windows overlap and each scored target has >= max_len - stride items
    of context.
    """
    w = max_len + 1
    n = len(seq)
    if n <= w:
        return [(seq, 0)]
    if mode == "last":
        return [(seq[-w:], 0)]
    stride = max_len if stride <= 0 else min(stride, max_len)
    out = [(seq[:w], 0)]
    end = w
    while end < n:
        new_end = min(n, end + stride)
        start = new_end - w
        out.append((seq[start:new_end], end - start - 1))
        end = new_end
    return out


def _factorize(col: pd.Series, sort: bool) -> tuple[np.ndarray, np.ndarray]:
    """(int64 codes, uniques) of an id column; with ``sort`` the uniques are in string order (code point
    order, as pandas/Python sort strings), so codes order like the strings."""
    codes, uniques = pd.factorize(col, sort=sort)
    return codes.astype(np.int64, copy=False), np.asarray(uniques, dtype=object)


def _list_array(offsets: np.ndarray, values: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32, copy=False)),
                                    pa.array(values, type=value_type))


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` for each (s, n): the gather index of contiguous slices."""
    lengths = lengths.astype(np.int64, copy=False)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    shift = np.repeat(starts.astype(np.int64) - (np.cumsum(lengths) - lengths), lengths)
    return np.arange(total, dtype=np.int64) + shift


def window_bounds(n: np.ndarray, max_len: int, mode: str, stride: int = 0) -> tuple[np.ndarray, ...]:
    """The training windows of sequences with ``n`` training events, vectorised over sequences.

    Returns ``(owner, start, end, first_label)``: window ``k`` is ``train_seq[start:end]`` of sequence
    ``owner[k]``, in sequence order then window order -- the same windows, in the same order, as
    :func:`_windows` (windows shorter than 2 tokens are left out, as preprocessing drops them)."""
    w = max_len + 1
    n = np.asarray(n, dtype=np.int64)
    stride = max_len if stride <= 0 else min(stride, max_len)
    long = n > w
    if mode == "last":
        count = np.ones(len(n), dtype=np.int64)
    else:
        count = np.where(long, 1 + (n - w + stride - 1) // stride, 1)
    owner = np.repeat(np.arange(len(n), dtype=np.int64), count)
    j = np.arange(len(owner), dtype=np.int64) - np.repeat(np.cumsum(count) - count, count)
    nn = n[owner]
    lo = long[owner]
    if mode == "last":
        end = nn
        start = np.where(lo, nn - w, 0)
        first = np.zeros(len(owner), dtype=np.int64)
    else:
        end = np.where(lo, np.where(j == 0, w, np.minimum(nn, w + j * stride)), nn)
        start = np.where(lo, end - w, 0)
        first = np.where(lo & (j > 0), (w + (j - 1) * stride) - start - 1, 0)
    keep = (end - start) >= 2
    return owner[keep], start[keep], end[keep], first[keep]


def preprocess(data: InteractionData, cfg: PreprocessConfig, out_dir: str | Path,
               validate_fn: Callable[[Path], None] | None = None) -> dict:
    """Run the whole preprocessing and write :data:`OUTPUT_FILES` atomically into ``out_dir``.

    Vectorised (numpy over integer codes of the ids, Arrow list arrays built from offsets); no Python
    loop over users or events. ``validate_fn(tmp_dir)`` runs on the complete output before it is
    published; if it raises, nothing is written.
    """
    df = data.interactions
    if df[TS].dtype != np.int64:
        raise DataFormatError("<interactions>", f"timestamp must be int64, got {df[TS].dtype}", column=TS)
    columns = {c: df[c] for c in (USER, ITEM, TS, RATING) if c in df.columns}
    return _preprocess(columns, len(df), data, cfg, out_dir, validate_fn)


def preprocess_raw_dir(raw_dir: str | Path, cfg: PreprocessConfig, out_dir: str | Path,
                       validate_fn: Callable[[Path], None] | None = None) -> dict:
    """:func:`preprocess` of a published ``raw/`` directory (same outputs as
    ``preprocess(read_raw(raw_dir), ...)``), reading only the canonical columns with Arrow and releasing
    them once they are encoded, so the raw log is not held in memory while the output is validated."""
    raw_dir = Path(raw_dir)
    src = json.loads((raw_dir / "source.json").read_text())
    items = pd.read_parquet(raw_dir / "catalog.parquet") if (raw_dir / "catalog.parquet").is_file() else None
    path = raw_dir / "interactions.parquet"
    names = pq.read_schema(path).names
    table = pq.read_table(path, columns=[c for c in (USER, ITEM, TS, RATING) if c in names])
    n_raw = table.num_rows
    for c in (USER, ITEM, TS):
        if c not in table.column_names:
            raise DataFormatError(path, f"column {c!r} not found", column=c)
    ts_type = table.schema.field(TS).type
    if ts_type != pa.int64():
        raise DataFormatError("<interactions>", f"timestamp must be int64, got {_pandas_dtype(ts_type)}", column=TS)
    columns = {c: table.column(c) for c in table.column_names}
    del table
    data = InteractionData(pd.DataFrame(), items, src["source"], src["format"])
    return _preprocess(columns, n_raw, data, cfg, out_dir, validate_fn)


def _pandas_dtype(t: pa.DataType) -> str:
    try:
        return str(np.dtype(t.to_pandas_dtype()))
    except (NotImplementedError, TypeError):
        return str(t)


def _column(col, what: str) -> np.ndarray | pd.Series:
    """A canonical column (pandas or Arrow) as what :func:`_preprocess` needs: ids as a pandas Series,
    timestamps as int64 and ratings as float64 (NaN when missing)."""
    if isinstance(col, pd.Series):
        if what == "id":
            return col
        return col.to_numpy(dtype=np.int64) if what == "ts" else col.to_numpy(dtype=np.float64, na_value=np.nan)
    if what == "id":
        return col.to_pandas()
    if what == "ts":
        return np.asarray(col.to_numpy(), dtype=np.int64)
    return np.asarray(col.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)


def _preprocess(columns: dict, n_raw: int, data: InteractionData, cfg: PreprocessConfig, out_dir: str | Path,
                validate_fn: Callable[[Path], None] | None) -> dict:
    """The preprocessing of :func:`preprocess` on the canonical columns (pandas or Arrow); ``columns`` is
    emptied as they are encoded (the caller's only reference lets them go)."""
    # users in string order (user_idx follows it); items in order of first appearance after sorting
    ucode, user_names = _factorize(_column(columns.pop(USER), "id"), sort=True)
    icode, item_names = _factorize(_column(columns.pop(ITEM), "id"), sort=False)
    users_raw, items_raw = len(user_names), len(item_names)
    ts = _column(columns.pop(TS), "ts")
    # sort by user, then timestamp; lexsort is stable, so ties keep the source row order
    order = np.lexsort((ts, ucode))
    ucode, icode, ts = ucode[order], icode[order], ts[order]
    rating = _column(columns.pop(RATING), "rating")[order] if RATING in columns else None
    del order

    def keep_rows(mask: np.ndarray) -> None:
        nonlocal ucode, icode, ts, rating
        ucode, icode, ts = ucode[mask], icode[mask], ts[mask]
        if rating is not None:
            rating = rating[mask]

    if cfg.dedupe_consecutive and len(ucode) > 1:
        same = np.zeros(len(ucode), dtype=bool)
        same[1:] = (ucode[1:] == ucode[:-1]) & (icode[1:] == icode[:-1])
        keep_rows(~same)
    if cfg.user_core > 1 or cfg.item_core > 1:  # k-core: iterated to a fixed point (at most 100 rounds)
        for _ in range(100):
            n = len(ucode)
            if cfg.item_core > 1:
                keep_rows(np.bincount(icode, minlength=items_raw)[icode] >= cfg.item_core)
            if cfg.user_core > 1:
                keep_rows(np.bincount(ucode, minlength=users_raw)[ucode] >= cfg.user_core)
            if len(ucode) == n:
                break
    ucount = np.bincount(ucode, minlength=users_raw)
    short_users = int(((ucount > 0) & (ucount < cfg.min_user_events)).sum())
    keep_rows(ucount[ucode] >= cfg.min_user_events)
    if len(ucode) == 0:
        raise DataFormatError(
            data.source or "<interactions>",
            f"no user has at least {cfg.min_user_events} events after filtering; nothing to train on",
        )
    n_events = len(ucode)

    # vocabulary: natural order of the raw ids (ties of equal integers keep first appearance)
    present, first_seen = np.unique(icode, return_index=True)
    present = present[np.argsort(first_seen, kind="stable")]
    vocab = ItemVocab(items=_natural_key([str(x) for x in item_names[present]]))
    token_of = np.zeros(items_raw, dtype=np.int64)
    token_of[present] = vocab.encode(item_names[present])
    tokens = token_of[icode]
    del icode, token_of
    has_rating = rating is not None and bool(np.any(~np.isnan(rating)))
    ratings = rating.astype(np.float32) if has_rating else None
    del rating

    change = np.flatnonzero(ucode[1:] != ucode[:-1]) + 1
    starts = np.concatenate([[0], change]).astype(np.int64)
    ends = np.concatenate([change, [n_events]]).astype(np.int64)
    lengths = ends - starts
    user_ids = user_names[ucode[starts]].astype(str)
    n_users = len(starts)
    del ucode
    L = cfg.max_len
    offsets = np.concatenate([[0], ends])
    uidx = np.arange(n_users, dtype=np.int32)

    seq_table = pa.table(
        {
            "user_id": pa.array(user_ids, type=pa.string()),
            "user_idx": pa.array(uidx),
            "items": _list_array(offsets, tokens.astype(np.int32), pa.int32()),
            "ratings": _list_array(offsets, ratings, pa.float32()) if ratings is not None
            else pa.nulls(n_users, pa.list_(pa.float32())),
            "timestamps": _list_array(offsets, ts, pa.int64()),
        }
    )
    del ts

    owner, w_start, w_end, first = window_bounds(lengths - 2, L, cfg.train_windows, cfg.window_stride)
    w_len = w_end - w_start
    train_table = pa.table(
        {
            "user_idx": pa.array(owner.astype(np.int32)),
            "tokens": _list_array(np.concatenate([[0], np.cumsum(w_len)]),
                                  tokens[_ranges(starts[owner] + w_start, w_len)].astype(np.int32), pa.int32()),
            "first_label": pa.array(first.astype(np.int32)),
        }
    )
    n_windows = len(owner)
    del owner, w_start, w_end, first, w_len

    def held_out(tokens: np.ndarray, ratings: np.ndarray | None, starts: np.ndarray, back: int) -> pa.Table:
        t = lengths - back  # position of the target in each sequence
        hist_off = np.concatenate([[0], np.cumsum(t)])
        in_len = np.minimum(t, L)
        return pa.table(
            {
                "user_idx": pa.array(uidx),
                "input": _list_array(np.concatenate([[0], np.cumsum(in_len)]),
                                     tokens[_ranges(starts + t - in_len, in_len)].astype(np.int32), pa.int32()),
                "target": pa.array(tokens[starts + t].astype(np.int32)),
                "target_rating": pa.array(ratings[starts + t] if ratings is not None
                                          else np.full(n_users, np.nan, dtype=np.float32)),
                "history": _list_array(hist_off, tokens[_ranges(starts, t)].astype(np.int32), pa.int32()),
            }
        )

    item_counts = np.bincount(tokens, minlength=vocab.size)[NUM_SPECIAL:]
    stats = {
        "source": data.source,
        "format": data.format,
        "raw_events": int(n_raw),
        "raw_users": int(users_raw),
        "raw_items": int(items_raw),
        "events": int(n_events),
        "users": int(n_users),
        "items": int(vocab.n_items),
        "vocab_size": int(vocab.size),
        "dropped_short_users": short_users,
        "min_user_events": cfg.min_user_events,
        "train_events": int((lengths - 2).sum()),
        "train_windows": int(n_windows),
        "mean_history": float(lengths.mean()),
        "median_history": float(np.median(lengths)),
        "max_history": int(lengths.max()),
        "density": float(n_events / (n_users * vocab.n_items)),
        "has_ratings": bool(has_rating),
        "max_len": L,
        "top_item_share": float(item_counts.max() / item_counts.sum()),
    }

    with atomic_dir(out_dir) as tmp:
        pq.write_table(seq_table, tmp / "sequences.parquet")
        del seq_table
        pq.write_table(train_table, tmp / "train.parquet")
        del train_table
        pq.write_table(held_out(tokens, ratings, starts, 2), tmp / "valid.parquet")
        pq.write_table(held_out(tokens, ratings, starts, 1), tmp / "test.parquet")
        del tokens, ratings, starts
        vocab.save(tmp / "vocab.json")
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2))
        if data.items is not None:
            cat = data.items[data.items[ITEM].isin(set(vocab.items))]
            cat.to_parquet(tmp / "catalog.parquet", index=False)
        if validate_fn is not None:
            validate_fn(tmp)
    return stats


@dataclass
class ProcessedData:
    """Read-side view of a preprocessed directory."""

    root: Path
    vocab: ItemVocab
    stats: dict

    @classmethod
    def open(cls, root: str | Path) -> ProcessedData:
        root = Path(root)
        missing = [f for f in OUTPUT_FILES if not (root / f).is_file()]
        if missing:
            raise DataFormatError(root, f"not a preprocessed dataset: missing {', '.join(missing)}")
        return cls(root=root, vocab=ItemVocab.load(root / "vocab.json"),
                   stats=json.loads((root / "stats.json").read_text()))

    def table(self, name: str) -> pd.DataFrame:
        return pd.read_parquet(self.root / f"{name}.parquet")

    def train_windows(self) -> list[tuple[np.ndarray, int]]:
        t = pq.read_table(self.root / "train.parquet", columns=["tokens", "first_label"])
        tok = t.column("tokens").combine_chunks()
        offsets = tok.offsets.to_numpy().astype(np.int64)
        values = tok.values.to_numpy(zero_copy_only=False).astype(np.int64)[offsets[0]:offsets[-1]]
        parts = np.split(values, offsets[1:-1] - offsets[0])
        return list(zip(parts, t.column("first_label").to_numpy().astype(int).tolist()))

    def item_popularity(self) -> np.ndarray:
        """Training-event count per token (special tokens 0)."""
        items = pq.read_table(self.root / "sequences.parquet", columns=["items"]).column("items").combine_chunks()
        offsets = items.offsets.to_numpy().astype(np.int64)
        values = items.values.to_numpy(zero_copy_only=False).astype(np.int64)
        n = np.diff(offsets)
        pos = np.arange(offsets[-1] - offsets[0]) - np.repeat(offsets[:-1] - offsets[0], n)
        train = values[offsets[0]:offsets[-1]][pos < np.repeat(n - 2, n)]  # items[:-2] of each user
        return np.bincount(train, minlength=self.vocab.size).astype(np.int64)
