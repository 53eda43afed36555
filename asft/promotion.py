"""The champion/challenger promotion gate (pure: no registry access here).

A new model becomes champion only if both hold against the current champion, measured on the same
validation contexts and by the same held-out judge:

1. validation NDCG@10 >= champion's - ``ndcg_tolerance`` (post-training may trade a little logged
   accuracy for reward, but not more than the tolerance), and
2. held-out judged reward of the valid top-10 > champion's + ``judged_margin``.

Otherwise it is registered as challenger; the reason names the failed check and the numbers.

Lineages: the registered models are scoped to a *product* (``registry.product``; by default derived
from the data source and the catalog, see :func:`product_name`), one registered recommender and reward
model per product (:func:`registered_name`). The gate only ever compares models of one catalog: a
champion whose catalog differs from the new model's (possible only inside an explicitly named product)
is not compared at all (:func:`catalog_change_decision`).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from pathlib import Path

NDCG_KEY, JUDGED_KEY = "ndcg@10", "judged_top10"
PRODUCT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # a suffix of an MLflow registered model name
FINGERPRINT_CHARS = 8


def catalog_fingerprint(items: list[str]) -> str:
    """The catalog's identity: sha256 of its item ids in vocabulary order (the order fixes the tokens a
    model's weights belong to, so a reordered catalog is a different one)."""
    h = hashlib.sha256()
    for item in items:
        h.update(item.encode())
        h.update(b"\n")
    return h.hexdigest()


def source_label(source: str) -> str:
    """A data source as a name: 'simulator', else the dataset directory's (or file's stem) name,
    reduced to the characters a registered model name allows."""
    if source == "simulator":
        return "simulator"
    p = Path(source)
    name = p.stem if p.suffix and not p.is_dir() else p.name
    label = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-._")[:40]
    return label or "data"


def product_name(configured: str | None, source: str, fingerprint: str) -> str:
    """The product lineage of a run: ``registry.product`` when set, else ``<source label>-<catalog
    fingerprint>`` (so two datasets, or two simulator catalogs, never share a lineage by default)."""
    if configured:
        return configured
    return f"{source_label(source)}-{fingerprint[:FINGERPRINT_CHARS]}"


def registered_name(base: str, product: str) -> str:
    """The registered model name of ``base`` (e.g. ``asft-recommender``) for one product."""
    return f"{base}-{product}"


def catalog_change_decision(new: dict[str, float], champion_version: str | int, product: str,
                            champion_catalog: tuple[str, int], new_catalog: tuple[str, int],
                            on_change: str = "challenger") -> Decision:
    """The decision when the product's champion ranks another catalog ((fingerprint, items) each): the
    models are not compared. ``on_change='challenger'`` keeps the champion (a person promotes the new
    model, or gives the new catalog its own ``registry.product``); ``'champion'`` lets the newest
    catalog take over the lineage."""
    if on_change not in ("challenger", "champion"):
        raise ValueError(f"on_change must be 'challenger' or 'champion', got {on_change!r}")
    picked = {k: float(new[k]) for k in (NDCG_KEY, JUDGED_KEY)}
    what = (f"catalog changed in product '{product}': champion v{champion_version} ranks catalog "
            f"{champion_catalog[0][:12]} ({champion_catalog[1]} items), this model {new_catalog[0][:12]} "
            f"({new_catalog[1]} items); models of different catalogs are not compared")
    if on_change == "champion":
        return Decision(True, "champion", f"{what}; the newest catalog replaces the champion "
                        "(registry.catalog_change=champion)", picked, None)
    return Decision(False, "challenger", f"{what}; the champion stays (promote this version by hand, set "
                    "registry.catalog_change=champion, or give the new catalog its own registry.product)",
                    picked, None)


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
