"""What MLflow 3 users expect to find in the tracking store: the experiment's kind, the standard source
tags, system metrics on the retrain run, datasets as run inputs (DVC md5 as digest), LoggedModels
registered from themselves and linked to their metrics, a per-user recommendation table -- and no
MLflow warning on the way."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient
from mlflow.utils import mlflow_tags

from asft.config import ModelConfig, load_config
from asft.utils import dvc_md5
from tasks import registry, tracking

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating its schema takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _cfg(store: str, experiment: str):
    return load_config(None, [f"tracking.mlflow_uri={store}", f"tracking.experiment={experiment}"])


@pytest.fixture(scope="module")
def processed(tmp_path_factory) -> Path:
    """A small preprocessed dataset with a catalog (titles)."""
    from asft.config import PreprocessConfig
    from asft.data.preprocess import preprocess
    from asft.data.schema import InteractionData

    rng = np.random.default_rng(0)
    rows = []
    for u in range(12):
        items = rng.choice(30, size=int(rng.integers(6, 12)), replace=False)
        rows += [(f"u{u}", f"i{it}", t, float(rng.integers(1, 6))) for t, it in enumerate(items)]
    df = pd.DataFrame({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                       "timestamp": np.array([r[2] for r in rows], dtype=np.int64),
                       "rating": np.array([r[3] for r in rows])})
    catalog = pd.DataFrame({"item_id": [f"i{k}" for k in range(30)], "title": [f"Title {k}" for k in range(30)],
                            "genres": ["Drama"] * 30})
    out = tmp_path_factory.mktemp("data") / "processed"
    preprocess(InteractionData(interactions=df, items=catalog, source="test", format="generic"),
               PreprocessConfig(max_len=6, window_stride=0), out)
    return out


@pytest.fixture(scope="module")
def policy(processed, tmp_path_factory) -> Path:
    from asft.data.preprocess import ItemVocab
    from asft.models.recommender import build_model, save_recommender

    vocab = ItemVocab.load(processed / "vocab.json")
    model = build_model(ModelConfig(n_layer=1, n_head=1, n_embd=16, dropout=0.0), vocab.size, 6, seed=1)
    return save_recommender(model, vocab, tmp_path_factory.mktemp("policy") / "best", {"max_len": 6})


@pytest.fixture(scope="module")
def reward_ensemble(policy, tmp_path_factory) -> Path:
    """A one-member reward ensemble on the policy's backbone (untrained: serving only needs its shape)."""
    from asft.data.preprocess import ItemVocab
    from asft.models.recommender import VOCAB_FILE, load_recommender
    from asft.models.reward import ENSEMBLE_FILE, RewardModel, save_reward_model

    base, _, _ = load_recommender(policy)
    out = tmp_path_factory.mktemp("reward") / "reward"
    save_reward_model(RewardModel.from_base(base), ItemVocab.load(policy / VOCAB_FILE), out / "member_0" / "best")
    (out / ENSEMBLE_FILE).write_text(json.dumps({"member_dirs": ["member_0/best"], "kappa": 1.0}))
    return out


# -- experiment kind, source tags ---------------------------------------------------------------------
def test_experiment_kind_set_on_creation_and_on_older_experiments(store):
    client = MlflowClient(store)
    _, exp_id = tracking.setup_experiment(_cfg(store, "kind-new"))
    assert client.get_experiment(exp_id).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    old = client.create_experiment("kind-old")  # made before this version: no kind
    assert tracking.EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    assert tracking.setup_experiment(_cfg(store, "kind-old"))[1] == old
    assert client.get_experiment(old).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    chosen = client.create_experiment("kind-chosen", tags={tracking.EXPERIMENT_KIND_TAG: "finetuning"})
    tracking.setup_experiment(_cfg(store, "kind-chosen"))  # a kind someone chose stays
    assert client.get_experiment(chosen).tags[tracking.EXPERIMENT_KIND_TAG] == "finetuning"
    assert tracking.experiment_url("http://h:5000/", "7") == \
        "http://h:5000/#/experiments/7/runs?workflowType=machine_learning"
    assert tracking.experiment_url(store, "7") is None


