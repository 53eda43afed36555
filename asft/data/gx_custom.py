"""The project's own Great Expectations (GX 1.x) expectations: every data rule of the pipeline that GX
does not ship (id and timestamp types, the rating scale, token lists, the leave-one-out window rules,
the leakage rule, the preference-pair rules, files of a processed directory) as a named expectation.

Each rule is a pure pandas function (``True`` = the row passes) wrapped into a GX map metric
(``asft.<rule>``) and an ``Expectation`` subclass whose class name gives the expectation type that
appears in validation results and data docs (``ExpectItemsToNotBeHeldOutTargets`` ->
``expect_items_to_not_be_held_out_targets``). They return the usual map-expectation result (count,
0-based row positions, failing values), so a failure names the rule, the column(s) and the rows.

Rules see the values of the table itself plus *joined reference columns* that the suite builder adds
from the other tables (e.g. a pair's ``valid_target``/``test_target``, a window's ``training_items``);
the rule logic runs inside GX. Rows that are not of the right type (not an integer list, ...) pass the
value rules: the type rule of that column reports them, once.

Importing this module imports GX (about 3 s) and registers the expectations; import it lazily.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from great_expectations.compatibility import pydantic
from great_expectations.execution_engine import PandasExecutionEngine
from great_expectations.expectations.expectation import (
    BatchExpectation,
    ColumnMapExpectation,
    ColumnPairMapExpectation,
    MulticolumnMapExpectation,
)
from great_expectations.expectations.metrics.map_metric_provider import (
    ColumnMapMetricProvider,
    ColumnPairMapMetricProvider,
    MulticolumnMapMetricProvider,
)
from great_expectations.expectations.metrics.map_metric_provider.column_condition_partial import (
    column_condition_partial,
)
from great_expectations.expectations.metrics.map_metric_provider.column_pair_condition_partial import (
    column_pair_condition_partial,
)
from great_expectations.expectations.metrics.map_metric_provider.multicolumn_condition_partial import (
    multicolumn_condition_partial,
)

SLICE_HOLDOUT = 2  # the last two events of a sequence are validation and test


# ------------------------------------------------------------------------------ value helpers
def _ok(mask, index) -> pd.Series:
    return pd.Series(np.asarray(mask, dtype=bool), index=index)


def _is_int_value(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real_value(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _numeric(s: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype)


def as_list(v: Any) -> np.ndarray | None:
    """``v`` as a 1-D int64 array when it is a list/array of integers, else None."""
    if v is None or isinstance(v, (str, bytes, dict)) or (isinstance(v, float) and math.isnan(v)):
        return None
    try:
        if np.ndim(v) != 1:
            return None
        a = np.asarray(v)
    except (TypeError, ValueError):
        return None
    if a.dtype.kind in "iu":
        return a.astype(np.int64, copy=False)
    if a.size == 0:
        return np.zeros(0, np.int64)
    if a.dtype.kind == "f" and np.isfinite(a).all() and (a == np.round(a)).all():
        return a.astype(np.int64)
    if a.dtype == object and all(_is_int_value(x) for x in a):
        return a.astype(np.int64)
    return None


@dataclass
class Lists:
    """A column of integer lists as flat values + offsets; ``null``: missing or not an integer list."""

    values: np.ndarray
    offsets: np.ndarray
    null: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return np.where(self.null, -1, np.diff(self.offsets))

    @property
    def starts(self) -> np.ndarray:
        return self.offsets[:-1]

    def row(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def parents(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.null)), np.diff(self.offsets))

    def rows_with(self, bad_values: np.ndarray) -> np.ndarray:
        """Per row: how many of its values are flagged."""
        return np.bincount(self.parents()[bad_values], minlength=len(self.null))

    def to_arrow(self):
        import pyarrow as pa

        return pa.LargeListArray.from_arrays(pa.array(self.offsets), pa.array(self.values),
                                             mask=pa.array(self.null))

    def to_series(self) -> pd.Series:
        """An arrow-backed pandas column (cheap for GX to fingerprint, fast to read back)."""
        return pd.Series(pd.arrays.ArrowExtensionArray(self.to_arrow()))


@dataclass
class Views:
    """Rows that view the lists of a shared table: row i is ``base`` row ``index[i]`` (null when
    ``index < 0``). A reference column joined per row (a user's training items for each of their
    windows) is stored once per user, as a dictionary-encoded Arrow column, and read as this."""

    base: Lists
    index: np.ndarray

    @property
    def values(self) -> np.ndarray:
        return self.base.values

    @property
    def null(self) -> np.ndarray:
        ok = self.index >= 0
        return ~ok | (self.base.null[np.where(ok, self.index, 0)] if len(self.base.null) else True)

    @property
    def lengths(self) -> np.ndarray:
        if not len(self.base.null):
            return np.full(len(self.index), -1, dtype=np.int64)
        return np.where(self.null, -1, self.base.lengths[np.maximum(self.index, 0)])

    @property
    def starts(self) -> np.ndarray:
        if not len(self.base.null):
            return np.zeros(len(self.index), dtype=np.int64)
        return self.base.offsets[np.maximum(self.index, 0)]


def shared_lists(index: np.ndarray, base) -> pd.Series:
    """A column whose row i is the list ``base[index[i]]`` (null where ``index < 0``), stored once per
    distinct list: a dictionary-encoded Arrow column (Arrow list ``base`` as the dictionary)."""
    import pyarrow as pa

    index = np.asarray(index, dtype=np.int64)
    idx = pa.array(index, mask=index < 0, type=pa.int64())
    return pd.Series(pd.arrays.ArrowExtensionArray(pa.DictionaryArray.from_arrays(idx, base)))


def _dictionary(arr):
    """A (chunked) dictionary array as one array."""
    import pyarrow as pa

    if isinstance(arr, pa.ChunkedArray):
        if arr.num_chunks == 1:
            return arr.chunk(0)
        arr = arr.unify_dictionaries()
        if arr.num_chunks == 0:
            return pa.DictionaryArray.from_arrays(pa.array([], pa.int64()), pa.array([], arr.type.value_type))
        idx = pa.concat_arrays([c.indices.cast(pa.int64()) for c in arr.chunks])
        return pa.DictionaryArray.from_arrays(idx, arr.chunk(0).dictionary)
    return arr


def to_views(s: pd.Series) -> Views | Lists:
    """A column of integer lists as :class:`Views` when it is dictionary-encoded (see
    :func:`shared_lists`), else as :class:`Lists`; both have values, starts, lengths and null."""
    import pyarrow as pa

    if isinstance(s.dtype, pd.ArrowDtype) and pa.types.is_dictionary(s.dtype.pyarrow_dtype):
        arr = _dictionary(pa.array(s.array))
        vt = arr.type.value_type
        if (pa.types.is_list(vt) or pa.types.is_large_list(vt)) and pa.types.is_integer(vt.value_type):
            index = arr.indices.cast(pa.int64()).fill_null(-1).to_numpy(zero_copy_only=False)
            return Views(lists_from_arrow(arr.dictionary), np.asarray(index, dtype=np.int64))
        return to_lists(pd.Series(arr.dictionary_decode().to_pylist(), dtype=object))
    return to_lists(s)


def _pairs_match(A: Lists, rows: np.ndarray, values: np.ndarray, start: np.ndarray,
                 chunk: int = 1 << 20) -> np.ndarray:
    """For each k: ``A.row(rows[k]) == values[start[k] : start[k] + len(A.row(rows[k]))]`` (the caller
    guarantees the slice is in range). Vectorised, in chunks of about ``chunk`` compared values."""
    out = np.ones(len(rows), dtype=bool)
    if len(rows) == 0:
        return out
    lens = np.diff(A.offsets)[rows]
    csum = np.cumsum(lens)
    k0 = 0
    while k0 < len(rows):
        base = csum[k0 - 1] if k0 else 0
        k1 = max(int(np.searchsorted(csum, base + chunk, side="right")), k0 + 1)
        ln = lens[k0:k1]
        rep = np.repeat(np.arange(k0, k1), ln)
        within = np.arange(int(ln.sum()), dtype=np.int64) - np.repeat(np.cumsum(ln) - ln, ln)
        got = A.values[A.offsets[rows[rep]] + within]
        exp = values[start[rep] + within]
        bad = np.bincount(rep[got != exp] - k0, minlength=k1 - k0)
        out[k0:k1] = bad == 0
        k0 = k1
    return out


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    lengths = lengths.astype(np.int64, copy=False)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    return np.arange(total, dtype=np.int64) + np.repeat(starts.astype(np.int64) - (np.cumsum(lengths) - lengths),
                                                        lengths)


def arrow_lists(s: pd.Series) -> pd.Series:
    """A column of integer lists as an arrow-backed column; unchanged when it holds anything else."""
    L = to_lists(s)
    if L.null.any() and (s.notna().to_numpy() & L.null).any():
        return s
    out = L.to_series()
    out.index = s.index
    return out


def lists_from_arrow(arr) -> Lists:
    import pyarrow as pa

    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks else pa.array([], type=arr.type)
    arr = arr.cast(pa.large_list(pa.int64()))
    null = np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    offsets = np.asarray(arr.offsets.to_numpy(), dtype=np.int64)
    offsets = offsets - offsets[0]
    values = arr.values.slice(int(arr.offsets[0].as_py()), int(offsets[-1]))
    vals = values.fill_null(-(2**62)).to_numpy(zero_copy_only=False).astype(np.int64)
    return Lists(vals, offsets, null)


def to_lists(s: pd.Series) -> Lists:
    """A pandas column of token lists (lists or numpy arrays) -> Lists; fast path through pyarrow."""
    import pyarrow as pa

    try:
        if isinstance(s.dtype, pd.ArrowDtype):
            arr = pa.array(s.array)
        else:
            arr = pa.array(s.to_numpy(dtype=object), from_pandas=True)
        if (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)) and pa.types.is_integer(
            arr.type.value_type
        ):
            return lists_from_arrow(arr)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        pass
    arrays = [as_list(v) for v in s.tolist()]
    null = np.array([a is None for a in arrays], dtype=bool)
    lengths = np.fromiter((0 if a is None else len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    parts = [a for a in arrays if a is not None and len(a)]
    values = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    return Lists(values, offsets, null)


def lists(s: pd.Series) -> list[np.ndarray | None]:
    L = to_lists(s)
    return [None if L.null[i] else L.row(i) for i in range(len(L.null))]


def tails_match(ctx: Lists, items: Lists | Views, end: np.ndarray, max_len: int) -> np.ndarray:
    """Row i: ctx[i] == items[i][:end[i]][-max_len:] (vectorised over all rows)."""
    n = len(end)
    match = np.zeros(n, dtype=bool)
    want = np.minimum(end, max_len)
    rows = np.flatnonzero(~ctx.null & ~items.null & (end >= 1) & (end <= items.lengths) & (ctx.lengths == want))
    match[rows] = _pairs_match(ctx, rows, items.values, items.starts[rows] + end[rows] - want[rows])
    return match


def nonblank_strings(s: pd.Series) -> pd.Series:
    if pd.api.types.infer_dtype(s, skipna=True) == "string":
        return s.astype(str).str.strip().str.len() > 0
    return s.map(lambda v: isinstance(v, str) and bool(v.strip())).astype(bool)


def integers(s: pd.Series) -> pd.Series:
    if pd.api.types.is_bool_dtype(s.dtype):
        return _ok(np.zeros(len(s)), s.index)
    if pd.api.types.is_integer_dtype(s.dtype):
        return _ok(np.ones(len(s)), s.index)
    if pd.api.types.is_float_dtype(s.dtype):
        v = s.to_numpy(dtype=np.float64)
        return _ok(np.isfinite(v) & (v == np.round(v)), s.index)
    return s.map(lambda v: _is_int_value(v) or (isinstance(v, float) and v.is_integer())).astype(bool)


def int64_timestamps(s: pd.Series, min_value: int, max_value: int) -> pd.Series:
    """int64 values within [min_value, max_value]. In a column of another dtype the values that are not
    integers fail, or every value when all are (the dtype itself is wrong)."""
    if s.dtype == np.int64:
        v = s.to_numpy()
        return _ok((v >= min_value) & (v <= max_value), s.index)
    ok = s.map(lambda v: _is_int_value(v) and min_value <= int(v) <= max_value).astype(bool)
    return ok if not ok.all() else _ok(np.zeros(len(s)), s.index)


def on_rating_scale(s: pd.Series, min_value: float, max_value: float, step: float | None) -> pd.Series:
    """A finite number within [min_value, max_value] (on the ``step`` grid from min_value when given);
    missing (NaN) ratings fail."""
    if _numeric(s):
        v = s.to_numpy(dtype=np.float64, na_value=np.nan)
        known = np.ones(len(s), dtype=bool)
    else:
        known = s.map(_is_real_value).to_numpy(dtype=bool)
        v = np.where(known, pd.to_numeric(s.where(known), errors="coerce").to_numpy(dtype=np.float64), np.nan)
    with np.errstate(invalid="ignore"):
        ok = known & np.isfinite(v) & (v >= min_value - 1e-9) & (v <= max_value + 1e-9)
        if step:
            k = (v - min_value) / step
            ok &= np.abs(k - np.round(k)) < 1e-6
    return _ok(ok, s.index)


def real_numbers(s: pd.Series) -> pd.Series:
    if _numeric(s):
        return _ok(np.ones(len(s)), s.index)
    return s.map(_is_real_value).astype(bool)


def integer_lists(s: pd.Series) -> pd.Series:
    return _ok(~to_lists(s).null, s.index)


def list_lengths_between(s: pd.Series, min_value: int | None, max_value: int | None) -> pd.Series:
    L = to_lists(s)
    n = L.lengths
    ok = np.ones(len(n), dtype=bool)
    if min_value is not None:
        ok &= n >= min_value
    if max_value is not None:
        ok &= n <= max_value
    return _ok(L.null | ok, s.index)


def list_values_between(s: pd.Series, min_value: int, max_value: int) -> pd.Series:
    L = to_lists(s)
    return _ok(L.null | (L.rows_with((L.values < min_value) | (L.values > max_value)) == 0), s.index)


def list_values_non_decreasing(s: pd.Series) -> pd.Series:
    L = to_lists(s)
    if len(L.values) < 2:
        return _ok(np.ones(len(L.null)), s.index)
    par = L.parents()
    dec = (np.diff(L.values) < 0) & (par[1:] == par[:-1])
    return _ok(L.null | (np.bincount(par[1:][dec], minlength=len(L.null)) == 0), s.index)


def value_shares_at_least(s: pd.Series, min_share: float) -> pd.Series:
    shares = s.map(s.value_counts(normalize=True))
    return _ok(shares.to_numpy(dtype=np.float64) >= min_share - 1e-12, s.index)


def users_with_min_events(s: pd.Series, min_events: int) -> pd.Series:
    codes, _ = pd.factorize(s)  # missing values (code -1) are filtered out by GX before this runs
    counts = np.bincount(codes[codes >= 0], minlength=1)
    return _ok(np.where(codes >= 0, counts[np.maximum(codes, 0)], 0) >= min_events, s.index)


def found_in_reference(a: pd.Series, b: pd.Series) -> pd.Series:
    """Column B is column A looked up in a reference table (null when absent): they must be equal."""
    known = b.notna().to_numpy(dtype=bool)
    if a.dtype == b.dtype or (_numeric(a) and _numeric(b)):
        with np.errstate(invalid="ignore"):
            eq = a.eq(b).fillna(False).to_numpy(dtype=bool)
    else:
        eq = a.astype(object).to_numpy() == b.astype(object).to_numpy()
    return _ok(known & eq, a.index)


def values_differ(a: pd.Series, b: pd.Series) -> pd.Series:
    return _ok(a.to_numpy() != b.to_numpy(), a.index)


def list_lengths_equal(a: pd.Series, b: pd.Series) -> pd.Series:
    A, B = to_views(a), to_views(b)
    return _ok(A.null | B.null | (A.lengths == B.lengths), a.index)


def labels_within_windows(a: pd.Series, b: pd.Series) -> pd.Series:
    """Column A: a training window; B: its first label position, at most len(window) - 2."""
    A = to_lists(a)
    if _numeric(b):
        k = b.to_numpy(dtype=np.float64, na_value=np.nan)
        with np.errstate(invalid="ignore"):
            return _ok(A.null | (k <= A.lengths - 2), a.index)
    n = A.lengths
    return _ok([bool(A.null[i]) or not _is_real_value(k) or k <= n[i] - 2 for i, k in enumerate(b.tolist())], a.index)


def inputs_are_history_tails(a: pd.Series, b: pd.Series, max_len: int) -> pd.Series:
    """input (A) == history (B)[-max_len:] (an empty history has an empty tail)."""
    A, B = to_lists(a), to_views(b)
    hist = B.lengths
    ok = A.null | B.null
    ok |= ~ok & (hist == 0) & (A.lengths == 0)
    return _ok(ok | tails_match(A, B, np.where(B.null, 0, hist), max_len), a.index)


def lists_equal(a: pd.Series, b: pd.Series) -> pd.Series:
    A, B = to_lists(a), to_views(b)
    ok = A.null.copy()
    rows = np.flatnonzero(~A.null & ~B.null & (A.lengths == B.lengths))
    ok[rows] = _pairs_match(A, rows, B.values, B.starts[rows])
    return _ok(ok, a.index)


def is_slice(w: np.ndarray, part: np.ndarray) -> bool:
    n = len(w)
    if n == 0 or n > len(part):
        return False
    return any(np.array_equal(part[s : s + n], w) for s in np.flatnonzero(part[: len(part) - n + 1] == w[0]))


def slices_of(W: Lists, P: Lists | Views) -> np.ndarray:
    """Row i: W[i] is a non-empty contiguous slice of P[i] (null rows: False). Vectorised: every start
    of P[i] that holds W[i]'s first value is a candidate (found by a sorted (list, value) index of P's
    distinct lists), and each candidate is compared in full."""
    n = len(W.null)
    ok = np.zeros(n, dtype=bool)
    wl, pl = W.lengths, P.lengths
    rows = np.flatnonzero(~W.null & ~P.null & (wl >= 1) & (wl <= pl))
    if len(rows) == 0:
        return ok
    base = P.base if isinstance(P, Views) else P
    brow_of = P.index[rows] if isinstance(P, Views) else rows
    blen = np.diff(base.offsets)
    first = W.values[W.offsets[rows]]
    # index of (list, value) -> positions; values ranked densely (tokens: their own offset from the minimum)
    vmin, vmax = (int(base.values.min()), int(base.values.max())) if len(base.values) else (0, 0)
    if (vmax - vmin + 1) * (len(blen) + 1) < 2**62:
        span, rank = vmax - vmin + 1, base.values - vmin
        r = first - vmin
        known = (first >= vmin) & (first <= vmax)
        r = np.where(known, r, 0)
    else:  # values too spread to combine with the list number: rank them
        uniq, rank = np.unique(base.values, return_inverse=True)
        span = len(uniq)
        r = np.minimum(np.searchsorted(uniq, first), len(uniq) - 1)
        known = uniq[r] == first
    key = np.repeat(np.arange(len(blen), dtype=np.int64) * span, blen) + rank.astype(np.int64)
    del rank
    order = np.argsort(key, kind="stable")
    key = key[order]
    bpos = (order - np.repeat(base.offsets[:-1], blen)[order]).astype(np.int64)
    del order
    q = brow_of * span + r
    lo = np.searchsorted(key, q, side="left")
    cnt = np.where(known, np.searchsorted(key, q, side="right") - lo, 0)
    del key
    cand = np.repeat(rows, cnt)
    start = bpos[_ranges(lo, cnt)]
    fits = start + wl[cand] <= pl[cand]
    cand, start = cand[fits], start[fits]
    good = _pairs_match(W, cand, P.values, P.starts[cand] + start)
    ok[cand[good]] = True
    return ok


def windows_in_training_part(df: pd.DataFrame) -> pd.Series:
    """Columns (window, training_items): the window is a contiguous slice of the training items."""
    w, part = df.columns[:2]
    W = to_lists(df[w])
    return _ok(W.null | slices_of(W, to_views(df[part])), df.index)


def contexts_end_in_training_part(df: pd.DataFrame) -> pd.Series:
    """Columns (context_end, training_items): 1 <= context_end <= len(training_items)."""
    end, part = df.columns[:2]
    e = pd.to_numeric(df[end], errors="coerce").to_numpy(dtype=np.float64)
    P = to_views(df[part])
    with np.errstate(invalid="ignore"):
        return _ok(~P.null & (e >= 1) & (e <= P.lengths), df.index)


def contexts_are_training_tails(df: pd.DataFrame, max_len: int) -> pd.Series:
    """Columns (context, context_end, training_items): context == training_items[:context_end][-max_len:]
    (rows whose context is not a list or whose context_end is outside the training part are reported
    by those rules)."""
    ctx, end, part = df.columns[:3]
    C, P = to_lists(df[ctx]), to_views(df[part])
    e = pd.to_numeric(df[end], errors="coerce").to_numpy(dtype=np.float64)
    with np.errstate(invalid="ignore"):
        judged = ~C.null & ~P.null & (e >= 1) & (e <= P.lengths)
    ends = np.where(judged, e, 0).astype(np.int64)
    return _ok(~judged | tails_match(C, P, ends, max_len), df.index)


def items_not_held_out(df: pd.DataFrame) -> pd.Series:
    """Columns (item, held-out target, ...): the item is none of the user's held-out targets."""
    item = df.iloc[:, 0].to_numpy()
    ok = np.ones(len(df), dtype=bool)
    for c in df.columns[1:]:
        ok &= item != df[c].to_numpy()
    return _ok(ok, df.index)


