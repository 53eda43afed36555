"""Great Expectations (GX 1.x) suites for the three data artifacts of the pipeline.

* :func:`validate_raw` - the canonical interaction table (and optional catalog) after loading;
* :func:`validate_processed` - a directory written by :func:`asft.data.preprocess.preprocess`;
* :func:`validate_preferences` - the preference-pair table built from a processed directory.

Each call builds one *ephemeral* GX context (nothing is written to the home directory or the
working directory), registers one pandas dataframe asset per table, runs one checkpoint per table
and, when ``docs_dir`` is given and ``cfg.validation.data_docs`` is true, builds the static GX data
docs site into ``docs_dir`` (on success and on failure). Checks that GX cannot express directly
(per-user joins, list columns, leakage) are computed in pandas/numpy as *derived columns* that GX
then validates, so every failure still has a GX expectation name, a count and sample rows.

Before GX runs, cheap structural pre-checks (missing columns, empty table, wrong dtypes, unreadable
files) are done in pandas/pyarrow and reported with GX expectation names
(``expect_column_to_exist``, ``expect_table_row_count_to_be_between``,
``expect_column_values_to_be_of_type``, ``expect_file_to_exist``); if any fails the suite itself is
skipped. Nothing from GX or pandas escapes as a traceback: failures are raised as
:class:`~asft.data.validation.DataValidationError` with :class:`~asft.data.validation.Failure`
records whose ``sample_rows`` are 0-based row positions in the validated table.

GX is imported lazily (about 3 s), with analytics off, progress bars off and its log quiet.
This module does not import prefect or mlflow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from asft.config import Config
from asft.data.schema import ITEM, RATING, REQUIRED_COLUMNS, TS, USER, rating_scale
from asft.data.validation import DataValidationError, Failure

log = logging.getLogger(__name__)

SUITE_RAW = "raw_interactions"
SUITE_PROCESSED = "processed_sequences"
SUITE_PREFERENCES = "preference_pairs"

# Timestamps are seconds for most sources but an order index for some (RecBole files without a time
# field, generic files with ``order_column``), and milli/microseconds would also be legitimate. So only
# sanity bounds: no negative values, and nothing above 2**62 (sentinels such as INT64_MAX and values
# that overflow when a few of them are added). Ordering per user is what the pipeline relies on.
TIMESTAMP_MIN = 0
TIMESTAMP_MAX = 2**62

MARGIN_MAX = float(np.finfo(np.float32).max)  # "finite" for a float32 column
PAIR_SOURCES = ("explicit", "implicit", "ranking", "best_of_n", "pairwise")
EXTERNAL_SOURCE = "human"  # pairs from preferences.extra_pairs_file
PAIR_SPLITS = ("train", "valid", "test")
# column -> kind: "int" (integer ids, nullable in pandas as float), "float", "str", "list" (int tokens)
PAIR_COLUMNS: dict[str, str] = {
    "pair_id": "int",
    "user_idx": "int",
    "context_id": "int",
    "context_end": "int",
    "context": "list",
    "chosen": "int",
    "rejected": "int",
    "source": "str",
    "margin": "float",
    "chosen_rating": "float",
    "rejected_rating": "float",
    "judge": "int",
    "split": "str",
    "fold": "int",
}
PAIR_NULLABLE = ("chosen_rating", "rejected_rating")

# processed tables: required columns and their kind
PROCESSED_TABLES: dict[str, dict[str, str]] = {
    "sequences": {"user_id": "str", "user_idx": "int", "items": "list", "timestamps": "list"},
    "train": {"user_idx": "int", "tokens": "list", "first_label": "int"},
    "valid": {"user_idx": "int", "input": "list", "target": "int", "history": "list"},
    "test": {"user_idx": "int", "input": "list", "target": "int", "history": "list"},
}

_SITE = "asft"


# --------------------------------------------------------------------------------------- GX plumbing
def _import_gx():
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    with _quiet():
        import great_expectations as gx
    return gx


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence GX's logger and warnings (deprecations, pandas FutureWarnings) for the duration."""
    logger = logging.getLogger("great_expectations")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


@dataclass
class _Table:
    """One validated table: the frame GX sees and a factory of its expectations."""

    name: str  # asset name and suite suffix
    frame: pd.DataFrame | None
    build: Callable[[Any], list]  # gx module -> list of expectations
    prefix: str = ""  # prefix of reported column names ("train." for processed tables)


@dataclass
class _Outcome:
    failures: list[Failure] = field(default_factory=list)
    evaluated: int = 0
    docs: str | None = None
    docs_error: str | None = None


def _m(detail: str, values: str | None = None) -> dict:
    """Expectation keyword arguments ``meta`` and ``notes``: the short text reported on failure (also
    shown in the data docs) and the column quoted at the failing rows."""
    meta = {"asft_detail": detail}
    if values:
        meta["asft_values"] = values
    return {"meta": meta, "notes": detail}



def _all_true(E, column: str, detail: str, values: str | None = None):
    """A derived boolean column that must be True on every row."""
    return E.ExpectColumnValuesToBeInSet(column=column, value_set=[True], **_m(detail, values))


def _all_false(E, column: str, detail: str, values: str | None = None):
    """A derived boolean column that must be False on every row."""
    return E.ExpectColumnValuesToBeInSet(column=column, value_set=[False], **_m(detail, values))

def _context(gx, docs_dir: Path | None):
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    sites = {}
    if docs_dir is not None:
        sites[_SITE] = {
            "class_name": "SiteBuilder",
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
        }
    project = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
        analytics_enabled=False,
        data_docs_sites=sites,
    )
    return gx.get_context(mode="ephemeral", project_config=project)


def _short(v: Any, n: int = 40) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if isinstance(v, (np.generic,)):
        v = v.item()
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def _column_of(kwargs: dict) -> str | None:
    if kwargs.get("column") is not None:
        return str(kwargs["column"])
    if kwargs.get("column_A") is not None:
        return f"{kwargs['column_A']},{kwargs['column_B']}"
    if kwargs.get("column_list"):
        return ",".join(str(c) for c in kwargs["column_list"])
    return None


