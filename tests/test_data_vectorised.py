"""The vectorised data layer agrees with the simple per-row definitions it replaced: training windows,
the window-is-a-slice rule, list views shared per user, item popularity and training windows read back."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from asft.config import PreprocessConfig
from asft.data.preprocess import ProcessedData, _windows, preprocess, window_bounds
from asft.data.schema import InteractionData


@pytest.mark.parametrize("mode", ["all", "last"])
@pytest.mark.parametrize("stride", [0, 1, 3, 7, 50])
def test_window_bounds_match_per_sequence_windows(mode, stride):
    rng = np.random.default_rng(stride)
    n = np.concatenate([np.arange(0, 40), rng.integers(0, 200, 60)])
    max_len = 7
    owner, start, end, first = window_bounds(n, max_len, mode, stride)
    got = list(zip(owner.tolist(), start.tolist(), end.tolist(), first.tolist()))
    want = []
    for u, k in enumerate(n.tolist()):
        seq = np.arange(k)
        for win, f in _windows(seq, max_len, mode, stride):
            if len(win) >= 2:
                want.append((u, int(win[0]), int(win[-1]) + 1, f))
    assert got == want


def test_slices_of_matches_the_definition():
    from asft.data.gx_custom import Views, is_slice, slices_of, to_lists

    rng = np.random.default_rng(0)
    for trial in range(60):
        pool = np.array([-(2**61), 2**61, 3, 4]) if trial % 3 == 0 else np.arange(-3, 5 + trial % 7)
        parts = [rng.choice(pool, rng.integers(0, 12)) for _ in range(rng.integers(1, 6))]
        idx = rng.integers(-1, len(parts), 20)
        wins = []
        for i in idx:
            if rng.random() < 0.5 and i >= 0 and len(parts[i]):
                a = rng.integers(0, len(parts[i]))
                wins.append(parts[i][a : rng.integers(a, len(parts[i]) + 1)])
            else:
                wins.append(rng.choice(pool, rng.integers(0, 4)))
        W = to_lists(pd.Series(wins, dtype=object))
        want = np.array([i >= 0 and is_slice(w, parts[i]) for w, i in zip(wins, idx)])
        assert (slices_of(W, Views(to_lists(pd.Series(parts, dtype=object)), idx)) == want).all()
        flat = to_lists(pd.Series([parts[i] if i >= 0 else None for i in idx], dtype=object))
        assert (slices_of(W, flat) == want).all()


def test_shared_lists_column_reads_back_per_row():
    from asft.data.gx_custom import lists_equal, shared_lists, to_views

    base = pa.array([[4, 5, 6], [], [7]], type=pa.large_list(pa.int64()))
    col = shared_lists(np.array([0, 2, -1, 0, 1]), base)
    assert col.isna().tolist() == [False, False, True, False, False]
    v = to_views(col)
    assert v.lengths.tolist() == [3, 1, -1, 3, 0]
    hist = pd.Series([[4, 5, 6], [7], [1], [4, 5], []], dtype=object)
    assert lists_equal(hist, col).tolist() == [True, True, False, False, True]
    # after GX-style row filtering (take) the column still reads back
    kept = col[col.notna()]
    assert to_views(kept).lengths.tolist() == [3, 1, 3, 0]


def test_popularity_and_windows_read_back(tmp_path):
    rng = np.random.default_rng(3)
    n = 3000
    df = pd.DataFrame({
        "user_id": rng.integers(0, 80, n).astype(str),
        "item_id": rng.integers(0, 300, n).astype(str),
        "timestamp": rng.integers(0, 10**6, n).astype(np.int64),
        "rating": rng.integers(1, 6, n).astype(np.float64),
    })
    preprocess(InteractionData(df, None, "t", "generic"), PreprocessConfig(max_len=10, window_stride=4), tmp_path / "p")
    data = ProcessedData.open(tmp_path / "p")
    seqs = data.table("sequences")
    want = np.zeros(data.vocab.size, dtype=np.int64)
    for items in seqs["items"]:
        np.add.at(want, np.asarray(items[:-2], dtype=np.int64), 1)
    assert np.array_equal(data.item_popularity(), want)
    train = data.table("train")
    got = data.train_windows()
    assert len(got) == len(train)
    for (tok, first), (_, row) in zip(got, train.iterrows()):
        assert tok.dtype == np.int64 and np.array_equal(tok, np.asarray(row["tokens"]))
        assert isinstance(first, int) and first == row["first_label"]
