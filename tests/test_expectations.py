"""Tests for asft.data.expectations: the three GX suites pass on good data, and each family of
corruption fails with the GX expectation name (the project's own for its rules), the column, the count
and the 0-based sample rows; every rule is a GX expectation; a file-backed GX context in docs_dir keeps
each run's validation results and data docs; nothing is written anywhere else."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from asft.config import Config, PreprocessConfig, SimulatorConfig
from asft.data.expectations import TYPE_RULES, validate_preferences, validate_processed, validate_raw
from asft.data.preprocess import NUM_SPECIAL, preprocess
from asft.data.validation import DataValidationError, Failure
from asft.simulator import Simulator

MAX_LEN = 6


def make_cfg(**validation) -> Config:
    return Config(
        simulator=SimulatorConfig(n_users=60, n_items=40, min_len=8, max_len=16),
        preprocess=PreprocessConfig(max_len=MAX_LEN, window_stride=3),
        validation=validation,
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Simulated raw log + catalog, its processed directory and a valid pairs table (read-only)."""
    cfg = make_cfg()
    data = Simulator(cfg.simulator, seed=7).generate()
    root = tmp_path_factory.mktemp("world")
    processed = root / "processed"
    preprocess(data, cfg.preprocess, processed)
    return {
        "cfg": cfg,
        "raw": data.interactions,
        "catalog": data.items,
        "processed": processed,
        "pairs": make_pairs(processed),
    }


def make_pairs(processed: Path) -> pd.DataFrame:
    seqs = pd.read_parquet(processed / "sequences.parquet")
    rows = []
    for u, (uidx, items, ratings) in enumerate(zip(seqs["user_idx"], seqs["items"], seqs["ratings"])):
        rows.append(
            {
                "pair_id": u,
                "user_idx": int(uidx),
                "context_id": int(uidx) * 1000 + 3,
                "context_end": 3,
                "context": np.asarray(items[:3], dtype=np.int32),
                "chosen": int(items[3]),
                "rejected": int(items[4]),
                "source": "explicit" if u % 2 else "implicit",
                "margin": 1.0,
                "chosen_rating": float(ratings[3]),
                "rejected_rating": float("nan") if u % 2 == 0 else float(ratings[4]),
                "judge": -1,
                "split": "train" if u % 10 < 8 else ("valid" if u % 10 == 8 else "test"),
                "fold": u % 2,
            }
        )
    df = pd.DataFrame(rows)
    return df.astype(
        {
            "pair_id": "int64",
            "user_idx": "int32",
            "context_id": "int64",
            "context_end": "int32",
            "chosen": "int32",
            "rejected": "int32",
            "margin": "float32",
            "chosen_rating": "float32",
            "rejected_rating": "float32",
            "judge": "int32",
            "fold": "int8",
        }
    )


def failures(call) -> DataValidationError:
    with pytest.raises(DataValidationError) as e:
        call()
    return e.value


def find(err: DataValidationError, expectation: str, column: str | None) -> Failure:
    hits = [f for f in err.failures if f.expectation == expectation and f.column == column]
    assert hits, f"no {expectation} on {column}: {err}"
    return hits[0]


def only(err: DataValidationError) -> Failure:
    assert len(err.failures) == 1, str(err)
    return err.failures[0]


# ----------------------------------------------------------------------------------------- raw
def raw_copy(world) -> pd.DataFrame:
    return world["raw"].copy()