def _failure_from_result(er, frame: pd.DataFrame, prefix: str, sample: int) -> Failure:
    conf = er.expectation_config
    kwargs = dict(conf.kwargs)
    meta = dict(conf.meta or {})
    col = _column_of(kwargs)
    column = f"{prefix}{col}" if col is not None else (prefix.rstrip(".") or None)
    res = dict(er.result or {})
    detail = [meta.get("asft_detail", "")]
    exc = er.exception_info or {}
    errors = []
    if isinstance(exc, dict):
        if exc.get("raised_exception"):
            errors.append(str(exc.get("exception_message")))
        for v in exc.values():
            if isinstance(v, dict) and v.get("raised_exception"):
                errors.append(str(v.get("exception_message")))
    rows = [
        int(i) for i in res.get("partial_unexpected_index_list") or [] if isinstance(i, (int, np.integer))
    ]
    rows = rows[:sample]
    if errors:
        count = len(frame)
        detail.append("could not be evaluated: " + "; ".join(dict.fromkeys(errors))[:300])
    elif res.get("unexpected_count") is not None:
        count = int(res["unexpected_count"])
        values_col = meta.get("asft_values")
        if values_col and values_col in frame.columns and rows:
            vals = [_short(v) for v in frame[values_col].iloc[rows[:5]]]
            detail.append(f"{values_col} at failing rows: [{', '.join(vals)}]")
        elif res.get("partial_unexpected_list") and not meta.get("asft_values"):
            shown = (tuple(v.values()) if isinstance(v, dict) else v for v in res["partial_unexpected_list"])
            vals = list(dict.fromkeys(_short(v, 60) for v in shown))[:5]
            detail.append(f"unexpected values: [{', '.join(vals)}]")
        if kwargs.get("mostly") not in (None, 1, 1.0) and res.get("element_count"):
            ok = 1 - count / max(int(res["element_count"]), 1)
            detail.append(f"{ok:.1%} pass, mostly={kwargs['mostly']} required")
    else:
        count = int(res.get("missing_count") or 1)
        if "partial_missing_list" in res:
            detail.append(f"missing values: {[_short(v) for v in res['partial_missing_list']][:5]}")
        elif "observed_value" in res:
            detail.append(f"observed {_short(res['observed_value'], 80)}")
    return Failure(conf.type, column, count, rows, "; ".join(d for d in detail if d))


def _widen(frame: pd.DataFrame) -> pd.DataFrame:
    """int8/16/32 -> int64 and float32 -> float64 (nullable ints with NA -> float64).

    GX quirk: ExpectColumnValuesToBeBetween is vectorised on pandas only for int64/float64 columns;
    other numeric dtypes go through a per-value Python function (~100x slower on large tables).
    """
    out = {}
    for c in frame.columns:
        s = frame[c]
        dt = s.dtype
        if pd.api.types.is_bool_dtype(dt) or not pd.api.types.is_numeric_dtype(dt):
            out[c] = s
        elif pd.api.types.is_integer_dtype(dt) and not s.isna().any():
            out[c] = s.astype(np.int64)
        else:
            out[c] = s.astype(np.float64)
    return pd.DataFrame(out, index=frame.index)


def _run_gx(
    suite: str, tables: list[_Table], dataset: str, cfg: Config, docs_dir: str | Path | None
) -> _Outcome:
    """Run one checkpoint per table in one ephemeral context; build the data docs if asked."""
    out = _Outcome()
    docs = Path(docs_dir).resolve() if (docs_dir is not None and cfg.validation.data_docs) else None
    sample = int(cfg.validation.sample_rows)
    try:
        gx = _import_gx()
        from great_expectations.core.run_identifier import RunIdentifier

        with _quiet():
            if docs is not None:
                docs.mkdir(parents=True, exist_ok=True)
            ctx = _context(gx, docs)
            ds = ctx.data_sources.add_pandas(f"{suite}_source")
            # run names become path components of the docs site: no separators allowed
            run_name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(dataset)).strip("._") or suite
            run_id = RunIdentifier(run_name=run_name[-100:])
            rf = {"result_format": "SUMMARY", "partial_unexpected_count": sample}
            for t in tables:
                if t.frame is None:
                    continue
                name = f"{suite}.{t.name}" if t.name != suite else suite
                asset = ds.add_dataframe_asset(t.name)
                batch = asset.add_batch_definition_whole_dataframe("whole")
                gsuite = ctx.suites.add(gx.ExpectationSuite(name=name, expectations=t.build(gx)))
                vd = ctx.validation_definitions.add(
                    gx.ValidationDefinition(name=name, data=batch, suite=gsuite)
                )
                cp = ctx.checkpoints.add(
                    gx.Checkpoint(
                        name=f"{name}.checkpoint", validation_definitions=[vd], actions=[], result_format=rf
                    )
                )
                t.frame = _widen(t.frame)
                result = cp.run(batch_parameters={"dataframe": t.frame}, run_id=run_id)
                for vr in result.run_results.values():
                    out.evaluated += int(vr.statistics.get("evaluated_expectations", 0))
                    for er in vr.results:
                        if not er.success:
                            out.failures.append(_failure_from_result(er, t.frame, t.prefix, sample))
            if docs is not None:
                try:
                    ctx.build_data_docs(site_names=[_SITE])
                    out.docs = str(docs / "index.html")
                except Exception as e:  # noqa: BLE001 - docs are a by-product: never hide the outcome
                    out.docs_error = f"{type(e).__name__}: {e}"
                    log.warning("building the data docs in %s failed: %s", docs, out.docs_error)
    except Exception as e:  # noqa: BLE001 - GX itself broke: a failure, not a traceback
        out.failures.append(
            Failure("great_expectations_run", None, 0, [], f"{type(e).__name__}: {str(e)[:300]}")
        )
    return out


def _finish(suite: str, dataset: str, pre: list[Failure], out: _Outcome, report: dict, docs_dir) -> dict:
    failures = pre + out.failures
    if failures:
        raise DataValidationError(
            dataset, failures, docs_dir=str(Path(docs_dir).resolve()) if out.docs else None
        )
    rep = {"suite": suite, "expectations": out.evaluated, "failed": 0}
    rep.update(report)
    rep["docs"] = out.docs
    if out.docs_error:
        rep["docs_error"] = out.docs_error
    return rep


# ----------------------------------------------------------------------------------- shared helpers
def _positions(mask) -> list[int]:
    return [int(i) for i in np.flatnonzero(np.asarray(mask, dtype=bool))]


def _is_numeric(s: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype)


def _int_column_failure(s: pd.Series, column: str, sample: int, what: str = "integer") -> Failure | None:
    """None if ``s`` holds integers (NaN allowed: the not-null expectation reports those)."""
    if pd.api.types.is_integer_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype):
        return None
    if pd.api.types.is_float_dtype(s.dtype):
        v = s.to_numpy(dtype=np.float64)
        bad = np.isfinite(v) & (v != np.round(v)) | np.isinf(v)
        if not bad.any():
            return None
        rows = _positions(bad)
        return Failure(
            "expect_column_values_to_be_of_type",
            column,
            len(rows),
            rows[:sample],
            f"{what} expected, got non-integral {s.dtype} values {[_short(x) for x in v[bad][:5]]}",
        )
    num = pd.to_numeric(s, errors="coerce")
    bad = (num.isna() & s.notna()).to_numpy()
    rows = _positions(bad) if bad.any() else []
    vals = [_short(x) for x in s.iloc[rows[:5]]] if rows else []
    return Failure(
        "expect_column_values_to_be_of_type",
        column,
        len(rows) or len(s),
        rows[:sample],
        f"{what} expected, got {s.dtype}" + (f" values {vals}" if vals else ""),
    )


def _missing_columns(df: pd.DataFrame, required, prefix: str = "") -> list[Failure]:
    fails = []
    dup = [str(c) for c in pd.Index(df.columns)[pd.Index(df.columns).duplicated()]]
    if dup:
        fails.append(
            Failure(
                "expect_table_columns_to_be_unique",
                prefix.rstrip(".") or None,
                len(dup),
                detail=f"duplicated column names {dup}",
            )
        )
    for c in required:
        if c not in df.columns:
            fails.append(
                Failure(
                    "expect_column_to_exist",
                    f"{prefix}{c}",
                    1,
                    detail=f"have {[str(x) for x in df.columns][:20]}",
                )
            )
    return fails


