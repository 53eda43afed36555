"""One real retrain flow run through Prefect, then check what MLflow recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _runs(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=100)


def test_retrain_flow_records_everything(prefect_server, isolated_runs, tmp_path, tiny_overrides):
    from prefect.client.orchestration import get_client  # noqa: F401  (server must be reachable)

    from flows.retrain import retrain

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "run"
    result = retrain(data="simulator", output=str(out), config=str(REPO / "params.yaml"),
                     overrides=[*tiny_overrides, f"tracking.mlflow_uri={uri}", "tracking.experiment=flow-test",
                                "posttrain.lambda_sweep=[0.5]"], use_cache=False)

    # metrics.json: per model, validation and test metrics under lower-case keys, plus dataset stats
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result, default=str))
    base = metrics["models"]["base"]
    for split in ("valid", "test", "test_unmasked"):
        for key in ("ndcg@10", "hr@10", "ndcg@50", "hr@50", "mrr"):
            assert 0.0 <= base[split][key] <= 1.0
    assert metrics["dataset"]["users"] == 60 and metrics["dataset"]["items"] <= 40
    assert (out / "models/base/best/model.safetensors").is_file()

    client = MlflowClient(uri)
    runs = _runs(client, "flow-test")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.info.run_id == metrics["mlflow"]["parent_run_id"]
    assert parent.data.params["train.epochs"] == "2"
    assert len(parent.data.tags["git_commit"]) > 0
    assert parent.data.tags["processed_sha256"] == metrics["dataset"]["sha256"]
    assert abs(parent.data.metrics["base/test/ndcg_at_10"] - base["test"]["ndcg@10"]) < 1e-12

    children = {r.data.tags["stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
                and r.data.params.get("advantage.lam") != "0.5"}  # the lambda-sweep runs are checked below
    methods = ["asft", "sft", "dpo", "grpo"]  # params.yaml default
    assert set(children) == {"ingest", "preprocess", "preferences", "train-base", "evaluate",
                             "train-reward", "reward-report", "train-judge", "sample", "score", "advantages",
                             *[f"posttrain-{m}" for m in methods], "evaluate-policies", "promote"}
    assert all(r.info.status == "FINISHED" for r in children.values())

    # lineage: every run carries the git commit; DVC hashes of the datasets match the files on disk
    from asft.utils import dvc_md5

    hashes = {name: dvc_md5(out / d) for name, d in (("raw", "raw"), ("processed", "processed"),
                                                      ("preferences", "preferences"))}
    assert metrics["datasets"] == hashes
    for name, h in hashes.items():
        assert parent.data.tags[f"dvc.{name}.md5"] == h
    for r in children.values():
        assert r.data.tags["git_commit"] == parent.data.tags["git_commit"]
    assert children["train-reward"].data.tags["dvc.preferences.md5"] == hashes["preferences"]
    assert children["train-base"].data.tags["dvc.processed.md5"] == hashes["processed"]

    # validation ran on every dataset, with GX data docs logged
    for stage in ("ingest", "preprocess", "preferences"):
        run = children[stage]
        assert run.data.metrics["validation/failed"] == 0
        assert run.data.metrics["validation/expectations"] > 5
        assert "data_docs" in {a.path for a in client.list_artifacts(run.info.run_id)}

    # preference dataset and reward report
    prefs = metrics["preferences"]
    assert set(prefs["pairs_by_source"]) == {"explicit", "implicit", "ranking", "best_of_n", "pairwise"}
    rep = metrics["reward"]["report"]
    rr = children["reward-report"]
    assert abs(rr.data.metrics["ensemble/pair_acc"] - rep["ensemble"]["pair_acc"]) < 1e-12
    assert "naive/item_mean_rating/pair_acc" in rr.data.metrics
    assert "simulator/spearman_true_utility/ensemble" in rr.data.metrics
    plots = {Path(a.path).name for a in client.list_artifacts(rr.info.run_id, "plots")}
    assert {"reward_calibration.png", "reward_spread.png", "reward_accuracy.png"} <= plots
    ens = json.loads((out / "models/reward/ensemble.json").read_text())
    assert len(ens["member_dirs"]) == 2 and ens["centring"]["std"] > 0
    hist = client.get_metric_history(children["train-reward"].info.run_id, "member_1/valid/neg_bt_loss")
    assert sorted(m.step for m in hist) == [1, 2]

    train = children["train-base"]
    # metrics with steps: one validation point per epoch
    hist = client.get_metric_history(train.info.run_id, "valid/ndcg_at_10")
    assert sorted(m.step for m in hist) == [1, 2]
    assert train.data.params["model.n_embd"] == "16"
    arts = {a.path for a in client.list_artifacts(train.info.run_id)}
    assert {"plots", "model", "train_summary.json"} <= arts
    model_files = {Path(a.path).name for a in client.list_artifacts(train.info.run_id, "model")}
    assert {"model.safetensors", "item_vocab.json", "config.json"} <= model_files

    ev = children["evaluate"]
    assert abs(ev.data.metrics["test/hr_at_10"] - base["test"]["hr@10"]) < 1e-12

    # post-training: the training ensemble and the judge learn from different preference folds
    assert ens["fold"] == 0
    judge = json.loads((out / "models/judge/ensemble.json").read_text())
    assert judge["fold"] == 1 and judge["kind"] == "bt-judge-ensemble" and len(judge["member_dirs"]) == 1
    assert judge["seed"] != ens["seed"]
    assert metrics["sampling"]["candidates"] == 4 * metrics["sampling"]["contexts"] > 0
    assert 0 < metrics["advantages"]["ess_share"] <= 1
    base_policy = metrics["policy_base"]["test"]
    assert abs(base_policy["kl_ref"]) < 1e-6 and abs(base_policy["ndcg@10"] - base["test"]["ndcg@10"]) < 1e-9
    assert set(metrics["posttrain"]) == {*methods, "asft@lam=0.5"}  # + the lambda sweep
    for m in methods:
        rep = metrics["posttrain"][m]["test"]
        for key in ("ndcg@10", "high_rated/ndcg@10", "judged_top10", "judged_top1", "true_top10", "true_top1",
                    "kl_ref", "entropy", "coverage@10", "popularity@10"):
            assert key in rep, (m, key)
        assert rep["kl_ref"] >= 0
        run = children[f"posttrain-{m}"]
        assert run.data.tags["method"] == m and run.info.status == "FINISHED"
        assert abs(run.data.metrics["test/judged_top10"] - rep["judged_top10"]) < 1e-9
        hist = client.get_metric_history(run.info.run_id, "valid/kl_ref")
        # KL to pi_ref tracked at every evaluation: pi_ref itself before the first update (step 0), each epoch
        assert sorted(x.step for x in hist) == [0, 1, 2]
        assert [x.value for x in hist if x.step == 0] == [0.0]
        assert (out / f"models/posttrain/{m}/best/model.safetensors").is_file()
    asft_plots = {Path(a.path).name for a in client.list_artifacts(children["posttrain-asft"].info.run_id, "plots")}
    assert {"weights_hist.png", "advantages_hist.png", "training_curves.png"} <= asft_plots
    parent_plots = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"methods_test.png", "frontier_judged_kl.png", "frontier_true_ndcg.png"} <= parent_plots
    lam_runs = [r for r in runs if r.data.tags.get("stage") == "posttrain-asft"]
    assert sorted(r.data.params["advantage.lam"] for r in lam_runs) == ["0.5", "1.5"]

    # lineage for audits: code version, packages, seeds, model file hashes; datasets in the DVC cache
    from asft import datastore
    from tasks.lineage import code_version, dvc_cache_dir

    assert parent.data.tags["code_version"] == code_version() == metrics["lineage"]["code_version"]
    assert parent.data.tags["env.torch"].startswith("2.13")
    lin = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "lineage")}
    assert {"environment.json", "seeds.json", "model_hashes.json"} <= lin
    hashes = json.loads((out / "lineage/model_hashes.json").read_text())
    assert "member_0/best/model.safetensors" in hashes["reward"] and "model.safetensors" in hashes["posttrain/asft"]
    for name, md5 in metrics["datasets"].items():
        assert datastore.missing(md5, dvc_cache_dir()) == []
        assert md5 in (out / "dvc" / f"{name}.dvc").read_text()

    # registry: the first model is champion (recommender and its reward model), reason logged
    assert metrics["promotion"]["alias"] == "champion"
    promo = metrics["promotion"]  # the product: the simulator and this catalog's fingerprint
    assert promo["recommender_model"] == f"asft-recommender-{promo['product']}" and promo["product"].startswith("simulator-")
    for name in (promo["recommender_model"], promo["reward_model"]):
        v = client.get_model_version_by_alias(name, "champion")
        assert v.run_id == parent.info.run_id and v.tags["promotion_reason"].startswith("no current champion")
    assert parent.data.tags["promotion.alias"] == "champion"


def test_retrain_reuses_cache_and_champion_base(prefect_server, isolated_runs, tmp_path, tiny_overrides):
    """Same data, params and code: every stage comes from the cache (verified, attributed to the source
    run), the base model from the registered champion; an identical model is not promoted."""
    from flows.retrain import retrain

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # two post-training methods: a candidate-based one (asft, the champion) and an on-policy one (grpo)
    ov = [*tiny_overrides, f"tracking.mlflow_uri={uri}", "tracking.experiment=flow-cache", "seed=11",
          "posttrain.methods=[asft,grpo]"]
    first = retrain(data="simulator", output=str(tmp_path / "a"), config=str(REPO / "params.yaml"), overrides=ov)
    second = retrain(data="simulator", output=str(tmp_path / "b"), config=str(REPO / "params.yaml"), overrides=ov)
    cache = second["lineage"]["cache"]
    assert cache["train-base"] == {"hit": True, "source_run_id": first["lineage"]["base_run_id"],
                                   "champion_base": True}
    for stage in ("ingest", "preprocess", "preferences", "train-reward", "train-judge", "sample", "score",
                  "advantages", "posttrain-asft", "posttrain-grpo"):
        assert cache[stage]["hit"], stage
        assert cache[stage]["out_dir"].startswith(str(tmp_path / "a")), stage
    assert not cache["evaluate-policies"]["hit"]
    assert (isolated_runs / ".work").is_dir()  # resumable work directories went to the test's runs/, not the repo's
    assert second["posttrain"]["asft"]["test"] == first["posttrain"]["asft"]["test"]
    assert (tmp_path / "b/models/base/best/model.safetensors").is_file()  # champion base downloaded
    assert second["promotion"]["alias"] == "challenger" and "judged reward" in second["promotion"]["reason"]

    client = MlflowClient(uri)
    runs = _runs(client, "flow-cache")
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == second["mlflow"]["parent_run_id"]]
    hits = {r.data.tags["stage"]: r for r in kids if r.data.tags.get("cache_hit") == "true"}
    assert hits["train-base"].data.tags["reused_champion_base"] == "true"
    src = client.get_run(hits["posttrain-asft"].data.tags["source_run_id"])
    assert src.data.tags["mlflow.parentRunId"] == first["mlflow"]["parent_run_id"]
    assert hits["posttrain-asft"].data.metrics["test/ndcg_at_10"] == second["posttrain"]["asft"]["test"]["ndcg@10"]
    assert client.get_model_version_by_alias(first["promotion"]["recommender_model"], "champion").run_id == \
        first["mlflow"]["parent_run_id"]


def test_retrain_flow_stops_at_validation(prefect_server, isolated_runs, tmp_path, tiny_overrides):
    """A malformed log stops the flow at load/validation: nothing trained, parent run FAILED."""
    from flows.retrain import retrain

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "interactions.csv").write_text("user_id,item_id,timestamp\nu1,i1,10\n,i2,11\nu1,i3,12\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "run"
    with pytest.raises(Exception) as ei:
        retrain(data=str(bad), output=str(out), config=None,
                overrides=[*tiny_overrides, f"tracking.mlflow_uri={uri}", "tracking.experiment=flow-bad"])
    assert "user_id" in str(ei.value)
    assert not (out / "models").exists()
    client = MlflowClient(uri)
    runs = _runs(client, "flow-bad")
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.status == "FAILED"
    assert not any(r.data.tags.get("stage") == "train-base" for r in runs)
    # the failure names the stage, on the parent run and in failure.json; nothing registered
    assert parent.data.tags["failed_stage"] == "ingest"
    failure = json.loads((out / "failure.json").read_text())
    assert failure["stage"] == "ingest" and "user_id" in failure["error"]
    assert client.search_registered_models() == []
