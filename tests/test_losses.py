"""Tests for asft.losses: weighted NLL, SFT as its all-ones special case, global normalisation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from asft.losses import sft_loss, target_log_probs, weighted_nll


def _data(n: int = 24, v: int = 11, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g, dtype=torch.float32)
    targets = torch.randint(0, v, (n,), generator=g)
    return logits, targets


def test_target_log_probs_matches_log_softmax():
    logits, targets = _data()
    lp = target_log_probs(logits, targets)
    expected = torch.log_softmax(logits, dim=-1)[torch.arange(len(targets)), targets]
    assert lp.shape == (len(targets),)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, expected, rtol=0, atol=1e-6)
    # half-precision logits are upcast
    assert target_log_probs(logits.to(torch.bfloat16), targets).dtype == torch.float32


def test_weighted_nll_hand_computed():
    lp = torch.tensor([-1.0, -2.0, -3.0])
    w = torch.tensor([1.0, 2.0, 3.0])
    assert weighted_nll(lp, w).item() == pytest.approx((1 + 4 + 9) / 6)
    assert weighted_nll(lp).item() == pytest.approx((1 + 2 + 3) / 3)
    assert weighted_nll(lp, w, normalizer=7.0).item() == pytest.approx(14 / 7)
    assert weighted_nll(lp, w, normalizer=torch.tensor(2.0)).item() == pytest.approx(14 / 2)
    assert weighted_nll(lp, None, normalizer=4).item() == pytest.approx(6 / 4)
    # zero weights drop a term entirely
    assert weighted_nll(lp, torch.tensor([0.0, 0.0, 2.0])).item() == pytest.approx(3.0)


def test_sft_loss_is_mean_nll_cross_entropy():
    logits, targets = _data()
    torch.testing.assert_close(sft_loss(logits, targets), F.cross_entropy(logits, targets), rtol=0, atol=1e-6)
    torch.testing.assert_close(
        sft_loss(logits, targets, normalizer=100.0),
        F.cross_entropy(logits, targets, reduction="sum") / 100.0,
        rtol=0,
        atol=1e-6,
    )


@pytest.mark.parametrize("normalizer", [None, 37.0])
def test_all_ones_weights_reproduce_sft_value_and_gradient(normalizer):
    logits, targets = _data(n=32, v=17, seed=1)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    l_sft = sft_loss(a, targets, normalizer=normalizer)
    lp = target_log_probs(b, targets)
    l_w = weighted_nll(lp, torch.ones_like(lp), normalizer=normalizer)
    l_sft.backward()
    l_w.backward()
    torch.testing.assert_close(l_w, l_sft, rtol=0, atol=1e-7)
    torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=1e-7)


def test_global_normalizer_one_by_eight_equals_eight_by_one():
    logits, targets = _data(n=40, v=13, seed=2)
    g = torch.Generator().manual_seed(3)
    weights = torch.rand(40, generator=g) * 2

    for w in (None, weights):
        # one batch
        a = logits.clone().requires_grad_(True)
        full = weighted_nll(target_log_probs(a, targets), w)
        full.backward()
        # 8 micro-batches, each normalised by the global normaliser, losses summed (grad accumulation)
        b = logits.clone().requires_grad_(True)
        global_norm = float(targets.numel()) if w is None else w.sum()
        total = torch.zeros(())
        for idx in torch.arange(40).chunk(8):
            part = weighted_nll(
                target_log_probs(b[idx], targets[idx]), None if w is None else w[idx], global_norm
            )
            part.backward()
            total = total + part.detach()
        torch.testing.assert_close(total, full.detach(), rtol=0, atol=1e-6)
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=1e-7)

    # and the local (per-micro-batch) normaliser would NOT match when micro-batch sizes differ
    parts = [torch.arange(0, 4), torch.arange(4, 40)]
    local = sum(weighted_nll(target_log_probs(logits[i], targets[i])) for i in parts)
    assert not math.isclose(
        float(local), float(weighted_nll(target_log_probs(logits, targets))), rel_tol=1e-3
    )


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        weighted_nll(torch.zeros(3), torch.ones(4))
    with pytest.raises(ValueError, match="shape"):
        weighted_nll(torch.zeros(3), torch.ones(3, 1))


def test_non_positive_normalizer_raises():
    with pytest.raises(ValueError):
        weighted_nll(torch.tensor([-1.0]), None, normalizer=0)
    with pytest.raises(ValueError):
        weighted_nll(torch.tensor([-1.0]), torch.ones(1), normalizer=-2.0)


def test_bradley_terry_hand_computed():
    from asft.losses import bradley_terry_loss

    c, r = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.0, 1.0])
    # deltas 1, 0, -2: -log sigmoid(d) = log(1 + e^-d)
    expected = [math.log(1 + math.exp(-1)), math.log(2), math.log(1 + math.exp(2))]
    assert bradley_terry_loss(c, r).item() == pytest.approx(sum(expected) / 3, rel=1e-6)
    assert bradley_terry_loss(c, r, normalizer=6).item() == pytest.approx(sum(expected) / 6, rel=1e-6)
    # a shift common to both items changes nothing (only differences are identified)
    assert bradley_terry_loss(c + 5, r + 5).item() == pytest.approx(bradley_terry_loss(c, r).item(), rel=1e-6)
    # gradient wrt chosen is -(1 - sigmoid(delta)) / n
    cc = c.clone().requires_grad_(True)
    bradley_terry_loss(cc, r).backward()
    d = torch.tensor([1.0, 0.0, -2.0])
    torch.testing.assert_close(cc.grad, -(1 - torch.sigmoid(d)) / 3)
    with pytest.raises(ValueError):
        bradley_terry_loss(c, r, normalizer=0)


def test_bradley_terry_global_normaliser_accumulates():
    from asft.losses import bradley_terry_loss

    g = torch.Generator().manual_seed(3)
    c, r = torch.randn(8, generator=g), torch.randn(8, generator=g)
    whole = bradley_terry_loss(c, r)
    parts = sum(bradley_terry_loss(c[i : i + 1], r[i : i + 1], normalizer=8) for i in range(8))
    torch.testing.assert_close(parts, whole)


def test_squared_error_hand_computed():
    from asft.losses import squared_error_loss

    p, y = torch.tensor([1.0, 3.0]), torch.tensor([2.0, 5.0])
    assert squared_error_loss(p, y).item() == pytest.approx((1 + 4) / 2)
    assert squared_error_loss(p, y, normalizer=10).item() == pytest.approx(0.5)