def _structure_expectations(gx, required, min_rows: int = 1) -> list:
    E = gx.expectations
    exps = [E.ExpectColumnToExist(column=c) for c in required]
    exps.append(E.ExpectTableRowCountToBeBetween(min_value=min_rows))
    return exps


# ------------------------------------------------------------------------------ suite 1: raw events
def _raw_prechecks(df: Any, catalog: Any, sample: int) -> list[Failure]:
    if not isinstance(df, pd.DataFrame):
        return [
            Failure(
                "expect_table_row_count_to_be_between", None, 0, detail=f"not a table: {type(df).__name__}"
            )
        ]
    fails = _missing_columns(df, REQUIRED_COLUMNS)
    if len(df) == 0:
        fails.append(
            Failure("expect_table_row_count_to_be_between", None, 0, detail="table is empty (>= 1 row)")
        )
    if fails:
        return fails
    for col in (USER, ITEM):
        s = df[col]
        if pd.api.types.is_string_dtype(s.dtype) and not pd.api.types.is_object_dtype(s.dtype):
            continue  # pandas str dtype: str or missing
        if pd.api.types.is_object_dtype(s.dtype):
            bad = (s.notna() & ~s.map(lambda v: isinstance(v, str))).to_numpy()
            if not bad.any():
                continue
            rows = _positions(bad)
            vals = [_short(v) for v in s.iloc[rows[:5]]]
            fails.append(
                Failure(
                    "expect_column_values_to_be_of_type",
                    col,
                    len(rows),
                    rows[:sample],
                    f"str expected, got {vals}",
                )
            )
        else:
            fails.append(
                Failure("expect_column_values_to_be_of_type", col, len(s), [], f"str expected, got {s.dtype}")
            )
    ts = df[TS]
    if ts.dtype != np.int64:
        if pd.api.types.is_float_dtype(ts.dtype):
            v = ts.to_numpy(dtype=np.float64)
            bad = ~np.isfinite(v) | (v != np.round(v))
        elif pd.api.types.is_integer_dtype(ts.dtype) or pd.api.types.is_bool_dtype(ts.dtype):
            bad = np.zeros(len(ts), dtype=bool)
        else:
            bad = ~ts.map(lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool)).to_numpy(
                bool
            )
        rows = _positions(bad)
        vals = [_short(v) for v in ts.iloc[rows[:5]]] if rows else []
        fails.append(
            Failure(
                "expect_column_values_to_be_of_type",
                TS,
                len(rows) or len(ts),
                rows[:sample],
                f"int64 expected, got {ts.dtype}" + (f" values {vals}" if vals else ""),
            )
        )
    if RATING in df.columns and not _is_numeric(df[RATING]):
        s = df[RATING]
        num = (
            pd.to_numeric(s, errors="coerce")
            if not pd.api.types.is_bool_dtype(s.dtype)
            else s.map(lambda _: np.nan)
        )
        bad = (num.isna() & s.notna()).to_numpy()
        rows = _positions(bad)
        vals = [_short(v) for v in s.iloc[rows[:5]]] if rows else []
        fails.append(
            Failure(
                "expect_column_values_to_be_of_type",
                RATING,
                len(rows) or len(s),
                rows[:sample],
                f"float64 expected, got {s.dtype}" + (f" values {vals}" if vals else ""),
            )
        )
    if catalog is not None:
        if not isinstance(catalog, pd.DataFrame):
            fails.append(
                Failure(
                    "expect_column_to_exist",
                    f"catalog.{ITEM}",
                    1,
                    detail=f"catalog is not a table: {type(catalog).__name__}",
                )
            )
        else:
            fails += _catalog_prechecks(catalog, sample)
    return fails


def _catalog_prechecks(catalog: pd.DataFrame, sample: int) -> list[Failure]:
    """The catalog's item_id: present once, str, not null, unique (one title/genres per item)."""
    col = f"catalog.{ITEM}"
    fails = _missing_columns(catalog, [ITEM], prefix="catalog.")
    if fails:
        return fails
    ids = catalog[ITEM].reset_index(drop=True)
    null = ids.isna().to_numpy(dtype=bool)
    if null.any():
        rows = _positions(null)
        fails.append(Failure("expect_column_values_to_not_be_null", col, len(rows), rows[:sample], "missing catalog ids"))

    def flag(mask: np.ndarray, expectation: str, message: str) -> bool:
        if not mask.any():
            return False
        rows = _positions(mask)
        vals = [_short(v) for v in ids.iloc[rows[:5]]]
        fails.append(Failure(expectation, col, len(rows), rows[:sample], f"{message}{vals}"))
        return True

    if flag((~null) & ~ids.map(lambda v: isinstance(v, str)).to_numpy(dtype=bool),
            "expect_column_values_to_be_of_type", "str expected, got "):
        return fails
    flag((~null) & ids.duplicated(keep="first").to_numpy(dtype=bool), "expect_column_values_to_be_unique",
         "item ids listed more than once in the catalog: ")
    return fails


