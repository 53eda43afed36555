"""Stage: next-item SFT (behaviour cloning) of the base generative recommender.

One pass per sequence: the loss is the next-item NLL at every position of each training window
(not one sample per prefix), averaged over all target tokens of the optimizer batch.

By default (``train.mask_history``) the softmax is the *history-masked* policy that evaluation
ranks and serving returns: at each position the items the user already consumed -- earlier in the
window, or before the window began -- and the special tokens are excluded (a repeated target stays
a valid label). ``train.mask_history=false`` trains the plain full softmax over the vocabulary.

Large catalogs (``train.softmax``: sampled, or auto above ``train.sampled_softmax_min_items``) train a
*sampled* softmax instead: each row's target against ``train.negatives`` negatives shared by the
micro-batch, drawn uniformly or by popularity (plus, optionally, the micro-batch's other targets), with
the logQ correction and the same history masking (:class:`NegativeSampler`,
:func:`asft.losses.sampled_softmax_loss`). Negatives come from torch's global RNG, which the trainer's
checkpoints restore, so a resumed run draws the same negatives.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from asft.config import BaseTrainConfig, Config
from asft.data.preprocess import NUM_SPECIAL, ProcessedData
from asft.evaluation import evaluate_table, pad_right
from asft.losses import log_expected_counts, masked_sft_loss, sampled_softmax_loss
from asft.models.recommender import (
    backbone,
    build_model,
    load_recommender,
    position_logits,
    save_recommender,
)
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


def consumed_among(ids: torch.Tensor, before: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                   cands: torch.Tensor) -> torch.Tensor:
    """``[N, C]`` bool: candidate item ``cands[c]`` was consumed at or before position (rows[n], cols[n]) of
    ``ids`` or is in that row's ``before`` -- :func:`consumed_mask` restricted to ``C`` candidate items
    (memory ``B x T x C`` bytes instead of ``N x V``)."""
    b, t = ids.shape
    eq = ids.unsqueeze(-1) == cands.view(1, 1, -1)  # [B, T, C]
    first = torch.where(eq.any(dim=1), eq.to(torch.uint8).argmax(dim=1), torch.full((b, len(cands)), t,
                                                                                   device=ids.device))
    if before.numel():
        first = first.masked_fill((before.unsqueeze(-1) == cands.view(1, 1, -1)).any(dim=1), -1)
    return first[rows] <= cols.view(-1, 1)


@dataclass
class NegativeSampler:
    """Negatives of the sampled softmax: ``n`` draws per micro-batch (shared by its rows) from ``log_q``
    [V] (``-inf`` for special tokens), plus up to ``n`` of the micro-batch's targets when ``in_batch``
    (their marginal is the targets' popularity ``log_pop``), and the logQ correction."""

    n: int
    log_q: torch.Tensor
    uniform: bool
    in_batch: bool = False
    log_pop: torch.Tensor | None = None
    logq_correction: bool = True

    @classmethod
    def from_config(cls, cfg: BaseTrainConfig, vocab_size: int, item_counts: np.ndarray | None = None
                    ) -> NegativeSampler:
        """``item_counts`` [V]: how often each token is a training target (needed for the popularity
        sampler and for in-batch negatives)."""
        n_items = vocab_size - NUM_SPECIAL
        needs_counts = cfg.negative_sampler == "popularity" or cfg.in_batch_negatives
        if needs_counts and item_counts is None:
            raise ValueError("train.negative_sampler=popularity and train.in_batch_negatives need the training"
                             " targets' item counts")
        log_pop = None
        if item_counts is not None:
            c = torch.as_tensor(np.asarray(item_counts, dtype=np.float64))
            if c.shape != (vocab_size,):
                raise ValueError(f"item_counts has shape {tuple(c.shape)}, expected ({vocab_size},)")
            c[:NUM_SPECIAL] = 0
            log_pop = torch.log(c / c.sum()).float() if c.sum() > 0 else None
        if cfg.negative_sampler == "popularity":
            s = torch.as_tensor(np.asarray(item_counts, dtype=np.float64)) + 1.0  # add-one smoothing
            s[:NUM_SPECIAL] = 0
            log_q = torch.log(s / s.sum()).float()
        else:
            log_q = torch.full((vocab_size,), -float(np.log(n_items)))
            log_q[:NUM_SPECIAL] = float("-inf")
        return cls(cfg.negatives, log_q, cfg.negative_sampler == "uniform", cfg.in_batch_negatives, log_pop,
                   cfg.logq_correction)

    def draw(self, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(negative items [C], how many of them come from the batch's ``labels``)."""
        device = labels.device
        v = self.log_q.shape[0]
        if self.uniform:
            neg = torch.randint(NUM_SPECIAL, v, (self.n,), device=device)
        else:
            if self.log_q.device != device:
                self.log_q = self.log_q.to(device)
            neg = torch.multinomial(self.log_q.exp(), self.n, replacement=True)
        m = 0
        if self.in_batch and len(labels):
            m = min(self.n, len(labels))
            neg = torch.cat([neg, labels[torch.randperm(len(labels), device=device)[:m]]])
        return neg, m

    def log_expected(self, items: torch.Tensor, m: int) -> torch.Tensor | None:
        if not self.logq_correction:
            return None
        if self.log_q.device != items.device:
            self.log_q = self.log_q.to(items.device)
        if self.log_pop is not None and self.log_pop.device != items.device:
            self.log_pop = self.log_pop.to(items.device)
        return log_expected_counts(items, self.log_q, self.n, m, self.log_pop)


def use_sampled_softmax(cfg: BaseTrainConfig, n_items: int) -> bool:
    """Whether base training uses the sampled softmax for a catalog of ``n_items`` items."""
    return cfg.softmax == "sampled" or (cfg.softmax == "auto" and n_items >= cfg.sampled_softmax_min_items)


def target_counts(windows: list[tuple], vocab_size: int) -> np.ndarray:
    """How often each token is a scored training target of the base windows: [vocab_size]."""
    if not windows:
        return np.zeros(vocab_size, dtype=np.int64)
    labels = np.concatenate([np.asarray(w[0][1:], dtype=np.int64)[w[1]:] for w in windows])
    return np.bincount(labels, minlength=vocab_size)[:vocab_size]


def sampled_batch_loss(model, batch: dict, normalizer: float, sampler: NegativeSampler,
                       label_smoothing: float = 0.0):
    """:func:`sft_batch_loss` with the sampled softmax: the target and the shared negatives only."""
    am, ids = batch["attention_mask"], batch["input_ids"]
    sel = am.bool() & (batch["labels"] != IGNORE)
    hidden = backbone(model)(input_ids=ids, attention_mask=am).last_hidden_state[sel]
    labels = batch["labels"][sel]
    head = getattr(model, "module", model).get_output_embeddings()
    neg, m = sampler.draw(labels)
    pos_logits = (hidden * head.weight[labels]).sum(-1)
    neg_logits = hidden @ head.weight[neg].T
    if getattr(head, "bias", None) is not None:
        pos_logits, neg_logits = pos_logits + head.bias[labels], neg_logits + head.bias[neg]
    banned = None
    if "before" in batch:
        rows, cols = sel.nonzero(as_tuple=True)
        banned = consumed_among(ids, batch["before"], rows, cols, neg)
    loss = sampled_softmax_loss(pos_logits, neg_logits, labels, neg, sampler.log_expected(neg, m), banned,
                                label_smoothing, normalizer=normalizer)
    return loss, {}


def sft_batch_loss(model, batch: dict, normalizer: float, label_smoothing: float = 0.0,
                   sampler: NegativeSampler | None = None):
    """Next-item NLL at every labelled position, summed and divided by the global target count; the
    history-masked softmax when the batch carries ``before`` (see :func:`collate_windows`); the sampled
    softmax when a ``sampler`` is given."""
    if sampler is not None:
        return sampled_batch_loss(model, batch, normalizer, sampler, label_smoothing)
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
                 progress: bool = True, item_counts: np.ndarray | None = None) -> Trainer:
    """The base model's trainer; the sampled softmax per ``cfg.train.softmax`` (``item_counts``: see
    :meth:`NegativeSampler.from_config`)."""
    vocab_size = getattr(model, "module", model).config.vocab_size
    sampler = None
    if use_sampled_softmax(cfg.train, vocab_size - NUM_SPECIAL):
        sampler = NegativeSampler.from_config(cfg.train, vocab_size, item_counts)
    loss_fn = functools.partial(sft_batch_loss, label_smoothing=cfg.train.label_smoothing, sampler=sampler)
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
    sampled = use_sampled_softmax(cfg.train, data.vocab.size - NUM_SPECIAL)
    counts = target_counts(windows, data.vocab.size) if sampled else None
    meta = {"max_len": cfg.preprocess.max_len, "dataset_stats": data.stats, "backbone": cfg.model.backbone,
            "trained_masked": cfg.train.mask_history, "softmax": "sampled" if sampled else "full"}

    def evaluate_fn(m):
        return evaluate_table(m, valid, cfg.eval.ks, cfg.eval.mask_history, cfg.eval.batch_size,
                              memory_mb=cfg.eval.memory_mb).metrics

    def save_best(m, path):
        save_recommender(m, data.vocab, path, meta=meta)

    trainer = make_trainer(model, cfg, out_dir, evaluate_fn, save_best, on_log, progress, item_counts=counts)
    t0 = time.perf_counter()
    result: TrainResult = trainer.fit(windows, resume=resume)
    summary = {k: v for k, v in asdict(result).items() if k != "history"}
    summary.update(wall_seconds=time.perf_counter() - t0, tokens_per_s=result.tokens_per_s,
                   n_params=sum(p.numel() for p in model.parameters()), train_windows=len(windows),
                   softmax=meta["softmax"])
    write_json(out_dir / "train_summary.json", {**summary, "history": result.history})
    return summary


def evaluate_model(model_dir: str | Path, processed_dir: str | Path, cfg: Config, device: str = "cpu") -> dict:
    """Validation and test metrics of a saved model (masked, and unmasked test when configured)."""
    model, _, _ = load_recommender(model_dir, device=device)
    data = ProcessedData.open(processed_dir)
    out = {}
    valid = evaluate_table(model, data.table("valid"), cfg.eval.ks, cfg.eval.mask_history, cfg.eval.batch_size,
                           memory_mb=cfg.eval.memory_mb)
    test_tbl = data.table("test")
    test = evaluate_table(model, test_tbl, cfg.eval.ks, cfg.eval.mask_history, cfg.eval.batch_size,
                           memory_mb=cfg.eval.memory_mb)
    out["valid"] = valid.metrics
    out["test"] = test.metrics
    if cfg.eval.also_unmasked:
        out["test_unmasked"] = evaluate_table(model, test_tbl, cfg.eval.ks, False, cfg.eval.batch_size,
                                              memory_mb=cfg.eval.memory_mb).metrics
    if data.stats.get("has_ratings"):
        high = test_tbl["target_rating"].to_numpy() >= 4
        if high.any():
            from asft.metrics import ranking_metrics

            out["test_high_rated"] = ranking_metrics(test.ranks[high], cfg.eval.ks)
            out["test_high_rated"]["n_users"] = int(high.sum())
    return out
