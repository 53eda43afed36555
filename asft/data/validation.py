"""Shared types of data validation: a failed expectation (:class:`Failure`) and the error that stops
a stage (:class:`DataValidationError`). The rules themselves are Great Expectations suites in
:mod:`asft.data.expectations` (the raw suite also behind ``asft validate``:
:func:`asft.data.expectations.validate_raw_dir`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Failure:
    """One failed expectation: its GX name, the column(s), how many rows failed, the first 0-based
    row positions, and a detail (the rule, the failing values)."""

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
    """Validation failed. ``dataset`` names the data (file); ``docs_dir``: the GX data docs site that
    shows this validation, if any."""

    def __init__(self, dataset: str, failures: list[Failure], docs_dir: str | None = None):
        self.dataset = dataset
        self.failures = failures
        self.docs_dir = docs_dir
        lines = "\n".join("  - " + f.line() for f in failures)
        docs = f"\n  data docs: {docs_dir}" if docs_dir else ""
        super().__init__(f"{dataset}: validation failed ({len(failures)} expectation(s))\n{lines}{docs}")

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "failures": [asdict(f) for f in self.failures], "docs_dir": self.docs_dir}
