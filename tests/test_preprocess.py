"""Tests for asft.data.preprocess: ordering, leave-one-out split, windows, filters, vocabulary,
the read side (ProcessedData) and atomic output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from asft.config import PreprocessConfig
from asft.data.preprocess import (
    NUM_SPECIAL,
    OUTPUT_FILES,
    SPECIAL_TOKENS,
    ItemVocab,
    ProcessedData,
    _windows,
    kcore_filter,
    order_events,
    preprocess,
)
from asft.data.schema import DataFormatError, InteractionData
from asft.utils import dir_sha256


def make_data(rows: list[tuple], ratings: bool = True, source: str = "test") -> InteractionData:
    """rows: (user_id, item_id, timestamp[, rating]) in file order."""
    df = pd.DataFrame(
        {
            "user_id": pd.Series([str(r[0]) for r in rows], dtype=str),
            "item_id": pd.Series([str(r[1]) for r in rows], dtype=str),
            "timestamp": np.array([r[2] for r in rows], dtype=np.int64),
        }
    )
    if ratings:
        df["rating"] = np.array([r[3] if len(r) > 3 else 3.0 for r in rows], dtype=np.float64)
    return InteractionData(interactions=df, source=source, format="generic")


def cfg(**kw) -> PreprocessConfig:
    base = {"max_len": 4, "window_stride": 0}
    base.update(kw)
    return PreprocessConfig(**base)


def scored_targets(windows) -> list[list[int]]:
    return [list(np.asarray(t)[1:][f:]) for t, f in windows]


# ----------------------------------------------------------------------------------------------
# ordering
# ----------------------------------------------------------------------------------------------


def tie_rows():
    # file order interleaves users; u1 has ties at timestamp 3 (rows 1, 3, 5 in file order)
    return [
        ("u1", "a", 5, 5.0),  # row 0
        ("u1", "b", 3, 4.0),  # row 1
        ("u2", "x", 2, 1.0),  # row 2
        ("u1", "c", 3, 3.0),  # row 3
        ("u1", "d", 1, 2.0),  # row 4
        ("u1", "e", 3, 1.0),  # row 5
        ("u2", "y", 2, 2.0),  # row 6 (tie with row 2)
        ("u2", "z", 1, 3.0),  # row 7
    ]


def test_order_events_stable_tie_break():
    data = make_data(tie_rows())
    out = order_events(data.interactions)
    assert out["user_id"].tolist() == ["u1"] * 5 + ["u2"] * 3
    assert out["item_id"].tolist() == ["d", "b", "c", "e", "a", "z", "x", "y"]
    assert out["_row"].tolist() == [4, 1, 3, 5, 0, 7, 2, 6]
    # the input is not modified
    assert data.interactions["item_id"].tolist()[:2] == ["a", "b"]


def test_order_events_rejects_float_timestamps():
    df = make_data(tie_rows()).interactions
    df["timestamp"] = df["timestamp"].astype(np.float64)
    with pytest.raises(DataFormatError, match="timestamp"):
        order_events(df)


def test_preprocess_chronological_sequences_and_loo(tmp_path):
    data = make_data(tie_rows())
    stats = preprocess(data, cfg(), tmp_path / "p")
    pdata = ProcessedData.open(tmp_path / "p")
    vocab = pdata.vocab
    assert vocab.items == ["a", "b", "c", "d", "e", "x", "y", "z"]
    seqs = pdata.table("sequences")
    assert seqs["user_id"].tolist() == ["u1", "u2"]
    assert seqs["user_idx"].tolist() == [0, 1]
    assert vocab.decode(seqs["items"][0]) == ["d", "b", "c", "e", "a"]
    assert vocab.decode(seqs["items"][1]) == ["z", "x", "y"]
    assert list(seqs["timestamps"][0]) == [1, 3, 3, 3, 5]
    assert list(seqs["ratings"][0]) == [2.0, 4.0, 3.0, 1.0, 5.0]

    valid, test = pdata.table("valid"), pdata.table("test")
    enc = lambda xs: list(vocab.encode(xs))
    # u1: valid target = second-to-last (e), test target = last (a)
    v0, t0 = valid.iloc[0], test.iloc[0]
    assert vocab.decode([v0["target"]]) == ["e"] and vocab.decode([t0["target"]]) == ["a"]
    assert list(v0["history"]) == enc(["d", "b", "c"]) == list(v0["input"])
    assert list(t0["history"]) == enc(["d", "b", "c", "e"]) == list(t0["input"])  # includes the valid item
    assert v0["target_rating"] == 1.0 and t0["target_rating"] == 5.0
    # u2: only z is a training event
    v1, t1 = valid.iloc[1], test.iloc[1]
    assert vocab.decode([v1["target"], t1["target"]]) == ["x", "y"]
    assert list(v1["history"]) == enc(["z"])
    # training windows: u1's training events d, b, c; u2's single training event makes no window
    tw = pdata.train_windows()
    assert len(tw) == 1
    assert tw[0][0].tolist() == enc(["d", "b", "c"]) and tw[0][1] == 0
    assert pdata.table("train")["user_idx"].tolist() == [0]
    assert stats["users"] == 2 and stats["events"] == 8 and stats["train_events"] == 3 + 1
    assert stats["has_ratings"] is True and stats["dropped_short_users"] == 0
    # popularity counts training events only
    pop = pdata.item_popularity()
    assert pop[:NUM_SPECIAL].tolist() == [0] * NUM_SPECIAL
    assert pop[vocab.encode(["d", "b", "c", "z"])].tolist() == [1, 1, 1, 1]
    assert pop[vocab.encode(["e", "a", "x", "y"])].tolist() == [0, 0, 0, 0]


def test_eval_input_truncated_to_max_len(tmp_path):
    rows = [("u", f"i{k:02d}", k) for k in range(10)]
    preprocess(make_data(rows, ratings=False), cfg(max_len=3), tmp_path / "p")
    pdata = ProcessedData.open(tmp_path / "p")
    v, t = pdata.table("valid").iloc[0], pdata.table("test").iloc[0]
    assert len(v["history"]) == 8 and list(v["input"]) == list(v["history"][-3:])
    assert len(t["history"]) == 9 and list(t["input"]) == list(t["history"][-3:])
    assert np.isnan(v["target_rating"]) and pdata.stats["has_ratings"] is False


# ----------------------------------------------------------------------------------------------
# training windows
# ----------------------------------------------------------------------------------------------


def many_users(n_users: int = 6, seed: int = 0) -> list[tuple]:
    """Users with 3..20 events, no repeated item within a user, shuffled file order."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        n = int(rng.integers(3, 21)) if u else 20
        items = rng.choice(40, size=n, replace=False)
        ts = np.sort(rng.integers(0, 50, size=n))  # may contain ties
        rows += [(f"user{u}", f"item{it}", int(t), float(rng.integers(1, 6))) for it, t in zip(items, ts)]
    order = rng.permutation(len(rows))
    # keep each user's own rows in chronological file order (so ties resolve as generated)
    rows_sorted = sorted(range(len(rows)), key=lambda i: order[i])
    per_user: dict[str, list] = {}
    for r in rows:
        per_user.setdefault(r[0], []).append(r)
    out, seen = [], {k: 0 for k in per_user}
    for i in rows_sorted:
        u = rows[i][0]
        out.append(per_user[u][seen[u]])
        seen[u] += 1
    return out


