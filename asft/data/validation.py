"""Schema validation of the canonical interaction table.

A check returns :class:`Failure` records (expectation, column, count, sample rows); the caller
decides to stop. :func:`validate_interactions` raises :class:`DataValidationError` with a short
summary when anything fails, so nothing downstream runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from asft.data.schema import ITEM, RATING, REQUIRED_COLUMNS, TS, USER


@dataclass
class Failure:
    expectation: str
    column: str | None
    count: int
    sample_rows: list[int] = field(default_factory=list)
    detail: str = ""

    def line(self) -> str:
        col = f" column '{self.column}'" if self.column else ""
        rows = f"; rows {self.sample_rows[:5]}" if self.sample_rows else ""
        det = f" ({self.detail})" if self.detail else ""
        return f"{self.expectation}:{col} {self.count} failing{rows}{det}"


class DataValidationError(ValueError):
    """Validation failed. ``docs_dir``: the GX data docs site built for that validation, if any."""

    def __init__(self, dataset: str, failures: list[Failure], docs_dir: str | None = None):
        self.dataset = dataset
        self.failures = failures
        self.docs_dir = docs_dir
        lines = "\n".join("  - " + f.line() for f in failures)
        docs = f"\n  data docs: {docs_dir}" if docs_dir else ""
        super().__init__(f"{dataset}: validation failed ({len(failures)} expectation(s))\n{lines}{docs}")

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "failures": [asdict(f) for f in self.failures], "docs_dir": self.docs_dir}


def _rows(mask: np.ndarray | pd.Series, limit: int = 10) -> list[int]:
    return [int(i) for i in np.flatnonzero(np.asarray(mask))[:limit]]


def check_interactions(df: pd.DataFrame, min_user_events: int = 3) -> list[Failure]:
    """Schema and type checks (row numbers are 0-based positions in the canonical table)."""
    fails: list[Failure] = []
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        return [Failure("expect_columns_to_exist", c, 1, detail=f"have {list(df.columns)}") for c in missing]
    if len(df) == 0:
        return [Failure("expect_table_row_count_to_be_at_least", None, 0, detail="table is empty")]
    for col in (USER, ITEM):
        s = df[col]
        null = s.isna().to_numpy()
        if null.any():
            fails.append(Failure("expect_column_values_to_not_be_null", col, int(null.sum()), _rows(null)))
        blank = (~null) & (s.astype(str).str.strip() == "").to_numpy()
        if blank.any():
            fails.append(Failure("expect_column_values_to_not_be_blank", col, int(blank.sum()), _rows(blank)))
    if df[TS].dtype != np.int64:
        fails.append(Failure("expect_column_values_to_be_of_type", TS, len(df), detail=f"int64 expected, got {df[TS].dtype}"))
    elif (neg := (df[TS] < 0).to_numpy()).any():
        fails.append(Failure("expect_column_values_to_be_between", TS, int(neg.sum()), _rows(neg), ">= 0"))
    if RATING in df.columns:
        r = pd.to_numeric(df[RATING], errors="coerce")
        bad = (r.isna() & df[RATING].notna()).to_numpy() | ~np.isfinite(r.fillna(0).to_numpy())
        if bad.any():
            fails.append(Failure("expect_column_values_to_be_finite_numbers", RATING, int(bad.sum()), _rows(bad)))
    if not fails:
        counts = df.groupby(USER).size()
        if int((counts >= min_user_events).sum()) == 0:
            fails.append(Failure("expect_some_user_history_at_least", USER, len(counts),
                                 detail=f"no user has {min_user_events} events"))
    return fails


def validate_interactions(df: pd.DataFrame, dataset: str, min_user_events: int = 3) -> dict:
    fails = check_interactions(df, min_user_events)
    if fails:
        raise DataValidationError(dataset, fails)
    return {"rows": len(df), "users": int(df[USER].nunique()), "items": int(df[ITEM].nunique()),
            "expectations_failed": 0}
