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


def preprocess(data: InteractionData, cfg: PreprocessConfig, out_dir: str | Path,
               validate_fn: Callable[[Path], None] | None = None) -> dict:
    """Run the whole preprocessing and write :data:`OUTPUT_FILES` atomically into ``out_dir``.

    ``validate_fn(tmp_dir)`` runs on the complete output before it is published; if it raises,
    nothing is written.
    """
    df = data.interactions
    n_raw = len(df)
    users_raw = df[USER].nunique()
    items_raw = df[ITEM].nunique()
    df = order_events(df)
    if cfg.dedupe_consecutive:
        same = (df[USER] == df[USER].shift()) & (df[ITEM] == df[ITEM].shift())
        df = df[~same]
    df = kcore_filter(df, cfg.user_core, cfg.item_core)
    ucount = df[USER].map(df[USER].value_counts())
    short_users = int(df.loc[ucount < cfg.min_user_events, USER].nunique())
    df = df[ucount >= cfg.min_user_events].reset_index(drop=True)
    if df.empty:
        raise DataFormatError(
            data.source or "<interactions>",
            f"no user has at least {cfg.min_user_events} events after filtering; nothing to train on",
        )
    # filtering may have dropped rows but never reorders them: df is still sorted by user, ts, _row.

    vocab = ItemVocab(items=_natural_key(df[ITEM].unique().tolist()))
    tokens = vocab.encode(df[ITEM].to_numpy())
    has_rating = RATING in df.columns and df[RATING].notna().any()
    ratings = df[RATING].to_numpy(dtype=np.float32) if has_rating else None
    ts = df[TS].to_numpy(dtype=np.int64)

    users = df[USER].to_numpy()
    boundaries = np.flatnonzero(users[1:] != users[:-1]) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(df)]])
    user_ids = users[starts].astype(str)

    seq_rows, train_rows, valid_rows, test_rows = [], [], [], []
    L = cfg.max_len
    for uidx, (s, e) in enumerate(zip(starts, ends)):
        seq = tokens[s:e]
        seq_rows.append(
            {
                "user_id": str(user_ids[uidx]),
                "user_idx": uidx,
                "items": seq.astype(np.int32),
                "ratings": None if ratings is None else ratings[s:e],
                "timestamps": ts[s:e],
            }
        )
        train_seq = seq[:-2]
        for win, first in _windows(train_seq, L, cfg.train_windows, cfg.window_stride):
            if len(win) >= 2:
                train_rows.append({"user_idx": uidx, "tokens": win.astype(np.int32), "first_label": first})
        for rows, t in ((valid_rows, len(seq) - 2), (test_rows, len(seq) - 1)):
            hist = seq[:t]
            rows.append(
                {
                    "user_idx": uidx,
                    "input": hist[-L:].astype(np.int32),
                    "target": int(seq[t]),
                    "target_rating": float(ratings[s + t]) if ratings is not None else float("nan"),
                    "history": hist.astype(np.int32),
                }
            )

    lengths = ends - starts
    item_counts = np.bincount(tokens, minlength=vocab.size)[NUM_SPECIAL:]
    stats = {
        "source": data.source,
        "format": data.format,
        "raw_events": int(n_raw),
        "raw_users": int(users_raw),
        "raw_items": int(items_raw),
        "events": len(df),
        "users": len(starts),
        "items": int(vocab.n_items),
        "vocab_size": int(vocab.size),
        "dropped_short_users": short_users,
        "min_user_events": cfg.min_user_events,
        "train_events": int((lengths - 2).sum()),
        "train_windows": len(train_rows),
        "mean_history": float(lengths.mean()),
        "median_history": float(np.median(lengths)),
        "max_history": int(lengths.max()),
        "density": float(len(df) / (len(starts) * vocab.n_items)),
        "has_ratings": bool(has_rating),
        "max_len": L,
        "top_item_share": float(item_counts.max() / item_counts.sum()),
    }

    seq_schema = pa.schema(
        [
            ("user_id", pa.string()),
            ("user_idx", pa.int32()),
            ("items", pa.list_(pa.int32())),
            ("ratings", pa.list_(pa.float32())),
            ("timestamps", pa.list_(pa.int64())),
        ]
    )
    eval_schema = pa.schema(
        [
            ("user_idx", pa.int32()),
            ("input", pa.list_(pa.int32())),
            ("target", pa.int32()),
            ("target_rating", pa.float32()),
            ("history", pa.list_(pa.int32())),
        ]
    )
    train_schema = pa.schema([("user_idx", pa.int32()), ("tokens", pa.list_(pa.int32())), ("first_label", pa.int32())])
    with atomic_dir(out_dir) as tmp:
        pq.write_table(pa.Table.from_pylist(seq_rows, schema=seq_schema), tmp / "sequences.parquet")
        pq.write_table(pa.Table.from_pylist(train_rows, schema=train_schema), tmp / "train.parquet")
        pq.write_table(pa.Table.from_pylist(valid_rows, schema=eval_schema), tmp / "valid.parquet")
        pq.write_table(pa.Table.from_pylist(test_rows, schema=eval_schema), tmp / "test.parquet")
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
        return [(np.asarray(x, dtype=np.int64), int(f))
                for x, f in zip(t.column("tokens").to_pylist(), t.column("first_label").to_pylist())]

    def item_popularity(self) -> np.ndarray:
        """Training-event count per token (special tokens 0)."""
        seqs = self.table("sequences")
        counts = np.zeros(self.vocab.size, dtype=np.int64)
        for items in seqs["items"]:
            np.add.at(counts, np.asarray(items[:-2], dtype=np.int64), 1)
        return counts
