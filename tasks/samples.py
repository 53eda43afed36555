"""A readable sample of what a policy recommends, for the tracking UI (``tracking.log_recommendation_sample``).

One row per sampled user of a split (valid/test): the tail of the history the policy sees, its
top-K (history excluded, as served) with log-probabilities, and the held-out next item, with titles
when the processed data carries the catalog. Scoring is the serving path (:class:`asft.serving.Recommender`),
so the table shows what ``mlflow models serve`` would answer for these users.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from asft.data.schema import ITEM, TITLE


def _titles(processed_dir: Path) -> dict[str, str]:
    path = processed_dir / "catalog.parquet"
    if not path.is_file():
        return {}
    cat = pd.read_parquet(path)
    if TITLE not in cat.columns:
        return {}
    return dict(zip(cat[ITEM].astype(str), cat[TITLE].fillna("").astype(str)))


def recommendation_sample(policy_dir: str | Path, processed_dir: str | Path, split: str = "test", n_users: int = 20,
                          k: int = 10, history_tail: int = 5, seed: int = 0) -> pd.DataFrame:
    """``n_users`` users of ``split`` (a seeded draw, in user order), one row each: ``user_id``,
    ``history_tail`` / ``history_titles`` (the last ``history_tail`` items, oldest first),
    ``top_items`` / ``top_titles`` / ``top_scores`` (the policy's top-``k``, log-probabilities),
    ``held_out`` / ``held_out_title`` (the next item) and ``held_out_rank`` (1-based in the top-``k``, 0
    if absent). Lists are joined with `` | `` so the table reads as text in the UI."""
    from asft.data.preprocess import ProcessedData
    from asft.serving import Recommender

    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    if n_users < 1 or k < 1 or history_tail < 1:
        raise ValueError(f"n_users, k and history_tail must be >= 1, got {n_users}, {k}, {history_tail}")
    data = ProcessedData.open(processed_dir)
    table = data.table(split)
    users = data.table("sequences").set_index("user_idx")["user_id"]
    rows = np.sort(np.random.default_rng(seed).choice(len(table), size=min(n_users, len(table)), replace=False))
    table = table.iloc[rows].reset_index(drop=True)
    histories = [data.vocab.decode(np.asarray(h, dtype=np.int64)) for h in table["history"]]
    targets = data.vocab.decode(table["target"].to_numpy(np.int64))
    recs = Recommender.load(policy_dir).recommend(histories, k=k)
    titles = _titles(Path(processed_dir))

    def names(ids: list[str]) -> str:
        return " | ".join(titles.get(i, "") for i in ids)

    out = []
    for uidx, hist, target, rec in zip(table["user_idx"], histories, targets, recs):
        tail = hist[-history_tail:]
        out.append({"user_id": str(users[uidx]), "history_tail": " | ".join(tail), "history_titles": names(tail),
                    "top_items": " | ".join(rec.items), "top_titles": names(rec.items),
                    "top_scores": " | ".join(f"{s:.4f}" for s in rec.scores), "held_out": target,
                    "held_out_title": titles.get(target, ""),
                    "held_out_rank": rec.items.index(target) + 1 if target in rec.items else 0})
    return pd.DataFrame(out)
