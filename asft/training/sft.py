"""Stage: next-item SFT (behaviour cloning) of the base generative recommender.

One pass per sequence: the loss is the next-item NLL at every position of each training window
(not one sample per prefix), averaged over all target tokens of the optimizer batch.

By default (``train.mask_history``) the softmax is the *history-masked* policy that evaluation
ranks and serving returns: at each position the items the user already consumed -- earlier in the
window, or before the window began -- and the special tokens are excluded (a repeated target stays
a valid label). ``train.mask_history=false`` trains the plain full softmax over the vocabulary.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from asft.config import Config
from asft.data.preprocess import NUM_SPECIAL, ProcessedData
from asft.evaluation import evaluate_table, pad_right
from asft.losses import masked_sft_loss
from asft.models.recommender import build_model, load_recommender, position_logits, save_recommender
from asft.sampling import TrainContexts
from asft.training.trainer import Trainer, TrainResult
from asft.utils import seed_everything, write_json

IGNORE = -100


def base_windows(data: ProcessedData, mask_history: bool) -> list[tuple]:
    """The base model's training examples: ``(tokens, first_label)`` per window, plus the user's items
    before the window (``before``, masked as history) when the masked policy is trained."""
    if not mask_history:
        return data.train_windows()
    tc = TrainContexts.from_processed(data)
    return [(w, int(f), tc.before(i)) for i, (w, f) in enumerate(zip(tc.windows, tc.first))]


def collate_windows(windows: list[tuple]) -> dict:
    """(tokens, first_label[, before]) windows -> inputs tokens[:-1], labels tokens[1:] (right-padded);
    labels before ``first_label`` (already scored by an overlapping window) and padding are ignored.
    With ``before`` the batch carries those items (right-padded with PAD, a special token) for masking."""
    ids, am = pad_right([w[0][:-1] for w in windows])
    labels, lm = pad_right([w[0][1:] for w in windows])
    labels[lm == 0] = IGNORE
    for i, w in enumerate(windows):
        labels[i, : w[1]] = IGNORE
    batch = {"input_ids": ids, "attention_mask": am, "labels": labels}
    if windows and len(windows[0]) > 2:
        batch["before"], _ = pad_right([np.asarray(w[2], dtype=np.int64) for w in windows])
    return batch


def count_targets(batch: dict) -> float:
    return float((batch["labels"] != IGNORE).sum())


def consumed_mask(ids: torch.Tensor, before: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                  vocab_size: int) -> torch.Tensor:
    """``[N, V]`` bool: the items excluded from the softmax at positions (rows[n], cols[n]) of ``ids`` --
    the special tokens, every item at or before that position, and every item of that row's ``before``."""
    b, t = ids.shape
    first = torch.full((b, vocab_size), t, dtype=torch.long, device=ids.device)
    first.scatter_reduce_(1, ids, torch.arange(t, device=ids.device).expand(b, t), reduce="amin")
    if before.numel():
        first.scatter_(1, before, -1)
    banned = first[rows] <= cols.view(-1, 1)
    banned[:, :NUM_SPECIAL] = True
    return banned


def sft_batch_loss(model, batch: dict, normalizer: float, label_smoothing: float = 0.0):
    """Next-item NLL at every labelled position, summed and divided by the global target count; the
    history-masked softmax when the batch carries ``before`` (see :func:`collate_windows`)."""
    am, ids = batch["attention_mask"], batch["input_ids"]
    sel = am.bool() & (batch["labels"] != IGNORE)
    logits = position_logits(model, ids, am, positions=sel)
    labels = batch["labels"][sel]
    banned = None
    if "before" in batch:
        rows, cols = sel.nonzero(as_tuple=True)
        banned = consumed_mask(ids, batch["before"], rows, cols, logits.shape[-1])
    loss = masked_sft_loss(logits, labels, banned, label_smoothing, normalizer=normalizer)
    return loss, {}


def make_trainer(model, cfg: Config, out_dir: Path, evaluate_fn=None, save_best_fn=None, on_log=None,
                 progress: bool = True) -> Trainer:
    loss_fn = functools.partial(sft_batch_loss, label_smoothing=cfg.train.label_smoothing)
    return Trainer(model, cfg.train, out_dir, collate_fn=collate_windows, loss_fn=loss_fn,
                   count_fn=count_targets, evaluate_fn=evaluate_fn, save_best_fn=save_best_fn,
                   monitor=cfg.train.monitor, seed=cfg.seed, on_log=on_log, progress=progress, name="train-base")


def train_base(
    processed_dir: str | Path,
    cfg: Config,
    out_dir: str | Path,
    on_log: Callable[[dict, int], None] | None = None,
    resume: bool = True,
    progress: bool = True,
) -> dict:
    """Train the base model; returns a summary and writes ``out_dir/best`` (the best-validation model)."""
    out_dir = Path(out_dir)
    data = ProcessedData.open(processed_dir)
    seed_everything(cfg.seed)
    model = build_model(cfg.model, data.vocab.size, cfg.preprocess.max_len, seed=cfg.seed)
    valid = data.table("valid")
    windows = base_windows(data, cfg.train.mask_history)
    meta = {"max_len": cfg.preprocess.max_len, "dataset_stats": data.stats, "backbone": cfg.model.backbone,
            "trained_masked": cfg.train.mask_history}

    def evaluate_fn(m):
        return evaluate_table(m, valid, cfg.eval.ks, cfg.eval.mask_history, cfg.eval.batch_size).metrics

    def save_best(m, path):
        save_recommender(m, data.vocab, path, meta=meta)

    trainer = make_trainer(model, cfg, out_dir, evaluate_fn, save_best, on_log, progress)
    t0 = time.perf_counter()
    result: TrainResult = trainer.fit(windows, resume=resume)
    summary = {k: v for k, v in asdict(result).items() if k != "history"}
    summary.update(wall_seconds=time.perf_counter() - t0, tokens_per_s=result.tokens_per_s,
                   n_params=sum(p.numel() for p in model.parameters()), train_windows=len(windows))
    write_json(out_dir / "train_summary.json", {**summary, "history": result.history})
    return summary


def evaluate_model(model_dir: str | Path, processed_dir: str | Path, cfg: Config, device: str = "cpu") -> dict:
    """Validation and test metrics of a saved model (masked, and unmasked test when configured)."""
    model, _, _ = load_recommender(model_dir, device=device)
    data = ProcessedData.open(processed_dir)
    out = {}
    valid = evaluate_table(model, data.table("valid"), cfg.eval.ks, cfg.eval.mask_history, cfg.eval.batch_size)
    test_tbl = data.table("test")
    test = evaluate_table(model, test_tbl, cfg.eval.ks, cfg.eval.mask_history, cfg.eval.batch_size)
    out["valid"] = valid.metrics
    out["test"] = test.metrics
    if cfg.eval.also_unmasked:
        out["test_unmasked"] = evaluate_table(model, test_tbl, cfg.eval.ks, False, cfg.eval.batch_size).metrics
    if data.stats.get("has_ratings"):
        high = test_tbl["target_rating"].to_numpy() >= 4
        if high.any():
            from asft.metrics import ranking_metrics

            out["test_high_rated"] = ranking_metrics(test.ranks[high], cfg.eval.ks)
            out["test_high_rated"]["n_users"] = int(high.sum())
    return out