def validate_raw(
    interactions: pd.DataFrame,
    catalog: pd.DataFrame | None,
    cfg: Config,
    dataset: str,
    docs_dir: str | Path | None = None,
    fmt: str | None = None,
) -> dict:
    """Validate the canonical interaction table (see :mod:`asft.data.schema`).

    Expectations: required columns exist; >= 1 row; user_id, item_id, timestamp not null; ids not
    blank; timestamp int64 within [0, 2**62]; rating (when present with any value) not null and within
    the scale of the format ``fmt`` or the declared [rating_min, rating_max] (see
    :func:`asft.data.schema.rating_scale`), on the format's grid when it has one; (user_id, item_id, timestamp) unique unless
    ``validation.allow_duplicate_events``; item_id in the catalog (when given); and, with
    ``mostly=validation.min_history_mostly``, each event belongs to a user with at least
    ``preprocess.min_user_events`` events (derived column ``user_event_count``).
    """
    t0 = time.perf_counter()
    sample = int(cfg.validation.sample_rows)
    pre = _raw_prechecks(interactions, catalog, sample)
    k = int(cfg.preprocess.min_user_events)
    vcfg = cfg.validation
    r_lo, r_hi, r_step = rating_scale(fmt, vcfg.rating_min, vcfg.rating_max)
    declared = vcfg.rating_min is not None or vcfg.rating_max is not None
    scale_note = "validation.rating_min/max" if declared else f"the {fmt or 'default'} scale; declare" \
        " validation.rating_min/rating_max for another"

    if pre:
        frame = interactions.reset_index(drop=True) if isinstance(interactions, pd.DataFrame) else None
        if frame is not None and frame.columns.duplicated().any():
            frame = None

        def build_structure(gx):
            exps = _structure_expectations(gx, REQUIRED_COLUMNS)
            if frame is not None and TS in frame.columns and len(frame):
                exps.append(gx.expectations.ExpectColumnValuesToBeOfType(column=TS, type_="int64"))
            return exps

        out = _Outcome()
        if docs_dir is not None and vcfg.data_docs and frame is not None:
            out = _run_gx(SUITE_RAW, [_Table(SUITE_RAW, frame, build_structure)], dataset, cfg, docs_dir)
            out.failures = [f for f in out.failures if f.expectation == "great_expectations_run"]
        return _finish(SUITE_RAW, dataset, pre, out, {}, docs_dir)

    df = interactions
    frame = pd.DataFrame({USER: df[USER].to_numpy(), ITEM: df[ITEM].to_numpy(), TS: df[TS].to_numpy()})
    has_rating = RATING in df.columns and bool(df[RATING].notna().any())
    if has_rating:
        frame[RATING] = df[RATING].to_numpy(dtype=np.float64)
    counts = frame.groupby(USER, sort=False)[USER].transform("size")
    frame["user_event_count"] = counts.fillna(0).to_numpy(dtype=np.int64)
    has_catalog = catalog is not None
    if has_catalog:
        frame["item_in_catalog"] = frame[ITEM].isin(pd.unique(catalog[ITEM].dropna())).to_numpy(dtype=bool)

    def build(gx):
        E = gx.expectations
        exps = _structure_expectations(gx, REQUIRED_COLUMNS)
        for c in (USER, ITEM, TS):
            exps.append(E.ExpectColumnValuesToNotBeNull(column=c, **_m("missing values")))
        for c in (USER, ITEM):
            exps.append(E.ExpectColumnValuesToNotMatchRegex(column=c, regex=r"^\s*$", **_m("blank id")))
        exps.append(E.ExpectColumnValuesToBeOfType(column=TS, type_="int64"))
        exps.append(
            E.ExpectColumnValuesToBeBetween(
                column=TS,
                min_value=TIMESTAMP_MIN,
                max_value=TIMESTAMP_MAX,
                **_m(f"timestamp outside [{TIMESTAMP_MIN}, 2**62]"),
            )
        )
        if has_rating:
            exps.append(E.ExpectColumnValuesToNotBeNull(column=RATING, **_m("rating missing on some events")))
            exps.append(
                E.ExpectColumnValuesToBeBetween(
                    column=RATING,
                    min_value=r_lo,
                    max_value=r_hi,
                    **_m(f"rating outside [{r_lo}, {r_hi}] ({scale_note})"),
                )
            )
            if r_step:
                grid = [round(r_lo + i * r_step, 6) for i in range(int(round((r_hi - r_lo) / r_step)) + 1)]
                exps.append(
                    E.ExpectColumnValuesToBeInSet(
                        column=RATING, value_set=grid, **_m(f"rating off the {fmt} scale {grid}")
                    )
                )
        if not vcfg.allow_duplicate_events:
            exps.append(
                E.ExpectCompoundColumnsToBeUnique(
                    column_list=[USER, ITEM, TS], **_m("duplicated (user_id, item_id, timestamp) events")
                )
            )
        if has_catalog:
            exps.append(
                E.ExpectColumnValuesToBeInSet(
                    column="item_in_catalog", value_set=[True], **_m("item_id not in the catalog", ITEM)
                )
            )
        exps.append(
            E.ExpectColumnValuesToBeBetween(
                column="user_event_count",
                min_value=k,
                mostly=float(vcfg.min_history_mostly),
                **_m(f"events of users with fewer than {k} events (preprocess.min_user_events)", USER),
            )
        )
        return exps

    out = _run_gx(SUITE_RAW, [_Table(SUITE_RAW, frame, build)], dataset, cfg, docs_dir)
    users = frame["user_event_count"]
    report = {
        "rows": len(frame),
        "users": int(df[USER].nunique()),
        "items": int(df[ITEM].nunique()),
        "has_ratings": has_rating,
        "users_below_min_events": int(frame.loc[users < k, USER].nunique()),
        "events_of_short_users": int((users < k).sum()),
        "duplicate_events": int(frame.duplicated([USER, ITEM, TS]).sum()),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if has_catalog:
        report["items_missing_from_catalog"] = int(frame.loc[~frame["item_in_catalog"], ITEM].nunique())
    return _finish(SUITE_RAW, dataset, pre, out, report, docs_dir)


# ------------------------------------------------------------------------- list-column helpers
@dataclass
class _Lists:
    """A column of integer lists as flat values + offsets (nulls: length -1, empty values)."""

    values: np.ndarray
    offsets: np.ndarray
    null: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        n = np.diff(self.offsets)
        return np.where(self.null, -1, n)

    def row(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def parents(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.null)), np.diff(self.offsets))

    def rows_with(self, bad_values: np.ndarray) -> np.ndarray:
        """Per row: how many of its values are flagged."""
        return np.bincount(self.parents()[bad_values], minlength=len(self.null))


def _lists_from_arrow(arr) -> _Lists:
    import pyarrow as pa

    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks else pa.array([], type=arr.type)
    arr = arr.cast(pa.large_list(pa.int64()))
    null = np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    offsets = np.asarray(arr.offsets.to_numpy(), dtype=np.int64)
    offsets = offsets - offsets[0]
    values = arr.values.slice(int(arr.offsets[0].as_py()), int(offsets[-1]))
    vals = values.fill_null(-(2**62)).to_numpy(zero_copy_only=False).astype(np.int64)
    return _Lists(vals, offsets, null)


def _lists_from_series(s: pd.Series) -> tuple[_Lists, np.ndarray]:
    """Python objects -> _Lists; second value: rows that are not lists of integers."""
    arrays, bad = [], np.zeros(len(s), dtype=bool)
    null = np.zeros(len(s), dtype=bool)
    for i, v in enumerate(s.tolist()):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            null[i] = True
            arrays.append(np.empty(0, np.int64))
            continue
        try:
            if isinstance(v, (str, bytes, dict)) or np.ndim(v) != 1:
                raise TypeError
            a = np.asarray(v, dtype=np.float64)
            if a.size and (not np.isfinite(a).all() or (a != np.round(a)).any()):
                raise TypeError
            arrays.append(a.astype(np.int64))
        except (TypeError, ValueError):
            bad[i] = True
            null[i] = True
            arrays.append(np.empty(0, np.int64))
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = np.concatenate(arrays) if arrays else np.empty(0, np.int64)
    return _Lists(values.astype(np.int64), offsets, null), bad


def _lists_from_objects(s: pd.Series) -> tuple[_Lists, np.ndarray]:
    """A pandas column of token lists (lists or numpy arrays, e.g. read from Parquet) -> _Lists.

    Fast path through pyarrow; anything that is not a list of integers per row takes the slow path,
    which also reports the offending rows."""
    import pyarrow as pa

    try:
        arr = pa.array(s.to_numpy(dtype=object), from_pandas=True)
        if (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)) and pa.types.is_integer(
            arr.type.value_type
        ):
            return _lists_from_arrow(arr), np.zeros(len(s), dtype=bool)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        pass
    return _lists_from_series(s)