@pytest.mark.parametrize("max_len,stride", [(4, 0), (4, 1), (4, 3), (5, 2), (30, 0)])
def test_every_training_event_scored_once_and_no_eval_item(tmp_path, max_len, stride):
    preprocess(make_data(many_users()), cfg(max_len=max_len, window_stride=stride), tmp_path / "p")
    pdata = ProcessedData.open(tmp_path / "p")
    seqs = pdata.table("sequences")
    train = pdata.table("train")
    valid, test = pdata.table("valid"), pdata.table("test")
    n_scored = 0
    for uidx, items in zip(seqs["user_idx"], seqs["items"]):
        items = np.asarray(items)
        rows = train[train["user_idx"] == uidx]
        wins = [(np.asarray(t), int(f)) for t, f in zip(rows["tokens"], rows["first_label"])]
        scored = [x for s in scored_targets(wins) for x in s]
        train_seq = items[:-2]
        # every training event except the first (it has no context) is a target exactly once, in order
        assert scored == (list(train_seq[1:]) if len(train_seq) >= 2 else [])
        n_scored += len(scored)
        for t, f in wins:
            assert 2 <= len(t) <= max_len + 1
            # windows are contiguous slices of the training sequence
            s = [i for i in range(len(train_seq) - len(t) + 1) if list(train_seq[i : i + len(t)]) == list(t)]
            assert s, "window is not a slice of the user's training events"
            if f > 0:
                eff = stride if 0 < stride < max_len else max_len
                assert f >= max_len - eff  # each newly scored target sees >= max_len - stride items
        # no validation / test item among this user's training tokens (no repeats in this data)
        v_t = int(valid.loc[valid["user_idx"] == uidx, "target"].iloc[0])
        t_t = int(test.loc[test["user_idx"] == uidx, "target"].iloc[0])
        assert v_t == items[-2] and t_t == items[-1]
        all_train_tokens = set(np.concatenate([t for t, _ in wins]).tolist()) if wins else set()
        assert v_t not in all_train_tokens and t_t not in all_train_tokens
        assert v_t not in scored and t_t not in scored
    assert pdata.stats["train_windows"] == len(train)
    lengths = np.array([len(x) for x in seqs["items"]])
    assert pdata.stats["train_events"] == int((lengths - 2).sum())
    assert n_scored == int(sum(max(n - 3, 0) for n in lengths))