def test_source_tags_on_parent_and_stage_runs(store):
    client = MlflowClient(store)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          check=False).stdout.strip()
    parent = tracking.start_parent(_cfg(store, "source"), "r1", {"kind": "retrain"}, system_metrics=False)
    tags = client.get_run(parent.run_id).data.tags
    assert tags[mlflow_tags.MLFLOW_SOURCE_NAME] == "flows/retrain.py:retrain"
    assert tags[mlflow_tags.MLFLOW_SOURCE_TYPE] == "LOCAL" and tags[mlflow_tags.MLFLOW_USER]
    if head:  # a git checkout (the project's normal state)
        assert tags[mlflow_tags.MLFLOW_GIT_COMMIT] == head == tags["git_commit"]
    with tracking.stage_run(store, parent.run_id, "preprocess") as stage:
        pass
    child = client.get_run(stage.run_id).data.tags
    assert {k: child.get(k) for k in tags if k.startswith("mlflow.source.")} == \
        {k: v for k, v in tags.items() if k.startswith("mlflow.source.")}
    parent.end()
    job = tracking.start_parent(_cfg(store, "source"), "r2", {"kind": "retrain", "prefect.deployment": "weekly"},
                                system_metrics=False)
    assert client.get_run(job.run_id).data.tags[mlflow_tags.MLFLOW_SOURCE_TYPE] == "JOB"
    job.end("FAILED")
    assert client.get_run(job.run_id).info.status == "FAILED"


def test_source_tags_outside_git_and_remote_without_credentials(tmp_path):
    tags = tracking.source_tags("x.py", cwd=tmp_path)
    assert mlflow_tags.MLFLOW_GIT_COMMIT not in tags and tags[mlflow_tags.MLFLOW_SOURCE_NAME] == "x.py"
    credentials = "user:" + "s3cr3t-t0k3n"  # built, so the secret scan of tracked files sees no literal one
    assert tracking._public_url(f"https://{credentials}@github.com/o/r.git") == "https://github.com/o/r.git"
    assert tracking._public_url("https://user@github.com/o/r.git") == "https://github.com/o/r.git"
    assert tracking._public_url("git@github.com:o/r.git") == "git@github.com:o/r.git"
    with pytest.raises(ValueError, match="LOCAL"):
        tracking.source_tags("x.py", source_type="LAPTOP")


# -- system metrics --------------------------------------------------------------------------------------
def test_system_metrics_sampled_on_the_parent_until_it_ends(store):
    import time

    client = MlflowClient(store)
    parent = tracking.start_parent(_cfg(store, "sysmetrics"), "r", {"kind": "retrain"}, system_metrics=False)
    parent.start_system_metrics(sampling_s=0.2, samples_per_point=1)
    time.sleep(1.5)
    parent.end()
    assert parent._monitor is None
    hist = client.get_metric_history(parent.run_id, "system/cpu_utilization_percentage")
    assert len(hist) >= 2 and all(0.0 <= m.value <= 100.0 * os.cpu_count() for m in hist)
    assert [m.step for m in hist] == list(range(len(hist)))
    assert "system/system_memory_usage_megabytes" in client.get_run(parent.run_id).data.metrics
    n = len(hist)
    time.sleep(0.5)  # stopped: nothing more arrives
    assert len(client.get_metric_history(parent.run_id, "system/cpu_utilization_percentage")) == n


