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