def one_value_per_group(df: pd.DataFrame) -> pd.Series:
    """Columns (group, value): every group has a single value."""
    g, v = df.columns[:2]
    return _ok(df.groupby(g, sort=False, dropna=False)[v].transform("nunique").to_numpy() <= 1, df.index)


def ids_one_to_one(df: pd.DataFrame) -> pd.Series:
    """Columns (id, key...): each id names one key and each key has one id."""
    ident, keys = df.columns[0], list(df.columns[1:])
    per_id = df.groupby(ident, sort=False, dropna=False)[keys].transform("nunique").max(axis=1)
    per_key = df.groupby(keys, sort=False, dropna=False)[ident].transform("nunique")
    return _ok((per_id.to_numpy() <= 1) & (per_key.to_numpy() <= 1), df.index)


def _file_exists(root: str, name: str) -> bool:
    return (Path(root) / str(name)).is_file()


def _file_readable(root: str, name: str) -> bool:
    p = Path(root) / str(name)
    if not p.is_file():
        return True  # expect_files_to_exist reports it
    try:
        if p.suffix == ".parquet":
            import pyarrow.parquet as pq

            pq.read_metadata(p)
        elif p.name == "vocab.json":
            from asft.data.preprocess import ItemVocab

            ItemVocab.load(p)
        else:
            if not isinstance(json.loads(p.read_text()), dict):
                return False
    except Exception:  # noqa: BLE001 - pyarrow/json raise several types for broken files
        return False
    return True