def test_raw_passes_with_docs_and_keeps_history(world, tmp_path, monkeypatch):
    home, cwd, docs = tmp_path / "home", tmp_path / "cwd", tmp_path / "docs"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    rep = validate_raw(world["raw"], world["catalog"], world["cfg"], "sim", docs_dir=docs)
    assert rep["suite"] == "raw_interactions" and rep["failed"] == 0 and rep["rows"] == len(world["raw"])
    assert rep["expectations"] >= 12 and rep["users"] == 60
    assert rep["docs"] == str(docs.resolve() / "index.html") and Path(rep["docs"]).is_file()
    pages = lambda: sorted((docs / "validations").rglob("*.html"))
    results = lambda: sorted((docs / "gx" / "uncommitted" / "validations").rglob("*.json"))
    first = pages()
    assert len(first) == 2 and len(results()) == 2  # interactions + catalog
    assert (docs / "gx" / "great_expectations.yml").is_file()
    assert (docs / "gx" / "expectations" / "raw_interactions.json").is_file()
    json.dumps(rep)
    # a failure also builds the docs, names them in the error, and the earlier run stays in the history
    bad = raw_copy(world)
    bad.loc[2, "rating"] = 9.0
    err = failures(lambda: validate_raw(bad, world["catalog"], world["cfg"], "sim", docs_dir=docs))
    assert err.docs_dir == str(docs.resolve()) and err.to_dict()["docs_dir"] == err.docs_dir
    second = pages()
    assert len(second) == 4 and set(first) < set(second) and len(results()) == 4
    assert "expect_column_values_to_be_on_rating_scale" in str(err)
    newest = [p for p in second if p not in first and "catalog" not in p.parts]
    assert "expect_column_values_to_be_on_rating_scale" in newest[0].read_text()
    index = (docs / "index.html").read_text()
    assert index.count("raw_interactions") >= 2
    # a structural failure (a missing column) is a GX result too
    docs2 = tmp_path / "docs2"
    err = failures(
        lambda: validate_raw(bad.drop(columns=["item_id"]), None, world["cfg"], "sim", docs_dir=docs2)
    )
    assert err.docs_dir and (docs2 / "index.html").is_file()
    f = find(err, "expect_column_to_exist", "item_id")
    page = next((docs2 / "validations").rglob("*.html")).read_text()
    assert "expect_column_to_exist" in page and f.count == 1
    # nothing written to the (fake) home, the working directory or the repository root
    assert list(home.iterdir()) == [] and list(cwd.iterdir()) == []
    assert not (Path(__file__).resolve().parents[1] / "gx").exists()


def test_raw_docs_off(world, tmp_path):
    cfg = make_cfg(data_docs=False)
    rep = validate_raw(world["raw"], None, cfg, "sim", docs_dir=tmp_path / "docs")
    assert rep["docs"] is None and not (tmp_path / "docs").exists()


def test_raw_nulls_and_blank_ids(world):
    df = raw_copy(world)
    df.loc[[1, 4], "user_id"] = None
    df.loc[7, "item_id"] = "  "
    err = failures(lambda: validate_raw(df, None, world["cfg"], "toy"))
    f = find(err, "expect_column_values_to_not_be_null", "user_id")
    assert (f.count, f.sample_rows) == (2, [1, 4])
    f = find(err, "expect_column_values_to_be_nonblank_strings", "item_id")
    assert (f.count, f.sample_rows) == (1, [7])
    msg = str(err)
    assert msg.startswith("toy: validation failed") and "'user_id' 2 failing; rows [1, 4]" in msg


def test_raw_rating_out_of_range_or_missing(world):
    df = raw_copy(world)
    df.loc[3, "rating"] = 7.0
    df.loc[10, "rating"] = 0.0
    df.loc[12, "rating"] = np.nan
    f = only(failures(lambda: validate_raw(df, world["catalog"], world["cfg"], "toy", fmt="simulator")))
    assert (f.expectation, f.column, f.count, f.sample_rows) == (
        "expect_column_values_to_be_on_rating_scale",
        "rating",
        3,
        [3, 10, 12],
    )
    assert "between 1.0 and 5.0 in steps of 1.0" in f.detail and "[7.0, 0.0, nan]" in f.detail
    df = raw_copy(world)
    df.loc[4, "rating"] = 3.5  # off the simulator's whole-star grid, fine for a format without one
    assert only(failures(lambda: validate_raw(df, None, world["cfg"], "toy", fmt="simulator"))).sample_rows == [4]
    assert validate_raw(df, None, world["cfg"], "toy")["failed"] == 0


