"""Sampled softmax for base training (issue 15): the loss math by hand, equality with the full softmax
when every item is a negative, the logQ correction, history masking of negatives, accumulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from asft.config import BaseTrainConfig, ModelConfig, load_config
from asft.data.preprocess import NUM_SPECIAL
from asft.losses import log_expected_counts, masked_sft_loss, sampled_softmax_loss
from asft.models.recommender import build_model
from asft.training.sft import (
    NegativeSampler,
    base_windows,
    collate_windows,
    consumed_among,
    consumed_mask,
    count_targets,
    make_trainer,
    sft_batch_loss,
    target_counts,
    use_sampled_softmax,
)


# ---------------------------------------------------------------------------- pure loss math
def test_all_items_as_negatives_without_logq_is_the_full_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 9, generator=g)
    targets = torch.tensor([0, 3, 8, 3, 5, 1])
    banned = torch.rand(6, 9, generator=g) < 0.3
    pos = logits.gather(1, targets.view(-1, 1)).squeeze(1)
    items = torch.arange(9)
    for eps in (0.0, 0.2):
        for b in (None, banned):
            full = masked_sft_loss(logits, targets, b, eps)
            samp = sampled_softmax_loss(pos, logits, targets, items, None, b, eps)
            assert samp.item() == pytest.approx(full.item(), rel=1e-6)
    # ... and its gradient too
    lg = logits.clone().requires_grad_(True)
    masked_sft_loss(lg, targets, banned, 0.1).backward()
    ls = logits.clone().requires_grad_(True)
    sampled_softmax_loss(ls.gather(1, targets.view(-1, 1)).squeeze(1), ls, targets, items, None, banned, 0.1).backward()
    torch.testing.assert_close(lg.grad, ls.grad, rtol=1e-5, atol=1e-7)


def test_logq_correction_on_a_three_item_toy_by_hand():
    # one row, target item 0 (logit 2); negatives items 1, 2, 1 (logits 1, 0.5, 1) drawn with
    # q = (0.5, 0.3, 0.2) for items (0, 1, 2), K = 3 draws: E[count] = 3 q.
    log_q = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    items = torch.tensor([1, 2, 1])
    le = log_expected_counts(items, log_q, 3)
    torch.testing.assert_close(le, torch.log(torch.tensor([0.9, 0.6, 0.9])))
    pos, neg = torch.tensor([2.0]), torch.tensor([[1.0, 0.5, 1.0]])
    target = torch.tensor([0])
    z = math.exp(2) + math.exp(1) / 0.9 + math.exp(0.5) / 0.6 + math.exp(1) / 0.9
    assert sampled_softmax_loss(pos, neg, target, items, le).item() == pytest.approx(math.log(z) - 2, rel=1e-6)
    # without the correction: the plain softmax over the 4 candidates
    z0 = math.exp(2) + 2 * math.exp(1) + math.exp(0.5)
    assert sampled_softmax_loss(pos, neg, target, items).item() == pytest.approx(math.log(z0) - 2, rel=1e-6)
    # an accidental hit (a negative that is the target) and a history-banned negative leave the softmax
    items_hit = torch.tensor([0, 2, 1])
    le_hit = log_expected_counts(items_hit, log_q, 3)
    banned = torch.tensor([[False, True, False]])
    z1 = math.exp(2) + math.exp(1) / 0.9
    got = sampled_softmax_loss(pos, neg, target, items_hit, le_hit, banned).item()
    assert got == pytest.approx(math.log(z1) - 2, rel=1e-6)
    # label smoothing: weights 1 (target) and 1/E[count] (negatives) on -log p_hat = log Z_hat - o
    eps = 0.1
    w = [1.0, 1 / 0.9, 1 / 0.6, 1 / 0.9]
    o = [2.0, 1.0, 0.5, 1.0]
    u = sum(wi * (math.log(z) - oi) for wi, oi in zip(w, o)) / sum(w)
    expected = (1 - eps) * (math.log(z) - 2) + eps * u
    assert sampled_softmax_loss(pos, neg, target, items, le, label_smoothing=eps).item() == pytest.approx(expected,
                                                                                                          rel=1e-6)


def test_in_batch_expected_counts_mix_the_sources():
    log_q = torch.log(torch.tensor([0.0, 0.25, 0.75]).clamp_min(1e-30))
    log_pop = torch.log(torch.tensor([0.0, 0.5, 0.5]).clamp_min(1e-30))
    le = log_expected_counts(torch.tensor([1, 2]), log_q, 4, n_in_batch=2, log_pop=log_pop)
    torch.testing.assert_close(le, torch.log(torch.tensor([4 * 0.25 + 2 * 0.5, 4 * 0.75 + 2 * 0.5])))
    with pytest.raises(ValueError, match="popularity"):
        log_expected_counts(torch.tensor([1]), log_q, 4, n_in_batch=2)


def test_logq_corrected_partition_estimate_is_unbiased():
    """sum_j exp(o_j - log E[count_j]) over popularity draws estimates sum over all items of exp(o)."""
    g = torch.Generator().manual_seed(3)
    o = torch.randn(50, generator=g)
    counts = np.r_[np.zeros(NUM_SPECIAL), np.arange(1, 47)]
    sampler = NegativeSampler.from_config(BaseTrainConfig(negatives=32, negative_sampler="popularity"), 50, counts)
    torch.manual_seed(0)
    est = []
    for _ in range(3000):
        neg, m = sampler.draw(torch.tensor([], dtype=torch.long))
        est.append(torch.exp(o[neg] - sampler.log_expected(neg, m)).sum().item())
    truth = o[NUM_SPECIAL:].exp().sum().item()
    assert np.mean(est) == pytest.approx(truth, rel=0.02)


# ---------------------------------------------------------------------------- in the base model
@pytest.fixture(scope="module")
def processed(tiny_processed):
    return tiny_processed


class FixedNegatives(NegativeSampler):
    """Always the same negatives (for comparisons that must be exact)."""

    def __init__(self, items: torch.Tensor, vocab_size: int, logq: bool = False):
        log_q = torch.full((vocab_size,), -math.log(vocab_size - NUM_SPECIAL))
        log_q[:NUM_SPECIAL] = float("-inf")
        super().__init__(len(items), log_q, True, logq_correction=logq)
        self.items = items

    def draw(self, labels):
        return self.items.to(labels.device), 0


def tiny(vocab_size: int, seed: int = 1):
    return build_model(ModelConfig(n_layer=1, n_head=1, n_embd=16, dropout=0.0), vocab_size, 8, seed=seed)


def test_consumed_among_is_consumed_mask_on_the_candidates(processed):
    data, _ = processed
    batch = collate_windows(base_windows(data, mask_history=True)[:12])
    sel = batch["attention_mask"].bool() & (batch["labels"] != -100)
    rows, cols = sel.nonzero(as_tuple=True)
    full = consumed_mask(batch["input_ids"], batch["before"], rows, cols, data.vocab.size)
    cands = torch.tensor([7, 4, 30, 4, 12, 5, 19])
    torch.testing.assert_close(consumed_among(batch["input_ids"], batch["before"], rows, cols, cands),
                               full[:, cands])
    assert full[:, cands].any() and not full[:, cands].all()


@pytest.mark.parametrize("mask_history", [True, False])
def test_sampled_base_loss_with_every_item_as_negative_equals_the_full_softmax(processed, mask_history):
    data, _ = processed
    windows = base_windows(data, mask_history=mask_history)[:10]
    model = tiny(data.vocab.size).eval()
    batch = collate_windows(windows)
    n = count_targets(batch)
    # the unmasked full softmax also spans the special tokens, so they are negatives there too
    first = NUM_SPECIAL if mask_history else 0
    sampler = FixedNegatives(torch.arange(first, data.vocab.size), data.vocab.size)
    with torch.no_grad():
        for eps in (0.0, 0.1):
            full = sft_batch_loss(model, batch, n, label_smoothing=eps)[0]
            samp = sft_batch_loss(model, batch, n, label_smoothing=eps, sampler=sampler)[0]
            assert samp.item() == pytest.approx(full.item(), rel=1e-5)


def test_sampled_base_grad_accumulation_1x8_equals_8x1(processed):
    """With the same negatives, splitting the optimizer batch changes nothing (global normaliser)."""
    data, _ = processed
    windows = base_windows(data, mask_history=True)[:8]
    sampler = FixedNegatives(torch.tensor([5, 9, 11, 20, 28, 33, 9]), data.vocab.size, logq=True)
    m1, m2 = tiny(data.vocab.size, 2), tiny(data.vocab.size, 2)
    full = collate_windows(windows)
    total = count_targets(full)
    sft_batch_loss(m1, full, total, 0.1, sampler)[0].backward()
    for w in windows:
        sft_batch_loss(m2, collate_windows([w]), total, 0.1, sampler)[0].backward()
    for (k, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=k)


def test_history_items_are_masked_among_sampled_negatives(processed):
    """A negative the user already consumed gets no gradient (it is out of the softmax, as in full)."""
    data, _ = processed
    w = next(w for w in base_windows(data, mask_history=True) if len(w[2]))
    consumed = int(w[2][0])  # consumed before the window: banned at every position
    fresh = next(i for i in range(NUM_SPECIAL, data.vocab.size) if i not in set(w[0]) | set(w[2]))
    sampler = FixedNegatives(torch.tensor([consumed, fresh]), data.vocab.size)
    model = tiny(data.vocab.size)
    batch = collate_windows([w])
    sft_batch_loss(model, batch, count_targets(batch), 0.0, sampler)[0].backward()
    grad = model.get_output_embeddings().weight.grad
    assert grad[fresh].abs().sum() > 0
    # the consumed item's row gets gradient only through its input-embedding use, never as a negative:
    m2 = tiny(data.vocab.size)
    sft_batch_loss(m2, batch, count_targets(batch), 0.0, FixedNegatives(torch.tensor([fresh]), data.vocab.size))[
        0].backward()
    torch.testing.assert_close(grad[consumed], m2.get_output_embeddings().weight.grad[consumed])


def test_softmax_choice_and_sampler_config():
    cfg = BaseTrainConfig()
    assert cfg.softmax == "auto"
    assert not use_sampled_softmax(cfg, 400) and not use_sampled_softmax(cfg, 1682)
    assert not use_sampled_softmax(cfg, 12101) and use_sampled_softmax(cfg, 60000)
    assert use_sampled_softmax(BaseTrainConfig(softmax="sampled"), 10)
    assert not use_sampled_softmax(BaseTrainConfig(softmax="full"), 10**6)
    with pytest.raises(ValueError, match="item counts"):
        NegativeSampler.from_config(BaseTrainConfig(negative_sampler="popularity"), 20)
    s = NegativeSampler.from_config(BaseTrainConfig(negatives=5, in_batch_negatives=True), 20, np.ones(20))
    torch.manual_seed(0)
    neg, m = s.draw(torch.tensor([7, 8, 9]))
    assert m == 3 and len(neg) == 8 and (neg >= NUM_SPECIAL).all()
    assert sorted(neg[5:].tolist()) == [7, 8, 9]


def test_target_counts(processed):
    data, _ = processed
    windows = base_windows(data, mask_history=True)
    c = target_counts(windows, data.vocab.size)
    assert c.sum() == sum(count_targets(collate_windows([w])) for w in windows)
    assert c[:NUM_SPECIAL].sum() == 0


def test_trainer_with_sampled_softmax_learns(processed, tmp_path):
    data, _ = processed
    cfg = load_config(None, ["model.n_layer=1", "model.n_embd=16", "model.n_head=1", "train.epochs=3",
                             "train.batch_size=16", "train.softmax=sampled", "train.negatives=8",
                             "train.in_batch_negatives=true", "train.negative_sampler=popularity",
                             "preprocess.max_len=8"])
    windows = base_windows(data, mask_history=True)
    model = tiny(data.vocab.size, 4)
    trainer = make_trainer(model, cfg, tmp_path, progress=False, item_counts=target_counts(windows, data.vocab.size))
    assert trainer.loss_fn.keywords["sampler"] is not None
    res = trainer.fit(windows, resume=False)
    losses = [h["train_loss"] for h in res.history]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