def files_exist(s: pd.Series, root: str) -> pd.Series:
    return _ok([_file_exists(root, v) for v in s.tolist()], s.index)


def files_readable(s: pd.Series, root: str) -> pd.Series:
    return _ok([_file_readable(root, v) for v in s.tolist()], s.index)


# ------------------------------------------------------------------------------ registration
_KIND = {
    "column": (ColumnMapMetricProvider, ColumnMapExpectation, column_condition_partial),
    "pair": (ColumnPairMapMetricProvider, ColumnPairMapExpectation, column_pair_condition_partial),
    "multi": (MulticolumnMapMetricProvider, MulticolumnMapExpectation, multicolumn_condition_partial),
}
EXPECTATIONS: dict[str, type] = {}


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _register(name: str, kind: str, fn: Callable, params: tuple[str, ...] = (), nulls: bool = False,
              doc: str = "") -> type:
    """Metric ``asft.<rule>`` (pandas) + expectation class ``name`` (``expect_...`` in GX)."""
    provider_base, expectation_base, partial = _KIND[kind]
    rule = _snake(name)[len("expect_"):]
    metric = f"asft.{rule}"

    if kind == "column":
        def pandas_fn(cls, column, **kw):
            return fn(column, **{p: kw.get(p) for p in params})
    elif kind == "pair":
        def pandas_fn(cls, column_A, column_B, **kw):
            return fn(column_A, column_B, **{p: kw.get(p) for p in params})
    else:
        def pandas_fn(cls, column_list, **kw):
            return fn(column_list, **{p: kw.get(p) for p in params})

    provider_ns: dict[str, Any] = {
        "__module__": __name__,
        "condition_metric_name": metric,
        "condition_value_keys": params,
        "_pandas": partial(engine=PandasExecutionEngine)(pandas_fn),
    }
    if kind == "column":
        provider_ns["filter_column_isnull"] = not nulls
    type(f"{name[6:]}Metric", (provider_base,), provider_ns)
    ns: dict[str, Any] = {
        "__module__": __name__,
        "__doc__": doc or fn.__doc__,
        "__annotations__": {p: Any for p in params},
        "map_metric": metric,
        "success_keys": ("mostly", *params),
        "args_keys": ({"column": ("column",), "pair": ("column_A", "column_B"), "multi": ("column_list",)}[kind]
                      + params),
        **{p: pydantic.Field(None) for p in params},
    }
    if kind == "pair":  # as in GX's own pair expectations: which rows with missing values to skip
        ns["__annotations__"]["ignore_row_if"] = str
        ns["ignore_row_if"] = "both_values_are_missing"
        ns["success_keys"] = ("ignore_row_if", *ns["success_keys"])
    cls = type(name, (expectation_base,), ns)
    EXPECTATIONS[_snake(name)] = cls
    globals()[name] = cls
    return cls