def test_raw_duplicates(world):
    df = pd.concat([raw_copy(world), world["raw"].iloc[[5]]], ignore_index=True)
    f = only(failures(lambda: validate_raw(df, None, world["cfg"], "toy")))
    assert (f.expectation, f.column, f.count, f.sample_rows) == (
        "expect_compound_columns_to_be_unique",
        "user_id,item_id,timestamp",
        2,
        [5, len(df) - 1],
    )
    assert validate_raw(df, None, make_cfg(allow_duplicate_events=True), "toy")["duplicate_events"] == 1


def test_raw_unknown_catalog_item(world):
    catalog = world["catalog"][world["catalog"]["item_id"] != "i3"]
    expected = np.flatnonzero(world["raw"]["item_id"].to_numpy() == "i3")
    assert len(expected) > 0
    f = only(failures(lambda: validate_raw(world["raw"], catalog, world["cfg"], "toy")))
    assert (f.expectation, f.column, f.count) == (
        "expect_items_to_be_listed_in_catalog",
        "item_id,catalog_item_id",
        len(expected),
    )
    assert f.sample_rows == expected[:10].tolist() and "'i3'" in f.detail


def test_raw_short_histories(world):
    df = world["raw"].groupby("user_id", sort=False).head(2).reset_index(drop=True)  # every user 2 events
    f = only(failures(lambda: validate_raw(df, None, world["cfg"], "toy")))
    assert (f.expectation, f.column, f.count, f.sample_rows) == (
        "expect_users_to_have_min_events",
        "user_id",
        len(df),
        list(range(10)),
    )
    assert "user_event_count < preprocess.min_user_events" in f.detail
    # mostly: 60 users, 10 of them short -> passes at mostly=0.5, fails at mostly=1
    short = set(df["user_id"].unique()[:10])
    mixed = pd.concat(
        [world["raw"][~world["raw"]["user_id"].isin(short)], df[df["user_id"].isin(short)]], ignore_index=True
    )
    rep = validate_raw(mixed, None, world["cfg"], "toy")
    assert rep["users_below_min_events"] == 10 and rep["events_of_short_users"] == 20
    f = only(failures(lambda: validate_raw(mixed, None, make_cfg(min_history_mostly=1.0), "toy")))
    assert f.count == 20 and f.sample_rows == list(range(len(mixed) - 20, len(mixed) - 10))


def test_raw_bad_timestamps(world):
    df = raw_copy(world)
    df["timestamp"] = df["timestamp"].astype(object)
    df.loc[[4, 9], "timestamp"] = "yesterday"
    f = only(failures(lambda: validate_raw(df, None, world["cfg"], "toy")))
    assert (f.expectation, f.column, f.count, f.sample_rows) == (
        "expect_column_values_to_be_int64_timestamps",
        "timestamp",
        2,
        [4, 9],
    )
    assert "'yesterday'" in f.detail and "column dtype object" in f.detail
    df = raw_copy(world)
    df["timestamp"] = df["timestamp"].astype(float)  # integral floats: the dtype is wrong, every row
    df.loc[6, "timestamp"] = np.nan
    err = failures(lambda: validate_raw(df, None, world["cfg"], "toy"))
    f = find(err, "expect_column_values_to_not_be_null", "timestamp")
    assert (f.count, f.sample_rows) == (1, [6])
    f = find(err, "expect_column_values_to_be_int64_timestamps", "timestamp")
    assert f.count == len(df) - 1 and "column dtype float64" in f.detail and len(err.failures) == 2
    df = raw_copy(world)
    df.loc[11, "timestamp"] = -5
    df.loc[13, "timestamp"] = 2**62 + 1
    f = only(failures(lambda: validate_raw(df, None, world["cfg"], "toy")))
    assert (f.expectation, f.column, f.count, f.sample_rows) == (
        "expect_column_values_to_be_int64_timestamps",
        "timestamp",
        2,
        [11, 13],
    )
    df = raw_copy(world)
    df["timestamp"] = pd.array(df["timestamp"].tolist(), dtype="Int64")
    f = only(failures(lambda: validate_raw(df, None, world["cfg"], "toy")))
    assert f.expectation == "expect_column_values_to_be_int64_timestamps" and "Int64" in f.detail


