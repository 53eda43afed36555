"""Serving behaves like a service: the packaged pyfunc recommender and reward model answered through
MLflow's real scoring-server app (``mlflow.pyfunc.scoring_server.init``, in process): client errors
are HTTP 400 with the reason, a cold-start history gets the popularity fallback (flagged), unknown
ids are reported, batches answer row by row as single requests do."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from asft.config import ModelConfig

N_ITEMS, MAX_LEN, MAX_ROWS, MAX_HISTORY = 30, 6, 8, 20


@pytest.fixture(scope="module")
def raw_events() -> pd.DataFrame:
    """12 users over 30 items; item i{k} is drawn with weight ~ 1/(k+1), so popularity is skewed."""
    rng = np.random.default_rng(0)
    w = 1.0 / np.arange(1, N_ITEMS + 1)
    rows = []
    for u in range(12):
        items = rng.choice(N_ITEMS, size=int(rng.integers(6, 12)), replace=False, p=w / w.sum())
        rows += [(f"u{u}", f"i{it}", t, 3.0) for t, it in enumerate(items)]
    return pd.DataFrame({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                         "timestamp": np.array([r[2] for r in rows], dtype=np.int64),
                         "rating": np.array([r[3] for r in rows])})


@pytest.fixture(scope="module")
def served(raw_events, tmp_path_factory):
    """(processed dir, policy dir, reward dir, serving model dir) of a tiny untrained model."""
    from asft.config import PreprocessConfig
    from asft.data.preprocess import ItemVocab, preprocess
    from asft.data.schema import InteractionData
    from asft.models.recommender import build_model, save_recommender
    from tasks.registry import save_serving_model

    root = tmp_path_factory.mktemp("serving")
    preprocess(InteractionData(interactions=raw_events, source="test", format="generic"),
               PreprocessConfig(max_len=MAX_LEN, window_stride=0), root / "processed")
    vocab = ItemVocab.load(root / "processed" / "vocab.json")
    model = build_model(ModelConfig(n_layer=1, n_head=1, n_embd=16, dropout=0.0), vocab.size, MAX_LEN, seed=1)
    policy = save_recommender(model, vocab, root / "policy", {"max_len": MAX_LEN})
    path = save_serving_model("recommender", policy, root / "pyfunc", k=4, processed_dir=root / "processed",
                              max_rows=MAX_ROWS, max_history=MAX_HISTORY)
    return root / "processed", policy, path


@pytest.fixture(scope="module")
def client(served):
    import mlflow
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    with TestClient(scoring_server.init(mlflow.pyfunc.load_model(str(served[2])))) as c:
        yield c


def _post(client, records, key="dataframe_records"):
    r = client.post("/invocations", content=json.dumps({key: records}), headers={"Content-Type": "application/json"})
    return r.status_code, r.json()


def _popular_ranking(raw_events: pd.DataFrame, processed) -> list[str]:
    """Items by training-event count (each user's last two events are valid/test), ties in catalog order."""
    from asft.data.preprocess import ItemVocab

    counts = Counter()
    for _, g in raw_events.sort_values(["user_id", "timestamp"]).groupby("user_id"):
        counts.update(g["item_id"].tolist()[:-2])
    catalog = ItemVocab.load(processed / "vocab.json").items
    assert counts.most_common(1)[0][1] > 2 and len(set(counts.values())) > 3  # a ranking worth checking
    return sorted(catalog, key=lambda i: (-counts[i], catalog.index(i)))


def test_client_errors_are_400_with_the_reason(client):
    for bad_k in (-1, 0, 2.5):
        status, body = _post(client, [{"history": ["i1", "i2"], "k": bad_k}])
        assert status == 400 and "k must be an integer >= 1" in body["message"], (bad_k, body)
        assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    status, body = _post(client, [{"history": ["i1"], "k": 3}, {"history": ["i2"], "k": -4}])
    assert status == 400 and "rows [1]" in body["message"] and "-4" in body["message"]
    status, body = _post(client, [{"history": ["i1"], "k": "abc"}])  # refused by the signature
    assert status == 400 and "k" in body["message"]
    for history in (5, "i1 i2", None):  # not a list of ids
        status, body = _post(client, [{"history": history}])
        assert status == 400 and "history" in body["message"], (history, body)
    status, body = _post(client, [{"k": 3}])
    assert status == 400 and "history" in body["message"]
    status, body = _post(client, [{"history": ["i1"]}] * (MAX_ROWS + 1))
    assert status == 400 and f"at most {MAX_ROWS}" in body["message"]
    status, body = _post(client, [{"history": ["i1"]}, {"history": ["i2"] * (MAX_HISTORY + 1)}])
    assert status == 400 and "rows [1]" in body["message"] and f"longer than {MAX_HISTORY}" in body["message"]
    # dataframe_split requests are checked the same way
    status, body = _post(client, {"columns": ["history", "k"], "data": [[["i1"], -2]]}, key="dataframe_split")
    assert status == 400 and "k must be an integer >= 1" in body["message"]


def test_cold_start_gets_the_popular_fallback(client, raw_events, served):
    ranking = _popular_ranking(raw_events, served[0])
    status, body = _post(client, [{"history": [], "k": 5}, {"history": ["zz", "yy"], "k": 3}, {"history": ["zz"]}])
    assert status == 200
    empty, unknown, default_k = body["predictions"]
    assert empty == {**empty, "items": ranking[:5], "fallback": "popular", "unknown_items": []}
    assert unknown["items"] == ranking[:3] and unknown["unknown_items"] == ["zz", "yy"]
    assert unknown["fallback"] == "popular" and len(default_k["items"]) == 4  # the packaged default k
    assert empty["scores"] == sorted(empty["scores"], reverse=True) and all(s < 0 for s in empty["scores"])
    # the scores are smoothed log-popularities: exp sums to 1 over the catalog
    status, body = _post(client, [{"history": [], "k": 1000}])
    full = body["predictions"][0]
    assert full["items"] == ranking and np.exp(full["scores"]).sum() == pytest.approx(1.0, abs=1e-9)


def test_known_and_unknown_items_and_batches(client, served):
    from asft.serving import Recommender

    rec = Recommender.load(served[1], memory_mb=1e-6)  # the raw model, one history at a time
    status, body = _post(client, [{"history": ["i3", "zz", "i1"], "k": 5}])
    assert status == 200
    (pred,) = body["predictions"]
    direct = rec.recommend([["i3", "i1"]], k=5)[0]
    assert pred["unknown_items"] == ["zz"] and pred["fallback"] is None
    assert pred["items"] == direct.items and np.allclose(pred["scores"], direct.scores, atol=1e-6)
    assert not {"i3", "i1"} & set(pred["items"])

    rows = [{"history": ["i1", "i2"], "k": 3}, {"history": ["nope"], "k": 2}, {"history": ["i5"]},
            {"history": ["i7", "i8", "i9", "i10", "i11", "i12", "i13", "i14"], "k": 6}]  # longer than max_len
    status, body = _post(client, rows)
    assert status == 200 and [len(p["items"]) for p in body["predictions"]] == [3, 2, 4, 6]
    assert [p["fallback"] for p in body["predictions"]] == [None, "popular", None, None]
    for row, pred in zip(rows, body["predictions"]):  # a batch answers each row as a single request does
        _, single = _post(client, [row])
        assert single["predictions"][0]["items"] == pred["items"]
        assert np.allclose(single["predictions"][0]["scores"], pred["scores"], atol=1e-5)


def test_reward_model_refuses_unknown_candidates(served, tmp_path):
    import mlflow
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    from asft.data.preprocess import ItemVocab
    from asft.models.recommender import VOCAB_FILE, load_recommender
    from asft.models.reward import ENSEMBLE_FILE, RewardModel, save_reward_model
    from tasks.registry import save_serving_model

    base, _, _ = load_recommender(served[1])
    member = RewardModel.from_base(base, head_init_scale=1.0, rating_head=False, rating_mean=3.0).eval()
    save_reward_model(member, ItemVocab.load(served[1] / VOCAB_FILE), tmp_path / "ens" / "member_0" / "best")
    (tmp_path / "ens" / ENSEMBLE_FILE).write_text(json.dumps(
        {"member_dirs": ["member_0/best"], "kappa": 1.0, "centring": {"mean": 0.0, "std": 1.0}}))
    path = save_serving_model("reward", tmp_path / "ens", tmp_path / "reward", max_rows=MAX_ROWS)
    with TestClient(scoring_server.init(mlflow.pyfunc.load_model(str(path)))) as c:
        status, body = _post(c, [{"history": ["i1", "i2"], "items": ["i3", "i4"]}])
        assert status == 200 and len(body["predictions"][0]["mean"]) == 2
        status, body = _post(c, [{"history": ["i1"], "items": ["i3"]}, {"history": ["i1"], "items": ["i3", "nope"]}])
        assert status == 400 and "rows [1]" in body["message"] and "nope" in body["message"]
        status, body = _post(c, [{"history": ["zz"], "items": ["i3"]}])
        assert status == 400 and "no item from the reward model's catalog" in body["message"]
        status, body = _post(c, [{"history": ["i1"]}])
        assert status == 400 and "items" in body["message"]
    from asft.serving import RewardScorer

    scorer = RewardScorer.load(tmp_path / "ens")
    hist, cands = [["i1", "i2"], ["i3"], ["i4", "zz", "i5"]], [["i6", "i7"], ["i8"], []]
    whole = scorer.score(hist, cands)
    scorer.memory_mb = 1e-6  # one row at a time: the same scores
    rows = scorer.score(hist, cands)
    assert [len(r["mean"]) for r in whole] == [2, 1, 0]
    for a, b in zip(whole, rows):
        for key in ("mean", "std", "pessimistic"):
            assert np.allclose(a[key], b[key], atol=1e-5)


def test_packaged_model(served, raw_events, tmp_path):
    import mlflow

    from asft.serving import POPULARITY_FILE, Popularity, Recommender, ServingInputError
    from tasks.registry import save_serving_model, serving_signature

    processed, policy, path = served
    assert not list(path.rglob("*.pkl"))  # models-from-code: no pickle
    model = mlflow.pyfunc.load_model(str(path))
    mlmodel = mlflow.models.Model.load(str(path))
    example = mlmodel.load_input_example(str(path))  # saved with it: a request the model answers
    assert [c.name for c in mlmodel.signature.inputs.inputs] == ["history", "k"]
    assert len(example["history"][0]) == 5 and len(model.predict(example)["items"][0]) == int(example["k"][0])
    pred = model.predict(pd.DataFrame({"history": [["i1", "i2"], ["i5"]], "k": [3, 2]}))
    assert [len(x) for x in pred["items"]] == [3, 2]
    pred = model.predict(pd.DataFrame({"history": [["i1", "i2"], ["i3", "i4"]]}))  # default k
    assert [len(x) for x in pred["items"]] == [4, 4] and not {"i3", "i4"} & set(pred["items"][1])
    with pytest.raises(mlflow.exceptions.MlflowException, match="k must be") as err:
        model.predict(pd.DataFrame({"history": [["i1"]], "k": [0]}))
    assert err.value.get_http_status_code() == 400

    pop = Popularity.load(path / "artifacts" / POPULARITY_FILE)
    assert pop.items == _popular_ranking(raw_events, processed) and list(pop.counts) == sorted(pop.counts, reverse=True)
    assert [c.name for c in serving_signature("recommender").outputs.inputs][-1] == "fallback"
    meta = json.loads(json.dumps(__import__("mlflow").models.Model.load(str(path)).metadata))
    assert "popular" in meta["description"] and f"At most {MAX_ROWS} rows" in meta["description"]
    with pytest.raises(ValueError, match="processed_dir"):
        save_serving_model("recommender", policy, tmp_path / "x")
    with pytest.raises(ServingInputError, match=r"rows \[1\].*no popularity fallback"):
        Recommender.load(policy).recommend([["i1"], ["zz"]])  # no fallback packaged: refused, not a crash
