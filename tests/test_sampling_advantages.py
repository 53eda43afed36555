"""Candidate sampling (without replacement, history masked, top-k/top-p, seeded), KV-cache slates,
training-context bookkeeping, the advantage/weight registries and DPO pair selection."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from asft.advantages import BASELINES, advantages, compute_weights, register_baseline, weight_stats
from asft.config import AdvantageConfig, ConfigError, load_config
from asft.models.recommender import build_model
from asft.posttrain import preference_pairs
from asft.sampling import (
    TrainContexts,
    batch_generator,
    filter_logits,
    gumbel_topk,
    history_mask,
    inclusion_weights,
    sample_slates,
    slate_logprobs,
)

V = 4 + 12


def test_gumbel_topk_distinct_unmasked_and_matches_first_draw_distribution():
    z = torch.tensor([[2.0, 1.0, 0.0, float("-inf"), -1.0]])
    g = batch_generator(0, 1)
    draws = torch.stack([gumbel_topk(z, 3, g)[0] for _ in range(4000)])
    assert all(len(set(d.tolist())) == 3 for d in draws[:200])  # without replacement
    assert not (draws == 3).any()  # a masked item is never drawn
    freq = torch.bincount(draws[:, 0], minlength=5).float() / len(draws)
    p = torch.softmax(z[0], 0)
    assert torch.allclose(freq, p, atol=0.03)  # the first draw follows softmax(z)
    with pytest.raises(ValueError, match="only 4 items"):
        gumbel_topk(z, 5, g)


def test_inclusion_weights_make_without_replacement_sums_unbiased():
    """sum_{a in S} p(a)/P(a in S) f(a) over Gumbel top-k samples S estimates E_p[f]; the plain mean
    over S is biased towards unlikely items (the sample is flatter than p)."""
    z = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))[None].repeat(20000, 1)
    f = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    idx, kappa = gumbel_topk(z, 2, batch_generator(0, 9), return_threshold=True)
    w = inclusion_weights(z, idx, kappa)
    est = (w * f[idx]).sum(1).mean().item()
    exact = float((torch.softmax(z[0], 0) * f).sum())
    assert est == pytest.approx(exact, rel=0.02)
    assert f[idx].mean().item() > exact + 0.2  # the naive mean over the sample is biased
    # at most n items can be drawn: all are included surely, weights are the probabilities
    z2 = torch.tensor([[0.0, float("-inf"), 0.0]])
    i2, k2 = gumbel_topk(z2, 2, batch_generator(0, 1), return_threshold=True)
    assert torch.allclose(inclusion_weights(z2, i2, k2), torch.tensor([[0.5, 0.5]]))


def test_sample_weights_enter_baselines_and_weights():
    r = np.array([[1.0, 3.0]])
    sw = np.array([[3.0, 1.0]])  # candidate 0 carries 3/4 of the mass
    np.testing.assert_allclose(advantages(r, "mean", sample_weights=sw), [[1 - 1.5, 3 - 1.5]])
    w = compute_weights(r, AdvantageConfig(standardize=False), baseline="none", transform="ones", sample_weights=sw)
    np.testing.assert_allclose(w.weights, [[1.5, 0.5]])  # lambda -> infinity: weights follow pi_ref's mass
    sm = compute_weights(r, AdvantageConfig(standardize=False, lam=1.0), baseline="mean", transform="softmax",
                         sample_weights=sw).weights
    e = np.array([0.75 * np.exp(-0.5), 0.25 * np.exp(1.5)])
    np.testing.assert_allclose(sm, [2 * e / e.sum()])


def test_sampling_is_seeded():
    z = torch.randn(6, 20)
    a = gumbel_topk(z, 4, batch_generator(7, 3))
    b = gumbel_topk(z, 4, batch_generator(7, 3))
    c = gumbel_topk(z, 4, batch_generator(8, 3))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_filter_logits_specials_history_top_k_top_p():
    logits = torch.tensor([[9.0, 9.0, 9.0, 9.0, 4.0, 3.0, 2.0, 1.0]])
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask[0, 5] = True
    z = filter_logits(logits, mask)
    assert torch.isinf(z[0, :4]).all() and torch.isinf(z[0, 5]) and torch.isfinite(z[0, [4, 6, 7]]).all()
    z = filter_logits(logits, None, top_k=2)
    assert torch.isfinite(z[0]).sum() == 2 and torch.isfinite(z[0, [4, 5]]).all()
    p = torch.softmax(logits[0, 4:], 0)  # ~ [0.64, 0.24, 0.09, 0.03]
    z = filter_logits(logits, None, top_p=0.8)
    assert torch.isfinite(z[0]).sum() == 2 and p[0] < 0.8 <= p[:2].sum()
    z = filter_logits(logits, None, top_p=0.1, min_keep=3)  # never fewer than the candidates asked for
    assert torch.isfinite(z[0]).sum() == 3
    z = filter_logits(logits, None, temperature=2.0)
    assert z[0, 4].item() == pytest.approx(2.0)


def test_history_mask_is_causal_and_includes_items_before_the_window():
    ids = torch.tensor([[5, 6, 5, 7]])
    m = history_mask(ids, V, [np.array([9])])
    assert m[0, 0, 5] and not m[0, 0, 6] and m[0, 1, 6] and not m[0, 2, 7] and m[0, 3, 7]
    assert m[0, :, 9].all() and not m[0, :, 10].any()


def test_train_contexts_offsets_from_processed(tmp_path):
    from asft.data.preprocess import ProcessedData, preprocess
    from asft.simulator import simulate

    cfg = load_config(None, ["simulator.n_users=12", "simulator.n_items=60", "simulator.min_len=20",
                             "simulator.max_len=40", "preprocess.max_len=8", "preprocess.window_stride=4"])
    preprocess(simulate(cfg.simulator, 1), cfg.preprocess, tmp_path / "p")
    data = ProcessedData.open(tmp_path / "p")
    tc = TrainContexts.from_processed(data)
    for i, w in enumerate(tc.windows):
        seq = tc.items_of[tc.user[i]]
        assert np.array_equal(seq[tc.start[i] : tc.start[i] + len(w)], w)
        for p in tc.positions(i):
            nxt = tc.next_items(i, p, 3)
            assert np.array_equal(nxt, seq[tc.start[i] + p + 1 : min(tc.start[i] + p + 4, len(seq) - 2)])
    # every training target is a context exactly once
    assert tc.n_contexts() == data.stats["train_events"] - data.stats["users"]


def test_kv_cache_slates_match_full_recompute():
    cfg = load_config(None, ["model.n_layer=2", "model.n_head=2", "model.n_embd=16", "model.dropout=0"])
    model = build_model(cfg.model, V, 12, seed=0).eval()
    ctx = [np.array([5, 6, 7]), np.array([8, 9, 10, 11, 12, 13]), np.array([4])]
    slates, lp = sample_slates(model, ctx, 4, batch_generator(0, 0))
    assert slates.shape == (3, 4)
    for c, s in zip(ctx, slates):
        assert len(set(s.tolist())) == 4 and not set(s.tolist()) & set(c.tolist()) and (s >= 4).all()
    np.testing.assert_allclose(lp, slate_logprobs(model, ctx, slates), atol=1e-5)
    greedy, _ = sample_slates(model, ctx, 4, greedy=True)
    assert np.array_equal(greedy, sample_slates(model, ctx, 4, greedy=True)[0])


# ---------------------------------------------------------------------------- advantages and weights
R = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 3.0]])


def test_baselines_hand_values():
    np.testing.assert_allclose(advantages(R, "mean"), [[-1, 0, 1], [-1, -1, 2]])
    np.testing.assert_allclose(advantages(R, "loo"), [[1 - 2.5, 2 - 2, 3 - 1.5], [0 - 1.5, 0 - 1.5, 3 - 0]])
    np.testing.assert_allclose(advantages(R, "expectation", expectation=np.array([1.5, 0.5])),
                               [[-0.5, 0.5, 1.5], [-0.5, -0.5, 2.5]])
    np.testing.assert_allclose(advantages(R, "global_mean"), R - 1.5)
    a = advantages(R, "mean", standardize=True)
    assert a.std() == pytest.approx(1.0)
    # extra (logged) columns use the sampled candidates' baseline
    np.testing.assert_allclose(advantages(np.array([[1.0, 3.0, 10.0]]), "mean", n_sampled=2), [[-1, 1, 8]])
    with pytest.raises(ValueError, match="unknown baseline"):
        advantages(R, "median")
    with pytest.raises(ValueError, match="non-finite"):
        advantages(np.array([[1.0, np.nan]]), "mean")


def test_weight_transforms_hand_values():
    cfg = AdvantageConfig(lam=0.5, standardize=False, w_max=5.0)
    w = compute_weights(R, cfg, baseline="mean", transform="exp")
    raw = np.minimum(np.exp(np.array([[-1, 0, 1], [-1, -1, 2]]) / 0.5), 5.0)
    np.testing.assert_allclose(w.weights, raw / raw.mean())
    assert w.stats["clipped_share"] == pytest.approx(2 / 6)  # exp(2) and exp(4) > 5
    s = compute_weights(R, cfg, baseline="mean", transform="softmax").weights
    np.testing.assert_allclose(s.sum(axis=1), [3, 3])
    e = np.exp(np.array([-1, 0, 1]) / 0.5)
    np.testing.assert_allclose(s[0], 3 * e / e.sum())
    t = compute_weights(R, cfg.model_copy(update={"top_q": 0.34}), baseline="none", transform="top_q").weights
    # ceil(0.34 * 3) = 2 kept per context; ties keep the earlier candidate
    np.testing.assert_allclose(t > 0, [[False, True, True], [True, False, True]])
    lin = compute_weights(np.array([[1.0, 5.0]]), cfg, baseline="none", transform="linear").weights
    np.testing.assert_allclose(lin, [[1 / 3, 5 / 3]])  # w = r, mean 1
    ones = compute_weights(R, cfg, baseline="mean", transform="ones").weights
    assert (ones == 1).all()


def test_weight_stats_effective_sample_size():
    st = weight_stats(np.array([1.0, 1.0, 1.0, 1.0]), np.zeros(4, bool))
    assert st["ess"] == 4 and st["ess_share"] == 1
    st = weight_stats(np.array([4.0, 0.0, 0.0, 0.0]), np.array([True, False, False, False]))
    assert st["ess"] == 1 and st["zero_share"] == 0.75 and st["clipped_share"] == 0.25


def test_registering_a_baseline_is_one_function():
    @register_baseline("max_test")
    def _max(r, n, expectation, sw):
        return np.broadcast_to(r.max(axis=1, keepdims=True), r.shape)

    try:
        np.testing.assert_allclose(advantages(R, "max_test"), [[-2, -1, 0], [-3, -3, 0]])
    finally:
        BASELINES.pop("max_test")


def test_dpo_pairs_need_non_overlapping_intervals():
    frame = pd.DataFrame({"window": [0, 0], "pos": [0, 1],
                          "candidates": [np.array([5, 6, 7, 8]), np.array([5, 6, 7, 8])],
                          "r_mean": [np.array([1.0, 0.0, 0.5, -1.0]), np.array([0.1, 0.0, 0.05, -0.1])],
                          "r_std": [np.array([0.1, 0.1, 0.1, 0.1]), np.array([0.5, 0.5, 0.5, 0.5])],
                          "ref_logp": [np.array([-1.0, -2.0, -3.0, -4.0])] * 2})
    pairs = preference_pairs(frame, z=1.0, per_context=2)
    # context 0: best 5 (1.0) vs worst 8 (-1.0) kept; 7 (0.5) vs 6 (0.0): 0.4 > 0.1 kept; context 1: overlap
    assert pairs[["chosen", "rejected"]].values.tolist() == [[5, 8], [7, 6]]
    assert pairs["ref_w"].tolist() == [-1.0, -3.0] and pairs["ref_l"].tolist() == [-4.0, -2.0]


def test_config_guards():
    with pytest.raises(ConfigError, match="judge.fold"):
        load_config(None, ["judge.fold=0"])
    with pytest.raises(ConfigError, match="unknown post-training"):
        load_config(None, ["posttrain.methods=[asft, ppo]"])
    with pytest.raises(ConfigError, match="top_k"):
        load_config(None, ["sampling.top_k=3"])
    assert math.isclose(load_config(None, ["advantage.lam=0.5"]).advantage.lam, 0.5)