def test_raw_structure(world):
    cfg = world["cfg"]
    f = only(failures(lambda: validate_raw(world["raw"].iloc[:0], None, cfg, "toy")))
    assert (f.expectation, f.column) == ("expect_table_row_count_to_be_between", None)
    f = only(failures(lambda: validate_raw(world["raw"].drop(columns=["timestamp"]), None, cfg, "toy")))
    assert (f.expectation, f.column) == ("expect_column_to_exist", "timestamp")
    f = only(
        failures(lambda: validate_raw(world["raw"], world["catalog"].drop(columns=["item_id"]), cfg, "toy"))
    )
    assert (f.expectation, f.column) == ("expect_column_to_exist", "catalog.item_id")
    catalog = pd.concat([world["catalog"], world["catalog"].iloc[[2]]], ignore_index=True)
    f = only(failures(lambda: validate_raw(world["raw"], catalog, cfg, "toy")))
    assert (f.expectation, f.column, f.sample_rows) == ("expect_column_values_to_be_unique", "catalog.item_id",
                                                        [2, len(catalog) - 1])
    df = raw_copy(world)
    df["user_id"] = df["user_id"].str[1:].astype(np.int64)  # ints, not strings
    f = only(failures(lambda: validate_raw(df, None, cfg, "toy")))
    assert (f.expectation, f.column) == ("expect_column_values_to_be_nonblank_strings", "user_id")
    assert "column dtype int64" in f.detail
    df = raw_copy(world)
    df["rating"] = df["rating"].astype(object)
    df.loc[8, "rating"] = "five"
    f = only(failures(lambda: validate_raw(df, None, cfg, "toy")))
    assert (f.expectation, f.column, f.count, f.sample_rows) == (
        "expect_column_values_to_be_on_rating_scale",
        "rating",
        1,
        [8],
    )
    assert "'five'" in f.detail
    err = failures(lambda: validate_raw(None, None, cfg, "toy"))
    f = find(err, "expect_table_row_count_to_be_between", None)
    assert "not a table: NoneType" in f.detail
    assert {g.column for g in err.failures if g.expectation == "expect_column_to_exist"} == {
        "user_id", "item_id", "timestamp"}
    df = pd.concat([raw_copy(world), raw_copy(world)[["rating"]]], axis=1)  # two "rating" columns
    f = only(failures(lambda: validate_raw(df, None, cfg, "toy")))
    assert f.expectation == "expect_table_columns_to_be_unique" and "'rating'" in f.detail


# ----------------------------------------------------------------------------------- processed
def corrupt(world, tmp_path: Path, table: str, fn) -> Path:
    """Copy the processed dir and rewrite one table: fn(DataFrame) -> DataFrame (or a dict for json)."""
    out = tmp_path / "processed"
    shutil.copytree(world["processed"], out)
    if table.endswith(".json"):
        d = json.loads((out / table).read_text())
        (out / table).write_text(json.dumps(fn(d)))
    else:
        t = pq.read_table(out / f"{table}.parquet")
        df = fn(t.to_pandas())
        pq.write_table(
            pa.Table.from_pandas(df, schema=t.schema, preserve_index=False), out / f"{table}.parquet"
        )
    return out


def test_processed_passes_with_docs(world, tmp_path):
    rep = validate_processed(world["processed"], world["cfg"], docs_dir=tmp_path / "docs")
    assert rep["suite"] == "processed_sequences" and rep["failed"] == 0 and rep["users"] == 60
    assert rep["rows"]["sequences"] == rep["rows"]["valid"] == rep["rows"]["test"] == 60
    assert rep["expectations"] > 50 and Path(rep["docs"]).is_file()
    json.dumps(rep)