class ExpectTableColumnsToBeUnique(BatchExpectation):
    """No two columns of the table share a name."""

    metric_dependencies: ClassVar[tuple[str, ...]] = ("table.columns",)
    domain_keys: ClassVar[tuple[str, ...]] = ("batch_id", "row_condition", "condition_parser")

    def _validate(self, metrics: dict, runtime_configuration: dict | None = None, execution_engine=None) -> dict:
        cols = [str(c) for c in metrics["table.columns"]]
        dup = sorted({c for c in cols if cols.count(c) > 1})
        return {"success": not dup, "result": {"observed_value": dup}}


EXPECTATIONS["expect_table_columns_to_be_unique"] = ExpectTableColumnsToBeUnique

_register("ExpectColumnValuesToBeNonblankStrings", "column", nonblank_strings,
          doc="Identifiers are non-blank strings.")
_register("ExpectColumnValuesToBeIntegers", "column", integers, doc="Values are integers (not bool, not text).")
_register("ExpectColumnValuesToBeInt64Timestamps", "column", int64_timestamps, ("min_value", "max_value"),
          doc="Timestamps are int64 within [min_value, max_value].")
_register("ExpectColumnValuesToBeOnRatingScale", "column", on_rating_scale, ("min_value", "max_value", "step"),
          nulls=True, doc="Ratings are numbers within the dataset's scale (on its grid); missing ratings fail.")
