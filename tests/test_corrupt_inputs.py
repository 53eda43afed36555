"""The corrupted-input corpus: each case stops the real ``retrain`` flow at validation with a message
naming the problem; nothing downstream runs and no model is trained or registered."""

from __future__ import annotations

import json

import pytest
from corrupt_corpus import CASES
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow
DATA_STAGES = ("ingest", "preprocess", "preferences")  # where validation stops a run

TINY_TRAIN = ["preprocess.max_len=12", "model.n_layer=1", "model.n_head=1", "model.n_embd=16", "train.epochs=1",
              "train.device=cpu", "reward.members=1", "reward.train.epochs=1", "reward.train.device=cpu"]


def test_corpus_is_large_enough():
    assert len(CASES) >= 12


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_corrupted_input_stops_retrain_at_validation(case, prefect_server, isolated_runs, tmp_path, store):
    from flows.retrain import retrain

    build, expected = CASES[case]
    data = tmp_path / "data"
    data.mkdir()
    extra = build(data)
    out = tmp_path / "run"
    exp = f"corrupt-{case}"
    with pytest.raises(Exception) as ei:
        retrain(data=str(data), output=str(out), config=None,
                overrides=[*TINY_TRAIN, *extra, f"tracking.mlflow_uri={store}", f"tracking.experiment={exp}"])
    msg = str(ei.value)
    for s in expected:
        assert s.lower() in msg.lower(), f"{case}: {s!r} not in {msg!r}"

    # Nothing downstream ran: no model directory, no training stage, nothing registered.
    assert not (out / "models").exists()
    summary = json.loads((out / "reports" / "validation_failure.json").read_text())
    assert summary["stage"] in DATA_STAGES
    assert summary["failures"] and summary["failures"][0]["expectation"]
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name(exp).experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.status == "FAILED" and parent.data.tags["failed_stage"] == summary["stage"]
    stages_run = {r.data.tags.get("stage") for r in runs} - {None}
    assert stages_run <= set(DATA_STAGES), stages_run  # e.g. no train-base, evaluate, posttrain-asft
    failed = [r for r in runs if r.data.tags.get("validation_failed") == "true"]
    assert len(failed) == 1 and failed[0].info.status == "FAILED"
    arts = {a.path for a in client.list_artifacts(failed[0].info.run_id, "validation")}
    assert "validation/validation_failure.json" in arts
    assert client.search_registered_models() == []
