"""MLflow pyfunc serving model (models-from-code: MLflow stores this file, never a pickle).

``model_config["kind"]`` picks what the model does:

- ``recommender``: input rows ``{"history": [item ids, oldest first], "k": 10}`` -> ``{"items": [...],
  "scores": [...], "unknown_items": [...], "fallback": null}`` (top-K catalog items and their
  log-probabilities; history items excluded; ids not in the catalog ignored and listed). A history
  with no catalog item (cold start) gets the most popular training items instead (the packaged
  ``popularity`` artifact; scores are their smoothed log-probabilities) with ``"fallback": "popular"``.
- ``reward``: input rows ``{"history": [...], "items": [...]}`` -> ``{"mean", "std", "pessimistic"}``
  reward of each candidate item under the ensemble.

Client errors (``k`` < 1 or not an integer, a history that is not a list of ids, a missing column,
unknown candidate items, more than ``max_rows`` rows, more than ``max_history`` ids in a list) are
raised as ``MlflowException(INVALID_PARAMETER_VALUE)`` with the reason: the scoring server answers
them with HTTP 400 and that message, not 500.

The signature (given when the model is saved, with an input example) declares ``history``/``items``
as arrays of strings and ``k`` as Any, checked here (called directly, without the signature check,
one string of ids separated by spaces or commas is accepted too). ``predict`` is type-hinted with ``pd.DataFrame``: MLflow infers no
schema from that hint (the explicit signature is the schema) and asks for no other.
Served with ``mlflow models serve -m models:/asft-recommender-<product>@champion --env-manager local``.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel


def _client_error(msg: str) -> mlflow.exceptions.MlflowException:
    # the numeric protobuf code: a string error_code would be mapped to INTERNAL_ERROR (HTTP 500)
    return mlflow.exceptions.MlflowException(msg, error_code=INVALID_PARAMETER_VALUE)


def _ids(value):
    """One string of ids separated by spaces or commas as a list; anything else as given (checked
    by :func:`asft.serving.check_histories`)."""
    if isinstance(value, str):
        return [t for t in value.replace(",", " ").split() if t]
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return value


class AsftPyfunc(PythonModel):
    def load_context(self, context) -> None:
        from asft.serving import Recommender, RewardScorer, ServingLimits

        cfg = context.model_config or {}
        self.kind = cfg.get("kind", "recommender")
        self.default_k = int(cfg.get("k", 10))
        limits = ServingLimits(max_rows=cfg.get("max_rows"), max_history=cfg.get("max_history"))
        path = context.artifacts["model"]
        if self.kind == "recommender":
            self.impl = Recommender.load(path, popularity=context.artifacts.get("popularity"), limits=limits)
        else:
            self.impl = RewardScorer.load(path, limits=limits)

    def _ks(self, df: pd.DataFrame, params: dict[str, Any] | None) -> list[int]:
        from asft.serving import ServingInputError, check_k

        default = (params or {}).get("k", self.default_k)
        if "k" not in df.columns:
            return [check_k(default)] * len(df)
        ks, bad = [], []
        for row, k in enumerate(df["k"].tolist()):
            if k is None or (isinstance(k, float) and np.isnan(k)):
                k = default
            try:
                ks.append(check_k(k))
            except ServingInputError:
                bad.append((row, int(k) if isinstance(k, float) and k.is_integer() else k))
        if bad:
            raise ServingInputError(f"rows {[r for r, _ in bad][:10]}: k must be an integer >= 1, got"
                                    f" {[k for _, k in bad][:10]}")
        return ks

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from asft.serving import ServingInputError

        try:
            df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        except (ValueError, TypeError) as e:
            raise _client_error(f"input is not a table of rows: {e}") from None
        need = ["history"] + (["items"] if self.kind == "reward" else [])
        missing = [c for c in need if c not in df.columns]
        if missing:
            raise _client_error(f"input needs column(s) {missing}; got {[str(c) for c in df.columns]}")
        try:
            histories = [_ids(h) for h in df["history"]]
            if self.kind == "recommender":
                ks = self._ks(df, params)
                recs = self.impl.recommend(histories, k=max(ks, default=1))
                rows = [{"items": r.items[:k], "scores": r.scores[:k], "unknown_items": r.unknown_items,
                         "fallback": r.fallback} for r, k in zip(recs, ks)]
                # object columns: pandas' default string dtype would turn a null fallback into NaN
                return pd.DataFrame(rows, columns=["items", "scores", "unknown_items", "fallback"], dtype=object)
            rows = self.impl.score(histories, [_ids(x) for x in df["items"]])
            return pd.DataFrame(rows, columns=["mean", "std", "pessimistic"])
        except ServingInputError as e:
            raise _client_error(str(e)) from None


set_model(AsftPyfunc())