def _tails_match(ctx: _Lists, items: _Lists, pos: np.ndarray, end: np.ndarray, max_len: int) -> np.ndarray:
    """Row i: ctx[i] == items[pos[i]][:end[i]][-max_len:] (vectorised over all rows)."""
    n = len(pos)
    match = np.zeros(n, dtype=bool)
    safe = np.maximum(pos, 0)
    ilen = items.lengths[safe] if len(items.null) else np.full(n, -1)
    want = np.minimum(end, max_len)
    rows = np.flatnonzero((pos >= 0) & ~ctx.null & (end >= 1) & (end <= ilen) & (ctx.lengths == want))
    if len(rows) == 0:
        return match
    lens = ctx.lengths[rows]
    rep = np.repeat(rows, lens)
    within = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
    got = ctx.values[ctx.offsets[rep] + within]
    expected = items.values[items.offsets[pos[rep]] + (end[rep] - want[rep]) + within]
    bad = np.bincount(rep[got != expected], minlength=n)
    match[rows] = bad[rows] == 0
    return match


def _int_values(s: pd.Series | np.ndarray, fill: int = -1) -> np.ndarray:
    v = pd.to_numeric(pd.Series(s), errors="coerce").to_numpy(dtype=np.float64)
    v = np.where(np.isfinite(v), v, fill)
    return np.clip(v, -(2**62), 2**62).astype(np.int64)


def _lookup(keys: np.ndarray, table_keys: np.ndarray) -> np.ndarray:
    """Row position of each key in ``table_keys`` (first occurrence), -1 when absent."""
    idx = pd.Series(np.arange(len(table_keys)), index=table_keys)
    idx = idx[~idx.index.duplicated()]
    pos = idx.reindex(keys).to_numpy()
    return np.where(np.isnan(pos.astype(np.float64)), -1, pos).astype(np.int64)


# ------------------------------------------------------------------------ suite 2: processed dir
def _read_processed(root: Path) -> tuple[dict, dict, Any, list[Failure]]:
    """Read the processed tables with pyarrow; structural failures instead of exceptions."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from asft.data.preprocess import OUTPUT_FILES, ItemVocab

    fails: list[Failure] = []
    tables: dict[str, Any] = {}
    stats: dict = {}
    vocab = None
    if not root.is_dir():
        return {}, {}, None, [Failure("expect_file_to_exist", None, 1, detail=f"{root} is not a directory")]
    for f in OUTPUT_FILES:
        if not (root / f).is_file():
            fails.append(Failure("expect_file_to_exist", None, 1, detail=f"{f} missing in {root}"))
    for name, cols in PROCESSED_TABLES.items():
        p = root / f"{name}.parquet"
        if not p.is_file():
            continue
        try:
            t = pq.read_table(p)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for broken files
            fails.append(
                Failure(
                    "expect_file_to_be_valid_parquet",
                    None,
                    1,
                    detail=f"{p.name}: {type(e).__name__}: {str(e)[:200]}",
                )
            )
            continue
        names = t.column_names
        present = [c for c in cols if c in names]
        for c in cols:
            if c not in names:
                fails.append(Failure("expect_column_to_exist", f"{name}.{c}", 1, detail=f"have {names[:20]}"))
        for c in present:
            typ = t.schema.field(c).type
            kind = cols[c]
            ok = {
                "int": pa.types.is_integer(typ),
                "str": pa.types.is_string(typ) or pa.types.is_large_string(typ),
                "list": (pa.types.is_list(typ) or pa.types.is_large_list(typ))
                and pa.types.is_integer(typ.value_type),
            }[kind]
            if not ok:
                fails.append(
                    Failure(
                        "expect_column_values_to_be_of_type",
                        f"{name}.{c}",
                        t.num_rows,
                        [],
                        f"{ {'int': 'integer', 'str': 'string', 'list': 'list<int>'}[kind] } expected,"
                        f" got {typ}",
                    )
                )
        if name in ("sequences", "valid", "test") and t.num_rows == 0:
            fails.append(
                Failure("expect_table_row_count_to_be_between", name, 0, detail=f"{name}.parquet is empty")
            )
        tables[name] = t
    for fname in ("vocab.json", "stats.json"):
        p = root / fname
        if not p.is_file():
            continue
        try:
            if fname == "vocab.json":
                vocab = ItemVocab.load(p)
            else:
                stats = json.loads(p.read_text())
                if not isinstance(stats, dict):
                    raise ValueError("not a JSON object")
        except Exception as e:  # noqa: BLE001 - broken JSON, wrong keys or types
            fails.append(
                Failure(
                    "expect_file_to_be_valid_json",
                    None,
                    1,
                    detail=f"{fname}: {type(e).__name__}: {str(e)[:200]}",
                )
            )
    return tables, stats, vocab, fails


def _seq_windows_ok(items: _Lists, seq_pos: np.ndarray, tokens: _Lists, holdout: int) -> np.ndarray:
    """Window i is a contiguous slice of its user's items[:-holdout] (the training part)."""
    ok = np.zeros(len(seq_pos), dtype=bool)
    tl = tokens.lengths
    il = items.lengths
    for i, p in enumerate(seq_pos):
        n = int(tl[i])
        if p < 0 or n <= 0:
            continue
        part = items.row(int(p))[: max(int(il[p]) - holdout, 0)]
        w = tokens.row(i)
        if n > len(part):
            continue
        for s in np.flatnonzero(part[: len(part) - n + 1] == w[0]):
            if np.array_equal(part[s : s + n], w):
                ok[i] = True
                break
    return ok