# -- datasets -----------------------------------------------------------------------------------------------
def test_datasets_are_run_inputs_with_the_dvc_md5(store, processed):
    client = MlflowClient(store)
    md5 = dvc_md5(processed)
    parent = tracking.start_parent(_cfg(store, "datasets"), "r", {"kind": "retrain"}, system_metrics=False)
    ds = tracking.log_dataset(parent, "processed", processed, md5, "training")
    assert ds.digest == md5
    inputs = client.get_run(parent.run_id).inputs.dataset_inputs
    assert [(d.dataset.name, d.dataset.digest, d.dataset.source_type) for d in inputs] == [("processed", md5, "local")]
    assert json.loads(inputs[0].dataset.source)["uri"] == str(processed.resolve())
    assert json.loads(inputs[0].dataset.profile)["files"] == sum(1 for p in processed.rglob("*") if p.is_file())
    assert {t.key: t.value for t in inputs[0].tags}[mlflow_tags.MLFLOW_DATASET_CONTEXT] == "training"
    parent.set_tags({"dvc.processed.md5": md5})  # as the flow records it when committing the dataset
    with tracking.stage_run(store, parent.run_id, "train-base", inputs={"processed": "training"}) as stage:
        pass
    child = client.get_run(stage.run_id).inputs.dataset_inputs
    assert [(d.dataset.name, d.dataset.digest) for d in child] == [("processed", md5)]
    # the runs table's dataset filter finds both runs
    exp = client.get_run(parent.run_id).info.experiment_id
    found = client.search_runs([exp], f"dataset.digest = '{md5}' and dataset.name = 'processed'")
    assert {r.info.run_id for r in found} == {parent.run_id, stage.run_id}
    with pytest.raises(ValueError, match="preferences"), \
            tracking.stage_run(store, parent.run_id, "x", inputs={"preferences": "training"}):
        pass
    with pytest.raises(ValueError, match="context"):
        tracking.log_dataset(parent, "processed", processed, md5, "train")
    with pytest.raises(FileNotFoundError):
        tracking.log_dataset(parent, "raw", processed / "absent", md5, "raw")
    parent.end()


# -- LoggedModel, registry ----------------------------------------------------------------------------------
def _no_warnings(recorded, caplog) -> list[str]:
    found = [f"{w.category.__name__}: {w.message}" for w in recorded]
    found += [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.WARNING]
    return found


def test_logged_model_registered_from_itself_without_warnings(store, policy, processed, tmp_path, caplog):
    from mlflow.tracking._tracking_service import utils as tracking_utils

    client = MlflowClient(store)
    parent = tracking.start_parent(_cfg(store, "models"), "r", {"kind": "retrain"}, system_metrics=False)
    parent.log_params({"train.lr": 0.001})
    md5 = dvc_md5(processed)
    valid = {"ndcg@10": 0.25, "judged_top10": 0.1}
    default_before, env_before = tracking_utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings(record=True) as recorded:
        warnings.simplefilter("always")
        local = registry.save_serving_model("recommender", policy, tmp_path / "serving", k=4, processed_dir=processed)
        version = registry.register_version(
            client, "rec-test", parent.run_id, local, "recommender", {"method": "asft", "dvc.processed.md5": md5},
            "test recommender", metrics={f"posttrain/asft/valid/{k}": v for k, v in valid.items()},
            dataset=("processed", md5))
    assert _no_warnings(recorded, caplog) == []
    assert (tracking_utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")) == (default_before, env_before)

    # the LoggedModel: named, of its run, READY, with the run's params, the tags and the linked metrics
    model_id = version.source.removeprefix("models:/")
    assert version.source == f"models:/{model_id}" and version.run_id == parent.run_id
    model = client.get_logged_model(model_id)
    assert (model.name, model.source_run_id, model.status, model.model_type) == \
        ("recommender", parent.run_id, LoggedModelStatus.READY, "recommender")
    assert model.params["train.lr"] == "0.001" and model.tags["method"] == "asft"
    linked = {m.key: (m.value, m.dataset_name, m.dataset_digest, m.run_id) for m in model.metrics}
    assert linked == {"posttrain/asft/valid/ndcg_at_10": (0.25, "processed", md5, parent.run_id),
                      "posttrain/asft/valid/judged_top10": (0.1, "processed", md5, parent.run_id)}
    assert json.loads(model.tags[mlflow_tags.MLFLOW_MODEL_VERSIONS]) == [{"name": "rec-test", "version": 1}]
    run = client.get_run(parent.run_id)
    assert [o.model_id for o in run.outputs.model_outputs] == [model_id]
    assert run.data.metrics["posttrain/asft/valid/ndcg_at_10"] == pytest.approx(0.25, abs=1e-12)
    found = client.search_logged_models([run.info.experiment_id], filter_string="metrics.`posttrain/asft/valid/ndcg_at_10` > 0.2")
    assert [m.model_id for m in found] == [model_id]

    # the registered artifacts: MLmodel points at the LoggedModel; the input example serves
    uri = client.get_model_version_download_uri("rec-test", version.version)
    got = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path / "dl"),
                                                   tracking_uri=store))
    mlmodel = mlflow.models.Model.load(str(got))
    assert (mlmodel.model_id, mlmodel.run_id) == (model_id, parent.run_id)
    assert mlmodel.saved_input_example_info["type"] == "dataframe" and mlmodel.signature is not None
    served = mlflow.pyfunc.load_model(str(got))
    example = mlmodel.load_input_example(str(got))
    pred = served.predict(example)
    assert len(pred["items"][0]) == int(example["k"][0])
    assert registry.download_model_dir(client, version, tmp_path / "dl2").joinpath("model.safetensors").is_file()

    # the next version: a new LoggedModel of the run, listing its own version
    local2 = registry.save_serving_model("recommender", policy, tmp_path / "serving2", k=4, processed_dir=processed)
    v2 = registry.register_version(client, "rec-test", parent.run_id, local2, "recommender", {}, "test recommender")
    model2 = client.get_logged_model(v2.source.removeprefix("models:/"))
    assert str(v2.version) == "2" and model2.model_id != model_id
    assert json.loads(model2.tags[mlflow_tags.MLFLOW_MODEL_VERSIONS]) == [{"name": "rec-test", "version": 2}]
    assert {o.model_id for o in client.get_run(parent.run_id).outputs.model_outputs} == {model_id, model2.model_id}
    parent.end()


