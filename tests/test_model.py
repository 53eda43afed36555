"""Tests for asft.models.recommender: build, save/load round trip, plain-transformers loading,
and next-item logits under right padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from asft.config import ModelConfig
from asft.data.preprocess import ItemVocab
from asft.evaluation import pad_right
from asft.models.recommender import (
    META_FILE,
    VOCAB_FILE,
    build_model,
    load_recommender,
    next_item_logits,
    position_logits,
    save_recommender,
)

MCFG = ModelConfig(n_layer=1, n_head=1, n_embd=16, dropout=0.1)
VOCAB = ItemVocab(items=[f"i{k}" for k in range(12)])  # vocab size 16
MAX_LEN = 6
# Two model instances with identical weights: float32 logits agree to rounding, not necessarily bit for bit.
LOGIT_RTOL, LOGIT_ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def model():
    m = build_model(MCFG, VOCAB.size, MAX_LEN, seed=3)
    m.eval()
    return m


def _inputs():
    ids = torch.tensor([[4, 5, 6, 7, 8, 9], [10, 11, 12, 0, 0, 0]])
    am = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    return ids, am


def test_build_model_config(model):
    c = model.config
    assert c.vocab_size == VOCAB.size and c.n_positions == MAX_LEN
    assert (c.n_layer, c.n_head, c.n_embd) == (1, 1, 16)
    assert c.pad_token_id == 0 and c.bos_token_id == 1 and c.eos_token_id == 2
    # item embeddings are tied to the output layer
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    # same seed -> same initialisation
    other = build_model(MCFG, VOCAB.size, MAX_LEN, seed=3)
    for (k, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), k
    bigger = build_model(ModelConfig(n_layer=1, n_head=1, n_embd=16, n_positions=10), VOCAB.size, MAX_LEN)
    assert bigger.config.n_positions == 10
    with pytest.raises(ValueError, match="n_positions"):
        build_model(ModelConfig(n_layer=1, n_head=1, n_embd=16, n_positions=4), VOCAB.size, MAX_LEN)


def test_save_load_round_trip_identical_logits(model, tmp_path):
    out = save_recommender(model, VOCAB, tmp_path / "m", meta={"max_len": MAX_LEN})
    files = {p.name for p in out.iterdir()}
    assert "model.safetensors" in files and VOCAB_FILE in files and META_FILE in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    loaded, vocab, meta = load_recommender(out)
    assert not loaded.training
    assert vocab.items == VOCAB.items
    assert meta["max_len"] == MAX_LEN and meta["n_items"] == 12 and meta["kind"] == "generative-recommender"
    # the weights round-trip bit for bit (safetensors stores the exact float32 values) ...
    sd_a, sd_b = model.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    # ... so the two instances compute the same function (up to kernel-level float reordering)
    ids, am = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids, attention_mask=am).logits, model(input_ids=ids, attention_mask=am).logits,
            rtol=LOGIT_RTOL, atol=LOGIT_ATOL)
        torch.testing.assert_close(next_item_logits(loaded, ids, am), next_item_logits(model, ids, am),
                                   rtol=LOGIT_RTOL, atol=LOGIT_ATOL)
    # tying survives the round trip
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()


def test_plain_transformers_loads_saved_dir(model, tmp_path):
    save_recommender(model, VOCAB, tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    plain.eval()
    ids, am = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            plain(input_ids=ids, attention_mask=am).logits, model(input_ids=ids, attention_mask=am).logits,
            rtol=LOGIT_RTOL, atol=LOGIT_ATOL)


def test_load_without_safetensors_raises(model, tmp_path):
    out = save_recommender(model, VOCAB, tmp_path / "m")
    (out / "model.safetensors").unlink()
    torch.save(model.state_dict(), out / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_recommender(out)
    with pytest.raises(FileNotFoundError):
        load_recommender(tmp_path / "nothing-here")


def test_load_vocab_mismatch_raises(model, tmp_path):
    out = save_recommender(model, VOCAB, tmp_path / "m")
    ItemVocab(items=["a", "b"]).save(out / VOCAB_FILE)
    with pytest.raises(ValueError, match="vocab"):
        load_recommender(out)


def test_next_item_logits_uses_last_real_position_under_right_padding(model):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(4, VOCAB.size, size=n) for n in (1, 4, 6, 2, 3)]
    ids, am = pad_right(seqs)
    with torch.no_grad():
        batched = next_item_logits(model, ids, am)
        assert batched.shape == (len(seqs), VOCAB.size)
        for i, s in enumerate(seqs):
            alone = model(input_ids=torch.as_tensor(s).view(1, -1)).logits[0, -1]
            torch.testing.assert_close(batched[i], alone, rtol=0, atol=1e-5)
            # and it is not simply the last column of the padded batch
            if len(s) < ids.shape[1]:
                full = model(input_ids=ids[i : i + 1], attention_mask=am[i : i + 1]).logits[0, -1]
                assert not torch.allclose(full, alone, atol=1e-4)


def test_position_logits_only_real_positions(model):
    ids, am = _inputs()
    with torch.no_grad():
        pl = position_logits(model, ids, am)
        assert pl.shape == (9, VOCAB.size)
        full = model(input_ids=ids, attention_mask=am).logits
        torch.testing.assert_close(pl, full[am.bool()], rtol=0, atol=1e-6)
