"""Tests for asft.metrics and the full-ranking evaluation in asft.evaluation.

Metric values are checked against numbers written out by hand; ``evaluate_table`` is checked both
on a fake model whose logits are fixed and on a tiny real model against a brute-force loop.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from asft.config import ModelConfig
from asft.evaluation import evaluate_table, mask_items, pad_right
from asft.metrics import ranking_metrics, ranks_from_scores
from asft.models.recommender import build_model, mask_special

NEG = float("-inf")


# ----------------------------------------------------------------------------------------------
# ranking_metrics
# ----------------------------------------------------------------------------------------------


def test_ranking_metrics_hand_computed():
    ranks = [0, 1, 9, 10, 60]
    m = ranking_metrics(np.array(ranks), ks=(10, 50))
    # hits @10: ranks 0, 1, 9 -> 3/5; @50: additionally 10 -> 4/5
    assert m["hr@10"] == pytest.approx(3 / 5, abs=1e-12)
    assert m["hr@50"] == pytest.approx(4 / 5, abs=1e-12)
    # NDCG@K = 1/log2(rank + 2)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(11)) / 5, abs=1e-12)
    assert m["ndcg@50"] == pytest.approx(
        (1 + 1 / math.log2(3) + 1 / math.log2(11) + 1 / math.log2(12)) / 5, abs=1e-12
    )
    # MRR = mean 1/(rank + 1)
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 10 + 1 / 11 + 1 / 61) / 5, abs=1e-12)
    assert m["mrr@10"] == pytest.approx((1 + 1 / 2 + 1 / 10) / 5, abs=1e-12)
    assert m["mrr@50"] == pytest.approx((1 + 1 / 2 + 1 / 10 + 1 / 11) / 5, abs=1e-12)
    assert set(m) == {"hr@10", "ndcg@10", "mrr@10", "hr@50", "ndcg@50", "mrr@50", "mrr"}


def test_ranking_metrics_accepts_tensor_and_single_k():
    m = ranking_metrics(torch.tensor([0, 2, 4, 5]), ks=[5])
    assert m["hr@5"] == pytest.approx(3 / 4)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(6)) / 4)
    assert m["mrr@5"] == pytest.approx((1 + 1 / 3 + 1 / 5) / 4)
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 5 + 1 / 6) / 4)


def test_ranking_metrics_perfect_and_empty():
    m = ranking_metrics(np.zeros(7, dtype=np.int64), ks=(1, 10))
    assert m["hr@1"] == m["ndcg@1"] == m["mrr@1"] == m["mrr"] == m["hr@10"] == 1.0
    # rank exactly K is a miss for HR@K (0-based rank < K)
    m = ranking_metrics(np.array([1]), ks=(1,))
    assert m["hr@1"] == 0.0 and m["ndcg@1"] == 0.0 and m["mrr@1"] == 0.0 and m["mrr"] == 0.5
    with pytest.raises(ValueError):
        ranking_metrics(np.array([], dtype=np.int64))


# ----------------------------------------------------------------------------------------------
# ranks_from_scores
# ----------------------------------------------------------------------------------------------


def test_ranks_from_scores_hand_computed():
    scores = torch.tensor(
        [
            [0.1, 0.5, 0.3, 0.9],  # target 1 (0.5): only 0.9 higher -> 1
            [0.1, 0.5, 0.3, 0.9],  # target 3 (0.9): best -> 0
            [0.1, 0.5, 0.3, 0.9],  # target 0 (0.1): worst -> 3
        ]
    )
    r = ranks_from_scores(scores, torch.tensor([1, 3, 0]))
    assert r.dtype == torch.int64
    assert r.tolist() == [1, 0, 3]


def test_ranks_ties_use_strictly_greater_rule():
    # target 2 ties with items 0 and 4; only item 1 is strictly greater -> rank 1 (optimistic ties)
    scores = torch.tensor([[0.7, 0.9, 0.7, 0.1, 0.7]])
    assert ranks_from_scores(scores, torch.tensor([2])).tolist() == [1]
    # all equal -> rank 0
    assert ranks_from_scores(torch.zeros(2, 6), torch.tensor([0, 5])).tolist() == [0, 0]


def test_ranks_masked_entries_never_outrank():
    scores = torch.tensor([[NEG, NEG, 5.0, 1.0, 2.0, 3.0]])
    assert ranks_from_scores(scores, torch.tensor([3])).tolist() == [3]
    scores[0, 2] = NEG
    assert ranks_from_scores(scores, torch.tensor([3])).tolist() == [2]


# ----------------------------------------------------------------------------------------------
# masking
# ----------------------------------------------------------------------------------------------


def test_pad_right():
    ids, am = pad_right([np.array([5, 6, 7]), np.array([8])])
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert am.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_mask_special_masks_first_four_tokens():
    logits = torch.arange(8, dtype=torch.float32).repeat(2, 1)
    out = mask_special(logits)
    assert out is logits  # in place
    assert torch.isinf(out[:, :4]).all() and (out[:, :4] < 0).all()
    assert out[:, 4:].tolist() == [[4.0, 5.0, 6.0, 7.0]] * 2


def test_mask_items_history_and_keep():
    base = torch.arange(10, dtype=torch.float32).repeat(3, 1) + 0.5
    scores = base.clone()
    hist = [np.array([4, 5, 6]), np.array([7]), np.array([8, 9, 8])]
    keep = torch.tensor([5, 9, 9])  # row 0 and 2: the target is in the history (a repeat) and keeps its score
    out = mask_items(scores, hist, keep=keep)
    assert out is scores
    expected = base.clone()
    expected[0, [4, 6]] = NEG  # 5 kept
    expected[1, 7] = NEG
    expected[2, 8] = NEG  # 9 kept
    assert torch.equal(out, expected)
    # padding positions of the short rows (index 0 in the padded history) are untouched
    assert out[1, 0] == base[1, 0] and out[1, 1] == base[1, 1]


def test_mask_items_without_keep_and_empty_history():
    base = torch.arange(6, dtype=torch.float32).repeat(2, 1)
    scores = base.clone()
    out = mask_items(scores, [np.array([4, 5]), np.array([], dtype=np.int64)])
    expected = base.clone()
    expected[0, [4, 5]] = NEG
    assert torch.equal(out, expected)
    # no histories at all: unchanged
    s2 = base.clone()
    assert torch.equal(mask_items(s2, []), base)


def test_masking_changes_ranks_as_expected():
    # items 4..9, special 0..3; scores increase with the token id
    scores = mask_special(torch.arange(10, dtype=torch.float32).view(1, -1).clone())
    tgt = torch.tensor([6])
    assert ranks_from_scores(scores.clone(), tgt).tolist() == [3]  # 7, 8, 9 higher
    masked = mask_items(scores.clone(), [np.array([8, 9, 4])], keep=tgt)
    assert ranks_from_scores(masked, tgt).tolist() == [1]  # only 7 left above
    # target in history keeps its score
    masked = mask_items(scores.clone(), [np.array([6, 9])], keep=tgt)
    assert ranks_from_scores(masked, tgt).tolist() == [2]


# ----------------------------------------------------------------------------------------------
# evaluate_table on a fake model with controlled logits
# ----------------------------------------------------------------------------------------------


class _Transformer(torch.nn.Module):
    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden  # [V] table: hidden state of a sequence = one-hot of its last token

    def forward(self, input_ids, attention_mask):
        class Out:
            pass

        o = Out()
        o.last_hidden_state = torch.nn.functional.one_hot(input_ids, self.hidden.numel()).float()
        return o


class FakeModel(torch.nn.Module):
    """logits(next | sequence) = table[last real token of sequence]."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        V = table.shape[1]
        self.transformer = _Transformer(torch.zeros(V))
        self.lm_head = torch.nn.Linear(V, V, bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(table.T)  # one_hot(t) @ W.T = table[t]

    @property
    def base_model(self):  # as transformers' PreTrainedModel: the stack without the head
        return self.transformer


def test_evaluate_table_fake_model():
    V = 10
    table = torch.zeros(V, V)
    # after token 4: items ranked 9 > 8 > 7 > 6 > 5 > 4; special tokens score highest but are masked
    table[4] = torch.tensor([100.0, 100, 100, 100, 1, 2, 3, 4, 5, 6])
    # after token 5: all items tie at 0
    table[5] = torch.tensor([0.0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    model = FakeModel(table)
    df = pd.DataFrame(
        {
            "user_idx": [0, 1, 2, 3],
            "input": [[7, 4], [4], [6, 5], [9, 9, 4]],
            "target": [6, 9, 8, 4],
            "history": [[7, 4], [4], [6, 5], [9, 9, 4]],
        }
    )
    # masked ranks:
    #   row0 target 6 (score 3): higher 7(4,masked), 8(5), 9(6) -> 2
    #   row1 target 9: best -> 0
    #   row2 target 8 (tie everywhere, 5 and 6 masked) -> 0
    #   row3 target 4 (score 1) is in the history but kept; 9 masked; higher 5,6,7,8 -> 4
    res = evaluate_table(model, df, ks=[1, 3], mask_history=True, batch_size=3)
    assert res.ranks.tolist() == [2, 0, 0, 4]
    assert res.user_idx.tolist() == [0, 1, 2, 3]
    assert res.metrics["hr@1"] == pytest.approx(2 / 4)
    assert res.metrics["hr@3"] == pytest.approx(3 / 4)
    assert res.metrics["ndcg@3"] == pytest.approx((1 / math.log2(4) + 1 + 1) / 4)
    assert res.metrics["mrr"] == pytest.approx((1 / 3 + 1 + 1 + 1 / 5) / 4)
    # unmasked: row0 -> 3 (7, 8, 9), row3 -> 5 (5..9)
    res_u = evaluate_table(model, df, ks=[1, 3], mask_history=False, batch_size=2)
    assert res_u.ranks.tolist() == [3, 0, 0, 5]


# ----------------------------------------------------------------------------------------------
# evaluate_table on a tiny real model vs. a brute-force loop
# ----------------------------------------------------------------------------------------------


def _brute_force_ranks(model, df, mask_history: bool) -> np.ndarray:
    ranks = []
    with torch.no_grad():
        for inp, tgt, hist in zip(df["input"], df["target"], df["history"]):
            ids = torch.tensor([list(inp)], dtype=torch.long)
            logits = model(input_ids=ids).logits[0, -1].double()
            scores = torch.log_softmax(logits, dim=-1).numpy().copy()  # full softmax: same order
            scores[:4] = -np.inf
            if mask_history:
                for h in hist:
                    if h != tgt:
                        scores[h] = -np.inf
            ranks.append(int((scores > scores[tgt]).sum()))
    return np.array(ranks)


@pytest.fixture(scope="module")
def tiny_model():
    cfg = ModelConfig(n_layer=1, n_head=1, n_embd=16, dropout=0.0)
    model = build_model(cfg, vocab_size=4 + 30, max_len=8, seed=0)
    model.eval()
    return model


def test_evaluate_table_matches_brute_force(tiny_model):
    rng = np.random.default_rng(0)
    rows = []
    for u in range(13):
        n = int(rng.integers(2, 12))
        seq = rng.integers(4, 34, size=n)
        hist = seq[:-1]
        rows.append({"user_idx": u, "input": hist[-8:], "target": int(seq[-1]), "history": hist})
    df = pd.DataFrame(rows)
    for mask_history in (True, False):
        res = evaluate_table(
            tiny_model, df, ks=[5, 10], mask_history=mask_history, batch_size=4, device="cpu"
        )
        expected = _brute_force_ranks(tiny_model, df, mask_history)
        # logits differ by float noise between padded batches and single rows; allow no rank changes
        # unless two scores are within float tolerance (none are for random init at this size).
        np.testing.assert_array_equal(res.ranks, expected)
        assert res.metrics == ranking_metrics(expected, [5, 10])
    assert not tiny_model.training


def test_evaluate_table_restores_training_mode(tiny_model):
    df = pd.DataFrame({"user_idx": [0], "input": [[5, 6]], "target": [7], "history": [[5, 6]]})
    tiny_model.train()
    try:
        evaluate_table(tiny_model, df, ks=[10])
        assert tiny_model.training
    finally:
        tiny_model.eval()


def test_nan_target_score_is_a_miss():
    """A diverged model (NaN logits) must score zero, never a perfect rank."""
    s = mask_special(torch.full((3, 10), float("nan")))
    m = ranking_metrics(ranks_from_scores(s, torch.tensor([4, 5, 6])), [10])
    assert m["hr@10"] == 0.0 and m["ndcg@10"] == 0.0 and m["mrr"] < 0.2


def test_pairwise_accuracy_and_auc_hand_computed():
    from asft.metrics import pairwise_accuracy, pairwise_auc

    assert pairwise_accuracy(np.array([1.0, -1.0, 0.0, 2.0])) == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    # perfectly separated: every delta_i > -delta_j
    assert pairwise_auc(np.array([1.0, 2.0, 3.0])) == pytest.approx(1.0)
    assert pairwise_auc(np.array([-1.0, -2.0])) == pytest.approx(0.0)
    assert pairwise_auc(np.zeros(5)) == pytest.approx(0.5)
    # deltas (2, -1): positives {2, -1}, negatives {-2, 1}; wins: 2>-2, 2>1, -1>-2 ; -1<1 -> 3/4
    assert pairwise_auc(np.array([2.0, -1.0])) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        pairwise_auc(np.array([]))


def test_calibration_bins_hand_computed():
    from asft.metrics import calibration_bins

    cal = calibration_bins(np.array([0.0, 0.0]), n_bins=2)
    # sigmoid(0) = 0.5 in both orders -> all four in the upper bin, observed 2/4
    assert cal["count"].tolist() == [0.0, 4.0]
    assert cal["observed"][1] == pytest.approx(0.5)
    assert cal["ece"] == pytest.approx(0.0)
    cal = calibration_bins(np.array([10.0, 10.0]), n_bins=10)
    assert cal["ece"] == pytest.approx(1 - 1 / (1 + np.exp(-10)), abs=1e-9)


def test_spearman_rows_matches_definition():
    from asft.metrics import spearman_rows

    a = np.array([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]])
    b = np.array([[10.0, 20.0, 30.0, 40.0], [4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    out = spearman_rows(a, b)
    assert out[0] == pytest.approx(1.0) and out[1] == pytest.approx(-1.0) and np.isnan(out[2])
    # with ties: ranks (1.5, 1.5, 3) vs (1, 2, 3): pearson of centred (-.5,-.5,1) and (-1,0,1)
    r = spearman_rows(np.array([[5.0, 5.0, 7.0]]), np.array([[1.0, 2.0, 3.0]]))[0]
    assert r == pytest.approx(1.5 / np.sqrt(1.5 * 2), rel=1e-9)


def test_ndcg_per_user_and_paired_bootstrap():
    from asft.metrics import ndcg_per_user, paired_bootstrap

    assert np.allclose(ndcg_per_user(np.array([0, 1, 9, 10]), 10), [1.0, 1 / np.log2(3), 1 / np.log2(11), 0.0])
    rng = np.random.default_rng(0)
    b = rng.random(400)
    same = paired_bootstrap(b, b, n_boot=500)
    assert same["diff"] == 0 and same["lo"] == 0 and same["hi"] == 0 and not same["excludes_zero"]
    up = paired_bootstrap(b + 0.05, b, n_boot=500)
    assert up["diff"] == pytest.approx(0.05) and up["lo"] == pytest.approx(0.05) and up["excludes_zero"]
    noisy = paired_bootstrap(b + rng.normal(0.0, 1.0, 400), b, n_boot=2000, seed=1)
    assert noisy["lo"] < noisy["diff"] < noisy["hi"] and not noisy["excludes_zero"]
    # seeds x users: the interval is over users, seeds averaged
    two = paired_bootstrap(np.stack([b + 0.1, b]), np.stack([b, b]), n_boot=200)
    assert two["diff"] == pytest.approx(0.05) and two["n_seeds"] == 2 and two["n_users"] == 400
    with pytest.raises(ValueError):
        paired_bootstrap(b, b[:10])