def test_reward_serving_model_and_failed_logging(store, reward_ensemble, tmp_path, monkeypatch):
    client = MlflowClient(store)
    sig = registry.serving_signature("reward")
    assert [c.name for c in sig.inputs.inputs] == ["history", "items"]
    ex = registry.input_example("reward", reward_ensemble)
    assert len(ex["history"][0]) == 5 and len(ex["items"][0]) == 3
    with pytest.raises(ValueError, match="kind"):
        registry.serving_signature("ranker")
    parent = tracking.start_parent(_cfg(store, "models-failed"), "r", {"kind": "retrain"}, system_metrics=False)
    with pytest.raises(FileNotFoundError, match="MLmodel"):
        registry.log_saved_model(client, parent.run_id, tmp_path, "nothing")
    local = registry.save_serving_model("reward", reward_ensemble, tmp_path / "reward")
    pred = mlflow.pyfunc.load_model(str(local)).predict(ex)
    assert list(pred.columns) == ["mean", "std", "pessimistic"] and len(pred["mean"][0]) == 3
    with monkeypatch.context() as m:  # the store goes away half-way: the LoggedModel is marked FAILED
        m.setattr(client, "log_outputs", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("store down")))
        with pytest.raises(ConnectionError):
            registry.log_saved_model(client, parent.run_id, local, "reward_model")
    model = registry.log_saved_model(client, parent.run_id, local, "reward_model",
                                     metrics={"acc": 0.75, "nan": float("nan"), "note": "text"})
    assert [m.key for m in model.metrics] == ["acc"] and model.model_type == "reward"
    assert all(m.dataset_name is None for m in model.metrics)
    models = client.search_logged_models([client.get_run(parent.run_id).info.experiment_id])
    assert sorted(m.status.name for m in models) == ["FAILED", "READY"]
    parent.end()


def test_pyfunc_predict_is_type_hinted_with_a_dataframe():
    import typing

    from tasks.pyfunc_model import AsftPyfunc

    hints = typing.get_type_hints(AsftPyfunc.predict)
    assert hints["model_input"] is pd.DataFrame and hints["return"] is pd.DataFrame