def test_windows_function_overlap():
    seq = np.arange(10, 23)  # 13 tokens
    out = _windows(seq, max_len=4, mode="all", stride=2)
    assert [(t.tolist(), f) for t, f in out] == [
        (list(range(10, 15)), 0),
        (list(range(12, 17)), 2),
        (list(range(14, 19)), 2),
        (list(range(16, 21)), 2),
        (list(range(18, 23)), 2),
    ]
    out = _windows(np.arange(10, 20), max_len=4, mode="all", stride=0)  # 10 tokens, no overlap
    assert [(t.tolist(), f) for t, f in out] == [
        (list(range(10, 15)), 0),
        (list(range(14, 19)), 0),
        (list(range(15, 20)), 3),  # last window shifted back; only its one new label is scored
    ]
    out = _windows(np.arange(10, 20), max_len=4, mode="last")
    assert [(t.tolist(), f) for t, f in out] == [(list(range(15, 20)), 0)]
    short = _windows(np.arange(3), max_len=4, mode="all")
    assert [(t.tolist(), f) for t, f in short] == [([0, 1, 2], 0)]


def test_train_windows_last_mode(tmp_path):
    rows = [("u", f"i{k}", k) for k in range(12)]
    preprocess(make_data(rows), cfg(max_len=4, train_windows="last"), tmp_path / "p")
    pdata = ProcessedData.open(tmp_path / "p")
    tw = pdata.train_windows()
    assert len(tw) == 1
    assert pdata.vocab.decode(tw[0][0]) == [f"i{k}" for k in range(5, 10)] and tw[0][1] == 0


# ----------------------------------------------------------------------------------------------
# filters
# ----------------------------------------------------------------------------------------------


def kcore_rows():
    return [
        ("A", "x", 1),
        ("A", "y", 2),
        ("A", "z", 3),  # z appears once
        ("B", "x", 1),
        ("B", "y", 2),
        ("B", "w", 3),
        ("C", "x", 1),
        ("C", "y", 2),
        ("C", "w", 3),
        ("C", "v", 4),  # v appears once
        ("D", "x", 1),
        ("D", "q", 2),  # D is short; q appears once
    ]


