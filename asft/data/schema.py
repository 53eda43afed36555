"""The canonical interaction table and item catalog.

Interactions (one row per event):

| column      | dtype   | notes                                                    |
|-------------|---------|----------------------------------------------------------|
| user_id     | string  | raw user identifier, as in the source                   |
| item_id     | string  | raw item identifier, as in the source                   |
| timestamp   | int64   | event time (seconds) or an order index; never float     |
| rating      | float64 | optional explicit feedback (e.g. 1-5); absent if implicit |

Catalog (optional, one row per item): item_id (string), title (string), genres (string,
'|'-separated categories).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

USER = "user_id"
ITEM = "item_id"
TS = "timestamp"
RATING = "rating"
INTERACTION_COLUMNS = (USER, ITEM, TS, RATING)
REQUIRED_COLUMNS = (USER, ITEM, TS)

TITLE = "title"
GENRES = "genres"
CATALOG_COLUMNS = (ITEM, TITLE, GENRES)


class DataFormatError(ValueError):
    """Malformed input. The message names the file, the line or column, and what is wrong."""

    def __init__(self, path: str | Path, problem: str, *, line: int | None = None, column: str | None = None,
                 rows: list[int] | None = None):
        self.path = str(path)
        self.problem = problem
        self.line = line
        self.column = column
        self.rows = rows
        where = self.path
        if line is not None:
            where += f", line {line}"
        if column is not None:
            where += f", column '{column}'"
        msg = f"{where}: {problem}"
        if rows:
            shown = ", ".join(str(r) for r in rows[:10])
            msg += f" (rows {shown}{', ...' if len(rows) > 10 else ''})"
        super().__init__(msg)


# The rating scale each format defines: (lowest, highest, step). MovieLens u.data / ratings.dat are
# whole stars 1-5; ratings.csv (ml-latest, ml-20m, ml-25m, ml-32m) has half stars from 0.5.
FORMAT_RATING_SCALES: dict[str, tuple[float, float, float | None]] = {
    "movielens-100k": (1.0, 5.0, 1.0),
    "movielens-dat": (1.0, 5.0, 1.0),
    "movielens-csv": (0.5, 5.0, 0.5),
    "simulator": (1.0, 5.0, 1.0),
}
DEFAULT_RATING_SCALE: tuple[float, float, float | None] = (1.0, 5.0, None)


def rating_scale(fmt: str | None, rating_min: float | None = None, rating_max: float | None = None
                 ) -> tuple[float, float, float | None]:
    """The valid ratings of a dataset: ``(lowest, highest, step)``. Declared bounds win; otherwise the
    format's own scale, and [1, 5] (any value in between) for formats that define none (generic,
    recbole). ``step`` is set only when the format's scale applies unchanged."""
    lo, hi, step = FORMAT_RATING_SCALES.get(fmt or "", DEFAULT_RATING_SCALE)
    if rating_min is not None or rating_max is not None:
        step = None
    return (lo if rating_min is None else float(rating_min), hi if rating_max is None else float(rating_max), step)


@dataclass
class InteractionData:
    """A loaded dataset in canonical form."""

    interactions: pd.DataFrame
    items: pd.DataFrame | None = None
    source: str = ""
    format: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def has_ratings(self) -> bool:
        return RATING in self.interactions.columns and self.interactions[RATING].notna().any()
