"""Post-training loss math against hand-computed values (DPO, IPO, GRPO/RLOO advantages, k3 KL, PPO
clip, entropy/KL rows), and the weighted-SFT identities: all-ones weights reproduce the SFT loss
and gradient exactly; gradient accumulation 1x8 equals 8x1."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from asft.config import load_config
from asft.losses import (
    clipped_policy_loss,
    dpo_loss,
    entropy_rows,
    group_advantages,
    ipo_loss,
    kl_k3,
    kl_rows,
    policy_gradient_loss,
)
from asft.models.recommender import build_model
from asft.posttrain import (
    Example,
    collate_examples,
    count_weight,
    plackett_luce_logp,
    slate_ndcg,
    weighted_loss,
)
from asft.sampling import TrainContexts
from asft.training.sft import collate_windows, sft_batch_loss
from asft.training.trainer import Trainer

V = 4 + 12
T = lambda *x: torch.tensor(x, dtype=torch.float32)


def test_dpo_hand_values():
    # pair 1: h = (-1 - -1.5) - (-2 - -1.5) = 1;  pair 2: h = -1
    pw, pl, rw, rl = T(-1.0, -2.0), T(-2.0, -1.0), T(-1.5, -1.5), T(-1.5, -1.5)
    beta = 0.5
    expect = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(0.5))) / 2  # -log sigma(+-0.5)
    assert dpo_loss(pw, pl, rw, rl, beta).item() == pytest.approx(expect, abs=1e-6)
    # global normaliser: sum / 4
    assert dpo_loss(pw, pl, rw, rl, beta, normalizer=4.0).item() == pytest.approx(expect * 2 / 4, abs=1e-6)
    # at the reference (h = 0) the loss is log 2 whatever beta
    z = T(-1.0)
    assert dpo_loss(z, z, z, z, 0.1).item() == pytest.approx(math.log(2), abs=1e-7)


def test_ipo_hand_values():
    pw, pl, rw, rl = T(-1.0, -2.0), T(-2.0, -2.0), T(-1.5, -2.0), T(-1.5, -2.0)
    # h = [1, 0]; beta 0.5 -> target 1/(2 beta) = 1 -> [(1-1)^2, (0-1)^2] -> mean 0.5
    assert ipo_loss(pw, pl, rw, rl, 0.5).item() == pytest.approx(0.5, abs=1e-7)
    assert ipo_loss(pw, pl, rw, rl, 0.25).item() == pytest.approx(((1 - 2) ** 2 + (0 - 2) ** 2) / 2, abs=1e-6)


def test_group_advantages_hand_values():
    r = T(1.0, 2.0, 3.0)[None]
    sd = math.sqrt(2 / 3)  # population std
    assert torch.allclose(group_advantages(r, "grpo", eps=0.0), T(-1 / sd, 0.0, 1 / sd)[None], atol=1e-6)
    assert torch.allclose(group_advantages(r, "rloo"), T(1 - 2.5, 2 - 2.0, 3 - 1.5)[None])
    # a constant group has no signal
    assert torch.all(group_advantages(T(2.0, 2.0)[None], "grpo") == 0)
    with pytest.raises(ValueError):
        group_advantages(r, "ppo")


def test_kl_k3_hand_value_and_unbiased():
    # q = log(0.25) - log(0.5) = -log 2 -> exp(q) - q - 1 = 0.5 + log 2 - 1
    assert kl_k3(T(math.log(0.5)), T(math.log(0.25))).item() == pytest.approx(0.5 + math.log(2) - 1, abs=1e-6)
    assert kl_k3(T(-1.3), T(-1.3)).item() == 0.0
    # E_{a~pi}[k3] = KL(pi || pi_ref) exactly (enumerate the actions)
    pi, ref = T(0.5, 0.3, 0.2), T(0.2, 0.2, 0.6)
    k3 = kl_k3(pi.log(), ref.log())
    assert (pi * k3).sum().item() == pytest.approx((pi * (pi / ref).log()).sum().item(), abs=1e-6)
    assert kl_rows(pi.log()[None], ref.log()[None]).item() == pytest.approx((pi * (pi / ref).log()).sum().item(),
                                                                            abs=1e-6)


def test_ppo_clip_hand_values():
    old = T(0.0, 0.0)
    new = T(math.log(1.5), math.log(1.5))  # ratio 1.5, clip 0.2 -> 1.2
    adv = T(2.0, -2.0)
    # A > 0: -min(3, 2.4) = -2.4 ; A < 0: -min(-3, -2.4) = 3
    assert torch.allclose(clipped_policy_loss(new, old, adv, 0.2), T(-2.4, 3.0), atol=1e-6)


def test_policy_gradient_loss_adds_kl_and_has_reinforce_gradient():
    logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    ref = T(-1.5, -1.0)
    adv = T(1.0, -0.5)
    loss, k3 = policy_gradient_loss(logp, logp.detach(), ref, adv, clip=0.2, kl_coef=0.1, normalizer=2.0)
    # ratio = 1: surrogate = -A; the k3 term is *added* with coefficient beta
    assert loss.item() == pytest.approx(((-1.0 + 0.5) + 0.1 * k3.sum().item()) / 2, abs=1e-6)
    loss.backward()
    q = ref - logp.detach()
    dk3 = -(torch.exp(q) - 1)  # d k3 / d logp
    assert torch.allclose(logp.grad, (-adv + 0.1 * dk3) / 2, atol=1e-6)


def test_entropy_rows_hand_values():
    assert entropy_rows(torch.zeros(1, 4)).item() == pytest.approx(math.log(4), abs=1e-6)
    x = torch.tensor([[0.0, 0.0, float("-inf")]])
    assert entropy_rows(x).item() == pytest.approx(math.log(2), abs=1e-6)


def test_slate_ndcg_and_plackett_luce():
    slates = torch.tensor([[5, 6, 7], [5, 6, 7], [8, 9, 10]])
    rel = torch.tensor([[6, -1], [5, 7], [-1, -1]])
    got = slate_ndcg(slates, rel)
    assert got[0].item() == pytest.approx((1 / math.log2(3)) / 1.0, abs=1e-6)
    assert got[1].item() == pytest.approx((1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3)), abs=1e-6)
    assert got[2].item() == 0.0
    p = torch.tensor([[0.5, 0.3, 0.2]])
    s = torch.tensor([[2, 0]])
    # P(2 then 0) = 0.2 * 0.5 / (1 - 0.2)
    lp = plackett_luce_logp(p.log(), s, torch.tensor([0]))
    assert lp.item() == pytest.approx(math.log(0.2 * 0.5 / 0.8), abs=1e-6)


# ---------------------------------------------------------------------------- weighted SFT identities
def _model(seed=3):
    cfg = load_config(None, ["model.n_layer=1", "model.n_head=1", "model.n_embd=16", "model.dropout=0"])
    return build_model(cfg.model, V, 10, seed=seed)


def _contexts(n_windows=8, seed=0) -> TrainContexts:
    rng = np.random.default_rng(seed)
    windows = [rng.integers(4, V, size=int(rng.integers(3, 10))).astype(np.int64) for _ in range(n_windows)]
    return TrainContexts(windows=windows, first=np.zeros(n_windows, dtype=np.int64),
                         user=np.arange(n_windows), start=np.zeros(n_windows, dtype=np.int64),
                         items_of=[np.concatenate([w, [4, 5]]) for w in windows], ratings_of=[None] * n_windows,
                         vocab_size=V)


def _logged_examples(tc: TrainContexts, weight=1.0) -> list[Example]:
    out = []
    for i, w in enumerate(tc.windows):
        pos = tc.positions(i)
        out.append(Example(i, pos, {"item": w[pos + 1], "weight": np.full(len(pos), weight)}))
    return out


def test_all_ones_weights_reproduce_sft_loss_and_gradient():
    tc = _contexts()
    ex = _logged_examples(tc)
    m1, m2 = _model(), _model()
    wb = collate_examples(tc, ex)
    sb = collate_windows([(w, 0) for w in tc.windows])
    l1, _ = weighted_loss(m1, wb, count_weight(wb))
    l2, _ = sft_batch_loss(m2, sb, float((sb["labels"] != -100).sum()))
    assert count_weight(wb) == float((sb["labels"] != -100).sum())
    assert l1.item() == pytest.approx(l2.item(), abs=1e-6)
    l1.backward()
    l2.backward()
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), n
    # a constant weight changes nothing (the loss divides by the weight sum)
    m3 = _model()
    wb3 = collate_examples(tc, _logged_examples(tc, 3.0))
    assert weighted_loss(m3, wb3, count_weight(wb3))[0].item() == pytest.approx(l2.item(), abs=1e-6)


def _weighted_examples(n=16):
    tc = _contexts(n, seed=1)
    rng = np.random.default_rng(2)
    ex = []
    for i, w in enumerate(tc.windows):  # several candidates per context, uneven weights
        pos = np.repeat(tc.positions(i), 3)
        ex.append(Example(i, pos, {"item": rng.integers(4, V, size=len(pos)),
                                   "weight": rng.exponential(size=len(pos))}))
    return tc, ex


def test_weighted_gradient_accumulation_1x8_equals_8x1():
    """The accumulated gradient of 8 micro-batches, each normalised by the global weight sum, equals
    the gradient of one batch of 8."""
    tc, ex = _weighted_examples(8)
    grads = {}
    for n_micro in (1, 8):
        model = _model()
        micro = [collate_examples(tc, [ex[i] for i in idx]) for idx in np.array_split(np.arange(8), n_micro)]
        total = sum(count_weight(mb) for mb in micro)
        loss = 0.0
        for mb in micro:
            lm, _ = weighted_loss(model, mb, total)
            lm.backward()
            loss += lm.item()
        grads[n_micro] = (loss, torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[1][0] == pytest.approx(grads[8][0], abs=1e-6)
    torch.testing.assert_close(grads[8][1], grads[1][1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_weighted_trainer_accum_1x8_equals_8x1(tmp_path, grad_clip):
    tc, ex = _weighted_examples(16)
    models, outs = {}, {}
    for accum in (1, 8):
        cfg = load_config(None, ["train.device=cpu", "train.batch_size=8", f"train.grad_accum={accum}",
                                 "train.lr=0.01", "train.warmup_steps=0", f"train.grad_clip={grad_clip}"])
        model = _model()
        tr = Trainer(model, cfg.train, tmp_path / f"a{accum}", collate_fn=lambda e: collate_examples(tc, e),
                     loss_fn=weighted_loss, count_fn=count_weight, seed=0, progress=False)
        outs[accum] = [tr.train_step(ex[:8]), tr.train_step(ex[8:])]
        models[accum] = model.eval()
    for a, b in zip(outs[1], outs[8]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["count"] == pytest.approx(b["count"], rel=1e-6)
    ids = torch.as_tensor(np.stack([w[:3] for w in tc.windows]))
    with torch.no_grad():  # same function (the key bias has a zero true gradient: compare outputs)
        torch.testing.assert_close(models[8](input_ids=ids).logits, models[1](input_ids=ids).logits, rtol=0,
                                   atol=1e-5)