def test_kcore_filter_fixed_point():
    df = make_data(kcore_rows(), ratings=False).interactions
    out = kcore_filter(df, user_core=3, item_core=2)
    # round 1: drop items z, v, q -> A has 2 events, D 1 -> dropped; then x: 2, y: 2, w: 2 -> stable
    assert sorted(out["user_id"].unique()) == ["B", "C"]
    assert sorted(out["item_id"].unique()) == ["w", "x", "y"]
    assert out.groupby("user_id").size().min() >= 3 and out.groupby("item_id").size().min() >= 2
    assert kcore_filter(df, 0, 0) is df  # off
    # row order is preserved
    assert list(out.index) == sorted(out.index)


def test_kcore_through_preprocess(tmp_path):
    stats = preprocess(make_data(kcore_rows()), cfg(user_core=3, item_core=2), tmp_path / "p")
    assert stats["users"] == 2 and stats["items"] == 3 and stats["events"] == 6
    assert stats["raw_users"] == 4 and stats["raw_items"] == 6 and stats["raw_events"] == 12
    assert ProcessedData.open(tmp_path / "p").vocab.items == ["w", "x", "y"]


def test_short_users_dropped_and_counted(tmp_path):
    rows = [
        ("long", "a", 1),
        ("long", "b", 2),
        ("long", "c", 3),
        ("long", "d", 4),
        ("two", "a", 1),
        ("two", "b", 2),
        ("one", "e", 1),
        ("three", "b", 1),
        ("three", "c", 2),
        ("three", "a", 3),
    ]
    stats = preprocess(make_data(rows), cfg(), tmp_path / "p")
    assert stats["dropped_short_users"] == 2
    assert stats["users"] == 2 and stats["raw_users"] == 4
    assert stats["items"] == 4  # e only belonged to a dropped user
    pdata = ProcessedData.open(tmp_path / "p")
    assert pdata.table("sequences")["user_id"].tolist() == ["long", "three"]
    stats = preprocess(make_data(rows), cfg(min_user_events=4), tmp_path / "p4")
    assert stats["dropped_short_users"] == 3 and stats["users"] == 1


