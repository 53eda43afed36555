"""``asft tune``: an Optuna study over base-model settings on a tiny simulator (never real data): the
flow tracks each trial as a nested MLflow run, writes best.yaml that ``load_config`` takes as a
``--config``, and resumes the same study (trials are added, not restarted)."""

from __future__ import annotations

import json

import pytest
import yaml

from asft.config import ConfigError, load_config
from asft.tuning import apply_values, config_diff

SPACE = "tune.space={train.lr: {low: 0.001, high: 0.01, log: true}, preprocess.max_len: {choices: [8, 12]}}"


def test_config_diff_and_apply_values_round_trip():
    cfg = load_config(None, ["train.lr=0.004", "model.backbone=llama"])
    d = config_diff(cfg)
    assert d == {"model": {"backbone": "llama"}, "train": {"lr": 0.004}}
    again = apply_values(load_config(None), {"train.lr": 0.004, "model.backbone": "llama"})
    assert again == cfg
    with pytest.raises(ConfigError, match="tune.space"):
        load_config(None, ["tune.space={train.nope: {low: 1, high: 2}}"])
    with pytest.raises(ConfigError, match="choices"):
        load_config(None, ["tune.space={train.lr: {low: 2, high: 1}}"])


@pytest.mark.slow
def test_tune_flow_tracks_trials_writes_best_and_resumes(prefect_server, tmp_path, tiny_overrides, monkeypatch):
    from mlflow.tracking import MlflowClient

    from flows.tune import tune

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ov = [*tiny_overrides, "train.epochs=3", SPACE, f"tracking.mlflow_uri={uri}", "tune.startup_trials=2"]
    out = tmp_path / "tune"
    res = tune(data="simulator", output=str(out), config=None, overrides=ov, n_trials=2)
    assert res["trials"] == 2 and res["complete"] + res["pruned"] == 2
    best_file = out / "best.yaml"
    best = yaml.safe_load(best_file.read_text())
    cfg = load_config(best_file)  # usable as retrain --config
    assert cfg.train.lr == pytest.approx(res["best_params"]["train.lr"])
    assert cfg.preprocess.max_len == res["best_params"]["preprocess.max_len"]
    assert "tune" not in best and cfg.train.epochs == 3
    trials = json.loads((out / "trials.json").read_text())
    assert [t["number"] for t in trials] == [0, 1] and all(t["value"] is not None for t in trials)

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("asft-retrain")
    parents = client.search_runs([exp.experiment_id], "tags.kind = 'tune'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["trial-0000", "trial-0001"]
    assert all("train.lr" in c.data.params and "valid/ndcg_at_10" in c.data.metrics for c in children)

    # the same command with more trials continues the study
    res2 = tune(data="simulator", output=str(out), config=None, overrides=ov, n_trials=3)
    assert res2["trials"] == 3
    assert [t["number"] for t in json.loads((out / "trials.json").read_text())] == [0, 1, 2]
