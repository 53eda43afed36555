"""Rounds family: plans of weighted rounds (RFT: best-of-N filtering, optionally followed by A-SFT).

A plan is a list of :class:`Round`; the runner trains each round from the previous round's selected
policy with ``posttrain.train.epochs // len(plan)`` epochs and keeps the best round's model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Round:
    """``kind`` 'filter' (weight 1 on the top ``keep_frac`` of each context's candidates) or 'asft'
    (the ``advantage`` weights); ``resample``: draw and score fresh candidates from the current policy."""

    kind: str
    keep_frac: float | None
    resample: bool = False


def _fracs(keep_fracs: Sequence[float]) -> list[float]:
    fracs = list(keep_fracs)
    if not fracs:
        raise ValueError("posttrain.rft.keep_fracs is empty; give at least one keep fraction")
    return fracs


def rft_plan(keep_fracs: Sequence[float]) -> list[Round]:
    """One filter round per keep fraction; every round after the first re-samples from the current policy."""
    return [Round("filter", f, resample=r > 0) for r, f in enumerate(_fracs(keep_fracs))]


def rft_asft_plan(keep_fracs: Sequence[float]) -> list[Round]:
    """Filtered SFT at the first keep fraction, then A-SFT on the same candidates."""
    return [Round("filter", _fracs(keep_fracs)[0]), Round("asft", None)]
