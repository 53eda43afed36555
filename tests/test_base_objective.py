"""The base model trains what it serves: history-masked next-item loss (hand-computed), the masked
training softmax equals the policy evaluation ranks, the Llama backbone, LR schedules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from asft.config import ModelConfig, TrainConfig, load_config
from asft.data.preprocess import NUM_SPECIAL, ItemVocab
from asft.evaluation import evaluate_table, mask_items, pad_right
from asft.losses import masked_sft_loss, sft_loss
from asft.models.recommender import (
    backbone,
    build_model,
    item_embeddings,
    load_recommender,
    mask_special,
    next_item_logits,
    save_recommender,
)
from asft.models.reward import LlamaRewardModel, RewardModel, load_reward_model, save_reward_model
from asft.training.sft import base_windows, collate_windows, consumed_mask, count_targets, sft_batch_loss
from asft.training.trainer import lr_factor

VOCAB = ItemVocab(items=[f"i{k}" for k in range(12)])  # vocab size 16


# ---------------------------------------------------------------------------- pure loss math
def test_masked_sft_loss_by_hand():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    target = torch.tensor([1])
    banned = torch.tensor([[False, False, True, False]])
    expected = math.log(math.exp(0) + math.exp(1) + math.exp(3)) - 1.0
    assert masked_sft_loss(logits, target, banned).item() == pytest.approx(expected, rel=1e-6)
    # a banned target (repeat consumption) stays a valid label: only the other banned item leaves
    banned_t = torch.tensor([[False, True, True, False]])
    assert masked_sft_loss(logits, target, banned_t).item() == pytest.approx(expected, rel=1e-6)
    # nothing banned, no smoothing == plain SFT
    full = torch.randn(5, 7)
    tg = torch.tensor([0, 3, 6, 2, 2])
    assert masked_sft_loss(full, tg).item() == pytest.approx(sft_loss(full, tg).item(), rel=1e-6)
    assert masked_sft_loss(full, tg, torch.zeros(5, 7, dtype=torch.bool)).item() == pytest.approx(
        sft_loss(full, tg).item(), rel=1e-6)


def test_masked_label_smoothing_by_hand():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    target = torch.tensor([1])
    banned = torch.tensor([[False, False, True, False]])
    logz = math.log(math.exp(0) + math.exp(1) + math.exp(3))
    nll = [logz - 0.0, logz - 1.0, logz - 3.0]  # allowed items 0, 1, 3
    eps = 0.2
    expected = (1 - eps) * nll[1] + eps * sum(nll) / 3
    assert masked_sft_loss(logits, target, banned, label_smoothing=eps).item() == pytest.approx(expected, rel=1e-6)
    # unmasked smoothing matches torch's own definition
    full, tg = torch.randn(6, 9), torch.randint(0, 9, (6,))
    ref = torch.nn.functional.cross_entropy(full, tg, label_smoothing=eps)
    assert masked_sft_loss(full, tg, label_smoothing=eps).item() == pytest.approx(ref.item(), rel=1e-5)


def test_consumed_mask_by_hand():
    ids = torch.tensor([[5, 6, 7], [9, 0, 0]])
    before = torch.tensor([[8], [0]])
    rows, cols = torch.tensor([0, 0, 1]), torch.tensor([0, 2, 0])
    m = consumed_mask(ids, before, rows, cols, 12)
    assert m.shape == (3, 12)
    assert set(np.flatnonzero(m[0].numpy())) == {0, 1, 2, 3, 5, 8}
    assert set(np.flatnonzero(m[1].numpy())) == {0, 1, 2, 3, 5, 6, 7, 8}
    assert set(np.flatnonzero(m[2].numpy())) == {0, 1, 2, 3, 9}


def test_lr_schedules():
    const = lr_factor(4)
    assert [const(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cos = lr_factor(2, "cosine", total_steps=12, min_ratio=0.1)
    assert cos(0) == 0.5 and cos(2) == pytest.approx(1.0)
    assert cos(7) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert cos(12) == pytest.approx(0.1) and cos(50) == pytest.approx(0.1)
    lin = lr_factor(0, "linear", total_steps=10)
    assert lin(5) == pytest.approx(0.5) and lin(10) == pytest.approx(0.0)


# ---------------------------------------------------------------------------- trains what it serves
@pytest.fixture(scope="module")
def processed(tiny_processed):
    return tiny_processed


def test_masked_training_nll_equals_the_served_policy(processed):
    """The per-target loss of the masked base is -log of the probability that evaluation's masked
    ranking assigns: same history (window and before it), same special tokens, targets kept."""
    data, _cfg = processed
    model = build_model(ModelConfig(n_layer=1, n_head=1, n_embd=16, dropout=0.0), data.vocab.size, 8, seed=1).eval()
    windows = base_windows(data, mask_history=True)
    assert any(len(w[2]) for w in windows), "some windows must start after the user's first item"
    losses, served = [], []
    with torch.no_grad():
        for w in windows[:40]:
            batch = collate_windows([w])
            n = count_targets(batch)
            losses.append(sft_batch_loss(model, batch, n)[0].item() * n)
            toks, first, before = w
            for p in range(first, len(toks) - 1):
                ids, am = pad_right([toks[: p + 1]])
                scores = mask_special(next_item_logits(model, ids, am).float())
                hist = np.concatenate([before, toks[: p + 1]])
                tgt = torch.tensor([int(toks[p + 1])])
                mask_items(scores, [hist], keep=tgt)
                served.append(-torch.log_softmax(scores, dim=-1)[0, tgt].item())
    assert sum(losses) == pytest.approx(sum(served), rel=1e-5)
    # the unmasked loss differs (mass on consumed items), and is lower bounded by the masked one
    plain = [(w[0], w[1]) for w in windows[:40]]
    un = sum(sft_batch_loss(model, collate_windows([w]), count_targets(collate_windows([w])))[0].item()
             * count_targets(collate_windows([w])) for w in plain)
    assert un > sum(losses)


def test_masked_base_grad_accumulation_1x8_equals_8x1(processed):
    data, _ = processed
    windows = base_windows(data, mask_history=True)[:8]
    m1 = build_model(ModelConfig(n_layer=1, n_head=1, n_embd=16, dropout=0.0), data.vocab.size, 8, seed=2)
    m2 = build_model(ModelConfig(n_layer=1, n_head=1, n_embd=16, dropout=0.0), data.vocab.size, 8, seed=2)
    full = collate_windows(windows)
    total = count_targets(full)
    sft_batch_loss(m1, full, total)[0].backward()
    for w in windows:
        sft_batch_loss(m2, collate_windows([w]), total)[0].backward()
    for (k, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=k)


def test_masked_and_unmasked_bases_train_and_record_their_objective(processed, tmp_path):
    """Both objectives train end to end and the saved model says which one it optimised; training
    lowers the served (masked) NLL on validation from the initial model's. (Which objective ranks
    better is a benchmark question: benchmarks/RESULTS.md, issue 13.)"""
    from asft.training.sft import train_base

    data, _ = processed
    res = {}
    for masked in (True, False):
        cfg = load_config(None, ["model.n_layer=1", "model.n_head=1", "model.n_embd=16", "train.epochs=6",
                                 "train.batch_size=8", "train.warmup_steps=2", "train.device=cpu",
                                 "preprocess.max_len=8", "train.label_smoothing=0", "train.lr_schedule=constant",
                                 "model.dropout=0", f"train.mask_history={str(masked).lower()}"])
        train_base(data.root, cfg, tmp_path / str(masked), progress=False)
        m, _, meta = load_recommender(tmp_path / str(masked) / "best")
        assert meta["trained_masked"] is masked
        nll = []
        with torch.no_grad():
            valid = data.table("valid")
            ids, am = pad_right([np.asarray(x, dtype=np.int64) for x in valid["input"]])
            scores = mask_special(next_item_logits(m, ids, am).float())
            tgt = torch.tensor(valid["target"].to_numpy(np.int64))
            mask_items(scores, [np.asarray(h, dtype=np.int64) for h in valid["history"]], keep=tgt)
            nll = -torch.log_softmax(scores, dim=-1).gather(1, tgt.view(-1, 1)).mean().item()
        res[masked] = (nll, evaluate_table(m, valid).metrics["ndcg@10"])
    init = build_model(ModelConfig(n_layer=1, n_head=1, n_embd=16, dropout=0.0), data.vocab.size, 8, seed=2026).eval()
    with torch.no_grad():
        scores = mask_special(next_item_logits(init, ids, am).float())
        mask_items(scores, [np.asarray(h, dtype=np.int64) for h in valid["history"]], keep=tgt)
        nll0 = -torch.log_softmax(scores, dim=-1).gather(1, tgt.view(-1, 1)).mean().item()
    assert res[True][0] < nll0 and res[False][0] < nll0
    assert all(0 <= v[1] <= 1 for v in res.values())


# ---------------------------------------------------------------------------- backbones
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_backbones_build_save_load(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig(backbone=kind, n_layer=1, n_head=2, n_embd=16, dropout=0.1)
    m = build_model(cfg, VOCAB.size, 6, seed=3).eval()
    assert m.config.model_type == kind
    assert m.lm_head.weight.data_ptr() == item_embeddings(m).data_ptr()  # tied
    ids, am = torch.tensor([[4, 5, 6, 0]]), torch.tensor([[1, 1, 1, 0]])
    out = save_recommender(m, VOCAB, tmp_path / kind, meta={"max_len": 6})
    assert (out / "model.safetensors").is_file()
    loaded, _, _ = load_recommender(out)
    torch.testing.assert_close(next_item_logits(m, ids, am), next_item_logits(loaded, ids, am))
    plain = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True).eval()
    assert type(plain) is type(m)
    # right padding does not change the last real position's logits
    torch.testing.assert_close(next_item_logits(m, ids, am), next_item_logits(m, ids[:, :3], am[:, :3]),
                               rtol=1e-5, atol=1e-5)
    # reward model on the same backbone, saved and loaded
    rm = RewardModel.from_base(m, head_init_scale=1.0).eval()
    assert isinstance(rm, LlamaRewardModel if kind == "llama" else RewardModel)
    for (k, a), b in zip(backbone(m).state_dict().items(), backbone(rm).state_dict().values()):
        assert torch.equal(a, b), k
    h = rm.hidden(ids, am)
    torch.testing.assert_close(rm.rewards(h)[:, NUM_SPECIAL:], next_item_logits(m, ids, am)[:, NUM_SPECIAL:])
    save_reward_model(rm, VOCAB, tmp_path / f"rm-{kind}")
    back = load_reward_model(tmp_path / f"rm-{kind}")
    torch.testing.assert_close(back(ids, am), rm(ids, am))


def test_unknown_backbone_is_a_config_error():
    from asft.config import ConfigError

    with pytest.raises(ConfigError, match="model.backbone"):
        load_config(None, ["model.backbone=mamba"])
    assert TrainConfig().lr_schedule == "constant"
