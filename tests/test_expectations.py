"""Tests for asft.data.expectations: the three GX suites pass on good data, and each family of
corruption fails with the GX expectation name, the column, the count and the 0-based sample rows;
data docs are built into docs_dir on success and on failure; nothing is written anywhere else."""

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
from asft.data.expectations import validate_preferences, validate_processed, validate_raw
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


def test_raw_passes_with_docs(world, tmp_path, monkeypatch):
    home, cwd, docs = tmp_path / "home", tmp_path / "cwd", tmp_path / "docs"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    rep = validate_raw(world["raw"], world["catalog"], world["cfg"], "sim", docs_dir=docs)
    assert rep["suite"] == "raw_interactions" and rep["failed"] == 0 and rep["rows"] == len(world["raw"])
    assert rep["expectations"] >= 12 and rep["users"] == 60
    assert rep["docs"] == str(docs.resolve() / "index.html") and Path(rep["docs"]).is_file()
    first = list((docs / "validations").rglob("*.html"))
    assert len(first) == 1
    json.dumps(rep)
    # a failure also builds the docs (the site then shows this validation) and names them in the error
    bad = raw_copy(world)
    bad.loc[2, "rating"] = 9.0
    err = failures(lambda: validate_raw(bad, world["catalog"], world["cfg"], "sim", docs_dir=docs))
    assert err.docs_dir == str(docs.resolve()) and err.to_dict()["docs_dir"] == err.docs_dir
    second = list((docs / "validations").rglob("*.html"))
    assert len(second) == 1 and second != first and "expect_column_values_to_be_between" in str(err)
    # a structural failure (pre-check) too
    docs2 = tmp_path / "docs2"
    err = failures(
        lambda: validate_raw(bad.drop(columns=["item_id"]), None, world["cfg"], "sim", docs_dir=docs2)
    )
    assert err.docs_dir and (docs2 / "index.html").is_file()
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
    f = find(err, "expect_column_values_to_not_match_regex", "item_id")
    assert (f.count, f.sample_rows) == (1, [7])
    msg = str(err)
    assert msg.startswith("toy: validation failed") and "'user_id' 2 failing; rows [1, 4]" in msg


def test_raw_rating_out_of_range(world):
    df = raw_copy(world)
    df.loc[3, "rating"] = 7.0
    df.loc[10, "rating"] = 0.0
    f = only(failures(lambda: validate_raw(df, world["catalog"], world["cfg"], "toy")))
    assert (f.expectation, f.column, f.count, f.sample_rows) == (
        "expect_column_values_to_be_between",
        "rating",
        2,
        [3, 10],
    )
    assert "rating outside [1.0, 5.0]" in f.detail
    df.loc[3, "rating"] = np.nan
    df.loc[10, "rating"] = 3.0
    f = only(failures(lambda: validate_raw(df, world["catalog"], world["cfg"], "toy")))
    assert (f.expectation, f.column, f.count, f.sample_rows) == (
        "expect_column_values_to_not_be_null",
        "rating",
        1,
        [3],
    )


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
        "expect_column_values_to_be_in_set",
        "item_in_catalog",
        len(expected),
    )
    assert f.sample_rows == expected[:10].tolist() and "'i3'" in f.detail


def test_raw_short_histories(world):
    df = world["raw"].groupby("user_id", sort=False).head(2).reset_index(drop=True)  # every user 2 events
    f = only(failures(lambda: validate_raw(df, None, world["cfg"], "toy")))
    assert (f.expectation, f.column, f.count, f.sample_rows) == (
        "expect_column_values_to_be_between",
        "user_event_count",
        len(df),
        list(range(10)),
    )
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
        "expect_column_values_to_be_of_type",
        "timestamp",
        2,
        [4, 9],
    )
    assert "'yesterday'" in f.detail
    df = raw_copy(world)
    df["timestamp"] = df["timestamp"].astype(float)
    df.loc[6, "timestamp"] = np.nan
    f = only(failures(lambda: validate_raw(df, None, world["cfg"], "toy")))
    assert (f.expectation, f.column, f.count, f.sample_rows) == (
        "expect_column_values_to_be_of_type",
        "timestamp",
        1,
        [6],
    )
    df = raw_copy(world)
    df.loc[11, "timestamp"] = -5
    f = only(failures(lambda: validate_raw(df, None, world["cfg"], "toy")))
    assert (f.expectation, f.column, f.count, f.sample_rows) == (
        "expect_column_values_to_be_between",
        "timestamp",
        1,
        [11],
    )


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
    df = raw_copy(world)
    df["user_id"] = np.arange(len(df))  # ints, not strings
    f = only(failures(lambda: validate_raw(df, None, cfg, "toy")))
    assert (f.expectation, f.column) == ("expect_column_values_to_be_of_type", "user_id")
    df = raw_copy(world)
    df["rating"] = df["rating"].astype(object)
    df.loc[8, "rating"] = "five"
    f = only(failures(lambda: validate_raw(df, None, cfg, "toy")))
    assert (f.expectation, f.column, f.count, f.sample_rows) == (
        "expect_column_values_to_be_of_type",
        "rating",
        1,
        [8],
    )
    f = only(failures(lambda: validate_raw(None, None, cfg, "toy")))
    assert f.expectation == "expect_table_row_count_to_be_between"


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
        "expect_column_values_to_be_in_set",
        "train.window_in_train_part",
        1,
        [4],
    )
    assert err.docs_dir and (tmp_path / "docs" / "index.html").is_file()