def test_processed_train_leak(world, tmp_path):
    seqs = pd.read_parquet(world["processed"] / "sequences.parquet")

    def leak(df):
        df = df.copy()
        u = int(df.loc[4, "user_idx"])
        toks = df.loc[4, "tokens"].copy()
        toks[-1] = seqs.loc[seqs["user_idx"] == u, "items"].iloc[0][-1]  # the user's test item
        df.at[4, "tokens"] = toks
        return df

    err = failures(
        lambda: validate_processed(
            corrupt(world, tmp_path, "train", leak), world["cfg"], docs_dir=tmp_path / "docs"
        )
    )
    f = only(err)
    assert (f.expectation, f.column, f.count, f.sample_rows) == (
        "expect_train_windows_to_be_slices_of_training_part",
        "train.tokens,training_items",
        1,
        [4],
    )
    assert "leakage" in f.detail
    page = next(p for p in (tmp_path / "docs" / "validations").rglob("*.html") if "train" in p.parts)
    assert "expect_train_windows_to_be_slices_of_training_part" in page.read_text()
    assert err.docs_dir and (tmp_path / "docs" / "index.html").is_file()


def test_processed_window_too_long_and_oov(world, tmp_path):
    def bad(df):
        df = df.copy()
        df.at[0, "tokens"] = np.concatenate([df.loc[0, "tokens"], df.loc[0, "tokens"]])
        df.at[2, "tokens"] = np.array([NUM_SPECIAL, 999], dtype=np.int32)
        return df

    err = failures(lambda: validate_processed(corrupt(world, tmp_path, "train", bad), world["cfg"]))
    f = find(err, "expect_list_lengths_to_be_between", "train.tokens")
    assert (f.count, f.sample_rows) == (1, [0])
    f = find(err, "expect_list_values_to_be_between", "train.tokens")
    assert (f.count, f.sample_rows) == (1, [2])
    f = find(err, "expect_train_windows_to_be_slices_of_training_part", "train.tokens,training_items")
    assert f.sample_rows == [0, 2]


def test_processed_wrong_targets_and_inputs(world, tmp_path):
    def bad(df):
        df = df.copy()
        df.loc[[3, 5], "target"] = df.loc[[4, 6], "target"].to_numpy()
        df.at[7, "input"] = np.zeros(0, dtype=np.int32)
        return df

    err = failures(lambda: validate_processed(corrupt(world, tmp_path, "valid", bad), world["cfg"]))
    f = find(err, "expect_column_pair_values_to_be_equal", "valid.target,held_out_item")
    assert (f.count, f.sample_rows) == (2, [3, 5])
    f = find(err, "expect_list_lengths_to_be_between", "valid.input")
    assert (f.count, f.sample_rows) == (1, [7])
    assert find(err, "expect_inputs_to_be_history_tails", "valid.input,history").sample_rows == [7]
    assert len(err.failures) == 3, str(err)


def test_processed_sequences_and_stats(world, tmp_path):
    def bad(df):
        df = df.copy()
        ts = df.loc[1, "timestamps"].copy()
        ts[0] = ts[-1] + 1000
        df.at[1, "timestamps"] = ts
        df.loc[2, "user_idx"] = df.loc[3, "user_idx"]
        return df

    err = failures(lambda: validate_processed(corrupt(world, tmp_path, "sequences", bad), world["cfg"]))
    f = find(err, "expect_list_values_to_be_non_decreasing", "sequences.timestamps")
    assert (f.count, f.sample_rows) == (1, [1])
    f = find(err, "expect_column_values_to_be_unique", "sequences.user_idx")
    assert (f.count, f.sample_rows) == (2, [2, 3])
    out = tmp_path / "stats"
    out.mkdir()
    err = failures(
        lambda: validate_processed(
            corrupt(world, out, "stats.json", lambda d: {**d, "users": 61}), world["cfg"]
        )
    )
    f = only(err)
    assert (f.expectation, f.column, f.count, f.sample_rows) == (
        "expect_column_pair_values_to_be_equal",
        "stats.stated,actual",
        1,
        [0],
    )
    assert "'users'" in f.detail