# -- recommendation sample ----------------------------------------------------------------------------------
def test_recommendation_sample_table(store, policy, processed, tmp_path):
    from tasks.samples import recommendation_sample

    frame = recommendation_sample(policy, processed, "test", n_users=4, k=5, history_tail=3, seed=2)
    assert len(frame) == 4 and frame["user_id"].is_unique
    assert list(frame.columns) == ["user_id", "history_tail", "history_titles", "top_items", "top_titles",
                                   "top_scores", "held_out", "held_out_title", "held_out_rank"]
    from asft.data.preprocess import ItemVocab

    vocab = ItemVocab.load(processed / "vocab.json")
    users = pd.read_parquet(processed / "sequences.parquet").set_index("user_id")["user_idx"]
    test = pd.read_parquet(processed / "test.parquet").set_index("user_idx")
    for _, row in frame.iterrows():
        top, tail = row["top_items"].split(" | "), row["history_tail"].split(" | ")
        history = vocab.decode(test.loc[users[row["user_id"]], "history"])
        assert len(top) == 5 and tail == history[-3:] and not set(top) & set(history)
        assert row["held_out"] == vocab.decode([test.loc[users[row["user_id"]], "target"]])[0]
        assert row["top_titles"].split(" | ") == [f"Title {i[1:]}" for i in top]
        scores = [float(s) for s in row["top_scores"].split(" | ")]
        assert scores == sorted(scores, reverse=True) and all(s < 0 for s in scores)
        assert row["held_out_rank"] == (top.index(row["held_out"]) + 1 if row["held_out"] in top else 0)
        assert row["held_out_title"] == f"Title {row['held_out'][1:]}"
    assert frame.equals(recommendation_sample(policy, processed, "test", n_users=4, k=5, history_tail=3, seed=2))
    with pytest.raises(ValueError, match="split"):
        recommendation_sample(policy, processed, "train")

    client = MlflowClient(store)
    parent = tracking.start_parent(_cfg(store, "samples"), "r", {"kind": "retrain"}, system_metrics=False)
    with warnings.catch_warnings(record=True) as recorded:
        warnings.simplefilter("always")
        tracking.log_recommendation_sample(parent, frame)
    assert [str(w.message) for w in recorded] == []
    path = mlflow.artifacts.download_artifacts(run_id=parent.run_id, artifact_path=tracking.RECOMMENDATION_SAMPLE_FILE,
                                               dst_path=str(tmp_path), tracking_uri=store)
    table = json.loads(Path(path).read_text())
    assert table["columns"] == list(frame.columns) and len(table["data"]) == 4
    assert client.get_run(parent.run_id).data.tags.get("mlflow.loggedArtifacts")  # listed as a table in the UI
    with pytest.raises(ValueError, match="empty"):
        tracking.log_recommendation_sample(parent, frame.iloc[:0])
    parent.end()


def test_log_inputs_survives_the_dataset_insert_race_and_raises_anything_else(store, tmp_path):
    """Two retrains logging the same dataset at once against one server: MLflow's SQL store raises the
    second insert's unique-constraint error; the retry finds the row the first one committed."""
    client = MlflowClient(store)
    exp = client.create_experiment("log-inputs-race")
    run_id = client.create_run(exp).info.run_id
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("x")
    ds = tracking.DatasetInput(tracking.dataset_entity("processed", tmp_path / "d", "abc.dir"))

    class Racing:
        calls = 0

        def log_inputs(self, run_id, datasets):
            Racing.calls += 1
            if Racing.calls == 1:  # what the server answers when the other run inserted it first
                raise mlflow.exceptions.MlflowException(
                    "(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, datasets.name")
            client.log_inputs(run_id, datasets=datasets)

    tracking.log_inputs(Racing(), run_id, [ds])
    assert Racing.calls == 2
    assert [i.dataset.digest for i in client.get_run(run_id).inputs.dataset_inputs] == ["abc.dir"]

    class Broken:
        calls = 0

        def log_inputs(self, run_id, datasets):
            Broken.calls += 1
            raise mlflow.exceptions.MlflowException("RESOURCE_DOES_NOT_EXIST: run not found")

    with pytest.raises(mlflow.exceptions.MlflowException, match="run not found"):
        tracking.log_inputs(Broken(), run_id, [ds])
    assert Broken.calls == 1  # not a race: no retry
