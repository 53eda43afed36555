"""Reward-model training and scoring on length buckets: contexts of similar length are padded together,
and the results (hidden states, losses, gradients, catalog scores) are those of the whole padded batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asft.config import ModelConfig
from asft.data.preprocess import NUM_SPECIAL, ItemVocab
from asft.evaluation import pad_right
from asft.losses import bradley_terry_loss, squared_error_loss
from asft.models.recommender import build_model
from asft.models.reward import RewardModel, bucket_contexts, length_order_chunks, score_contexts
from asft.training.reward import (
    MAX_BUCKETS,
    ContextGroup,
    collate_groups,
    group_deltas,
    make_reward_loss,
    n_buckets,
)

VOCAB = ItemVocab(items=[f"i{k}" for k in range(20)])  # vocab size 24


def _contexts(n: int, seed: int = 0, max_len: int = 12) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(NUM_SPECIAL, VOCAB.size, size=int(rng.integers(1, max_len + 1))) for _ in range(n)]


def _groups(n: int, seed: int = 0) -> list[ContextGroup]:
    rng = np.random.default_rng([seed, 1])
    out = []
    for ctx in _contexts(n, seed):
        k = int(rng.integers(1, 4))
        items = rng.choice(np.arange(NUM_SPECIAL, VOCAB.size), size=2 * k, replace=False)
        rated = np.unique(items[: int(rng.integers(0, 2 * k + 1))])
        out.append(ContextGroup(ctx, items[:k], items[k:], rated, rng.uniform(1, 5, size=len(rated))))
    return out


def _reward_model(kind: str = "gpt2", rating: bool = True) -> RewardModel:
    base = build_model(ModelConfig(backbone=kind, n_layer=2, n_head=2, n_embd=16, dropout=0.0), VOCAB.size, 12,
                       seed=3)
    torch.manual_seed(0)
    m = RewardModel.from_base(base, head_init_scale=1.0, rating_head=rating, rating_mean=3.0)
    with torch.no_grad():  # a non-trivial head, so rewards and ratings depend on every part of the model
        m.reward_bias.normal_()
        if rating:
            m.rating_proj.weight.normal_(std=0.3)
            m.rating_bias.normal_()
    return m.eval()


@pytest.mark.parametrize("lengths, n", [([5, 1, 3, 3, 9, 2, 7], 3), ([4, 4, 4], 5), ([2], 1), ([], 4),
                                         ([3, 1, 2], 0)])
def test_length_order_chunks_partition_sorted_by_length(lengths, n):
    chunks = length_order_chunks(np.array(lengths, dtype=np.int64), n)
    flat = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
    assert sorted(flat.tolist()) == list(range(len(lengths)))  # every context exactly once
    assert len(chunks) <= max(1, n) and all(len(c) for c in chunks)
    ordered = np.array(lengths)[flat]
    assert (np.diff(ordered) >= 0).all()  # shortest first, across chunk boundaries too
    if chunks:
        assert max(map(len, chunks)) - min(map(len, chunks)) <= 1  # (nearly) equal counts


def test_bucket_contexts_restore_the_input_order():
    ctxs = _contexts(37, seed=4)
    lb = bucket_contexts(ctxs, 4)
    assert len(lb) == 37 and len(lb.buckets) == 4
    rows = [row[am.bool()].tolist() for ids, am in lb.buckets for row, am in zip(ids, am)]
    assert [rows[int(j)] for j in lb.restore] == [c.tolist() for c in ctxs]
    # each bucket is padded only to its own longest context
    assert [int(ids.shape[1]) for ids, _ in lb.buckets] == [int(am.sum(1).max()) for _, am in lb.buckets]
    assert sum(ids.numel() for ids, _ in lb.buckets) < len(ctxs) * max(map(len, ctxs))


def test_n_buckets_bounds():
    assert n_buckets(1) == n_buckets(31) == 1
    assert n_buckets(64) == 2
    assert n_buckets(10_000) == MAX_BUCKETS


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_bucketed_hidden_equals_the_whole_padded_batch(kind):
    m = _reward_model(kind)
    ctxs = _contexts(41, seed=5)
    with torch.no_grad():
        whole = m.hidden(*pad_right(ctxs))
        bucketed = m.hidden_buckets(bucket_contexts(ctxs, 4))
    torch.testing.assert_close(bucketed, whole, rtol=1e-5, atol=1e-5)


def _reference_loss(m: RewardModel, groups: list[ContextGroup], rating_weight: float, normalizer: float):
    """The reward loss on one right-padded batch of all contexts (no buckets)."""
    h = m.hidden(*pad_right([g.context for g in groups]))
    r = m.rewards(h)
    gi = torch.from_numpy(np.concatenate([np.full(len(g.chosen), i) for i, g in enumerate(groups)]))
    c = torch.from_numpy(np.concatenate([g.chosen for g in groups]))
    rj = torch.from_numpy(np.concatenate([g.rejected for g in groups]))
    loss = bradley_terry_loss(r[gi, c], r[gi, rj], normalizer)
    ri = torch.from_numpy(np.concatenate([np.full(len(g.rated_items), i) for i, g in enumerate(groups)]))
    items = torch.from_numpy(np.concatenate([g.rated_items for g in groups]).astype(np.int64))
    y = torch.from_numpy(np.concatenate([g.ratings for g in groups]).astype(np.float32))
    return loss + rating_weight * squared_error_loss(m.ratings(h)[ri, items], y, normalizer)


def test_bucketed_reward_loss_and_gradient_match_the_padded_batch():
    groups = _groups(70, seed=6)
    batch = collate_groups(groups)
    assert len(batch["contexts"].buckets) == n_buckets(70) == 2
    normalizer = float(len(batch["chosen"])) * 1.5  # a global count larger than this micro-batch's
    m = _reward_model()
    loss, stats = make_reward_loss(0.5)(m, batch, normalizer)
    loss.backward()
    got = {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    ref = _reference_loss(m, groups, 0.5, normalizer)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert stats["rated"] == sum(len(g.rated_items) for g in groups)
    assert set(got) == {k for k, p in m.named_parameters() if p.grad is not None}
    for k, p in m.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[k], p.grad, rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("head", ["reward", "rating"])
def test_score_contexts_in_length_batches_keeps_the_input_order(head):
    m = _reward_model()
    ctxs = _contexts(23, seed=7)
    batched = score_contexts([m, m], ctxs, batch_size=5, head=head)
    assert batched.shape == (2, 23, VOCAB.size - NUM_SPECIAL)
    one_by_one = np.concatenate([score_contexts([m], [c], batch_size=1, head=head)[0] for c in ctxs])
    np.testing.assert_allclose(batched[0], one_by_one, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(batched[0], batched[1])
    if head == "reward":  # rewards are centred over the catalog per context
        np.testing.assert_allclose(batched[0].mean(axis=1), 0.0, atol=1e-5)
    assert score_contexts([m], [], batch_size=4).shape == (1, 0, VOCAB.size - NUM_SPECIAL)


def test_group_deltas_are_reward_differences_per_pair():
    m = _reward_model()
    groups = _groups(9, seed=8)
    d = group_deltas([m], groups, batch_size=4)
    with torch.no_grad():
        r = m.rewards(m.hidden(*pad_right([g.context for g in groups]))).numpy()
    want = np.concatenate([r[i, g.chosen] - r[i, g.rejected] for i, g in enumerate(groups)])
    np.testing.assert_allclose(d[0], want, rtol=1e-5, atol=1e-5)