def test_processed_structure(world, tmp_path):
    out = tmp_path / "processed"
    shutil.copytree(world["processed"], out)
    (out / "test.parquet").unlink()
    f = only(failures(lambda: validate_processed(out, world["cfg"], docs_dir=tmp_path / "docs")))
    assert (f.expectation, f.column, f.sample_rows) == ("expect_files_to_exist", "files.file", [3])
    assert "'test.parquet'" in f.detail
    pq.write_table(pq.read_table(out / "valid.parquet").drop_columns(["target"]), out / "test.parquet")
    f = only(failures(lambda: validate_processed(out, world["cfg"])))
    assert (f.expectation, f.column) == ("expect_column_to_exist", "test.target")
    t = pq.read_table(world["processed"] / "test.parquet")
    pq.write_table(t.set_column(t.column_names.index("input"), "input", pa.array([["a"]] * t.num_rows)),
                   out / "test.parquet")
    f = only(failures(lambda: validate_processed(out, world["cfg"])))
    assert (f.expectation, f.column, f.count) == ("expect_column_values_to_be_integer_lists", "test.input", 60)
    (out / "test.parquet").write_text("not parquet")
    (out / "stats.json").write_text("[1, 2]")
    f = only(failures(lambda: validate_processed(out, world["cfg"])))
    assert (f.expectation, f.column, f.sample_rows) == ("expect_files_to_be_readable", "files.file", [3, 5])
    (out / "stats.json").write_text("{}")
    (out / "test.parquet").unlink()
    (out / "vocab.json").write_text("{}")  # JSON, but no vocabulary
    err = failures(lambda: validate_processed(out, world["cfg"]))
    assert [(f.expectation, f.sample_rows) for f in err.failures] == [("expect_files_to_exist", [3]),
                                                                      ("expect_files_to_be_readable", [4])]
    f = only(failures(lambda: validate_processed(tmp_path / "nowhere", world["cfg"])))
    assert (f.expectation, f.count) == ("expect_files_to_exist", 6)


# ----------------------------------------------------------------------------------- preferences
def test_preferences_pass_with_docs(world, tmp_path):
    rep = validate_preferences(
        world["pairs"], world["processed"], world["cfg"], "pairs", docs_dir=tmp_path / "d"
    )
    assert rep["suite"] == "preference_pairs" and rep["failed"] == 0 and rep["rows"] == 60
    assert rep["source_shares"] == {"explicit": 0.5, "implicit": 0.5} and rep["leaking_pairs"] == 0
    assert rep["splits"] == {"train": 48, "valid": 6, "test": 6} and Path(rep["docs"]).is_file()
    json.dumps(rep)
    # a round trip through Parquet keeps it valid (lists come back as numpy arrays)
    pq_path = tmp_path / "pairs.parquet"
    world["pairs"].to_parquet(pq_path)
    assert (
        validate_preferences(pd.read_parquet(pq_path), world["processed"], world["cfg"], "pairs")["failed"]
        == 0
    )


def test_preferences_leak(world, tmp_path):
    df = world["pairs"].copy()
    test = pd.read_parquet(world["processed"] / "test.parquet").set_index("user_idx")["target"]
    valid = pd.read_parquet(world["processed"] / "valid.parquet").set_index("user_idx")["target"]
    df.loc[5, "chosen"] = test[df.loc[5, "user_idx"]]
    df.loc[[8, 9], "rejected"] = valid[df.loc[[8, 9], "user_idx"]].to_numpy()
    err = failures(
        lambda: validate_preferences(
            df, world["processed"], world["cfg"], "pairs", docs_dir=tmp_path / "docs"
        )
    )
    assert len(err.failures) == 2, str(err)
    f = find(err, "expect_items_to_not_be_held_out_targets", "chosen,valid_target,test_target")
    assert (f.count, f.sample_rows) == (1, [5])
    f = find(err, "expect_items_to_not_be_held_out_targets", "rejected,valid_target,test_target")
    assert (f.count, f.sample_rows) == (2, [8, 9])
    page = next((tmp_path / "docs" / "validations").rglob("*preference_pairs.html")).read_text()
    assert "expect_items_to_not_be_held_out_targets" in page
    assert "leakage" in f.detail and (tmp_path / "docs" / "index.html").is_file() and err.docs_dir