def validate_processed(processed_dir: str | Path, cfg: Config, docs_dir: str | Path | None = None) -> dict:
    """Validate a directory written by :func:`asft.data.preprocess.preprocess`.

    Tables (one GX suite each, ``processed_sequences.<table>``):

    * sequences: user_idx unique in [0, users), user_id unique, length >= min_user_events, all items in
      the vocabulary, as many timestamps as items, timestamps non-decreasing;
    * train: user_idx known, window length in [2, max_len+1], tokens in the vocabulary, first_label in
      [0, len-2], and every window is a contiguous slice of the user's items[:-2] (no leakage of the
      validation/test events);
    * valid / test: one row per user (unique user_idx, row count == users), input length in [1, max_len],
      tokens in the vocabulary, target == items[-2] / items[-1], history == items[:-2] / items[:-1],
      input == history[-max_len:];
    * stats: stats.json agrees with the tables (users, items, vocab_size, events, train_events,
      train_windows, max_len, min_user_events).
    """
    from asft.data.preprocess import NUM_SPECIAL

    t0 = time.perf_counter()
    root = Path(processed_dir)
    dataset = str(root)
    L = int(cfg.preprocess.max_len)
    k = int(cfg.preprocess.min_user_events)
    tables, stats, vocab, pre = _read_processed(root)
    if pre or vocab is None:
        if not pre:
            pre = [Failure("expect_file_to_exist", None, 1, detail="vocab.json missing")]
        out = _Outcome()
        if docs_dir is not None and cfg.validation.data_docs:
            st = []
            for name, t in tables.items():
                cols = list(PROCESSED_TABLES[name])
                frame = pd.DataFrame({c: np.zeros(t.num_rows, np.int8) for c in t.column_names if c in cols})
                st.append(
                    _Table(
                        name,
                        frame,
                        lambda gx, cols=cols: _structure_expectations(gx, cols),
                        prefix=f"{name}.",
                    )
                )
            if st:
                out = _run_gx(SUITE_PROCESSED, st, dataset, cfg, docs_dir)
                out.failures = [f for f in out.failures if f.expectation == "great_expectations_run"]
        return _finish(SUITE_PROCESSED, dataset, pre, out, {}, docs_dir)

    V = vocab.size
    lo, hi = NUM_SPECIAL, V - 1

    def in_vocab(lists: _Lists) -> np.ndarray:
        bad = (lists.values < lo) | (lists.values > hi)
        return (lists.rows_with(bad) == 0) & ~lists.null

    def col(t, c) -> pd.Series:
        return t.column(c).to_pandas().reset_index(drop=True)

    # sequences
    st = tables["sequences"]
    n_users = st.num_rows
    seq_uidx = col(st, "user_idx")
    items = _lists_from_arrow(st.column("items"))
    tss = _lists_from_arrow(st.column("timestamps"))
    ilen = items.lengths
    same_row = np.zeros(max(len(tss.values) - 1, 0), dtype=bool)
    if len(tss.values) > 1:
        par = tss.parents()
        same_row = par[1:] == par[:-1]
        dec = np.diff(tss.values) < 0
        dec_rows = np.bincount(par[1:][dec & same_row], minlength=n_users)
    else:
        dec_rows = np.zeros(n_users, dtype=np.int64)
    seq_frame = pd.DataFrame(
        {
            "user_id": col(st, "user_id"),
            "user_idx": seq_uidx,
            "items_len": ilen,
            "items_in_vocab": in_vocab(items),
            "timestamps_len": tss.lengths,
            "timestamps_sorted": (dec_rows == 0) & ~tss.null,
        }
    )
    seq_key = _int_values(seq_uidx, fill=-(2**40))

    def build_seq(gx):
        E = gx.expectations
        return [
            *_structure_expectations(gx, list(seq_frame.columns)),
            E.ExpectColumnValuesToNotBeNull(column="user_idx"),
            E.ExpectColumnValuesToBeUnique(column="user_idx", **_m("one sequence per user")),
            E.ExpectColumnValuesToBeBetween(
                column="user_idx",
                min_value=0,
                max_value=max(n_users - 1, 0),
                **_m(f"user_idx outside [0, {n_users})"),
            ),
            E.ExpectColumnValuesToNotBeNull(column="user_id"),
            E.ExpectColumnValuesToBeUnique(column="user_id"),
            E.ExpectColumnValuesToBeBetween(
                column="items_len",
                min_value=k,
                **_m(f"sequence shorter than {k} (preprocess.min_user_events)"),
            ),
            _all_true(E, "items_in_vocab", f"items token outside [{lo}, {V})", "user_idx"),
            E.ExpectColumnPairValuesToBeEqual(
                column_A="timestamps_len", column_B="items_len", **_m("timestamps and items differ in length")
            ),
            _all_true(E, "timestamps_sorted", "timestamps decrease within the sequence", "user_idx"),
        ]

    # train windows
    tt = tables["train"]
    tokens = _lists_from_arrow(tt.column("tokens"))
    tr_uidx = col(tt, "user_idx")
    tr_pos = _lookup(_int_values(tr_uidx), seq_key)
    tlen = tokens.lengths
    train_frame = pd.DataFrame(
        {
            "user_idx": tr_uidx,
            "user_known": tr_pos >= 0,
            "tokens_len": tlen,
            "tokens_in_vocab": in_vocab(tokens),
            "first_label": col(tt, "first_label"),
            "last_label": np.maximum(tlen - 2, 0),
            "window_in_train_part": _seq_windows_ok(items, tr_pos, tokens, 2),
        }
    )

    def build_train(gx):
        E = gx.expectations
        return [
            *_structure_expectations(gx, list(train_frame.columns)),
            E.ExpectColumnValuesToNotBeNull(column="user_idx"),
            E.ExpectColumnValuesToBeInSet(
                column="user_known", value_set=[True], **_m("user_idx not in sequences", "user_idx")
            ),
            E.ExpectColumnValuesToBeBetween(
                column="tokens_len",
                min_value=2,
                max_value=L + 1,
                **_m(f"window length outside [2, max_len+1={L + 1}]"),
            ),
            E.ExpectColumnValuesToBeInSet(
                column="tokens_in_vocab", value_set=[True], **_m(f"token outside [{lo}, {V})", "user_idx")
            ),
            E.ExpectColumnValuesToBeBetween(column="first_label", min_value=0, **_m("negative first_label")),
            E.ExpectColumnPairValuesAToBeGreaterThanB(
                column_A="last_label",
                column_B="first_label",
                or_equal=True,
                **_m("first_label beyond the window's last label"),
            ),
            _all_true(E, "window_in_train_part", 
                    "window is not a slice of the user's training items (items[:-2]): leakage or corruption",
                    "user_idx",
                ),
        ]

    def eval_frame(name: str, offset: int) -> tuple[pd.DataFrame, Callable]:
        t = tables[name]
        uidx = col(t, "user_idx")
        pos = _lookup(_int_values(uidx), seq_key)
        inp = _lists_from_arrow(t.column("input"))
        hist = _lists_from_arrow(t.column("history"))
        target = col(t, "target")
        expected = np.full(len(pos), np.nan)
        hist_ok = np.zeros(len(pos), dtype=bool)
        input_ok = np.zeros(len(pos), dtype=bool)
        for i, p in enumerate(pos):
            h = hist.row(i)
            if not inp.null[i] and not hist.null[i]:
                input_ok[i] = np.array_equal(inp.row(i), h[-L:])
            if p < 0 or ilen[p] < offset:
                continue
            seq = items.row(int(p))
            expected[i] = seq[len(seq) - offset]
            hist_ok[i] = not hist.null[i] and np.array_equal(h, seq[: len(seq) - offset])
        tv = _int_values(target, fill=-1)
        frame = pd.DataFrame(
            {
                "user_idx": uidx,
                "user_known": pos >= 0,
                "input_len": inp.lengths,
                "input_in_vocab": in_vocab(inp),
                "input_is_history_tail": input_ok,
                "history_in_vocab": in_vocab(hist),
                "history_matches_sequence": hist_ok,
                "target": target,
                "target_in_vocab": (tv >= lo) & (tv <= hi),
                "expected_target": expected,
            }
        )
        which = "items[-2]" if offset == 2 else "items[-1]"

        def build(gx):
            E = gx.expectations
            return [
                *_structure_expectations(gx, list(frame.columns)),
                E.ExpectTableRowCountToEqual(value=n_users, **_m("one row per user of sequences.parquet")),
                E.ExpectColumnValuesToNotBeNull(column="user_idx"),
                E.ExpectColumnValuesToBeUnique(column="user_idx", **_m("one row per user")),
                E.ExpectColumnValuesToBeInSet(
                    column="user_known", value_set=[True], **_m("user_idx not in sequences", "user_idx")
                ),
                E.ExpectColumnValuesToBeBetween(
                    column="input_len",
                    min_value=1,
                    max_value=L,
                    **_m(f"input length outside [1, max_len={L}]"),
                ),
                _all_true(E, "input_in_vocab", f"input token outside [{lo}, {V})", "user_idx"),
                _all_true(E, "input_is_history_tail", f"input != history[-{L}:]", "user_idx"),
                _all_true(E, "history_in_vocab", f"history token outside [{lo}, {V})", "user_idx"),
                _all_true(E, "history_matches_sequence", f"history != items[:-{offset}] of the user's sequence", "user_idx"),
                E.ExpectColumnValuesToNotBeNull(column="target"),
                E.ExpectColumnValuesToBeInSet(
                    column="target_in_vocab", value_set=[True], **_m(f"target outside [{lo}, {V})", "target")
                ),
                E.ExpectColumnPairValuesToBeEqual(
                    column_A="target",
                    column_B="expected_target",
                    **_m(f"target != {which} of the user's sequence"),
                ),
            ]

        return frame, build

    valid_frame, build_valid = eval_frame("valid", 2)
    test_frame, build_test = eval_frame("test", 1)

    # stats.json against the tables
    train_events = int(np.maximum(ilen[ilen >= 0] - 2, 0).sum())
    actual = {
        "users": n_users,
        "items": vocab.n_items,
        "vocab_size": V,
        "events": int(ilen[ilen >= 0].sum()),
        "train_events": train_events,
        "train_windows": tt.num_rows,
        "max_len": L,
        "min_user_events": k,
    }
    stats_frame = pd.DataFrame(
        {
            "key": list(actual),
            "stated": pd.Series([stats.get(key) for key in actual], dtype=object),
            "actual": pd.Series(list(actual.values()), dtype=object),
        }
    )

    def build_stats(gx):
        E = gx.expectations
        return [
            E.ExpectColumnPairValuesToBeEqual(
                column_A="stated",
                column_B="actual",
                **_m("stats.json disagrees with the tables/config", "key"),
            )
        ]

    parts = [
        _Table("sequences", seq_frame, build_seq, "sequences."),
        _Table("train", train_frame, build_train, "train."),
        _Table("valid", valid_frame, build_valid, "valid."),
        _Table("test", test_frame, build_test, "test."),
        _Table("stats", stats_frame, build_stats, "stats."),
    ]
    out = _run_gx(SUITE_PROCESSED, parts, dataset, cfg, docs_dir)
    report = {
        "rows": {p.name: len(p.frame) for p in parts if p.name != "stats"},
        "users": n_users,
        "items": vocab.n_items,
        "vocab_size": V,
        "events": actual["events"],
        "train_windows": tt.num_rows,
        "max_len": L,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return _finish(SUITE_PROCESSED, dataset, pre, out, report, docs_dir)


# ----------------------------------------------------------------------- suite 3: preference pairs
def _pair_prechecks(pairs: Any, sample: int) -> list[Failure]:
    if not isinstance(pairs, pd.DataFrame):
        return [
            Failure(
                "expect_table_row_count_to_be_between", None, 0, detail=f"not a table: {type(pairs).__name__}"
            )
        ]
    fails = _missing_columns(pairs, PAIR_COLUMNS)
    if len(pairs) == 0:
        fails.append(Failure("expect_table_row_count_to_be_between", None, 0, detail="no preference pairs"))
    if fails:
        return fails
    for c, kind in PAIR_COLUMNS.items():
        s = pairs[c]
        if kind == "int":
            f = _int_column_failure(s, c, sample)
            if f:
                fails.append(f)
        elif kind == "float" and not _is_numeric(s):
            num = (
                pd.to_numeric(s, errors="coerce")
                if not pd.api.types.is_bool_dtype(s.dtype)
                else s.map(lambda _: np.nan)
            )
            bad = (num.isna() & s.notna()).to_numpy()
            rows = _positions(bad)
            fails.append(
                Failure(
                    "expect_column_values_to_be_of_type",
                    c,
                    len(rows) or len(s),
                    rows[:sample],
                    f"float expected, got {s.dtype}",
                )
            )
    return fails


def validate_preferences(
    pairs: pd.DataFrame,
    processed_dir: str | Path,
    cfg: Config,
    dataset: str,
    docs_dir: str | Path | None = None,
) -> dict:
    """Validate preference pairs against the processed sequences they were built from.

    Expectations: all columns exist and are not null (ratings may be NaN); pair_id unique; chosen !=
    rejected; chosen/rejected tokens in the vocabulary; source in the allowed set (configured sources or
    all five); split in {train, valid, test} with a non-empty train split; fold in {0, 1}; judge in
    [-1, n_judges); margin > 0; ratings (when known) within [rating_min, rating_max]; user_idx known;
    one split and one fold per user; context_id <-> (user_idx, context_end) one-to-one; context length in
    [1, max_len] and == min(context_end, max_len); context == items[:context_end][-max_len:];
    1 <= context_end <= len(items)-2 (the training part); no leakage: neither chosen nor rejected is the
    user's validation or test target (``chosen_leaks`` / ``rejected_leaks``); every source present has
    a share >= ``validation.min_source_share``.
    """
    from asft.data.preprocess import NUM_SPECIAL

    t0 = time.perf_counter()
    sample = int(cfg.validation.sample_rows)
    vcfg = cfg.validation
    L = int(cfg.preprocess.max_len)
    root = Path(processed_dir)
    pre = _pair_prechecks(pairs, sample)
    tables, pstats, vocab, pfails = _read_processed(root)
    r_lo, r_hi, _ = rating_scale(pstats.get("format"), vcfg.rating_min, vcfg.rating_max)
    pfails = [
        Failure(f.expectation, f.column, f.count, f.sample_rows, f"processed dir: {f.detail}".rstrip(": "))
        for f in pfails
    ]
    if vocab is None and not pfails:
        pfails = [
            Failure("expect_file_to_exist", None, 1, detail=f"processed dir: vocab.json missing in {root}")
        ]
    pre = pre + pfails
    if pre:
        frame = pairs.reset_index(drop=True) if isinstance(pairs, pd.DataFrame) else None
        if frame is not None and frame.columns.duplicated().any():
            frame = None
        out = _Outcome()
        if docs_dir is not None and vcfg.data_docs and frame is not None:
            shallow = pd.DataFrame({c: np.zeros(len(frame), np.int8) for c in frame.columns})
            out = _run_gx(
                SUITE_PREFERENCES,
                [_Table(SUITE_PREFERENCES, shallow, lambda gx: _structure_expectations(gx, PAIR_COLUMNS))],
                dataset,
                cfg,
                docs_dir,
            )
            out.failures = [f for f in out.failures if f.expectation == "great_expectations_run"]
        return _finish(SUITE_PREFERENCES, dataset, pre, out, {}, docs_dir)

    V = vocab.size
    lo, hi = NUM_SPECIAL, V - 1
    df = pairs.reset_index(drop=True)
    n = len(df)

    st = tables["sequences"]
    seq_key = _int_values(st.column("user_idx").to_pandas(), fill=-(2**40))
    items = _lists_from_arrow(st.column("items"))
    ilen = items.lengths
    uidx = _int_values(df["user_idx"])
    pos = _lookup(uidx, seq_key)
    known = pos >= 0
    train_len = np.where(known, ilen[np.maximum(pos, 0)] - 2, -1)

    targets = []
    for name in ("valid", "test"):
        t = tables[name]
        tpos = _lookup(uidx, _int_values(t.column("user_idx").to_pandas(), fill=-(2**40)))
        tv = _int_values(t.column("target").to_pandas(), fill=-(2**40))
        targets.append(np.where(tpos >= 0, tv[np.maximum(tpos, 0)] if len(tv) else -(2**40), -(2**40)))
    chosen = _int_values(df["chosen"], fill=-(2**41))
    rejected = _int_values(df["rejected"], fill=-(2**41))
    cend = _int_values(df["context_end"], fill=-1)

    ctx, ctx_bad = _lists_from_objects(df["context"])
    clen = ctx.lengths
    match = _tails_match(ctx, items, pos, cend, L)

    src = df["source"]
    shares = src.value_counts(normalize=True, dropna=True)
    allowed = list(PAIR_SOURCES) if cfg.preferences.sources == "auto" else list(cfg.preferences.sources)
    if cfg.preferences.extra_pairs_file:
        allowed.append(EXTERNAL_SOURCE)
    keys = pd.DataFrame({"u": uidx, "e": cend, "c": _int_values(df["context_id"], fill=-(2**41))})
    per_id = keys.groupby("c")[["u", "e"]].transform("nunique")
    per_key = keys.groupby(["u", "e"])["c"].transform("nunique")
    id_ok = (per_id["u"] == 1) & (per_id["e"] == 1) & (per_key == 1)
    frame = pd.DataFrame({c: df[c] for c in PAIR_COLUMNS if c != "context"})
    # GX sees only whether a context is there; its content is checked through the derived columns
    frame["context"] = pd.Series(np.where(ctx.null & ~ctx_bad, None, "list"), dtype=object)
    by_user = df.groupby(uidx)
    frame = frame.assign(
        user_in_sequences=known,
        train_part_len=train_len,
        context_len=clen,
        expected_context_len=np.minimum(cend, L),
        context_matches_sequence=match,
        context_id_consistent=id_ok.to_numpy(dtype=bool),
        chosen_is_rejected=chosen == rejected,
        chosen_leaks=known & ((chosen == targets[0]) | (chosen == targets[1])),
        rejected_leaks=known & ((rejected == targets[0]) | (rejected == targets[1])),
        source_share=src.map(shares).fillna(0.0).to_numpy(dtype=np.float64),
        user_split_count=by_user["split"].transform("nunique").to_numpy(),
        user_fold_count=by_user["fold"].transform("nunique").to_numpy(),
    )
    n_judges = int(cfg.preferences.judge.n_judges)

    def build(gx):
        E = gx.expectations
        exps = _structure_expectations(gx, PAIR_COLUMNS)
        for c in PAIR_COLUMNS:
            if c not in PAIR_NULLABLE:
                exps.append(E.ExpectColumnValuesToNotBeNull(column=c))
        exps += [
            E.ExpectColumnValuesToBeUnique(column="pair_id"),
            E.ExpectColumnValuesToBeInSet(
                column="chosen_is_rejected", value_set=[False], **_m("chosen == rejected", "chosen")
            ),
            E.ExpectColumnValuesToBeBetween(
                column="chosen",
                min_value=lo,
                max_value=hi,
                **_m(f"chosen token outside the catalog [{lo}, {V})"),
            ),
            E.ExpectColumnValuesToBeBetween(
                column="rejected",
                min_value=lo,
                max_value=hi,
                **_m(f"rejected token outside the catalog [{lo}, {V})"),
            ),
            E.ExpectColumnValuesToBeInSet(column="source", value_set=allowed),
            E.ExpectColumnValuesToBeInSet(column="split", value_set=list(PAIR_SPLITS)),
            E.ExpectColumnDistinctValuesToContainSet(
                column="split", value_set=["train"], **_m("the train split is empty")
            ),
            E.ExpectColumnValuesToBeInSet(column="fold", value_set=[0, 1]),
            E.ExpectColumnValuesToBeBetween(
                column="judge", min_value=-1, max_value=n_judges - 1, **_m(f"judge outside [-1, {n_judges})")
            ),
            E.ExpectColumnValuesToBeBetween(
                column="margin",
                min_value=0,
                strict_min=True,
                max_value=MARGIN_MAX,
                **_m("margin must be > 0 and finite"),
            ),
            E.ExpectColumnValuesToBeBetween(
                column="chosen_rating",
                min_value=r_lo,
                max_value=r_hi,
                **_m(f"rating outside [{r_lo}, {r_hi}]"),
            ),
            E.ExpectColumnValuesToBeBetween(
                column="rejected_rating",
                min_value=r_lo,
                max_value=r_hi,
                **_m(f"rating outside [{r_lo}, {r_hi}]"),
            ),
            _all_true(E, "user_in_sequences", "user_idx not in sequences.parquet", "user_idx"),
            E.ExpectColumnValuesToBeBetween(
                column="user_split_count",
                min_value=1,
                max_value=1,
                **_m("user's pairs are in more than one split", "user_idx"),
            ),
            E.ExpectColumnValuesToBeBetween(
                column="user_fold_count",
                min_value=1,
                max_value=1,
                **_m("user's pairs are in more than one fold", "user_idx"),
            ),
            _all_true(E, "context_id_consistent", "context_id is not one-to-one with (user_idx, context_end)", "context_id"),
            E.ExpectColumnValuesToBeBetween(column="context_end", min_value=1, **_m("context_end < 1")),
            E.ExpectColumnPairValuesAToBeGreaterThanB(
                column_A="train_part_len",
                column_B="context_end",
                or_equal=True,
                **_m("context_end beyond the training part (len(items)-2)"),
            ),
            E.ExpectColumnValuesToBeBetween(
                column="context_len",
                min_value=1,
                max_value=L,
                **_m(f"context length outside [1, max_len={L}] (-1: not a list)"),
            ),
            E.ExpectColumnPairValuesToBeEqual(
                column_A="context_len",
                column_B="expected_context_len",
                **_m("context length != min(context_end, max_len)"),
            ),
            _all_true(E, "context_matches_sequence", f"context != items[:context_end][-{L}:] of the user's sequence", "user_idx"),
            _all_false(E, "chosen_leaks", "chosen is the user's validation or test target (leakage)", "chosen"),
            _all_false(E, "rejected_leaks", "rejected is the user's validation or test target (leakage)", "rejected"),
            E.ExpectColumnValuesToBeBetween(
                column="source_share",
                min_value=float(vcfg.min_source_share),
                max_value=1.0,
                **_m(f"source supplies less than {vcfg.min_source_share:.1%} of the pairs", "source"),
            ),
        ]
        return exps

    out = _run_gx(SUITE_PREFERENCES, [_Table(SUITE_PREFERENCES, frame, build)], dataset, cfg, docs_dir)
    if ctx_bad.any():
        rows = _positions(ctx_bad)
        out.failures.insert(
            0,
            Failure(
                "expect_column_values_to_be_of_type",
                "context",
                len(rows),
                rows[:sample],
                "list of integer tokens expected",
            ),
        )
    report = {
        "rows": n,
        "users": int(pd.Series(uidx).nunique()),
        "contexts": int(keys["c"].nunique()),
        "source_shares": {str(k): round(float(v), 4) for k, v in shares.items()},
        "splits": {str(k): int(v) for k, v in df["split"].value_counts().items()},
        "leaking_pairs": int((frame["chosen_leaks"] | frame["rejected_leaks"]).sum()),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return _finish(SUITE_PREFERENCES, dataset, pre, out, report, docs_dir)
