"""``asft validate``'s entry point (:func:`asft.data.expectations.validate_raw_dir`: the raw GX suite
that ``retrain`` runs, on a published raw directory) and the shared types of
:mod:`asft.data.validation`: a failure names the file, the expectation, the column, the 0-based rows
and the failing values; missing ratings fail; every advertised format's rating scale is enforced."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from asft.config import Config
from asft.data.expectations import validate_raw, validate_raw_dir
from asft.data.schema import FORMAT_RATING_SCALES, DataFormatError
from asft.data.validation import DataValidationError, Failure

CFG = Config(validation={"data_docs": False})


def good_df(n_users: int = 3, per_user: int = 4) -> pd.DataFrame:
    rows = [(f"u{u}", f"i{k}", 100 * u + k, float(1 + (u + k) % 5)) for u in range(n_users) for k in range(per_user)]
    return pd.DataFrame(
        {
            "user_id": pd.Series([r[0] for r in rows], dtype=object),
            "item_id": pd.Series([r[1] for r in rows], dtype=object),
            "timestamp": np.array([r[2] for r in rows], dtype=np.int64),
            "rating": np.array([r[3] for r in rows], dtype=np.float64),
        }
    )


def write_raw(d: Path, df: pd.DataFrame, fmt: str = "generic", catalog: pd.DataFrame | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    df.to_parquet(d / "interactions.parquet", index=False)
    if catalog is not None:
        catalog.to_parquet(d / "catalog.parquet", index=False)
    (d / "source.json").write_text(json.dumps({"source": "toy", "format": fmt, "rows": len(df)}))
    return d


def raised(call) -> DataValidationError:
    with pytest.raises(DataValidationError) as e:
        call()
    return e.value


def only(err: DataValidationError) -> Failure:
    assert len(err.failures) == 1, str(err)
    return err.failures[0]


# ------------------------------------------------------------------------------ shared types
def test_failure_line_and_error_message():
    f = Failure("expect_column_values_to_not_be_null", "user_id", 12, list(range(10)), "missing values")
    assert f.line() == ("expect_column_values_to_not_be_null: column 'user_id' 12 failing; rows [0, 1, 2, 3, 4]"
                        " (missing values)")
    g = Failure("expect_table_row_count_to_be_between", None, 0)
    assert g.line() == "expect_table_row_count_to_be_between: 0 failing"
    err = DataValidationError("toy (data/raw/interactions.parquet)", [f, g], docs_dir="/r/gx/raw")
    assert str(err).splitlines() == [
        "toy (data/raw/interactions.parquet): validation failed (2 expectation(s))",
        "  - " + f.line(),
        "  - " + g.line(),
        "  data docs: /r/gx/raw",
    ]
    d = err.to_dict()
    assert d["dataset"] == "toy (data/raw/interactions.parquet)" and d["docs_dir"] == "/r/gx/raw"
    assert d["failures"][0] == {"expectation": "expect_column_values_to_not_be_null", "column": "user_id",
                                "count": 12, "sample_rows": list(range(10)), "detail": "missing values"}
    json.dumps(d)


def test_old_checker_is_gone():
    import asft.data.validation as v

    assert not hasattr(v, "check_interactions") and not hasattr(v, "validate_interactions")


# ------------------------------------------------------------------------------ validate_raw_dir
def test_raw_dir_passes_and_matches_the_ingest_suite(tmp_path):
    df = good_df()
    raw = write_raw(tmp_path / "raw", df, "simulator")
    rep = validate_raw_dir(raw, CFG)
    assert rep["suite"] == "raw_interactions" and rep["failed"] == 0 and rep["rows"] == len(df)
    same = validate_raw(df, None, CFG, "toy", fmt="simulator")
    assert rep["expectations"] == same["expectations"] >= 10


def test_raw_dir_error_names_file_column_rows_and_values(tmp_path):
    df = good_df()
    df.loc[[2, 7], "rating"] = [np.nan, 9.0]
    df.loc[5, "user_id"] = None
    raw = write_raw(tmp_path / "raw", df)
    err = raised(lambda: validate_raw_dir(raw, CFG))
    msg = str(err)
    assert msg.startswith(f"toy ({raw / 'interactions.parquet'}): validation failed (2 expectation(s))")
    rating = next(f for f in err.failures if f.column == "rating")
    assert (rating.expectation, rating.count, rating.sample_rows) == ("expect_column_values_to_be_on_rating_scale", 2,
                                                                     [2, 7])
    assert "unexpected values: [nan, 9.0]" in rating.detail and "between 1.0 and 5.0" in rating.detail
    user = next(f for f in err.failures if f.column == "user_id")
    assert (user.expectation, user.count, user.sample_rows) == ("expect_column_values_to_not_be_null", 1, [5])
    assert msg.count("expect_column_values_to_be_on_rating_scale") == 1  # reported once


def test_raw_dir_nan_rating_fails(tmp_path):
    df = good_df()
    df.loc[4, "rating"] = np.nan
    f = only(raised(lambda: validate_raw_dir(write_raw(tmp_path / "raw", df), CFG)))
    assert (f.expectation, f.column, f.count, f.sample_rows) == ("expect_column_values_to_be_on_rating_scale",
                                                                 "rating", 1, [4])
    assert "nan" in f.detail and "none missing" in f.detail


def test_raw_dir_catalog_and_docs(tmp_path):
    df = good_df()
    catalog = pd.DataFrame({"item_id": ["i0", "i1", "i2"], "title": "t", "genres": "g"})  # i3 missing
    raw = write_raw(tmp_path / "raw", df, catalog=catalog)
    docs = tmp_path / "docs"
    err = raised(lambda: validate_raw_dir(raw, Config(), docs_dir=docs))
    f = only(err)
    assert (f.expectation, f.column) == ("expect_items_to_be_listed_in_catalog", "item_id,catalog_item_id")
    assert f.count == 3 and f.sample_rows == [3, 7, 11] and "'i3'" in f.detail
    assert err.docs_dir == str(docs.resolve()) and (docs / "index.html").is_file()


def test_raw_dir_unreadable_files(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    with pytest.raises(DataFormatError) as e:
        validate_raw_dir(raw, CFG)
    assert e.value.path == str(raw / "interactions.parquet") and "not found" in str(e.value)
    (raw / "interactions.parquet").write_bytes(b"PAR1 broken")
    with pytest.raises(DataFormatError) as e:
        validate_raw_dir(raw, CFG)
    assert "not a readable Parquet file" in str(e.value)


# ------------------------------------------------------------------------------ rating scales
def _ratings(values) -> pd.DataFrame:
    df = good_df(n_users=1, per_user=len(values))
    df["rating"] = np.asarray(values, dtype=np.float64)
    return df


# format -> (valid ratings, invalid ratings) on its real scale
SCALE_CASES = {
    "movielens-100k": ([1, 2, 3, 4, 5], [0.5, 4.5, 6]),
    "movielens-dat": ([1, 2, 3, 4, 5], [0, 3.5, 5.5]),
    "movielens-csv": ([0.5, 1, 2.5, 4.5, 5], [0, 0.25, 5.5]),
    "simulator": ([1, 2, 3, 4, 5], [2.5, 0, 6]),
    "generic": ([1, 2.7, 3.25, 4.5, 5], [0.5, 5.5, np.nan]),
    "recbole": ([1, 1.5, 3, 4.99, 5], [0, 7, np.nan]),
}


def test_every_advertised_format_has_a_scale_case():
    assert set(FORMAT_RATING_SCALES) <= set(SCALE_CASES)


@pytest.mark.parametrize("fmt", sorted(SCALE_CASES))
def test_format_rating_scale_enforced_through_validation(fmt, tmp_path):
    good, bad = SCALE_CASES[fmt]
    assert validate_raw_dir(write_raw(tmp_path / "ok", _ratings(good), fmt), CFG)["failed"] == 0
    for i, v in enumerate(bad):
        values = list(good)
        values[i] = v
        raw = write_raw(tmp_path / f"bad{i}", _ratings(values), fmt)
        f = only(raised(lambda raw=raw: validate_raw_dir(raw, CFG)))
        assert (f.expectation, f.column, f.count, f.sample_rows) == (
            "expect_column_values_to_be_on_rating_scale", "rating", 1, [i]), (fmt, v, f)


def test_declared_rating_bounds_replace_the_format_scale(tmp_path):
    raw = write_raw(tmp_path / "raw", _ratings([0, 3.5, 7, 10]), "movielens-100k")
    assert only(raised(lambda: validate_raw_dir(raw, CFG))).sample_rows == [0, 1, 2, 3]
    cfg = Config(validation={"data_docs": False, "rating_min": 0, "rating_max": 10})
    assert validate_raw_dir(raw, cfg)["failed"] == 0
    bad = write_raw(tmp_path / "bad", _ratings([0, 3.5, 11, 10]), "movielens-100k")
    f = only(raised(lambda: validate_raw_dir(bad, cfg)))
    assert f.sample_rows == [2] and "validation.rating_min/max" in f.detail