def test_no_user_long_enough_raises(tmp_path):
    rows = [("a", "x", 1), ("a", "y", 2), ("b", "x", 1)]
    with pytest.raises(DataFormatError, match="at least 3 events"):
        preprocess(make_data(rows), cfg(), tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_dedupe_consecutive(tmp_path):
    rows = [("u", "a", 1), ("u", "a", 2), ("u", "b", 3), ("u", "a", 4), ("u", "c", 5)]
    stats = preprocess(make_data(rows), cfg(dedupe_consecutive=True), tmp_path / "p")
    seq = ProcessedData.open(tmp_path / "p").table("sequences")["items"][0]
    assert ProcessedData.open(tmp_path / "p").vocab.decode(seq) == ["a", "b", "a", "c"]
    assert stats["events"] == 4


# ----------------------------------------------------------------------------------------------
# vocabulary
# ----------------------------------------------------------------------------------------------


def test_vocab_contiguous_after_special_tokens(tmp_path):
    rows = [(f"u{u}", str(i), t) for u in range(3) for t, i in enumerate([10, 2, 33, 1, 7 + u])]
    preprocess(make_data(rows), cfg(), tmp_path / "p")
    pdata = ProcessedData.open(tmp_path / "p")
    vocab = pdata.vocab
    assert vocab.items == ["1", "2", "7", "8", "9", "10", "33"]  # natural (numeric) order of raw ids
    assert vocab.size == NUM_SPECIAL + 7 and vocab.n_items == 7
    assert pdata.stats["vocab_size"] == vocab.size
    used = np.unique(np.concatenate([np.asarray(x) for x in pdata.table("sequences")["items"]]))
    assert used.tolist() == list(range(NUM_SPECIAL, vocab.size))
    assert vocab.encode(["1", "33"]).tolist() == [4, 10]
    assert vocab.decode([4, 10]) == ["1", "33"]
    d = json.loads((tmp_path / "p" / "vocab.json").read_text())
    assert d["special_tokens"] == list(SPECIAL_TOKENS) == ["[PAD]", "[BOS]", "[EOS]", "[MASK]"]
    assert d["items"] == vocab.items


def test_item_vocab_save_load(tmp_path):
    v = ItemVocab(items=["b", "a", "10"])
    v.save(tmp_path / "v.json")
    w = ItemVocab.load(tmp_path / "v.json")
    assert w.items == v.items and w.size == 7
    assert w.encode(["a", "10"]).tolist() == [5, 6]
    (tmp_path / "d").mkdir()
    v.save(tmp_path / "d" / "vocab.json")
    assert ItemVocab.load(tmp_path / "d").items == v.items  # a directory means its vocab.json
    with pytest.raises(KeyError, match="zzz"):
        v.encode(["a", "zzz"])
    bad = v.to_json()
    bad["special_tokens"] = ["[PAD]", "[UNK]", "[EOS]", "[MASK]"]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(DataFormatError):
        ItemVocab.load(tmp_path / "bad.json")


# ----------------------------------------------------------------------------------------------
# read side and atomic output
# ----------------------------------------------------------------------------------------------


def test_processed_data_open_missing(tmp_path):
    with pytest.raises(DataFormatError, match="missing"):
        ProcessedData.open(tmp_path / "does-not-exist")
    preprocess(make_data(tie_rows()), cfg(), tmp_path / "p")
    assert set(OUTPUT_FILES) <= {p.name for p in (tmp_path / "p").iterdir()}
    (tmp_path / "p" / "test.parquet").unlink()
    with pytest.raises(DataFormatError, match="test.parquet"):
        ProcessedData.open(tmp_path / "p")


def _failing_write(monkeypatch, fail_on: int):
    real = pq.write_table
    calls = {"n": 0}

    def write_table(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == fail_on:
            raise OSError("disk full (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(pq, "write_table", write_table)
    return calls


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_atomic_output_new_dir(tmp_path, monkeypatch):
    calls = _failing_write(monkeypatch, fail_on=2)
    with pytest.raises(OSError, match="simulated"):
        preprocess(make_data(tie_rows()), cfg(), tmp_path / "p")
    assert calls["n"] == 2
    assert not (tmp_path / "p").exists()
    assert _leftovers(tmp_path) == []


def test_atomic_output_keeps_old_content(tmp_path, monkeypatch):
    out = tmp_path / "p"
    preprocess(make_data(tie_rows()), cfg(), out)
    before = dir_sha256(out)
    names = sorted(p.name for p in out.iterdir())
    _failing_write(monkeypatch, fail_on=2)
    other = make_data(many_users())
    with pytest.raises(OSError, match="simulated"):
        preprocess(other, cfg(), out)
    assert dir_sha256(out) == before
    assert sorted(p.name for p in out.iterdir()) == names
    assert _leftovers(tmp_path) == []
    monkeypatch.undo()
    # and a successful rerun replaces it completely
    preprocess(other, cfg(), out)
    assert dir_sha256(out) != before
    assert ProcessedData.open(out).stats["users"] == 6
    assert _leftovers(tmp_path) == []


def test_catalog_written_for_known_items(tmp_path):
    data = make_data(tie_rows())
    data.items = pd.DataFrame(
        {"item_id": ["a", "b", "nope"], "title": ["A", "B", "N"], "genres": ["x", "y", "z"]}
    )
    preprocess(data, cfg(), tmp_path / "p")
    cat = pd.read_parquet(tmp_path / "p" / "catalog.parquet")
    assert cat["item_id"].tolist() == ["a", "b"]
