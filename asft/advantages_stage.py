"""Files of the ``advantages`` stage: the A-SFT weights of the scored candidates, written once (with
their statistics and histograms) so that the ``asft`` post-training method trains on exactly them.

Kept apart from :mod:`asft.advantages` (pure numpy registries, imported by the config to validate
names): this module reads and writes parquet and plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from asft.advantages import Weights
from asft.config import Config
from asft.sampling import read_candidates, stack
from asft.utils import write_json

ADVANTAGES_FILE = "advantages.parquet"
ADVANTAGES_METHOD = "asft"  # the post-training method whose weights the stage writes


def write_advantages(scored_dir: str | Path, cfg: Config, out_dir: str | Path) -> dict:
    """The A-SFT weights of the scored candidates (``advantage`` section), written with their
    statistics and histograms; the ``asft`` method trains on exactly these."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from asft.plots import histogram
    from asft.posttrain.weighted import method_weights
    from asft.utils import atomic_dir

    frame = read_candidates(scored_dir)
    items, w = method_weights(ADVANTAGES_METHOD, frame, cfg)
    table = pa.table({"window": frame["window"].to_numpy(np.int64), "pos": frame["pos"].to_numpy(np.int64),
                      "items": pa.array(list(items.astype(np.int32)), pa.list_(pa.int32())),
                      "advantages": pa.array(list(w.advantages.astype(np.float32)), pa.list_(pa.float32())),
                      "weights": pa.array(list(w.weights.astype(np.float32)), pa.list_(pa.float32()))})
    stats = {**w.stats, "baseline": cfg.advantage.baseline, "transform": cfg.advantage.transform,
             "lambda": cfg.advantage.lam, "reward": cfg.advantage.reward}
    with atomic_dir(out_dir) as tmp:
        pq.write_table(table, tmp / ADVANTAGES_FILE)
        write_json(tmp / "weights.json", stats)
        histogram(w.weights.ravel(), tmp / "weights_hist.png", "A-SFT weights", "weight (mean 1)")
        histogram(w.advantages.ravel(), tmp / "advantages_hist.png", "advantages", "A")
    out_dir = Path(out_dir)
    return {**stats, "advantages_dir": str(out_dir),
            "plots": [str(out_dir / "weights_hist.png"), str(out_dir / "advantages_hist.png")]}


def read_advantages(adv_dir: str | Path, frame: pd.DataFrame) -> tuple[np.ndarray, Weights]:
    """Items [C, M] and weights written by :func:`write_advantages`, checked against the scored
    candidates ``frame`` (same contexts in the same order)."""
    adv = pd.read_parquet(Path(adv_dir) / ADVANTAGES_FILE)
    if len(adv) != len(frame) or not (np.array_equal(adv["window"].to_numpy(), frame["window"].to_numpy())
                                      and np.array_equal(adv["pos"].to_numpy(), frame["pos"].to_numpy())):
        raise ValueError(f"{adv_dir}: advantages do not match the scored candidates (re-run the advantages stage)")
    stats = json.loads((Path(adv_dir) / "weights.json").read_text())
    w = stack(adv, "weights").astype(np.float64)
    return stack(adv, "items").astype(np.int64), Weights(stack(adv, "advantages"), w, np.zeros(w.shape, bool),
                                                         {k: v for k, v in stats.items() if isinstance(v, float)})