def test_processed_window_too_long_and_oov(world, tmp_path):
    def bad(df):
        df = df.copy()
        df.at[0, "tokens"] = np.concatenate([df.loc[0, "tokens"], df.loc[0, "tokens"]])
        df.at[2, "tokens"] = np.array([NUM_SPECIAL, 999], dtype=np.int32)
        return df

    err = failures(lambda: validate_processed(corrupt(world, tmp_path, "train", bad), world["cfg"]))
    f = find(err, "expect_column_values_to_be_between", "train.tokens_len")
    assert (f.count, f.sample_rows) == (1, [0])
    f = find(err, "expect_column_values_to_be_in_set", "train.tokens_in_vocab")
    assert (f.count, f.sample_rows) == (1, [2])
    assert find(err, "expect_column_values_to_be_in_set", "train.window_in_train_part").sample_rows == [0, 2]


def test_processed_wrong_targets_and_inputs(world, tmp_path):
    def bad(df):
        df = df.copy()
        df.loc[[3, 5], "target"] = df.loc[[4, 6], "target"].to_numpy()
        df.at[7, "input"] = np.zeros(0, dtype=np.int32)
        return df

    err = failures(lambda: validate_processed(corrupt(world, tmp_path, "valid", bad), world["cfg"]))
    f = find(err, "expect_column_pair_values_to_be_equal", "valid.target,expected_target")
    assert (f.count, f.sample_rows) == (2, [3, 5])
    f = find(err, "expect_column_values_to_be_between", "valid.input_len")
    assert (f.count, f.sample_rows) == (1, [7])
    assert find(err, "expect_column_values_to_be_in_set", "valid.input_is_history_tail").sample_rows == [7]


def test_processed_sequences_and_stats(world, tmp_path):
    def bad(df):
        df = df.copy()
        ts = df.loc[1, "timestamps"].copy()
        ts[0] = ts[-1] + 1000
        df.at[1, "timestamps"] = ts
        df.loc[2, "user_idx"] = df.loc[3, "user_idx"]
        return df

    err = failures(lambda: validate_processed(corrupt(world, tmp_path, "sequences", bad), world["cfg"]))
    f = find(err, "expect_column_values_to_be_in_set", "sequences.timestamps_sorted")
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
    assert f.expectation == "expect_file_to_exist" and "test.parquet" in f.detail
    pq.write_table(pq.read_table(out / "valid.parquet").drop_columns(["target"]), out / "test.parquet")
    f = only(failures(lambda: validate_processed(out, world["cfg"])))
    assert (f.expectation, f.column) == ("expect_column_to_exist", "test.target")
    (out / "test.parquet").write_text("not parquet")
    f = only(failures(lambda: validate_processed(out, world["cfg"])))
    assert f.expectation == "expect_file_to_be_valid_parquet"
    f = only(failures(lambda: validate_processed(tmp_path / "nowhere", world["cfg"])))
    assert f.expectation == "expect_file_to_exist"


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
    f = find(err, "expect_column_values_to_be_in_set", "chosen_leaks")
    assert (f.count, f.sample_rows) == (1, [5])
    f = find(err, "expect_column_values_to_be_in_set", "rejected_leaks")
    assert (f.count, f.sample_rows) == (2, [8, 9])
    assert "leakage" in f.detail and (tmp_path / "docs" / "index.html").is_file() and err.docs_dir


def test_preferences_chosen_is_rejected_and_vocab(world):
    df = world["pairs"].copy()
    df.loc[2, "rejected"] = df.loc[2, "chosen"]
    df.loc[[6, 11], "chosen"] = 10_000
    err = failures(lambda: validate_preferences(df, world["processed"], world["cfg"], "pairs"))
    assert len(err.failures) == 2, str(err)
    f = find(err, "expect_column_values_to_be_in_set", "chosen_is_rejected")
    assert (f.count, f.sample_rows) == (1, [2])
    f = find(err, "expect_column_values_to_be_between", "chosen")
    assert (f.count, f.sample_rows) == (2, [6, 11])


def test_preferences_context(world):
    df = world["pairs"].copy()
    df.at[3, "context"] = df.loc[3, "context"][::-1].copy()
    f = only(failures(lambda: validate_preferences(df, world["processed"], world["cfg"], "pairs")))
    assert (f.expectation, f.column, f.count, f.sample_rows) == (
        "expect_column_values_to_be_in_set",
        "context_matches_sequence",
        1,
        [3],
    )
    df = world["pairs"].copy()
    df.at[4, "context"] = df.loc[4, "context"][1:].copy()  # too short for context_end=3
    err = failures(lambda: validate_preferences(df, world["processed"], world["cfg"], "pairs"))
    f = find(err, "expect_column_pair_values_to_be_equal", "context_len,expected_context_len")
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
        "expect_column_pair_values_a_to_be_greater_than_b",
        "train_part_len,context_end",
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
    f = find(err, "expect_column_values_to_be_between", "source_share")
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
        "expect_column_values_to_be_of_type",
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
    f = find(err, "expect_column_values_to_be_of_type", "context")
    assert (f.count, f.sample_rows) == (1, [9])
    f = only(failures(lambda: validate_preferences(world["pairs"], proc.parent / "missing", cfg, "pairs")))
    assert f.expectation == "expect_file_to_exist"


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
