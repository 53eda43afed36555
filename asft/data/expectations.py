"""Great Expectations (GX 1.x) suites for the three data artifacts of the pipeline -- the one place
where data is validated.

* :func:`validate_raw` - the canonical interaction table (and optional catalog) after loading;
  :func:`validate_raw_dir` runs the same suite on a published ``raw/`` directory (``asft validate``);
* :func:`validate_processed` - a directory written by :func:`asft.data.preprocess.preprocess`;
* :func:`validate_preferences` - the preference-pair table built from a processed directory.

Every rule is a GX expectation, evaluated by GX: built-in ones where GX has the rule, and the
project's own (:mod:`asft.data.gx_custom`) for types, the rating scale, token lists, the leave-one-out
window rules, the leakage rule and the pair rules. Tables are validated as they are, plus *joined
reference columns* (a pair's held-out targets, a window's training items, an event's catalog entry)
that the rules compare against. Structural problems (missing columns or files, not a table) only
decide which expectations can be built; they are reported by GX too (``expect_column_to_exist``,
``expect_files_to_exist``, ...). Every expectation carries a description (shown in the data docs).

With ``docs_dir`` (and ``validation.data_docs``), validation runs in a file-backed GX context rooted
at ``docs_dir`` (project in ``docs_dir/gx``): the suites, every run's validation results and the data
docs site (``docs_dir/index.html``, one page per run, the newest :data:`DOCS_INDEX_LIMIT` in the index)
accumulate there across runs. Without it, an ephemeral context: nothing is written.

A failure raises :class:`~asft.data.validation.DataValidationError` with one
:class:`~asft.data.validation.Failure` per failed expectation (name, column, count, 0-based rows,
failing values); nothing from GX or pandas escapes as a traceback. GX is imported lazily (about 3 s)
with analytics, progress bars and its log quiet. This module does not import prefect or mlflow.
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
HOLDOUT = 2  # leave-one-out: the last two events of a sequence are validation and test

DOCS_INDEX_LIMIT = 200  # validation runs listed in the data docs index (all pages are kept)
_SITE = "asft"
# expectations that check a column's type: other failures that could not even be evaluated on such a
# column are the same problem, reported once
TYPE_RULES = {
    "expect_column_values_to_be_nonblank_strings",
    "expect_column_values_to_be_integers",
    "expect_column_values_to_be_int64_timestamps",
    "expect_column_values_to_be_real_numbers",
    "expect_column_values_to_be_integer_lists",
    "expect_table_columns_to_be_unique",
}


# --------------------------------------------------------------------------------------- GX plumbing
def _import_gx():
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    with _quiet():
        import great_expectations as gx

        from asft.data import gx_custom  # noqa: F401 - registers the project's expectations
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


class _Rules:
    """Collects a table's expectations; each gets a description ``<type>: <detail>`` (data docs) and the
    detail / the column to quote at failing rows in ``meta``."""

    def __init__(self, gx):
        from asft.data import gx_custom

        self.E, self.X, self.items = gx.expectations, gx_custom, []

    def add(self, cls, detail: str = "", values: str | None = None, **kwargs) -> None:
        meta = {"asft_detail": detail}
        if values:
            meta["asft_values"] = values
        e = cls(meta=meta, **kwargs)
        e.description = f"{e.expectation_type}: {detail}" if detail else None
        self.items.append(e)

    def structure(self, frame: pd.DataFrame, required, min_rows: int = 1, what: str = "",
                  unique_names: bool = True) -> list[str]:
        """Unique column names (unless known), required columns exist, row count; returns the usable
        required columns."""
        if unique_names:
            self.add(self.X.ExpectTableColumnsToBeUnique, "duplicated column names")
        for c in required:
            self.add(self.E.ExpectColumnToExist, f"required column (have {[str(x) for x in frame.columns][:20]})",
                     column=c)
        self.add(self.E.ExpectTableRowCountToBeBetween, what or f"at least {min_rows} row(s)", min_value=min_rows)
        return usable(frame, required)

    def types(self, kinds: dict[str, str], present: list[str]) -> None:
        X = self.X
        rule = {
            "int": (X.ExpectColumnValuesToBeIntegers, "integer expected"),
            "float": (X.ExpectColumnValuesToBeRealNumbers, "number expected"),
            "str": (X.ExpectColumnValuesToBeNonblankStrings, "non-blank string expected"),
            "list": (X.ExpectColumnValuesToBeIntegerLists, "list of integer tokens expected"),
        }
        for c in present:
            cls, detail = rule[kinds[c]]
            self.add(cls, detail, column=c)


def usable(frame: pd.DataFrame, columns) -> list[str]:
    """The columns of ``frame`` among ``columns`` that exist exactly once."""
    counts = pd.Index(frame.columns).value_counts()
    return [c for c in columns if counts.get(c, 0) == 1]


@dataclass
class _Table:
    """One validated table: the frame GX sees and a factory of its expectations."""

    name: str  # asset name and suite suffix
    frame: pd.DataFrame
    build: Callable[[_Rules], None]
    prefix: str = ""  # prefix of reported column names ("train." for processed tables)


@dataclass
class _Outcome:
    failures: list[Failure] = field(default_factory=list)
    evaluated: int = 0
    docs: str | None = None
    docs_error: str | None = None


def _plain(v: Any) -> Any:
    if isinstance(v, (np.ndarray, np.generic)):
        return v.tolist()
    if isinstance(v, tuple):
        return tuple(_plain(x) for x in v)
    return v


def _short(v: Any, n: int = 40) -> str:
    v = _plain(v)
    if isinstance(v, float) and math.isnan(v):
        return "nan"
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
    rows = [int(i) for i in res.get("partial_unexpected_index_list") or [] if isinstance(i, (int, np.integer))]
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
        elif res.get("partial_unexpected_list"):
            shown = (tuple(v.values()) if isinstance(v, dict) else v for v in res["partial_unexpected_list"])
            vals = list(dict.fromkeys(_short(v, 60) for v in shown))[:5]
            detail.append(f"unexpected values: [{', '.join(vals)}]")
        if conf.type in TYPE_RULES and col in frame.columns:
            detail.append(f"column dtype {frame[col].dtype}")
        if kwargs.get("mostly") not in (None, 1, 1.0) and res.get("element_count"):
            ok = 1 - count / max(int(res["element_count"]), 1)
            detail.append(f"{ok:.1%} pass, mostly={kwargs['mostly']} required")
    else:
        count = int(res.get("missing_count") or 1)
        if "partial_missing_list" in res:
            detail.append(f"missing values: {[_short(v) for v in res['partial_missing_list']][:5]}")
        elif res.get("observed_value") not in (None, [], ""):
            detail.append(f"observed {_short(res['observed_value'], 80)}")
    return Failure(conf.type, column, count, rows, "; ".join(d for d in detail if d))


def _columns(conf) -> set[str]:
    kw = conf.kwargs
    return {str(c) for c in [kw.get("column"), kw.get("column_A"), kw.get("column_B"), *(kw.get("column_list") or [])]
            if c is not None}


def _raised(er) -> bool:
    exc = er.exception_info or {}
    return bool(exc.get("raised_exception")) or any(
        isinstance(v, dict) and v.get("raised_exception") for v in exc.values()
    )


def _reported(results: list) -> list:
    """The failed results, less those that could not be evaluated on a column whose type rule failed
    (the same problem, reported once)."""
    failed = [er for er in results if not er.success]
    typed = set().union(*[_columns(er.expectation_config) for er in failed
                          if er.expectation_config.type in TYPE_RULES and not _raised(er)])
    return [er for er in failed if not (_raised(er) and _columns(er.expectation_config) & typed)]


def _widen(frame: pd.DataFrame) -> pd.DataFrame:
    """numpy int8/16/32 -> int64 and float32 -> float64.

    GX quirk: ExpectColumnValuesToBeBetween is vectorised on pandas only for int64/float64 columns;
    other numeric dtypes go through a per-value Python function (~100x slower on large tables).
    """
    if frame.columns.duplicated().any():
        return frame
    out = {}
    for c in frame.columns:
        s = frame[c]
        dt = s.dtype
        if not isinstance(dt, np.dtype) or pd.api.types.is_bool_dtype(dt) or not pd.api.types.is_numeric_dtype(dt):
            out[c] = s  # extension dtypes (nullable Int64, arrow lists) are checked as they are
        elif pd.api.types.is_integer_dtype(dt):
            out[c] = s.astype(np.int64)
        else:
            out[c] = s.astype(np.float64)
    return pd.DataFrame(out, index=frame.index)


def _context(gx, docs: Path | None):
    """A file-backed context rooted at ``docs`` (data docs site in ``docs``), or an ephemeral one."""
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    if docs is None:
        project = DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(), progress_bars=bars, analytics_enabled=False
        )
        return gx.get_context(mode="ephemeral", project_config=project)
    ctx = gx.get_context(mode="file", project_root_dir=str(docs))
    sites = {
        _SITE: {
            "class_name": "SiteBuilder",
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder", "validation_results_limit": DOCS_INDEX_LIMIT},
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs)},
        }
    }
    v = ctx.variables
    if v.data_docs_sites != sites or v.progress_bars != bars or v.analytics_enabled:
        v.data_docs_sites, v.progress_bars, v.analytics_enabled = sites, bars, False
        v.save()
    return ctx


def _datasource(ctx, name: str):
    with contextlib.suppress(KeyError, LookupError, ValueError):
        return ctx.data_sources.get(name)
    return ctx.data_sources.add_pandas(name)


def _asset(ds, name: str):
    with contextlib.suppress(LookupError):
        return ds.get_asset(name)
    return ds.add_dataframe_asset(name)


def _batch_definition(asset):
    with contextlib.suppress(KeyError, LookupError):
        return asset.get_batch_definition("whole")
    return asset.add_batch_definition_whole_dataframe("whole")


def _forget(ctx, name: str) -> None:
    """Drop a suite (and its validation definition) kept from an earlier run: suites are defined in code
    and rebuilt each run (replacing is much cheaper than GX's add_or_update diff); validation results
    keep their copy of the suite."""
    from great_expectations.exceptions import DataContextError

    for factory, key in ((ctx.validation_definitions, name), (ctx.suites, name)):
        with contextlib.suppress(DataContextError):
            factory.delete(key)


def _run_gx(
    suite: str, tables: list[_Table], dataset: str, cfg: Config, docs_dir: str | Path | None
) -> _Outcome:
    """Validate each table against its suite; with docs, in the file context at ``docs_dir`` (results
    kept, data docs pages built for this run and the index)."""
    out = _Outcome()
    docs = Path(docs_dir).resolve() if (docs_dir is not None and cfg.validation.data_docs) else None
    sample = int(cfg.validation.sample_rows)
    try:
        gx = _import_gx()
        from great_expectations.core.run_identifier import RunIdentifier
        from great_expectations.data_context.types.resource_identifiers import (
            ExpectationSuiteIdentifier,
            ValidationResultIdentifier,
        )

        with _quiet():
            if docs is not None:
                docs.mkdir(parents=True, exist_ok=True)
            ctx = _context(gx, docs)
            ds = _datasource(ctx, f"{suite}_source")
            # run names become path components of the docs site: no separators allowed
            run_name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(dataset)).strip("._") or suite
            run_id = RunIdentifier(run_name=run_name[-100:])
            rf = {"result_format": "SUMMARY", "partial_unexpected_count": sample}
            resources: list = []
            for t in tables:
                name = f"{suite}.{t.name}" if t.name != suite else suite
                rules = _Rules(gx)
                t.build(rules)
                _forget(ctx, name)
                gsuite = ctx.suites.add(gx.ExpectationSuite(name=name, expectations=rules.items))
                vd = ctx.validation_definitions.add(
                    gx.ValidationDefinition(name=name, data=_batch_definition(_asset(ds, t.name)), suite=gsuite)
                )
                t.frame = _widen(t.frame)
                # the validation definition stores its result in the context's validation results store
                vr = vd.run(batch_parameters={"dataframe": t.frame}, result_format=rf, run_id=run_id)
                suite_id = ExpectationSuiteIdentifier(name=name)
                resources += [ValidationResultIdentifier(suite_id, run_id, f"{ds.name}-{t.name}"), suite_id]
                out.evaluated += int(vr.statistics.get("evaluated_expectations", 0))
                for er in _reported(vr.results):
                    out.failures.append(_failure_from_result(er, t.frame, t.prefix, sample))
            if docs is not None:
                try:
                    ctx.build_data_docs(site_names=[_SITE], resource_identifiers=resources)
                    out.docs = str(docs / "index.html")
                except Exception as e:  # noqa: BLE001 - docs are a by-product: never hide the outcome
                    out.docs_error = f"{type(e).__name__}: {e}"
                    log.warning("building the data docs in %s failed: %s", docs, out.docs_error)
    except Exception as e:  # noqa: BLE001 - GX itself broke: a failure, not a traceback
        out.failures.append(
            Failure("expect_validation_to_run", None, 0, [], f"{type(e).__name__}: {str(e)[:300]}")
        )
    return out


def _finish(suite: str, dataset: str, out: _Outcome, report: Callable[[], dict], docs_dir) -> dict:
    if out.failures:
        raise DataValidationError(
            dataset, out.failures, docs_dir=str(Path(docs_dir).resolve()) if out.docs else None
        )
    rep = {"suite": suite, "expectations": out.evaluated, "failed": 0}
    rep.update(report())
    rep["docs"] = out.docs
    if out.docs_error:
        rep["docs_error"] = out.docs_error
    return rep


# ----------------------------------------------------------------------------------- shared helpers
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


def _found(keys: pd.Series, pos: np.ndarray) -> pd.Series:
    """Reference column for ``expect_*_to_be_in_*``: the key where it was found, null elsewhere (the
    column's own dtype where it has a missing value: arrow strings, floats; object otherwise)."""
    keys = keys.reset_index(drop=True)
    found = pd.Series(np.asarray(pos) >= 0)
    if isinstance(keys.dtype, pd.StringDtype) or pd.api.types.is_float_dtype(keys.dtype):
        return keys.where(found)
    if pd.api.types.is_integer_dtype(keys.dtype) and isinstance(keys.dtype, np.dtype):
        return keys.astype(np.float64).where(found) if (keys.abs() < 2**53).all() else \
            pd.Series(keys.to_numpy(dtype=object), dtype=object).where(found, None)
    return pd.Series(keys.to_numpy(dtype=object), dtype=object).where(found, None)


def _present(frame: Any) -> pd.DataFrame:
    return frame.reset_index(drop=True) if isinstance(frame, pd.DataFrame) else pd.DataFrame()


# ------------------------------------------------------------------------------ suite 1: raw events
def validate_raw(
    interactions: pd.DataFrame,
    catalog: pd.DataFrame | None,
    cfg: Config,
    dataset: str,
    docs_dir: str | Path | None = None,
    fmt: str | None = None,
) -> dict:
    """Validate the canonical interaction table (see :mod:`asft.data.schema`).

    Expectations: unique column names; required columns exist; >= 1 row; user_id, item_id, timestamp
    not null; ids non-blank strings; timestamps int64 within [0, 2**62]; ratings (when any is given)
    on the scale of the format ``fmt`` or the declared [rating_min, rating_max] (see
    :func:`asft.data.schema.rating_scale`), on the format's grid when it has one, none missing;
    (user_id, item_id, timestamp) unique unless ``validation.allow_duplicate_events``; items listed in
    the catalog (when given; the catalog's item_id: present, non-blank, unique); and, with
    ``mostly=validation.min_history_mostly``, events belong to users with at least
    ``preprocess.min_user_events`` events.
    """
    t0 = time.perf_counter()
    vcfg = cfg.validation
    k = int(cfg.preprocess.min_user_events)
    r_lo, r_hi, r_step = rating_scale(fmt, vcfg.rating_min, vcfg.rating_max)
    declared = vcfg.rating_min is not None or vcfg.rating_max is not None
    scale = "validation.rating_min/max" if declared else \
        f"the {fmt or 'default'} scale; declare validation.rating_min/rating_max for another"
    frame = _present(interactions)
    not_table = "" if isinstance(interactions, pd.DataFrame) else f"not a table: {type(interactions).__name__}"
    has_rating = RATING in usable(frame, [RATING]) and bool(frame[RATING].notna().any())
    cat = _present(catalog) if catalog is not None else None
    cat_ok = cat is not None and usable(cat, [ITEM]) == [ITEM] and ITEM in usable(frame, [ITEM])
    if cat_ok:
        listed = frame[ITEM].isin(pd.unique(cat[ITEM].dropna())).to_numpy(dtype=bool)
        frame = frame.assign(catalog_item_id=_found(frame[ITEM], np.where(listed, 0, -1)))

    def build(r: _Rules) -> None:
        E, X = r.E, r.X
        cols = r.structure(frame, REQUIRED_COLUMNS, what=not_table or "table is empty (>= 1 row)")
        for c in cols:
            r.add(E.ExpectColumnValuesToNotBeNull, "missing values", column=c)
        for c in (USER, ITEM):
            if c in cols:
                r.add(X.ExpectColumnValuesToBeNonblankStrings, "non-blank string id expected", column=c)
        if TS in cols:
            r.add(X.ExpectColumnValuesToBeInt64Timestamps, f"int64 timestamp in [{TIMESTAMP_MIN}, 2**62] expected",
                  column=TS, min_value=TIMESTAMP_MIN, max_value=TIMESTAMP_MAX)
        if has_rating:
            grid = f" in steps of {r_step}" if r_step else ""
            r.add(X.ExpectColumnValuesToBeOnRatingScale,
                  f"rating must be a number between {r_lo} and {r_hi}{grid}, none missing ({scale})",
                  column=RATING, min_value=r_lo, max_value=r_hi, step=r_step)
        if len(cols) == len(REQUIRED_COLUMNS) and not vcfg.allow_duplicate_events:
            r.add(E.ExpectCompoundColumnsToBeUnique, "duplicated (user_id, item_id, timestamp) events",
                  column_list=[USER, ITEM, TS])
        if cat_ok:
            r.add(X.ExpectItemsToBeListedInCatalog, "item_id not in the catalog", column_A=ITEM,
                  column_B="catalog_item_id", ignore_row_if="both_values_are_missing")
        if USER in cols:
            r.add(X.ExpectUsersToHaveMinEvents,
                  f"events of users with fewer than {k} events (user_event_count < preprocess.min_user_events)",
                  USER, column=USER, min_events=k, mostly=float(vcfg.min_history_mostly))

    def build_catalog(r: _Rules) -> None:
        what = "" if isinstance(catalog, pd.DataFrame) else f"catalog is not a table: {type(catalog).__name__}"
        if what:
            r.add(r.E.ExpectColumnToExist, what, column=ITEM)
            return
        if r.structure(cat, [ITEM], min_rows=0):
            r.add(r.E.ExpectColumnValuesToNotBeNull, "missing catalog ids", column=ITEM)
            r.add(r.X.ExpectColumnValuesToBeNonblankStrings, "non-blank string id expected", column=ITEM)
            r.add(r.E.ExpectColumnValuesToBeUnique, "item ids listed more than once in the catalog", column=ITEM)

    tables = [_Table(SUITE_RAW, frame, build)]
    if cat is not None:
        tables.append(_Table("catalog", cat, build_catalog, "catalog."))
    out = _run_gx(SUITE_RAW, tables, dataset, cfg, docs_dir)

    def report() -> dict:
        counts = frame.groupby(USER, sort=False)[USER].transform("size").to_numpy()
        rep = {
            "rows": len(frame),
            "users": int(frame[USER].nunique()),
            "items": int(frame[ITEM].nunique()),
            "has_ratings": has_rating,
            "users_below_min_events": int(frame.loc[counts < k, USER].nunique()),
            "events_of_short_users": int((counts < k).sum()),
            "duplicate_events": int(frame.duplicated([USER, ITEM, TS]).sum()),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        if cat_ok:
            rep["items_missing_from_catalog"] = int(frame.loc[frame["catalog_item_id"].isna(), ITEM].nunique())
        return rep

    return _finish(SUITE_RAW, dataset, out, report, docs_dir)


def read_raw_dir(raw_dir: str | Path):
    """The canonical tables of a published ``raw/`` directory (interactions, catalog, format);
    unreadable files raise :class:`~asft.data.schema.DataFormatError` naming the file."""
    import pyarrow.parquet as pq

    from asft.data.schema import DataFormatError, InteractionData

    raw_dir = Path(raw_dir)

    def parquet(name: str) -> pd.DataFrame:
        p = raw_dir / name
        try:
            return pq.read_table(p).to_pandas()
        except FileNotFoundError:
            raise DataFormatError(p, "file not found (write it with `asft ingest` or `asft load`)") from None
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for broken files
            raise DataFormatError(p, f"not a readable Parquet file: {type(e).__name__}: {str(e)[:200]}") from None

    src: dict = {}
    if (raw_dir / "source.json").is_file():
        try:
            src = json.loads((raw_dir / "source.json").read_text())
        except (ValueError, OSError) as e:
            raise DataFormatError(raw_dir / "source.json", f"not valid JSON: {e}") from None
        if not isinstance(src, dict):
            raise DataFormatError(raw_dir / "source.json", "not a JSON object")
    items = parquet("catalog.parquet") if (raw_dir / "catalog.parquet").is_file() else None
    return InteractionData(parquet("interactions.parquet"), items, str(src.get("source", "")),
                           str(src.get("format", "")))


def validate_raw_dir(raw_dir: str | Path, cfg: Config, docs_dir: str | Path | None = None) -> dict:
    """Run the raw suite (the one ``retrain`` runs at ingestion) on a published ``raw/`` directory:
    ``interactions.parquet`` (+ ``catalog.parquet``), with the rating scale of the format recorded in
    ``source.json``. Returns the report; raises DataValidationError (or DataFormatError for an
    unreadable file)."""
    data = read_raw_dir(raw_dir)
    dataset = f"{data.source or 'interactions'} ({Path(raw_dir) / 'interactions.parquet'})"
    return validate_raw(data.interactions, data.items, cfg, dataset, docs_dir, fmt=data.format or None)


# ------------------------------------------------------------------------ suite 2: processed dir
def _read_processed(root: Path, names=tuple(PROCESSED_TABLES)) -> tuple[dict, dict, Any]:
    """The readable processed tables (pyarrow), stats.json and vocab.json; missing or broken files are
    left out (the ``files`` table of the suite reports them)."""
    import pyarrow.parquet as pq

    from asft.data.preprocess import ItemVocab

    tables: dict[str, Any] = {}
    stats: dict = {}
    vocab = None
    for name in names:
        with contextlib.suppress(Exception):
            tables[name] = pq.read_table(root / f"{name}.parquet")
    with contextlib.suppress(Exception):
        vocab = ItemVocab.load(root / "vocab.json")
    with contextlib.suppress(Exception):
        s = json.loads((root / "stats.json").read_text())
        stats = s if isinstance(s, dict) else {}
    return tables, stats, vocab


def _files_table(root: Path, files, prefix: str = "files.") -> _Table:
    def build(r: _Rules) -> None:
        r.add(r.X.ExpectFilesToExist, f"missing in {root}", column="file", root=str(root))
        r.add(r.X.ExpectFilesToBeReadable, f"unreadable in {root} (broken Parquet, JSON or vocabulary)",
              column="file", root=str(root))

    return _Table("files", pd.DataFrame({"file": list(files)}), build, prefix)


class _Sequences:
    """sequences.parquet as token lists, with per-user joins for the other tables (vectorised)."""

    def __init__(self, table):
        from asft.data.gx_custom import lists_from_arrow

        self.key = _int_values(table.column("user_idx").to_pandas(), fill=-(2**40))
        self.items = lists_from_arrow(table.column("items"))

    def pos(self, user_idx: pd.Series) -> np.ndarray:
        return _lookup(_int_values(user_idx), self.key)

    def part(self, pos: np.ndarray, drop: int) -> pd.Series:
        """items[:-drop] of each row's user (null for unknown users), stored once per user: a
        dictionary-encoded Arrow column whose dictionary holds each user's list."""
        import pyarrow as pa

        from asft.data.gx_custom import _ranges, shared_lists

        it = self.items
        n = np.where(it.null, 0, np.maximum(np.diff(it.offsets) - drop, 0))
        offsets = np.concatenate([[0], np.cumsum(n)]).astype(np.int64)
        values = it.values[_ranges(it.offsets[:-1], n)]
        base = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.int64()),
                                             mask=pa.array(it.null))
        return shared_lists(pos, base)

    def item(self, pos: np.ndarray, back: int) -> np.ndarray:
        """items[-back] of each row's user (NaN when unknown or too short)."""
        it = self.items
        n = it.lengths
        p = np.maximum(pos, 0)
        ok = (pos >= 0) & (n[p] >= back) if len(n) else np.zeros(len(pos), dtype=bool)
        idx = np.where(ok, it.offsets[p + 1] - back if len(n) else 0, 0)
        return np.where(ok, it.values[idx] if len(it.values) else 0, np.nan).astype(np.float64)


def _arrow_frame(table, columns) -> pd.DataFrame:
    """Selected columns of a pyarrow table as pandas; list columns arrow-backed."""
    import pyarrow as pa

    out = {}
    for c in columns:
        col = table.column(c)
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            out[c] = pd.Series(pd.arrays.ArrowExtensionArray(col))
        else:
            out[c] = col.to_pandas()
    return pd.DataFrame(out).reset_index(drop=True)


def validate_processed(processed_dir: str | Path, cfg: Config, docs_dir: str | Path | None = None) -> dict:
    """Validate a directory written by :func:`asft.data.preprocess.preprocess`.

    Tables (one GX suite each, ``processed_sequences.<table>``):

    * files: every output file exists and is readable;
    * sequences: user_idx unique in [0, users), user_id unique non-blank, length >= min_user_events,
      all items in the vocabulary, as many timestamps as items, timestamps non-decreasing;
    * train: users known, window length in [2, max_len+1], tokens in the vocabulary, first_label in
      [0, len-2], and every window is a contiguous slice of the user's items[:-2] (no leakage of the
      validation/test events);
    * valid / test: one row per user (unique user_idx, row count == users), input length in [1, max_len],
      tokens in the vocabulary, target == items[-2] / items[-1], history == items[:-2] / items[:-1],
      input == history[-max_len:];
    * stats: stats.json agrees with the tables (users, items, vocab_size, events, train_events,
      train_windows, max_len, min_user_events).
    """
    from asft.data.preprocess import NUM_SPECIAL, OUTPUT_FILES

    t0 = time.perf_counter()
    root = Path(processed_dir)
    dataset = str(root)
    L = int(cfg.preprocess.max_len)
    k = int(cfg.preprocess.min_user_events)
    tables, stats, vocab = _read_processed(root)
    parts = [_files_table(root, OUTPUT_FILES)]
    frames = {name: _arrow_frame(t, [c for c in t.column_names if c in PROCESSED_TABLES[name]])
              for name, t in tables.items()}
    complete = vocab is not None and len(tables) == len(PROCESSED_TABLES) and all(
        len(set(tables[n].column_names)) == len(tables[n].column_names) and usable(frames[n], cols) == list(cols)
        for n, cols in PROCESSED_TABLES.items()
    )
    if not complete:  # structure and types only: the table rules need every table and the vocabulary
        for name, f in frames.items():
            kinds = PROCESSED_TABLES[name]

            def build(r: _Rules, f=f, kinds=kinds) -> None:
                r.types(kinds, r.structure(f, kinds, min_rows=0))

            parts.append(_Table(name, f, build, f"{name}."))
        out = _run_gx(SUITE_PROCESSED, parts, dataset, cfg, docs_dir)
        if not out.failures:  # defensive: the suite above reports every reason for an incomplete directory
            out.failures.append(Failure("expect_files_to_be_readable", "files.file", 1, [],
                                        f"{root} is incomplete (tables, columns or vocabulary)"))
        return _finish(SUITE_PROCESSED, dataset, out, dict, docs_dir)

    V = vocab.size
    lo, hi = NUM_SPECIAL, V - 1
    seqs = _Sequences(tables["sequences"])
    n_users = len(seqs.key)

    sf = frames["sequences"][list(PROCESSED_TABLES["sequences"])]

    def build_seq(r: _Rules) -> None:
        E, X = r.E, r.X
        r.types(PROCESSED_TABLES["sequences"], r.structure(sf, PROCESSED_TABLES["sequences"], unique_names=False))
        r.add(E.ExpectColumnValuesToNotBeNull, "missing user_idx", column="user_idx")
        r.add(E.ExpectColumnValuesToBeUnique, "one sequence per user", column="user_idx")
        r.add(E.ExpectColumnValuesToBeBetween, f"user_idx outside [0, {n_users})", column="user_idx",
              min_value=0, max_value=max(n_users - 1, 0))
        r.add(E.ExpectColumnValuesToNotBeNull, "missing user_id", column="user_id")
        r.add(E.ExpectColumnValuesToBeUnique, "one sequence per user", column="user_id")
        r.add(X.ExpectListLengthsToBeBetween, f"sequence shorter than {k} (preprocess.min_user_events)",
              column="items", min_value=k)
        r.add(X.ExpectListValuesToBeBetween, f"items token outside [{lo}, {V})", "user_idx", column="items",
              min_value=lo, max_value=hi)
        r.add(X.ExpectListLengthsToBeEqual, "timestamps and items differ in length", column_A="timestamps",
              column_B="items")
        r.add(X.ExpectListValuesToBeNonDecreasing, "timestamps decrease within the sequence", "user_idx",
              column="timestamps")

    tf = frames["train"][list(PROCESSED_TABLES["train"])]
    tpos = seqs.pos(tf["user_idx"])
    tf = tf.assign(sequence_user_idx=_found(tf["user_idx"], tpos), training_items=seqs.part(tpos, HOLDOUT))

    def build_train(r: _Rules) -> None:
        E, X = r.E, r.X
        r.types(PROCESSED_TABLES["train"], r.structure(tf, PROCESSED_TABLES["train"], min_rows=0, unique_names=False))
        r.add(E.ExpectColumnValuesToNotBeNull, "missing user_idx", column="user_idx")
        r.add(X.ExpectUsersToBeInSequences, "user_idx not in sequences.parquet", column_A="user_idx",
              column_B="sequence_user_idx", ignore_row_if="both_values_are_missing")
        r.add(X.ExpectListLengthsToBeBetween, f"window length outside [2, max_len+1={L + 1}]", column="tokens",
              min_value=2, max_value=L + 1)
        r.add(X.ExpectListValuesToBeBetween, f"token outside [{lo}, {V})", "user_idx", column="tokens",
              min_value=lo, max_value=hi)
        r.add(E.ExpectColumnValuesToBeBetween, "negative first_label", column="first_label", min_value=0)
        r.add(X.ExpectLabelsToBeWithinWindows, "first_label beyond the window's last label",
              column_A="tokens", column_B="first_label", ignore_row_if="either_value_is_missing")
        r.add(X.ExpectTrainWindowsToBeSlicesOfTrainingPart,
              "window is not a slice of the user's training items (items[:-2]): leakage or corruption",
              "user_idx", column_list=["tokens", "training_items"], ignore_row_if="any_value_is_missing")

    def held_out(name: str, back: int) -> _Table:
        f = frames[name][list(PROCESSED_TABLES[name])]
        pos = seqs.pos(f["user_idx"])
        f = f.assign(sequence_user_idx=_found(f["user_idx"], pos), held_out_item=seqs.item(pos, back),
                     sequence_prefix=seqs.part(pos, back))
        which = f"items[-{back}]"

        def build(r: _Rules) -> None:
            E, X = r.E, r.X
            r.types(PROCESSED_TABLES[name], r.structure(f, PROCESSED_TABLES[name], unique_names=False))
            r.add(E.ExpectTableRowCountToEqual, "one row per user of sequences.parquet", value=n_users)
            r.add(E.ExpectColumnValuesToNotBeNull, "missing user_idx", column="user_idx")
            r.add(E.ExpectColumnValuesToBeUnique, "one row per user", column="user_idx")
            r.add(X.ExpectUsersToBeInSequences, "user_idx not in sequences.parquet", column_A="user_idx",
                  column_B="sequence_user_idx", ignore_row_if="both_values_are_missing")
            r.add(X.ExpectListLengthsToBeBetween, f"input length outside [1, max_len={L}]", column="input",
                  min_value=1, max_value=L)
            r.add(X.ExpectListValuesToBeBetween, f"input token outside [{lo}, {V})", "user_idx", column="input",
                  min_value=lo, max_value=hi)
            r.add(X.ExpectInputsToBeHistoryTails, f"input != history[-{L}:]", "user_idx", column_A="input",
                  column_B="history", max_len=L, ignore_row_if="either_value_is_missing")
            r.add(X.ExpectListValuesToBeBetween, f"history token outside [{lo}, {V})", "user_idx",
                  column="history", min_value=lo, max_value=hi)
            r.add(X.ExpectHistoriesToBeSequencePrefixes, f"history != items[:-{back}] of the user's sequence",
                  "user_idx", column_A="history", column_B="sequence_prefix", ignore_row_if="either_value_is_missing")
            r.add(E.ExpectColumnValuesToNotBeNull, "missing target", column="target")
            r.add(E.ExpectColumnValuesToBeBetween, f"target outside [{lo}, {V})", column="target", min_value=lo,
                  max_value=hi)
            r.add(E.ExpectColumnPairValuesToBeEqual, f"target != {which} of the user's sequence",
                  column_A="target", column_B="held_out_item")

        return _Table(name, f, build, f"{name}.")

    ilen = seqs.items.lengths
    actual = {
        "users": n_users,
        "items": vocab.n_items,
        "vocab_size": V,
        "events": int(ilen[ilen >= 0].sum()),
        "train_events": int(np.maximum(ilen[ilen >= 0] - HOLDOUT, 0).sum()),
        "train_windows": len(tf),
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

    def build_stats(r: _Rules) -> None:
        r.add(r.E.ExpectColumnPairValuesToBeEqual, "stats.json disagrees with the tables/config", "key",
              column_A="stated", column_B="actual")

    parts += [
        _Table("sequences", sf, build_seq, "sequences."),
        _Table("train", tf, build_train, "train."),
        held_out("valid", 2),
        held_out("test", 1),
        _Table("stats", stats_frame, build_stats, "stats."),
    ]
    out = _run_gx(SUITE_PROCESSED, parts, dataset, cfg, docs_dir)
    return _finish(SUITE_PROCESSED, dataset, out, lambda: {
        "rows": {p.name: len(p.frame) for p in parts if p.name not in ("stats", "files")},
        "users": n_users,
        "items": vocab.n_items,
        "vocab_size": V,
        "events": actual["events"],
        "train_windows": len(tf),
        "max_len": L,
        "seconds": round(time.perf_counter() - t0, 3),
    }, docs_dir)


# ----------------------------------------------------------------------- suite 3: preference pairs
def validate_preferences(
    pairs: pd.DataFrame,
    processed_dir: str | Path,
    cfg: Config,
    dataset: str,
    docs_dir: str | Path | None = None,
) -> dict:
    """Validate preference pairs against the processed sequences they were built from.

    Expectations: the processed files the pairs refer to exist and are readable; all columns exist,
    have their type and are not null (ratings may be NaN); pair_id unique; chosen != rejected;
    chosen/rejected tokens in the vocabulary; source in the allowed set (configured sources or all
    five); split in {train, valid, test} with a non-empty train split; fold in {0, 1}; judge in
    [-1, n_judges); margin > 0 and finite; ratings (when known) on the dataset's scale; users known;
    one split and one fold per user; context_id <-> (user_idx, context_end) one-to-one;
    1 <= context_end <= len(items)-2 (the training part); context length in [1, max_len];
    context == items[:context_end][-max_len:]; no leakage: neither chosen nor rejected is the user's
    validation or test target; every source present has a share >= ``validation.min_source_share``.
    """
    from asft.data.preprocess import NUM_SPECIAL

    t0 = time.perf_counter()
    vcfg = cfg.validation
    L = int(cfg.preprocess.max_len)
    root = Path(processed_dir)
    tables, pstats, vocab = _read_processed(root, ("sequences", "valid", "test"))
    r_lo, r_hi, _ = rating_scale(pstats.get("format"), vcfg.rating_min, vcfg.rating_max)
    frame = _present(pairs)
    not_table = "" if isinstance(pairs, pd.DataFrame) else f"not a table: {type(pairs).__name__}"
    files = _files_table(root, ("sequences.parquet", "valid.parquet", "test.parquet", "vocab.json", "stats.json"),
                         "processed.")
    cols = usable(frame, PAIR_COLUMNS)
    refs = vocab is not None and len(tables) == 3 and all(
        {"user_idx", "items" if n == "sequences" else "target"} <= set(t.column_names)
        and len(set(t.column_names)) == len(t.column_names)
        for n, t in tables.items()
    )
    deep = refs and len(cols) == len(PAIR_COLUMNS) and len(frame) > 0
    allowed = list(PAIR_SOURCES) if cfg.preferences.sources == "auto" else list(cfg.preferences.sources)
    if cfg.preferences.extra_pairs_file:
        allowed.append(EXTERNAL_SOURCE)
    if deep:
        seqs = _Sequences(tables["sequences"])
        pos = seqs.pos(frame["user_idx"])
        held = {}
        for name in ("valid", "test"):
            t = tables[name]
            tpos = _lookup(_int_values(frame["user_idx"]), _int_values(t.column("user_idx").to_pandas(), -(2**40)))
            tv = np.append(pd.to_numeric(t.column("target").to_pandas(), errors="coerce").to_numpy(np.float64), np.nan)
            held[f"{name}_target"] = tv[np.where(tpos >= 0, tpos, len(tv) - 1)]
        from asft.data.gx_custom import arrow_lists

        frame = frame.assign(context=arrow_lists(frame["context"]), sequence_user_idx=_found(frame["user_idx"], pos),
                             training_items=seqs.part(pos, HOLDOUT), **held)
    n_judges = int(cfg.preferences.judge.n_judges)

    def build(r: _Rules) -> None:
        E, X = r.E, r.X
        present = r.structure(frame, PAIR_COLUMNS, what=not_table or "no preference pairs")
        r.types(PAIR_COLUMNS, present)
        for c in present:
            if c not in PAIR_NULLABLE:
                r.add(E.ExpectColumnValuesToNotBeNull, "missing values", column=c)
        if not deep:
            return
        V = vocab.size
        lo, hi = NUM_SPECIAL, V - 1
        r.add(E.ExpectColumnValuesToBeUnique, "duplicated pair_id", column="pair_id")
        r.add(X.ExpectColumnPairValuesToDiffer, "chosen == rejected", column_A="chosen", column_B="rejected",
              ignore_row_if="either_value_is_missing")
        for c in ("chosen", "rejected"):
            r.add(E.ExpectColumnValuesToBeBetween, f"{c} token outside the catalog [{lo}, {V})", column=c,
                  min_value=lo, max_value=hi)
        r.add(E.ExpectColumnValuesToBeInSet, f"source not in {allowed}", column="source", value_set=allowed)
        r.add(E.ExpectColumnValuesToBeInSet, "unknown split", column="split", value_set=list(PAIR_SPLITS))
        r.add(E.ExpectColumnDistinctValuesToContainSet, "the train split is empty", column="split",
              value_set=["train"])
        r.add(E.ExpectColumnValuesToBeInSet, "fold must be 0 or 1", column="fold", value_set=[0, 1])
        r.add(E.ExpectColumnValuesToBeBetween, f"judge outside [-1, {n_judges})", column="judge", min_value=-1,
              max_value=n_judges - 1)
        r.add(E.ExpectColumnValuesToBeBetween, "margin must be > 0 and finite", column="margin", min_value=0,
              strict_min=True, max_value=MARGIN_MAX)
        for c in PAIR_NULLABLE:
            r.add(E.ExpectColumnValuesToBeBetween, f"rating outside [{r_lo}, {r_hi}]", column=c, min_value=r_lo,
                  max_value=r_hi)
        r.add(X.ExpectUsersToBeInSequences, "user_idx not in sequences.parquet", column_A="user_idx",
              column_B="sequence_user_idx", ignore_row_if="both_values_are_missing")
        r.add(X.ExpectOneValuePerUser, "user's pairs are in more than one split", column_list=["user_idx", "split"])
        r.add(X.ExpectOneValuePerUser, "user's pairs are in more than one fold", column_list=["user_idx", "fold"])
        r.add(X.ExpectIdsToBeOneToOne, "context_id is not one-to-one with (user_idx, context_end)",
              column_list=["context_id", "user_idx", "context_end"], ignore_row_if="any_value_is_missing")
        r.add(E.ExpectColumnValuesToBeBetween, "context_end < 1", column="context_end", min_value=1)
        r.add(X.ExpectContextsToEndInTrainingPart, "context_end beyond the training part (len(items)-2)",
              column_list=["context_end", "training_items"], ignore_row_if="any_value_is_missing")
        r.add(X.ExpectListLengthsToBeBetween, f"context length outside [1, max_len={L}]", column="context",
              min_value=1, max_value=L)
        r.add(X.ExpectContextsToBeTrainingTails, f"context != items[:context_end][-{L}:] of the user's sequence",
              "user_idx", column_list=["context", "context_end", "training_items"], max_len=L,
              ignore_row_if="any_value_is_missing")
        for c in ("chosen", "rejected"):
            r.add(X.ExpectItemsToNotBeHeldOutTargets, f"{c} is the user's validation or test target (leakage)",
                  column_list=[c, "valid_target", "test_target"], ignore_row_if="all_values_are_missing")
        r.add(X.ExpectValueSharesToBeAtLeast, f"source supplies less than {vcfg.min_source_share:.1%} of the pairs",
              "source", column="source", min_share=float(vcfg.min_source_share))

    out = _run_gx(SUITE_PREFERENCES, [files, _Table(SUITE_PREFERENCES, frame, build)], dataset, cfg, docs_dir)
    if not out.failures and not deep:  # defensive: the suite above reports why the pairs were not joined
        out.failures.append(Failure("expect_files_to_be_readable", "processed.file", 1, [],
                                    f"{root} is incomplete (tables, columns or vocabulary)"))

    def report() -> dict:
        shares = frame["source"].value_counts(normalize=True, dropna=True)
        leaks = np.zeros(len(frame), dtype=bool)
        for c in ("chosen", "rejected"):
            v = pd.to_numeric(frame[c], errors="coerce").to_numpy(np.float64)
            leaks |= (v == frame["valid_target"].to_numpy()) | (v == frame["test_target"].to_numpy())
        keys = frame[["user_idx", "context_id"]]
        return {
            "rows": len(frame),
            "users": int(keys["user_idx"].nunique()),
            "contexts": int(keys["context_id"].nunique()),
            "source_shares": {str(k): round(float(v), 4) for k, v in shares.items()},
            "splits": {str(k): int(v) for k, v in frame["split"].value_counts().items()},
            "leaking_pairs": int(leaks.sum()),
            "seconds": round(time.perf_counter() - t0, 3),
        }

    return _finish(SUITE_PREFERENCES, dataset, out, report, docs_dir)
