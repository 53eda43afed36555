"""Stage: next-item SFT (behaviour cloning) of the base generative recommender.

One pass per sequence: the loss is the full-softmax next-item NLL at every position of each
training window (not one sample per prefix), averaged over all target tokens of the optimizer
batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from asft.config import Config
from asft.data.preprocess import ProcessedData
from asft.evaluation import evaluate_table, pad_right
from asft.losses import sft_loss
from asft.models.recommender import build_model, load_recommender, position_logits, save_recommender
from asft.training.trainer import Trainer, TrainResult
from asft.utils import seed_everything, write_json

IGNORE = -100


def collate_windows(windows: list[tuple[np.ndarray, int]]) -> dict:
    """(tokens, first_label) windows -> inputs tokens[:-1], labels tokens[1:] (right-padded); labels
    before ``first_label`` (already scored by an overlapping window) and padding are ignored."""
    ids, am = pad_right([w[:-1] for w, _ in windows])
    labels, lm = pad_right([w[1:] for w, _ in windows])
    labels[lm == 0] = IGNORE
    for i, (_, first) in enumerate(windows):
        labels[i, :first] = IGNORE
    return {"input_ids": ids, "attention_mask": am, "labels": labels}


def count_targets(batch: dict) -> float:
    return float((batch["labels"] != IGNORE).sum())


def sft_batch_loss(model, batch: dict, normalizer: float):
    am = batch["attention_mask"]
    logits = position_logits(model, batch["input_ids"], am)
    labels = batch["labels"][am.bool()]
    keep = labels != IGNORE
    loss = sft_loss(logits[keep], labels[keep], normalizer=normalizer)
    return loss, {}


def make_trainer(model, cfg: Config, out_dir: Path, evaluate_fn=None, save_best_fn=None, on_log=None,
                 progress: bool = True) -> Trainer:
    return Trainer(model, cfg.train, out_dir, collate_fn=collate_windows, loss_fn=sft_batch_loss,
                   count_fn=count_targets, evaluate_fn=evaluate_fn, save_best_fn=save_best_fn,
                   monitor=cfg.train.monitor, seed=cfg.seed, on_log=on_log, progress=progress)


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
    windows = data.train_windows()
    meta = {"max_len": cfg.preprocess.max_len, "dataset_stats": data.stats}

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
