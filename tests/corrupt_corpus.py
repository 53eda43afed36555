"""A corpus of corrupted inputs: each case writes a dataset directory (and maybe overrides) that must
stop ``retrain`` at validation with a message naming the problem.

``CASES`` maps a case name to ``(builder, expected substrings)``; a builder writes into a directory
and returns extra config overrides.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

N_USERS, N_EVENTS, N_ITEMS = 12, 8, 10


def good_frame() -> pd.DataFrame:
    """A small clean log: every user rates N_EVENTS distinct items at increasing timestamps."""
    rows = []
    for u in range(N_USERS):
        for k in range(N_EVENTS):
            rows.append({"user_id": f"u{u}", "item_id": f"i{(u + 3 * k) % N_ITEMS}", "timestamp": 1000 + 10 * k + u,
                         "rating": float(1 + (u + k) % 5)})
    return pd.DataFrame(rows)


def _csv(d: Path, df: pd.DataFrame, name: str = "interactions.csv", **kw) -> None:
    df.to_csv(d / name, index=False, **kw)


def _with(fn: Callable[[pd.DataFrame], pd.DataFrame]) -> Callable[[Path], list[str]]:
    def build(d: Path) -> list[str]:
        _csv(d, fn(good_frame()))
        return []

    return build


def _null_user(df):
    df.loc[5, "user_id"] = None
    return df


def _rating_out_of_range(df):
    df.loc[[3, 17], "rating"] = 7.0
    return df


def _nan_rating(df):
    df.loc[9, "rating"] = float("nan")
    return df


def _text_timestamp(df):
    df["timestamp"] = df["timestamp"].astype(object)
    df.loc[4, "timestamp"] = "yesterday"
    return df


def _negative_timestamp(df):
    df.loc[2, "timestamp"] = -5
    return df


def _duplicated_events(df):
    return pd.concat([df, df.iloc[[10, 11]]], ignore_index=True)


def _short_histories(df):
    return df.groupby("user_id").head(1).reset_index(drop=True)


def _text_in_id_ml100k(d: Path) -> list[str]:
    df = good_frame()
    df["user_id"] = df["user_id"].str[1:]
    df["item_id"] = df["item_id"].str[1:]
    df.loc[7, "item_id"] = "abc"
    df[["user_id", "item_id", "rating", "timestamp"]].astype({"rating": int}).to_csv(
        d / "u.data", sep="\t", header=False, index=False)
    return []


def _unknown_items(d: Path) -> list[str]:
    _csv(d, good_frame())
    cat = pd.DataFrame({"item_id": [f"i{k}" for k in range(N_ITEMS - 2)], "title": "t", "genres": "g"})
    cat.to_csv(d / "items.csv", index=False)
    return ["data.items_file=items.csv"]


def _empty_file(d: Path) -> list[str]:
    (d / "interactions.csv").write_bytes(b"")
    return []


def _header_only(d: Path) -> list[str]:
    (d / "interactions.csv").write_text("user_id,item_id,timestamp,rating\n")
    return []


def _truncated_csv(d: Path) -> list[str]:
    _csv(d, good_frame())
    text = (d / "interactions.csv").read_text()
    (d / "interactions.csv").write_text(text[: len(text) // 2].rsplit(",", 2)[0])  # cut mid-row
    return []


def _truncated_parquet(d: Path) -> list[str]:
    good_frame().to_parquet(d / "interactions.parquet", index=False)
    data = (d / "interactions.parquet").read_bytes()
    (d / "interactions.parquet").write_bytes(data[: len(data) // 2])
    return []


def _wrong_delimiter(d: Path) -> list[str]:
    _csv(d, good_frame(), sep=";")
    return []


def _missing_column(d: Path) -> list[str]:
    _csv(d, good_frame().drop(columns=["timestamp"]))
    return []


def _test_item(df: pd.DataFrame, user: str) -> str:
    return df[df["user_id"] == user].sort_values("timestamp")["item_id"].iloc[-1]


def _pairs(d: Path, rows: list[dict]) -> list[str]:
    _csv(d, good_frame())
    pd.DataFrame(rows).to_csv(d / "judgments.csv", index=False)
    return [f"preferences.extra_pairs_file={d / 'judgments.csv'}", "validation.min_source_share=0"]


def _leaking_pairs(d: Path) -> list[str]:
    df = good_frame()
    return _pairs(d, [{"user_id": "u1", "context_end": 3, "chosen_item": _test_item(df, "u1"), "rejected_item": "i0"}])


def _chosen_equals_rejected(d: Path) -> list[str]:
    return _pairs(d, [{"user_id": "u2", "context_end": 3, "chosen_item": "i5", "rejected_item": "i5"}])


def _pair_unknown_item(d: Path) -> list[str]:
    return _pairs(d, [{"user_id": "u2", "context_end": 3, "chosen_item": "i404", "rejected_item": "i5"}])


def _pair_context_outside_training(d: Path) -> list[str]:
    return _pairs(d, [{"user_id": "u3", "context_end": N_EVENTS, "chosen_item": "i0", "rejected_item": "i1"}])


CASES: dict[str, tuple[Callable[[Path], list[str]], list[str]]] = {
    "null_user_id": (_with(_null_user), ["user_id"]),
    "rating_out_of_range": (_with(_rating_out_of_range), ["rating", "between"]),
    "nan_rating": (_with(_nan_rating), ["rating"]),
    "text_in_timestamp": (_with(_text_timestamp), ["timestamp"]),
    "negative_timestamp": (_with(_negative_timestamp), ["timestamp"]),
    "duplicated_events": (_with(_duplicated_events), ["unique"]),
    "short_histories": (_with(_short_histories), ["user_event_count"]),
    "text_in_id_column": (_text_in_id_ml100k, ["item"]),
    "unknown_items": (_unknown_items, ["catalog"]),
    "empty_csv": (_empty_file, ["interactions.csv"]),
    "header_only_csv": (_header_only, ["row"]),
    "truncated_csv": (_truncated_csv, ["interactions.csv"]),
    "truncated_parquet": (_truncated_parquet, ["interactions.parquet"]),
    "wrong_delimiter": (_wrong_delimiter, ["user_id"]),
    "missing_column": (_missing_column, ["timestamp"]),
    "leaking_preference_pair": (_leaking_pairs, ["leak"]),
    "chosen_equals_rejected": (_chosen_equals_rejected, ["chosen"]),
    "pair_with_unknown_item": (_pair_unknown_item, ["chosen"]),
    "pair_context_outside_training": (_pair_context_outside_training, ["context_end"]),
}
