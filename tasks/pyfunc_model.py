"""MLflow pyfunc serving model (models-from-code: MLflow stores this file, never a pickle).

``model_config["kind"]`` picks what the model does:

- ``recommender``: input rows ``{"history": [item ids, oldest first], "k": 10}`` -> ``{"items": [...],
  "scores": [...]}`` (top-K catalog items and their log-probabilities; history items excluded).
- ``reward``: input rows ``{"history": [...], "items": [...]}`` -> ``{"mean", "std", "pessimistic"}``
  reward of each candidate item under the ensemble.

The signature (given when the model is saved, with an input example) declares ``history``/``items``
as arrays of strings (called directly, without the signature check, one string of ids separated by
spaces or commas is accepted too). ``predict`` is type-hinted with ``pd.DataFrame``: MLflow infers no
schema from that hint (the explicit signature is the schema) and asks for no other.
Served with ``mlflow models serve -m models:/asft-recommender@champion --env-manager local``.
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


def _ids(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [t for t in value.replace(",", " ").split() if t]
    return [str(v) for v in value]


class AsftPyfunc(PythonModel):
    def load_context(self, context) -> None:
        from asft.serving import Recommender, RewardScorer

        cfg = context.model_config or {}
        self.kind = cfg.get("kind", "recommender")
        self.default_k = int(cfg.get("k", 10))
        path = context.artifacts["model"]
        self.impl = Recommender.load(path) if self.kind == "recommender" else RewardScorer.load(path)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "history" not in df.columns:
            raise mlflow.exceptions.MlflowException(f"input needs a 'history' column; got {list(df.columns)}",
                                                    error_code="INVALID_PARAMETER_VALUE")
        histories = [_ids(h) for h in df["history"]]
        try:
            if self.kind == "recommender":
                ks = df["k"].fillna(self.default_k).astype(int).tolist() if "k" in df.columns else None
                k = max(ks) if ks else int((params or {}).get("k", self.default_k))
                recs = self.impl.recommend(histories, k=k)
                rows = [{"items": r.items[: (ks[i] if ks else k)], "scores": r.scores[: (ks[i] if ks else k)],
                         "unknown_items": r.unknown_items} for i, r in enumerate(recs)]
            else:
                if "items" not in df.columns:
                    raise ValueError("reward scoring needs an 'items' column (candidate item ids per row)")
                rows = self.impl.score(histories, [_ids(x) for x in df["items"]])
        except (ValueError, KeyError) as e:
            raise mlflow.exceptions.MlflowException(str(e), error_code="INVALID_PARAMETER_VALUE") from None
        return pd.DataFrame(rows)


set_model(AsftPyfunc())