_register("ExpectColumnValuesToBeRealNumbers", "column", real_numbers, doc="Values are numbers (not bool, not text).")
_register("ExpectColumnValuesToBeIntegerLists", "column", integer_lists, doc="Values are lists of integer tokens.")
_register("ExpectListLengthsToBeBetween", "column", list_lengths_between, ("min_value", "max_value"))
_register("ExpectListValuesToBeBetween", "column", list_values_between, ("min_value", "max_value"),
          doc="Every token of the list is within [min_value, max_value] (the vocabulary).")
_register("ExpectListValuesToBeNonDecreasing", "column", list_values_non_decreasing)
_register("ExpectValueSharesToBeAtLeast", "column", value_shares_at_least, ("min_share",),
          doc="Every value supplies at least min_share of the non-null rows.")
_register("ExpectUsersToHaveMinEvents", "column", users_with_min_events, ("min_events",),
          doc="Each event belongs to a user with at least min_events events.")
_register("ExpectFilesToExist", "column", files_exist, ("root",))
_register("ExpectFilesToBeReadable", "column", files_readable, ("root",),
          doc="Parquet files have a readable footer, vocab.json loads, other JSON files hold an object.")
_register("ExpectItemsToBeListedInCatalog", "pair", found_in_reference,
          doc="column_B is column_A looked up in the catalog: every item is listed.")