def test_preferences_chosen_is_rejected_and_vocab(world):
    df = world["pairs"].copy()
    df.loc[2, "rejected"] = df.loc[2, "chosen"]
    df.loc[[6, 11], "chosen"] = 10_000
    err = failures(lambda: validate_preferences(df, world["processed"], world["cfg"], "pairs"))
    assert len(err.failures) == 2, str(err)
    f = find(err, "expect_column_pair_values_to_differ", "chosen,rejected")
    assert (f.count, f.sample_rows) == (1, [2])
    f = find(err, "expect_column_values_to_be_between", "chosen")
    assert (f.count, f.sample_rows) == (2, [6, 11])


def test_preferences_context(world):
    df = world["pairs"].copy()
    df.at[3, "context"] = df.loc[3, "context"][::-1].copy()
    f = only(failures(lambda: validate_preferences(df, world["processed"], world["cfg"], "pairs")))
    assert (f.expectation, f.column, f.count, f.sample_rows) == (
        "expect_contexts_to_be_training_tails",
        "context,context_end,training_items",
        1,
        [3],
    )
    df = world["pairs"].copy()
    df.at[4, "context"] = df.loc[4, "context"][1:].copy()  # too short for context_end=3
    err = failures(lambda: validate_preferences(df, world["processed"], world["cfg"], "pairs"))
    f = find(err, "expect_contexts_to_be_training_tails", "context,context_end,training_items")
    assert (f.count, f.sample_rows) == (1, [4])
    df = world["pairs"].copy()
    seqs = pd.read_parquet(world["processed"] / "sequences.parquet").set_index("user_idx")["items"]
    items = seqs[df.loc[0, "user_idx"]]
    end = len(items) - 1  # reaches the validation item
    df.loc[0, "context_end"] = end
    df.at[0, "context"] = np.asarray(items[:end][-MAX_LEN:], dtype=np.int32)
    df.loc[0, "context_id"] = -1
    f = only(failures(lambda: validate_preferences(df, world["processed"], world["cfg"], "pairs")))
    assert (f.expectation, f.column, f.count, f.sample_rows) == (
        "expect_contexts_to_end_in_training_part",
        "context_end,training_items",
        1,
        [0],
    )


def test_preferences_values_and_balance(world):
    df = world["pairs"].copy()
    df.loc[1, "source"] = "ranking"
    df.loc[[2, 12], "margin"] = 0.0
    df.loc[3, "split"] = "holdout"
    df.loc[4, "pair_id"] = 5
    err = failures(
        lambda: validate_preferences(df, world["processed"], make_cfg(min_source_share=0.05), "pairs")
    )
    f = find(err, "expect_value_shares_to_be_at_least", "source")
    assert (f.count, f.sample_rows) == (1, [1]) and "'ranking'" in f.detail
    f = find(err, "expect_column_values_to_be_between", "margin")
    assert (f.count, f.sample_rows) == (2, [2, 12])
    f = find(err, "expect_column_values_to_be_in_set", "split")
    assert (f.count, f.sample_rows) == (1, [3]) and "'holdout'" in f.detail
    f = find(err, "expect_column_values_to_be_unique", "pair_id")
    assert (f.count, f.sample_rows) == (2, [4, 5])
    assert len(err.failures) == 4, str(err)
    df = world["pairs"].copy()
    df["split"] = "valid"
    f = only(failures(lambda: validate_preferences(df, world["processed"], world["cfg"], "pairs")))
    assert (f.expectation, f.column) == ("expect_column_distinct_values_to_contain_set", "split")


