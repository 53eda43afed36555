"""Tests for asft.data.validation: each broken expectation is reported with its name, the column and
the (0-based) failing row numbers, and validate_interactions stops with DataValidationError."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from asft.data.validation import DataValidationError, Failure, check_interactions, validate_interactions


def good_df(n_users: int = 2, per_user: int = 3) -> pd.DataFrame:
    rows = [
        (f"u{u}", f"i{k}", 100 * u + k, float(1 + k % 5)) for u in range(n_users) for k in range(per_user)
    ]
    return pd.DataFrame(
        {
            "user_id": pd.Series([r[0] for r in rows], dtype=object),
            "item_id": pd.Series([r[1] for r in rows], dtype=object),
            "timestamp": np.array([r[2] for r in rows], dtype=np.int64),
            "rating": np.array([r[3] for r in rows], dtype=np.float64),
        }
    )


def only_failure(df: pd.DataFrame, **kw) -> Failure:
    fails = check_interactions(df, **kw)
    assert len(fails) == 1, fails
    return fails[0]


def raise_message(df: pd.DataFrame, name: str = "toy", **kw) -> DataValidationError:
    with pytest.raises(DataValidationError) as e:
        validate_interactions(df, name, **kw)
    assert str(e.value).startswith(f"{name}: validation failed")
    return e.value


def test_good_table_passes():
    df = good_df()
    assert check_interactions(df) == []
    assert validate_interactions(df, "toy") == {"rows": 6, "users": 2, "items": 3, "expectations_failed": 0}
    # ratings are optional, missing ratings (NaN) are allowed
    assert check_interactions(df.drop(columns=["rating"])) == []
    df2 = df.copy()
    df2.loc[1, "rating"] = np.nan
    assert check_interactions(df2) == []


def test_null_user_id():
    df = good_df()
    df.loc[[1, 4], "user_id"] = None
    f = only_failure(df)
    assert (f.expectation, f.column, f.count, f.sample_rows) == (
        "expect_column_values_to_not_be_null",
        "user_id",
        2,
        [1, 4],
    )
    err = raise_message(df)
    msg = str(err)
    assert "expect_column_values_to_not_be_null" in msg and "'user_id'" in msg and "[1, 4]" in msg
    assert err.failures[0].expectation == "expect_column_values_to_not_be_null"
    d = err.to_dict()
    assert d["dataset"] == "toy" and d["failures"][0]["sample_rows"] == [1, 4]


def test_null_item_id_nan():
    df = good_df()
    df.loc[2, "item_id"] = np.nan
    f = only_failure(df)
    assert (f.expectation, f.column, f.sample_rows) == ("expect_column_values_to_not_be_null", "item_id", [2])


def test_blank_item_ids():
    df = good_df()
    df.loc[0, "item_id"] = ""
    df.loc[5, "item_id"] = "   "
    f = only_failure(df)
    assert (f.expectation, f.column, f.count, f.sample_rows) == (
        "expect_column_values_to_not_be_blank",
        "item_id",
        2,
        [0, 5],
    )
    msg = str(raise_message(df))
    assert "expect_column_values_to_not_be_blank" in msg and "'item_id'" in msg and "[0, 5]" in msg


def test_float_timestamps():
    df = good_df()
    df["timestamp"] = df["timestamp"].astype(np.float64) + 0.5
    f = only_failure(df)
    assert (f.expectation, f.column, f.count) == ("expect_column_values_to_be_of_type", "timestamp", len(df))
    msg = str(raise_message(df))
    assert "expect_column_values_to_be_of_type" in msg and "'timestamp'" in msg and "float64" in msg


def test_negative_timestamps():
    df = good_df()
    df.loc[[3, 5], "timestamp"] = [-1, -100]
    f = only_failure(df)
    assert (f.expectation, f.column, f.count, f.sample_rows) == (
        "expect_column_values_to_be_between",
        "timestamp",
        2,
        [3, 5],
    )
    msg = str(raise_message(df))
    assert (
        "expect_column_values_to_be_between" in msg
        and "'timestamp'" in msg
        and "[3, 5]" in msg
        and ">= 0" in msg
    )


def test_non_numeric_and_non_finite_ratings():
    df = good_df()
    df["rating"] = pd.Series([4.0, "bad", 3.0, "5", np.inf, None], dtype=object)
    f = only_failure(df)
    # "5" is numeric text (fine), None is a missing rating (fine); "bad" and inf fail
    assert (f.expectation, f.column, f.count, f.sample_rows) == (
        "expect_column_values_to_be_finite_numbers",
        "rating",
        2,
        [1, 4],
    )
    msg = str(raise_message(df))
    assert "expect_column_values_to_be_finite_numbers" in msg and "'rating'" in msg and "[1, 4]" in msg


def test_missing_columns():
    df = good_df().drop(columns=["timestamp", "item_id"])
    fails = check_interactions(df)
    assert [(f.expectation, f.column) for f in fails] == [
        ("expect_columns_to_exist", "item_id"),
        ("expect_columns_to_exist", "timestamp"),
    ]
    msg = str(raise_message(df))
    assert "expect_columns_to_exist" in msg and "'item_id'" in msg and "'timestamp'" in msg
    assert "2 expectation(s)" in msg


def test_empty_table():
    df = good_df().iloc[:0]
    f = only_failure(df)
    assert f.expectation == "expect_table_row_count_to_be_at_least" and f.count == 0
    msg = str(raise_message(df))
    assert "expect_table_row_count_to_be_at_least" in msg and "empty" in msg


def test_no_user_with_enough_events():
    df = good_df(n_users=3, per_user=2)
    f = only_failure(df)
    assert (f.expectation, f.column) == ("expect_some_user_history_at_least", "user_id")
    assert check_interactions(df, min_user_events=2) == []


def test_several_failures_reported_together():
    df = good_df()
    df.loc[0, "user_id"] = None
    df.loc[1, "item_id"] = " "
    df.loc[2, "timestamp"] = -5
    df["rating"] = pd.Series([1.0, 2.0, 3.0, "x", 5.0, 1.0], dtype=object)
    fails = check_interactions(df)
    assert [(f.expectation, f.column, f.sample_rows) for f in fails] == [
        ("expect_column_values_to_not_be_null", "user_id", [0]),
        ("expect_column_values_to_not_be_blank", "item_id", [1]),
        ("expect_column_values_to_be_between", "timestamp", [2]),
        ("expect_column_values_to_be_finite_numbers", "rating", [3]),
    ]
    err = raise_message(df, name="multi")
    assert "4 expectation(s)" in str(err) and len(str(err).splitlines()) == 5


def test_sample_rows_capped():
    df = good_df(n_users=5, per_user=4)  # 20 rows
    df["timestamp"] = -np.arange(1, 21, dtype=np.int64)
    f = only_failure(df)
    assert f.count == 20 and f.sample_rows == list(range(10))
    assert "rows [0, 1, 2, 3, 4]" in f.line()


def test_default_string_dtype_nulls_and_blanks():
    # pandas' inferred string dtype (not object): None becomes NaN and is still caught as null
    df = pd.DataFrame(
        {
            "user_id": ["a", "a", None, "a"],
            "item_id": ["x", "", "y", "z"],
            "timestamp": np.array([1, 2, 3, 4], dtype=np.int64),
        }
    )
    fails = check_interactions(df)
    assert [(f.expectation, f.column, f.sample_rows) for f in fails] == [
        ("expect_column_values_to_not_be_null", "user_id", [2]),
        ("expect_column_values_to_not_be_blank", "item_id", [1]),
    ]


def test_nullable_integer_timestamps_rejected():
    df = good_df()
    df["timestamp"] = pd.array(df["timestamp"].tolist(), dtype="Int64")
    f = only_failure(df)
    assert (f.expectation, f.column) == ("expect_column_values_to_be_of_type", "timestamp")
    assert "Int64" in f.detail
