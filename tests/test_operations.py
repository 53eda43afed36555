"""Production-operation pieces in isolation: the promotion gate, the DVC cache store, retry
classification, stage cache keys, serving, audit comparison, the comparison table and deployments."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from asft import datastore
from asft.config import ModelConfig, load_config
from asft.promotion import promotion_decision
from asft.utils import dvc_md5

REPO = Path(__file__).resolve().parents[1]


# -- promotion gate ---------------------------------------------------------------------------------
def test_gate_first_model_is_champion():
    d = promotion_decision({"ndcg@10": 0.2, "judged_top10": 0.1}, None, 0.01)
    assert d.promote and d.alias == "champion" and d.reason == "no current champion"


@pytest.mark.parametrize("new, promote, words", [
    ({"ndcg@10": 0.30, "judged_top10": 0.6}, True, ">="),          # better on both
    ({"ndcg@10": 0.295, "judged_top10": 0.6}, True, ">="),         # NDCG within the 0.01 tolerance
    ({"ndcg@10": 0.28, "judged_top10": 0.9}, False, "NDCG@10"),    # NDCG below champion - tolerance
    ({"ndcg@10": 0.35, "judged_top10": 0.5}, False, "judged"),     # judged reward not better (equal)
    ({"ndcg@10": 0.10, "judged_top10": 0.1}, False, "; "),         # both fail: both reasons
])
def test_gate_checks(new, promote, words):
    d = promotion_decision(new, {"ndcg@10": 0.30, "judged_top10": 0.5}, ndcg_tolerance=0.01)
    assert d.promote is promote and d.alias == ("champion" if promote else "challenger")
    assert words in d.reason


def test_gate_margin_and_missing_metric():
    champ = {"ndcg@10": 0.3, "judged_top10": 0.5}
    assert not promotion_decision({"ndcg@10": 0.3, "judged_top10": 0.55}, champ, 0.0, judged_margin=0.1).promote
    with pytest.raises(KeyError, match="judged_top10"):
        promotion_decision({"ndcg@10": 0.3}, champ, 0.01)


# -- DVC cache store ------------------------------------------------------------------------------------
def test_datastore_roundtrip_and_dvc_checkout(tmp_path):
    src = tmp_path / "ds"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha")
    (src / "sub" / "b.bin").write_bytes(b"\x00\x01" * 100)
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "-q"], cwd=repo, check=True)
    cache = repo / ".dvc" / "cache"
    md5 = datastore.commit(src, cache)
    assert md5 == dvc_md5(src) and datastore.missing(md5, cache) == []
    back = datastore.checkout(md5, cache, tmp_path / "back")
    assert (back / "sub" / "b.bin").read_bytes() == b"\x00\x01" * 100
    # DVC itself checks the dataset out of that cache from a .dvc pointer
    datastore.pointer_file(md5, "ds", repo / "ds.dvc")
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "checkout", "-q"], cwd=repo, check=True)
    assert (repo / "ds" / "a.txt").read_text() == "alpha"
    # a lost object makes the version unretrievable, and checkout says so
    obj = datastore.object_path(cache, dvc_md5(src / "a.txt"))
    obj.chmod(0o644)
    obj.unlink()
    assert datastore.missing(md5, cache) == [dvc_md5(src / "a.txt")]
    with pytest.raises(FileNotFoundError, match="incomplete"):
        datastore.checkout(md5, cache, tmp_path / "again")


# -- retries ----------------------------------------------------------------------------------------------
def test_transient_errors_are_retried_others_are_not():
    from mlflow.exceptions import MlflowException, RestException

    from asft.data.validation import DataValidationError
    from tasks.stages import is_transient

    assert is_transient(ConnectionError("refused")) and is_transient(TimeoutError()) and is_transient(OSError(5, "EIO"))
    assert is_transient(MlflowException("API request to http://x failed with exception; max retries exceeded"))
    assert is_transient(RestException({"error_code": "INTERNAL_ERROR", "message": "boom"}))
    assert not is_transient(RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad"}))
    assert not is_transient(FileNotFoundError("gone")) and not is_transient(ValueError("bad"))
    assert not is_transient(DataValidationError.__new__(DataValidationError))
    wrapped = RuntimeError("stage failed")
    wrapped.__cause__ = ConnectionResetError()
    assert is_transient(wrapped)


# -- stage cache keys ---------------------------------------------------------------------------------------
def test_stage_keys_follow_inputs_params_and_code(tmp_path):
    from asft.pipeline import get_stage, stage_params
    from tasks.lineage import task_key

    base, post = get_stage("train-base"), get_stage("posttrain")
    d = tmp_path / "processed"
    d.mkdir()
    (d / "x.parquet").write_bytes(b"v1")
    cfg = load_config(REPO / "params.yaml")
    key = task_key(base, cfg, {"processed_dir": str(d)})
    assert key == task_key(base, cfg, {"processed_dir": str(d)})
    assert key.startswith("train-base-")
    # params the stage declares change the key; others, tracking and the registry do not
    assert task_key(base, load_config(REPO / "params.yaml", ["train.lr=0.01"]), {"processed_dir": str(d)}) != key
    for other in ("posttrain.train.lr=0.01", "tracking.experiment=x", "registry.ndcg_tolerance=0.5"):
        assert task_key(base, load_config(REPO / "params.yaml", [other]), {"processed_dir": str(d)}) == key
    assert set(stage_params(base, cfg.to_dict())) == {"seed", "model", "train", "preprocess.max_len", "eval"}
    assert not any(k in ("posttrain", "posttrain.methods") for k in stage_params(post, cfg.to_dict()))
    methods = load_config(REPO / "params.yaml", ["posttrain.methods=[asft]"])
    assert task_key(post, methods, {}, {"method": "asft"}) == task_key(post, cfg, {}, {"method": "asft"})
    # new data -> new key; the method is part of a post-training key
    (d / "x.parquet").write_bytes(b"v2")
    assert task_key(base, cfg, {"processed_dir": str(d)}) != key
    assert task_key(post, cfg, {}, {"method": "asft"}) != task_key(post, cfg, {}, {"method": "sft"})


# -- serving ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    from asft.data.preprocess import ItemVocab
    from asft.models.recommender import build_model, save_recommender

    vocab = ItemVocab(items=[f"m{i}" for i in range(30)])
    model = build_model(ModelConfig(n_layer=1, n_head=1, n_embd=16, dropout=0.0), vocab.size, 8, seed=3)
    return save_recommender(model, vocab, tmp_path_factory.mktemp("rec") / "best", {"max_len": 8})


def test_recommender_top_k(saved_model):
    from asft.serving import Recommender

    rec = Recommender.load(saved_model)
    out = rec.recommend([["m1", "m2", "m3"], ["m4", "zzz"]], k=5)
    assert len(out[0].items) == 5 and not {"m1", "m2", "m3"} & set(out[0].items)
    assert out[0].scores == sorted(out[0].scores, reverse=True) and out[1].unknown_items == ["zzz"]
    long = [f"m{i % 30}" for i in range(40)]  # longer than max_len: the tail is used
    assert rec.recommend([long], k=3, exclude_history=False)[0].items == rec.recommend([long[-8:]], k=3,
                                                                                      exclude_history=False)[0].items
    with pytest.raises(ValueError, match=r"rows \[0\]"):
        rec.recommend([["nope"]])


# The packaged pyfunc model (signature, input example, cold-start fallback, HTTP errors through the
# scoring server) is tested in tests/test_serving.py.


# -- audit comparison ------------------------------------------------------------------------------------------
def test_audit_compare_metrics_exact_and_ignores_volatile():
    from ops.audit import compare_metrics

    a = {"output_dir": "/r/a", "models": {"base": {"test": {"ndcg@10": 0.25}, "train": {"train_seconds": 3.0}}},
         "timings_s": {"x": 1.0}, "dataset": {"docs": "/r/a/reports/gx"}, "sampling": {"candidates_per_s": 9.0}}
    b = {"output_dir": "/r/b", "models": {"base": {"test": {"ndcg@10": 0.25}, "train": {"train_seconds": 9.0}}},
         "timings_s": {"x": 2.0}, "dataset": {"docs": "/r/b/reports/gx"}, "sampling": {"candidates_per_s": 1.0}}
    assert compare_metrics(a, b)["mismatched"] == []
    b["models"]["base"]["test"]["ndcg@10"] = 0.25 + 1e-12
    assert [m["key"] for m in compare_metrics(a, b)["mismatched"]] == ["models/base/test/ndcg@10"]


# -- comparison table -------------------------------------------------------------------------------------------
def test_comparison_table_rows_per_run_and_method(tmp_path):
    from ops.compare import comparison_table

    def run(name, ndcg):
        return SimpleNamespace(
            info=SimpleNamespace(run_name=name, run_id=name + "-id", start_time=1_700_000_000_000),
            data=SimpleNamespace(metrics={"posttrain/asft/test/ndcg_at_10": ndcg, "posttrain/base/test/ndcg_at_10": .2,
                                          "posttrain/asft/valid/ndcg_at_10": 0.9},
                                 tags={"dvc.processed.md5": "abcdef123.dir", "promotion.alias": "champion"},
                                 params={"posttrain.champion_method": "asft"}))

    t = comparison_table([run("r1", 0.3), run("r2", 0.25)], "test", ("ndcg@10", "judged_top10"))
    assert list(t["method"]) == ["base", "asft", "base", "asft"]
    assert t.loc[1, "ndcg@10"] == 0.3 and t.loc[1, "alias"] == "champion" and t.loc[0, "alias"] == ""
    assert t["judged_top10"].isna().all() and t.loc[0, "dataset"] == "abcdef12"
    from asft.plots import run_method_bars

    png = run_method_bars(t, ("ndcg@10", "judged_top10"), tmp_path / "c.png", "runs")
    assert png.stat().st_size > 5_000


# -- deployments ----------------------------------------------------------------------------------------------------
def test_prefect_yaml_defines_weekly_cpu_and_gpu_deployments():
    from flows.deploy import deployment_specs

    specs = deployment_specs()
    weekly = specs["retrain-weekly"]
    assert weekly["schedules"][0]["cron"] == "0 3 * * 1" and weekly["work_pool"]["name"] == "asft-cpu"
    assert specs["retrain-weekly-gpu"]["work_pool"]["name"] == "asft-gpu"
    path, fn = weekly["entrypoint"].split(":")
    assert f"def {fn}(" in (REPO / path).read_text()


@pytest.mark.slow  # the session's Prefect server takes 5-11 s to start
def test_stage_task_retries_transient_errors_only(prefect_server):
    from prefect import flow, task

    from tasks.stages import RELIABILITY

    calls = {"io": 0, "bad": 0}

    @task(name="flaky-io", **{**RELIABILITY, "retry_delay_seconds": 0})
    def flaky() -> dict:
        calls["io"] += 1
        if calls["io"] < 2:
            raise ConnectionError("tracking server unreachable")
        return {"ok": 1}

    @task(name="bad-data", **{**RELIABILITY, "retry_delay_seconds": 0})
    def bad() -> dict:
        calls["bad"] += 1
        raise ValueError("interactions.csv, column user_id: 1 null")

    @flow
    def pipeline() -> dict:
        res = flaky()
        with pytest.raises(ValueError, match="user_id"):
            bad()
        return res

    assert pipeline() == {"ok": 1}
    assert calls == {"io": 2, "bad": 1}  # the I/O error was retried once, the data error never
