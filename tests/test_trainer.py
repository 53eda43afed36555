"""Tests for asft.training.trainer.Trainer with the SFT loss (asft.training.sft).

Tiny model (1 layer, 1 head, 16 dims, dropout 0) on tiny synthetic windows, CPU only.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from asft.config import load_config
from asft.evaluation import evaluate_table
from asft.models.recommender import build_model
from asft.training.sft import IGNORE, collate_windows, count_targets, make_trainer, sft_batch_loss
from asft.training.trainer import Trainer

V = 4 + 20
MAX_LEN = 8


def make_cfg(*overrides: str):
    return load_config(
        None,
        [
            "seed=7",
            "model.n_layer=1",
            "model.n_head=1",
            "model.n_embd=16",
            "model.dropout=0",
            f"preprocess.max_len={MAX_LEN}",
            "train.device=cpu",
            "train.batch_size=8",
            "train.grad_accum=1",
            "train.lr=0.01",
            "train.warmup_steps=2",
            "train.epochs=2",
            "train.eval_every=1",
            "train.patience=100",
            "train.monitor=ndcg@10",
            "train.num_threads=1",  # tiny model: one thread is much faster on a busy machine
            *overrides,
        ],
    )


# Trainer applies train.num_threads process-wide: conftest's isolation fixture restores it after each test.


def make_windows(n: int = 24, seed: int = 0) -> list[tuple[np.ndarray, int]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(2, MAX_LEN + 2))  # 2..max_len+1 tokens
        toks = rng.integers(4, V, size=length).astype(np.int64)
        first = int(rng.integers(0, length - 1)) if i % 3 == 0 else 0  # some overlapping windows
        out.append((toks, first))
    return out


def fresh_model(cfg):
    return build_model(cfg.model, V, cfg.preprocess.max_len, seed=cfg.seed)


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------
# collate / count
# ----------------------------------------------------------------------------------------------


def test_collate_windows_and_count_targets():
    windows = [(np.array([4, 5, 6, 7]), 0), (np.array([8, 9, 10, 11, 12]), 2), (np.array([13, 14]), 0)]
    b = collate_windows(windows)
    assert b["input_ids"].tolist() == [[4, 5, 6, 0], [8, 9, 10, 11], [13, 0, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert b["labels"].tolist() == [
        [5, 6, 7, IGNORE],
        [IGNORE, IGNORE, 11, 12],
        [14, IGNORE, IGNORE, IGNORE],
    ]
    assert count_targets(b) == 3 + 2 + 1


def test_sft_batch_loss_matches_manual_cross_entropy():
    cfg = make_cfg()
    model = fresh_model(cfg).eval()
    windows = make_windows(6)
    b = collate_windows(windows)
    with torch.no_grad():
        loss, _ = sft_batch_loss(model, b, normalizer=count_targets(b))
        total, n = 0.0, 0
        for toks, first in windows:
            logits = model(input_ids=torch.as_tensor(toks[:-1]).view(1, -1)).logits[0]
            lp = torch.log_softmax(logits.double(), -1)
            labels = toks[1:]
            for j in range(first, len(labels)):
                total -= float(lp[j, labels[j]])
                n += 1
    assert n == count_targets(b)
    assert float(loss) == pytest.approx(total / n, rel=1e-5)


# ----------------------------------------------------------------------------------------------
# data order
# ----------------------------------------------------------------------------------------------


def test_epoch_batches_pure_function_of_seed_and_epoch(tmp_path):
    cfg = make_cfg("train.batch_size=5")
    t1 = make_trainer(fresh_model(cfg), cfg, tmp_path / "a", progress=False)
    t2 = make_trainer(fresh_model(cfg), cfg, tmp_path / "b", progress=False)
    n = 23
    for epoch in range(3):
        b1 = t1.epoch_batches(n, epoch)
        b2 = t2.epoch_batches(n, epoch)
        again = t1.epoch_batches(n, epoch)
        assert [x.tolist() for x in b1] == [x.tolist() for x in b2] == [x.tolist() for x in again]
        assert [len(x) for x in b1] == [5, 5, 5, 5, 3]
        assert sorted(np.concatenate(b1).tolist()) == list(range(n))  # a partition of the dataset
    assert t1.epoch_batches(n, 0)[0].tolist() != t1.epoch_batches(n, 1)[0].tolist()
    # consuming the global RNGs does not change the order
    np.random.seed(123)
    torch.manual_seed(123)
    np.random.rand(10)
    assert [x.tolist() for x in t1.epoch_batches(n, 2)] == [x.tolist() for x in t2.epoch_batches(n, 2)]
    # a different seed gives a different order
    cfg2 = make_cfg("train.batch_size=5", "seed=8")
    t3 = make_trainer(fresh_model(cfg2), cfg2, tmp_path / "c", progress=False)
    assert [x.tolist() for x in t3.epoch_batches(n, 0)] != [x.tolist() for x in t1.epoch_batches(n, 0)]


# ----------------------------------------------------------------------------------------------
# gradient accumulation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_grad_accum_8x1_equals_1x8(tmp_path, grad_clip):
    windows = make_windows(24)
    results = {}
    for accum in (1, 8):
        cfg = make_cfg(f"train.grad_accum={accum}", "train.epochs=2", f"train.grad_clip={grad_clip}")
        model = fresh_model(cfg)
        trainer = Trainer(
            model,
            cfg.train,
            tmp_path / f"accum{accum}",
            collate_fn=collate_windows,
            loss_fn=sft_batch_loss,
            count_fn=count_targets,
            seed=cfg.seed,
            progress=False,
        )
        res = trainer.fit(windows, resume=False)
        assert res.steps == 2 * 3
        results[accum] = (params(model), res)
    p1, r1 = results[1]
    p8, r8 = results[8]
    assert p1.keys() == p8.keys()
    H = 16
    for k in p1:
        a, b = p1[k], p8[k]
        if k.endswith("attn.c_attn.bias"):
            # The key bias has an exactly-zero true gradient (it shifts every score of a query by the
            # same amount, softmax is invariant), so its "gradient" is float rounding noise that Adam
            # rescales to ~lr-sized steps; it cannot change the model's output. Compare the query and
            # value slices only (the function itself is compared below).
            a, b = torch.cat([a[:H], a[2 * H :]]), torch.cat([b[:H], b[2 * H :]])
        torch.testing.assert_close(b, a, rtol=0, atol=2e-6, msg=k)
    m1, m8 = fresh_model(make_cfg()), fresh_model(make_cfg())
    m1.load_state_dict(p1)
    m8.load_state_dict(p8)
    ids = torch.as_tensor(np.stack([w[:MAX_LEN] for w, _ in windows if len(w) >= MAX_LEN][:4]))
    with torch.no_grad():
        torch.testing.assert_close(
            m8.eval()(input_ids=ids).logits, m1.eval()(input_ids=ids).logits, rtol=0, atol=1e-5
        )
    assert r1.tokens == r8.tokens == 2 * sum(count_targets(collate_windows([w])) for w in windows)
    for h1, h8 in zip(r1.history, r8.history):
        assert h8["train_loss"] == pytest.approx(h1["train_loss"], rel=1e-5)
    # and training did move the parameters
    init = params(fresh_model(make_cfg()))
    assert any(not torch.equal(init[k], p1[k]) for k in init)


def test_train_step_loss_is_global_mean(tmp_path):
    """One step's reported loss (sum over micro-batches) equals the batch's mean target NLL."""
    cfg = make_cfg("train.grad_accum=3")
    model = fresh_model(cfg)
    windows = make_windows(8)
    with torch.no_grad():
        model.eval()
        b = collate_windows(windows)
        expected, _ = sft_batch_loss(model, b, count_targets(b), label_smoothing=cfg.train.label_smoothing)
    trainer = make_trainer(model, cfg, tmp_path, progress=False)
    out = trainer.train_step(windows)
    assert out["count"] == count_targets(b)
    assert out["loss"] == pytest.approx(float(expected), rel=1e-5)


# ----------------------------------------------------------------------------------------------
# resume
# ----------------------------------------------------------------------------------------------


def _valid_table(seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(6):
        hist = rng.integers(4, V, size=int(rng.integers(2, MAX_LEN)))
        rows.append({"user_idx": u, "input": hist, "target": int(rng.integers(4, V)), "history": hist})
    return pd.DataFrame(rows)


def _run(cfg, out_dir, windows, valid, resume):
    model = fresh_model(cfg)
    saved = []

    def evaluate_fn(m):
        return evaluate_table(m, valid, [10], True, 64).metrics

    def save_best(m, path):
        saved.append(path)

    trainer = make_trainer(
        model, cfg, out_dir, evaluate_fn=evaluate_fn, save_best_fn=save_best, progress=False
    )
    res = trainer.fit(windows, resume=resume)
    return model, res


def test_resume_matches_uninterrupted(tmp_path):
    windows = make_windows(20)
    valid = _valid_table()
    # epochs 2 then 4 stands for an interruption; a decaying schedule spans `epochs`, so it is held constant
    cfg4 = make_cfg("train.epochs=4", "train.grad_accum=2", "train.lr_schedule=constant")
    cfg2 = make_cfg("train.epochs=2", "train.grad_accum=2", "train.lr_schedule=constant")

    m_full, r_full = _run(cfg4, tmp_path / "full", windows, valid, resume=True)

    _, r_a = _run(cfg2, tmp_path / "split", windows, valid, resume=True)
    assert r_a.epochs_run == 2 and r_a.resumed_from_epoch == 0
    state = json.loads((tmp_path / "split" / "checkpoint" / "trainer_state.json").read_text())
    assert state["epoch"] == 2 and state["step"] == r_a.steps
    assert not list((tmp_path / "split").glob(".checkpoint.tmp-*"))  # atomic checkpoint, no leftovers

    # perturb the global RNGs between the runs: the resumed run must not depend on them
    torch.manual_seed(999)
    np.random.seed(999)
    m_res, r_res = _run(cfg4, tmp_path / "split", windows, valid, resume=True)
    assert r_res.resumed_from_epoch == 2
    assert r_res.epochs_run == r_full.epochs_run == 4
    assert r_res.steps == r_full.steps == 4 * 3
    assert r_res.tokens == r_full.tokens
    assert r_res.history == r_full.history
    assert r_res.best_metric == r_full.best_metric and r_res.best_epoch == r_full.best_epoch

    p_full, p_res = params(m_full), params(m_res)
    for k in p_full:
        assert torch.equal(p_res[k], p_full[k]), k


def test_resume_false_starts_over(tmp_path):
    windows = make_windows(10)
    cfg = make_cfg("train.epochs=1")
    _run(cfg, tmp_path, windows, _valid_table(), resume=True)
    m, r = _run(cfg, tmp_path, windows, _valid_table(), resume=False)
    assert r.resumed_from_epoch == 0 and r.epochs_run == 1 and len(r.history) == 1
    # resuming a finished run does nothing more
    m2, r2 = _run(cfg, tmp_path, windows, _valid_table(), resume=True)
    assert r2.resumed_from_epoch == 1 and r2.steps == r.steps and r2.history == r.history
    for k, v in params(m).items():
        assert torch.equal(params(m2)[k], v), k


class _CrashAfter(list):
    """A dataset that dies (like a killed process) after ``n`` examples have been read."""

    def __init__(self, items, n):
        super().__init__(items)
        self.left = n

    def __getitem__(self, i):
        self.left -= 1
        if self.left < 0:
            raise KeyboardInterrupt("simulated crash")
        return super().__getitem__(i)


def _run_saving(cfg, out_dir, windows, valid):
    model = fresh_model(cfg)
    trainer = make_trainer(model, cfg, out_dir, evaluate_fn=lambda m: evaluate_table(m, valid, [10], True, 64).metrics,
                           save_best_fn=lambda m, p: m.save_pretrained(p, safe_serialization=True), progress=False)
    return model, trainer.fit(windows, resume=True)


def test_mid_epoch_crash_resumes_at_the_same_batch_with_rng(tmp_path):
    """Step checkpoints record the position inside the epoch and the RNG states (dropout on): a run that
    dies mid-epoch and is resumed ends bit-identical to one that never stopped, best model included."""
    windows = make_windows(40)
    valid = _valid_table()
    cfg = make_cfg("train.epochs=3", "model.dropout=0.2", "train.checkpoint_steps=2")
    m_full, r_full = _run_saving(cfg, tmp_path / "full", windows, valid)
    with pytest.raises(KeyboardInterrupt):
        _run_saving(cfg, tmp_path / "crash", _CrashAfter(windows, 40 + 8 * 3 + 4), valid)  # dies in epoch 2
    state = json.loads((tmp_path / "crash" / "checkpoint" / "trainer_state.json").read_text())
    assert state["epoch"] == 1 and state["batch"] == 3 and state["step"] == 8
    assert (tmp_path / "crash" / "checkpoint" / "best" / "model.safetensors").is_file()
    torch.manual_seed(123)  # the resumed run must not depend on the global RNG state it starts with
    m_res, r_res = _run_saving(cfg, tmp_path / "crash", windows, valid)
    assert r_res.resumed_from_epoch == 1 and r_res.steps == r_full.steps
    assert r_res.history == r_full.history and r_res.best_epoch == r_full.best_epoch
    for k, v in params(m_full).items():
        assert torch.equal(params(m_res)[k], v), k
    from safetensors.torch import load_file

    best_full = load_file(tmp_path / "full" / "best" / "model.safetensors")
    best_res = load_file(tmp_path / "crash" / "best" / "model.safetensors")
    assert best_full.keys() == best_res.keys() and all(torch.equal(best_full[k], best_res[k]) for k in best_full)


def test_resume_with_another_world_size_mid_epoch_is_refused(tmp_path):
    windows = make_windows(40)
    cfg = make_cfg("train.epochs=2", "train.checkpoint_steps=2")
    with pytest.raises(KeyboardInterrupt):
        _run_saving(cfg, tmp_path, _CrashAfter(windows, 24), _valid_table())
    st = tmp_path / "checkpoint" / "trainer_state.json"
    state = json.loads(st.read_text())
    st.write_text(json.dumps({**state, "world": 2}))
    with pytest.raises(RuntimeError, match="same number"):
        _run_saving(cfg, tmp_path, windows, _valid_table())


@pytest.mark.parametrize("n", [33, 31, 32, 1])
def test_epoch_batches_same_step_count_on_every_process(n):
    """Under DDP each process must take part in every optimizer step (else the all-reduce hangs): equal
    batch counts, shards that partition the epoch, the global batch of one process split in world parts."""
    from types import SimpleNamespace

    cfg = SimpleNamespace(batch_size=8)
    shards = [Trainer.epoch_batches(SimpleNamespace(cfg=cfg, seed=3, world=2, rank=r), n, 0) for r in (0, 1)]
    single = Trainer.epoch_batches(SimpleNamespace(cfg=SimpleNamespace(batch_size=16), seed=3, world=1, rank=0), n, 0)
    assert len(shards[0]) == len(shards[1]) == len(single)
    for step, whole in enumerate(single):
        assert sorted(np.concatenate([shards[0][step], shards[1][step]])) == sorted(whole)


def test_staged_output_publishes_atomically_without_checkpoints_or_stale_temporaries(tmp_path):
    """A writer killed mid-write leaves ``.X.tmp-*``: the next run removes it, and the published output
    holds neither checkpoints nor temporaries; a failing stage publishes nothing and keeps its work."""
    from asft.utils import staged_output

    out, work = tmp_path / "out", tmp_path / "work"
    (work / "member_0" / ".checkpoint.tmp-dead").mkdir(parents=True)
    with pytest.raises(RuntimeError), staged_output(out, work) as w:
        (w / "checkpoint").mkdir()
        raise RuntimeError("crash")
    assert not out.exists() and (work / "checkpoint").is_dir()
    with staged_output(out, work) as w:
        assert not list(w.rglob(".*.tmp-*"))
        (w / "best").mkdir()
        (w / "best" / "model.safetensors").write_bytes(b"x")
        (w / "summary.json").write_text(json.dumps({"model_dir": str(w / "best")}))
    assert sorted(p.name for p in out.iterdir()) == ["best", "member_0", "summary.json"]
    assert json.loads((out / "summary.json").read_text())["model_dir"] == str(out / "best")
    assert not work.exists()
