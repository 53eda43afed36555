"""The champion/challenger promotion gate (pure: no registry access here).

A new model becomes champion only if both hold against the current champion, measured on the same
validation contexts and by the same held-out judge:

1. validation NDCG@10 >= champion's - ``ndcg_tolerance`` (post-training may trade a little logged
   accuracy for reward, but not more than the tolerance), and
2. held-out judged reward of the valid top-10 > champion's + ``judged_margin``.

Otherwise it is registered as challenger; the reason names the failed check and the numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

NDCG_KEY, JUDGED_KEY = "ndcg@10", "judged_top10"


@dataclass(frozen=True)
class Decision:
    promote: bool
    alias: str
    reason: str
    new: dict[str, float]
    champion: dict[str, float] | None

    def to_dict(self) -> dict:
        return asdict(self)


def promotion_decision(new: dict[str, float], champion: dict[str, float] | None, ndcg_tolerance: float,
                       judged_margin: float = 0.0) -> Decision:
    """``new``/``champion``: validation reports holding ``ndcg@10`` and ``judged_top10``."""
    for name, rep in (("new model", new), ("champion", champion)):
        if rep is None:
            continue
        missing = [k for k in (NDCG_KEY, JUDGED_KEY) if k not in rep]
        if missing:
            raise KeyError(f"{name}: validation report lacks {missing}")
    picked = {k: float(new[k]) for k in (NDCG_KEY, JUDGED_KEY)}
    if champion is None:
        return Decision(True, "champion", "no current champion", picked, None)
    champ = {k: float(champion[k]) for k in (NDCG_KEY, JUDGED_KEY)}
    floor = champ[NDCG_KEY] - ndcg_tolerance
    bar = champ[JUDGED_KEY] + judged_margin
    failed = []
    if picked[NDCG_KEY] < floor:
        failed.append(f"valid NDCG@10 {picked[NDCG_KEY]:.4f} < champion {champ[NDCG_KEY]:.4f} - tolerance "
                      f"{ndcg_tolerance:g}")
    if not picked[JUDGED_KEY] > bar:
        failed.append(f"held-out judged reward {picked[JUDGED_KEY]:.4f} <= champion {champ[JUDGED_KEY]:.4f}"
                      + (f" + margin {judged_margin:g}" if judged_margin else ""))
    if failed:
        return Decision(False, "challenger", "; ".join(failed), picked, champ)
    return Decision(True, "champion", f"valid NDCG@10 {picked[NDCG_KEY]:.4f} >= {floor:.4f} and judged reward "
                    f"{picked[JUDGED_KEY]:.4f} > {bar:.4f}", picked, champ)