_register("ExpectUsersToBeInSequences", "pair", found_in_reference,
          doc="column_B is column_A looked up in sequences.parquet: every user is known.")
_register("ExpectColumnPairValuesToDiffer", "pair", values_differ)
_register("ExpectListLengthsToBeEqual", "pair", list_lengths_equal)
_register("ExpectLabelsToBeWithinWindows", "pair", labels_within_windows,
          doc="first_label (column_B) <= len(window) - 2 (column_A).")
_register("ExpectInputsToBeHistoryTails", "pair", inputs_are_history_tails, ("max_len",),
          doc="input (column_A) == history (column_B)[-max_len:].")
_register("ExpectHistoriesToBeSequencePrefixes", "pair", lists_equal,
          doc="history (column_A) == the user's items[:-offset] (column_B, joined from sequences.parquet).")
_register("ExpectTrainWindowsToBeSlicesOfTrainingPart", "multi", windows_in_training_part,
          doc="Every training window is a contiguous slice of the user's items[:-2]: no validation or test"
              " event leaks into training.")
_register("ExpectContextsToEndInTrainingPart", "multi", contexts_end_in_training_part,
          doc="1 <= context_end <= len(items) - 2: a pair's context lies in the user's training part.")
_register("ExpectContextsToBeTrainingTails", "multi", contexts_are_training_tails, ("max_len",),
          doc="context == items[:context_end][-max_len:] of the user's sequence.")
_register("ExpectItemsToNotBeHeldOutTargets", "multi", items_not_held_out,
          doc="No leakage: the item is neither the user's validation nor test target.")
_register("ExpectOneValuePerUser", "multi", one_value_per_group)
_register("ExpectIdsToBeOneToOne", "multi", ids_one_to_one)