def test_preferences_structure(world):
    cfg, proc = world["cfg"], world["processed"]
    f = only(failures(lambda: validate_preferences(world["pairs"].iloc[:0], proc, cfg, "pairs")))
    assert f.expectation == "expect_table_row_count_to_be_between"
    f = only(
        failures(lambda: validate_preferences(world["pairs"].drop(columns=["judge"]), proc, cfg, "pairs"))
    )
    assert (f.expectation, f.column) == ("expect_column_to_exist", "judge")
    df = world["pairs"].copy()
    df["chosen"] = df["chosen"].astype(object)
    df.loc[7, "chosen"] = "i3"
    f = only(failures(lambda: validate_preferences(df, proc, cfg, "pairs")))
    assert (f.expectation, f.column, f.count, f.sample_rows) == (
        "expect_column_values_to_be_integers",
        "chosen",
        1,
        [7],
    )
    df = world["pairs"].copy()
    df.loc[[3, 4], "margin"] = np.nan
    df["context"] = df["context"].astype(object)
    df.at[9, "context"] = "3,4,5"
    err = failures(lambda: validate_preferences(df, proc, cfg, "pairs"))
    f = find(err, "expect_column_values_to_not_be_null", "margin")
    assert (f.count, f.sample_rows) == (2, [3, 4])
    f = find(err, "expect_column_values_to_be_integer_lists", "context")
    assert (f.count, f.sample_rows) == (1, [9])
    f = only(failures(lambda: validate_preferences(world["pairs"], proc.parent / "missing", cfg, "pairs")))
    assert (f.expectation, f.column, f.count) == ("expect_files_to_exist", "processed.file", 5)


def test_module_imports_are_light():
    """No prefect/mlflow; GX (about 3 s) only imported when a suite runs."""
    code = (
        "import sys, asft.data.expectations; "
        "print(sorted(m for m in ('prefect', 'mlflow', 'great_expectations') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    assert os.environ.get("GX_ANALYTICS_ENABLED") == "false"


def test_every_rule_is_a_named_gx_expectation(world):
    """The project's rules are registered GX expectations (GX's own or asft's), and the suites contain
    no helper-column verdicts ("value in set [True]")."""
    import great_expectations as gx

    from asft.data import gx_custom
    from asft.data.expectations import _Rules

    names = set(gx_custom.EXPECTATIONS)
    assert TYPE_RULES <= names
    assert {"expect_train_windows_to_be_slices_of_training_part", "expect_items_to_not_be_held_out_targets",
            "expect_contexts_to_be_training_tails", "expect_contexts_to_end_in_training_part",
            "expect_column_values_to_be_on_rating_scale", "expect_column_values_to_be_int64_timestamps"} <= names
    for name, cls in gx_custom.EXPECTATIONS.items():
        assert cls().expectation_type == name if name == "expect_table_columns_to_be_unique" else True
        assert gx.expectations.registry.get_expectation_impl(name) is cls
    rules = _Rules(gx)
    rules.add(gx_custom.ExpectItemsToNotBeHeldOutTargets, "leak", column_list=["chosen", "valid_target"])
    e = rules.items[0]
    assert e.expectation_type == "expect_items_to_not_be_held_out_targets"
    assert e.description == "expect_items_to_not_be_held_out_targets: leak"


def test_custom_rules_are_robust_to_any_value():
    """Rule functions never raise on hostile cells; type rules flag them, value rules leave them."""
    from asft.data import gx_custom as X

    s = pd.Series([[4, 5], "x", None, np.array([1.0, 2.5]), (7,), {"a": 1}, 3, np.array([], dtype=np.int32)],
                  dtype=object)
    assert X.integer_lists(s).tolist() == [True, False, False, False, True, False, False, True]
    assert X.list_values_between(s, 4, 7).tolist() == [True] * 8
    assert X.list_lengths_between(s, 1, 2).tolist() == [True, True, True, True, True, True, True, False]
    v = pd.Series([1, 2.0, 2.5, True, "3", None, np.inf], dtype=object)
    assert X.integers(v).tolist() == [True, True, False, False, False, False, False]
    assert X.real_numbers(v).tolist() == [True, True, True, False, False, False, True]
    r = X.on_rating_scale(pd.Series([0.5, 1.0, 4.5, 5.0, np.nan, 5.5]), 0.5, 5.0, 0.5)
    assert r.tolist() == [True, True, True, True, False, False]
    assert X.on_rating_scale(pd.Series([1.0, 1.25]), 1.0, 5.0, 0.5).tolist() == [True, False]
    w = pd.DataFrame({"w": [np.array([2, 3]), np.array([3, 2]), np.array([9])],
                      "p": [np.array([1, 2, 3, 4])] * 3})
    assert X.windows_in_training_part(w).tolist() == [True, False, False]
