"""Full-catalogue evaluation, candidate sampling and reward scoring in memory-bounded chunks (issue 15):
the chunked results equal the unchunked ones on small data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asft.config import ModelConfig, load_config
from asft.data.preprocess import NUM_SPECIAL, ProcessedData, preprocess
from asft.evaluation import EVAL_COPIES, evaluate_table, rows_per_chunk
from asft.models.recommender import build_model
from asft.models.reward import RewardEnsemble, RewardModel, score_context_chunks, score_contexts
from asft.sampling import TrainContexts, sample_candidates, score_candidates
from asft.simulator import simulate

TINY_MB = 0.004  # a few kB: one or two rows per chunk at this catalogue


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = load_config(None, ["simulator.n_users=40", "simulator.n_items=50", "simulator.min_len=12",
                             "simulator.max_len=24", "preprocess.max_len=8", "preprocess.window_stride=4",
                             "sampling.n_candidates=4", "sampling.batch_size=16"])
    root = tmp_path_factory.mktemp("chunk")
    preprocess(simulate(cfg.simulator, seed=cfg.seed), cfg.preprocess, root / "p")
    data = ProcessedData.open(root / "p")
    model = build_model(ModelConfig(n_layer=1, n_head=1, n_embd=16, dropout=0.0), data.vocab.size, 8, seed=3).eval()
    members = []
    for k in range(2):
        torch.manual_seed(10 + k)
        m = RewardModel.from_base(model, head_init_scale=1.0).eval()
        with torch.no_grad():
            m.reward_bias.normal_()
        members.append(m)
    return cfg, data, model, members


def test_rows_per_chunk():
    assert rows_per_chunk(1000, None, 512) == 512
    assert rows_per_chunk(2**20, 10, 512) == 10
    assert rows_per_chunk(2**30, 1, 512) == 1  # never 0
    assert rows_per_chunk(10, 1024, 7) == 7
    # 100k items, 4 float32 copies per user: a 1 GB budget scores ~670 users at a time
    assert rows_per_chunk(EVAL_COPIES * 4 * 100_000, 1024, 10**6) == 671


@pytest.mark.parametrize("mask_history", [True, False])
def test_chunked_evaluation_equals_unchunked(setup, mask_history):
    _, data, model, _ = setup
    table = data.table("test")
    dense = evaluate_table(model, table, [5, 10], mask_history, batch_size=512, memory_mb=None)
    chunked = evaluate_table(model, table, [5, 10], mask_history, batch_size=512, memory_mb=TINY_MB)
    assert len(table) > 20
    np.testing.assert_array_equal(chunked.ranks, dense.ranks)
    assert chunked.metrics == pytest.approx(dense.metrics)


def test_chunked_candidate_sampling_and_scoring_equal_unchunked(setup):
    cfg, data, model, members = setup
    tc = TrainContexts.from_processed(data)
    big = cfg.sampling.model_copy(update={"memory_mb": 1024})
    small = cfg.sampling.model_copy(update={"memory_mb": 16})
    # force 1-2 windows per chunk: the budget check itself is exercised by test_rows_per_chunk
    from asft import sampling

    windows = list(range(0, len(tc.windows), 3))
    a = sample_candidates(model, tc, big, seed=5, windows=windows, progress=False)
    old = sampling.SAMPLE_COPIES
    try:
        sampling.SAMPLE_COPIES = 10 * 2**20 // (4 * tc.vocab_size * 9)  # ~1.5 windows per 16 MB
        b = sample_candidates(model, tc, small, seed=5, windows=windows, progress=False)
        assert len(a) == len(b) > 20
        np.testing.assert_array_equal(np.stack(a["candidates"]), np.stack(b["candidates"]))
        for col in ("ref_logp", "ref_logp_masked", "sample_logp", "sample_iw"):
            np.testing.assert_allclose(np.stack(a[col]), np.stack(b[col]), rtol=1e-5, atol=1e-6)
        sa = score_candidates(a, model, members, tc, big, kappa=1.0, progress=False)
        sb = score_candidates(a, model, members, tc, small, kappa=1.0, progress=False)
    finally:
        sampling.SAMPLE_COPIES = old
    for col in ("r_mean", "r_std", "r_pess"):
        np.testing.assert_allclose(np.stack(sa[col]), np.stack(sb[col]), rtol=1e-5, atol=1e-5)
    for col in ("logged_r_mean", "expected_r_mean", "expected_r_pess"):
        np.testing.assert_allclose(sa[col].to_numpy(), sb[col].to_numpy(), rtol=1e-5, atol=1e-5)


def test_chunked_reward_scoring_equals_dense(setup):
    _, data, _, members = setup
    contexts = [np.asarray(x, dtype=np.int64) for x in data.table("valid")["input"]]
    ens = RewardEnsemble(members, data.vocab, kappa=0.5, centring={"mean": 0.1, "std": 2.0})
    dense = score_contexts(members, contexts)
    chunks = list(score_context_chunks(members, contexts, memory_mb=TINY_MB))
    assert len(chunks) > 5
    np.testing.assert_allclose(np.concatenate([c for _, c in chunks], axis=1), dense, rtol=1e-5, atol=1e-5)
    full = ens.score_all(contexts, standardize=True)
    parts = list(ens.score_chunks(contexts, standardize=True, memory_mb=TINY_MB))
    assert [s for s, _ in parts] == [s for s, _ in chunks]
    np.testing.assert_allclose(np.concatenate([p.pessimistic for _, p in parts]), full.pessimistic, rtol=1e-5,
                               atol=1e-5)
    # only the entries needed: a few items per context
    rng = np.random.default_rng(0)
    items = rng.integers(NUM_SPECIAL, data.vocab.size, size=(len(contexts), 3))
    got = ens.score_items(contexts, items, standardize=True, memory_mb=TINY_MB)
    rows = np.arange(len(contexts))[:, None]
    for key in ("mean", "std", "pessimistic"):
        np.testing.assert_allclose(got[key], getattr(full, key)[rows, items], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["members"], full.members[:, rows, items], rtol=1e-5, atol=1e-5)
    # pairs: chunked over contexts, the same differences as from the dense scores
    idx = rng.integers(0, len(contexts), size=30)
    ch, rj = rng.integers(NUM_SPECIAL, data.vocab.size, size=(2, 30))
    pairs = ens.score_pairs(contexts, idx, ch, rj, memory_mb=TINY_MB)
    d = dense[:, idx, ch - NUM_SPECIAL] - dense[:, idx, rj - NUM_SPECIAL]
    np.testing.assert_allclose(pairs["members"], d, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pairs["mean"], d.mean(axis=0), rtol=1e-5, atol=1e-5)


def test_policy_scorer_chunked_equals_cached(setup):
    """Post-training's section-7 evaluation: with tables cached and one chunk, or recomputed chunk by
    chunk under a tiny budget, the same metrics and per-user values."""
    from asft.policy_eval import PolicyScorer

    _, data, model, members = setup
    ens = RewardEnsemble(members, data.vocab, kappa=0.5)
    judge = RewardEnsemble(members[::-1], data.vocab, kappa=1.0, centring={"mean": 0.2, "std": 1.5})
    policy = build_model(ModelConfig(n_layer=1, n_head=1, n_embd=16, dropout=0.0), data.vocab.size, 8, seed=9).eval()
    cached = PolicyScorer.build(data, "valid", model, [5, 10], reward_ens=ens, judge_ens=judge, memory_mb=None)
    chunked = PolicyScorer.build(data, "valid", model, [5, 10], reward_ens=ens, judge_ens=judge, memory_mb=0.02)
    assert cached.reward is not None and cached.ref_masked.numel() and cached.chunk == len(cached.inputs)
    assert chunked.reward is None and not chunked.ref_masked.numel() and 1 <= chunked.chunk < len(cached.inputs) / 3
    a, b = cached.evaluate(policy), chunked.evaluate(policy)
    assert set(a) == set(b) and {"kl_ref", "reward_top10", "judged_expected", "selection", "coverage@10"} <= set(a)
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
    pa, pb = cached.per_user(policy), chunked.per_user(policy)
    np.testing.assert_array_equal(pa["rank"], pb["rank"])
    np.testing.assert_allclose(pa["judged_top10"], pb["judged_top10"], rtol=1e-5, atol=1e-6)
