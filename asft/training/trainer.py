"""A small, readable trainer shared by every fine-tuning stage.

* AdamW (no weight decay on biases, LayerNorm and position tables), linear warmup then constant LR,
  gradient clipping.
* One optimizer step = one batch of ``batch_size`` examples per process, split into ``grad_accum``
  micro-batches. The loss is normalised by the *global* count (tokens, or weight sum) of the whole
  optimizer batch across micro-batches and processes, so 1x8 and 8x1 give the same update.
* Data order is a pure function of (seed, epoch): a resumed run sees exactly the batches an
  uninterrupted run would.
* Early stopping on a validation metric; the best model is saved with ``save_pretrained``;
  a resumable checkpoint (model, optimizer, scheduler, RNG states, position) is written atomically.
* Runs on CPU, one GPU, or several processes through Accelerate (``accelerate launch``).

The loss is injected as ``loss_fn(model, micro_batch, normalizer) -> (loss, stats)`` and
``count_fn(batch) -> float`` gives a batch's contribution to the normaliser.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from asft import storage
from asft.config import TrainConfig
from asft.utils import atomic_dir, link_tree, write_json

LogFn = Callable[[dict[str, float], int], None]


@dataclass
class TrainResult:
    best_metric: float
    best_epoch: int
    epochs_run: int
    steps: int
    stopped_early: bool
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    tokens: int = 0
    resumed_from_epoch: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds > 0 else 0.0


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "ln_" in name or "norm" in name or name.endswith("wpe.weight"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(warmup_steps: int, schedule: str = "constant", total_steps: int = 0,
              min_ratio: float = 0.0) -> Callable[[int], float]:
    """LR multiplier after ``step`` optimizer steps: linear warmup to 1, then constant, or a cosine /
    linear decay that reaches ``min_ratio`` at ``total_steps``."""
    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant" or total_steps <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
        return min_ratio + (1.0 - min_ratio) * shape

    return f


def _rng_state() -> dict:
    st = np.random.get_state()
    return {
        "python": [st_ if not isinstance(st_, tuple) else list(st_) for st_ in random.getstate()],
        "numpy": {"key": st[1].tolist(), "pos": int(st[2]), "has_gauss": int(st[3]), "gauss": float(st[4])},
    }


def _set_rng_state(d: dict, torch_state: torch.Tensor, cuda_states: list[torch.Tensor] | None = None) -> None:
    py = d["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = d["numpy"]
    np.random.set_state(("MT19937", np.array(n["key"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(torch_state)
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)


class Trainer:
    def __init__(
        self,
        model: torch.nn.Module,
        cfg: TrainConfig,
        out_dir: str | Path,
        *,
        collate_fn: Callable[[list], dict],
        loss_fn: Callable[[torch.nn.Module, dict, float], tuple[torch.Tensor, dict]],
        count_fn: Callable[[dict], float],
        evaluate_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None,
        save_best_fn: Callable[[torch.nn.Module, Path], None] | None = None,
        monitor: str | None = None,
        seed: int = 0,
        on_log: LogFn | None = None,
        accelerator=None,
        progress: bool = True,
        name: str = "",
        repeat_batches: int = 1,
    ):
        from accelerate import Accelerator

        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.collate_fn, self.loss_fn, self.count_fn = collate_fn, loss_fn, count_fn
        self.evaluate_fn, self.save_best_fn = evaluate_fn, save_best_fn
        self.monitor = monitor or cfg.monitor
        self.seed = seed
        self.on_log = on_log or (lambda metrics, step: None)
        self.progress = progress
        self.stage_name = f"{name}: " if name else ""  # console lines say which stage is training
        self.repeat = max(1, int(repeat_batches))  # optimizer steps per batch (PPO epochs over one sample)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        if accelerator is None:
            from accelerate.utils import DistributedDataParallelKwargs

            dev = cfg.device
            # Under torchrun / accelerate launch: DDP (gloo on CPU, NCCL on GPUs). Parameters a loss does
            # not touch (e.g. the base LM head inside a reward model) must not stall the gradient sync.
            accelerator = Accelerator(cpu=(dev == "cpu" or (dev == "auto" and not torch.cuda.is_available())),
                                      kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
        self.acc = accelerator
        self.device = accelerator.device
        self.world = accelerator.num_processes
        self.rank = accelerator.process_index
        self.optimizer = torch.optim.AdamW(
            param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), fused=False
        )
        self.total_steps = 0  # set by fit() from the dataset size; decaying schedules read it
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(cfg.warmup_steps, cfg.lr_schedule, self.total_steps,
                                                   cfg.min_lr_ratio)(step))
        # The loss runs inside the (DDP-wrapped) module's forward, so losses may use any submodule of
        # the model and DDP still synchronises the gradients; ``self.core`` is the bare model.
        # The scheduler is not prepared: Accelerate would step it once per process per optimizer step
        # (it assumes a sharded dataloader with fewer steps), warming up N times faster under DDP.
        self.model, self.optimizer = accelerator.prepare(_LossModule(model, loss_fn), self.optimizer)
        self.core = model

    # ------------------------------------------------------------------ data
    def epoch_batches(self, n: int, epoch: int) -> list[np.ndarray]:
        """This process's batches for an epoch: a pure function of (seed, epoch, world, rank).

        Every process gets the same number of batches (one per optimizer step); in a last step smaller
        than the number of processes a batch may be empty, and that process takes part with a zero-weight
        step (see :meth:`train_step`) so the gradient all-reduce never waits for it."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(n)
        per_step = self.cfg.batch_size * self.world
        return [perm[s : s + per_step][self.rank :: self.world] for s in range(0, n, per_step)]

    # ------------------------------------------------------------------ checkpointing
    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoint"

    def save_checkpoint(self, state: dict) -> None:
        """Everything needed to continue exactly: model, optimizer, scheduler, RNG states (Python, NumPy,
        torch, CUDA), the data position (epoch, batch within it) and the best model so far (hard links
        to ``best/``). Written to a temporary directory and renamed, so a crash leaves the previous
        checkpoint intact."""
        if not self.acc.is_main_process:
            return
        with atomic_dir(self.ckpt_dir) as tmp:
            self.core.save_pretrained(tmp / "model", safe_serialization=True)
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(torch.get_rng_state(), tmp / "torch_rng.pt")
            if torch.cuda.is_available():
                torch.save(torch.cuda.get_rng_state_all(), tmp / "cuda_rng.pt")
            if self.best_dir.is_dir():
                link_tree(self.best_dir, tmp / "best")
            write_json(tmp / "trainer_state.json", {**state, "rng": _rng_state()})
        storage.after_checkpoint_write(self.ckpt_dir)  # to remote storage, when synced (asft.storage)

    def load_checkpoint(self) -> dict | None:
        """Restore a checkpoint written by :meth:`save_checkpoint` (tensors only: ``weights_only`` loads);
        without a local one, the latest from remote storage when synced (a run preempted elsewhere)."""
        if storage.syncing(self.ckpt_dir):
            if self.acc.is_local_main_process:
                version = storage.before_checkpoint_load(self.ckpt_dir)
                if version:
                    self._log(f"{self.stage_name}checkpoint {version} downloaded from remote storage")
            self.acc.wait_for_everyone()
        if not (self.ckpt_dir / "trainer_state.json").is_file():
            return None
        from safetensors.torch import load_file

        model = self.core
        weights = load_file(self.ckpt_dir / "model" / "model.safetensors", device=str(self.device))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected or [m for m in missing if "lm_head" not in m]:
            raise RuntimeError(f"{self.ckpt_dir}: checkpoint does not match the model ({missing}, {unexpected})")
        model.tie_weights()
        self.optimizer.load_state_dict(torch.load(self.ckpt_dir / "optimizer.pt", weights_only=True))
        self.scheduler.load_state_dict(torch.load(self.ckpt_dir / "scheduler.pt", weights_only=True))
        state = json.loads((self.ckpt_dir / "trainer_state.json").read_text())
        cuda_file = self.ckpt_dir / "cuda_rng.pt"
        _set_rng_state(state["rng"], torch.load(self.ckpt_dir / "torch_rng.pt", weights_only=True),
                       torch.load(cuda_file, weights_only=True) if cuda_file.is_file() else None)
        if self.acc.is_main_process:
            # The best model as of the checkpoint (a later best/ from the crashed run is discarded).
            if (self.ckpt_dir / "best").is_dir():
                with atomic_dir(self.best_dir) as tmp:
                    link_tree(self.ckpt_dir / "best", tmp)
            elif self.best_dir.exists():
                shutil.rmtree(self.best_dir)
        self.acc.wait_for_everyone()
        return state

    @property
    def best_dir(self) -> Path:
        return self.out_dir / "best"

    def save_best(self) -> None:
        """``save_best_fn`` into a temporary directory renamed over ``best/`` (never half-written)."""
        if self.save_best_fn is None or not self.acc.is_main_process:
            return
        with atomic_dir(self.best_dir) as tmp:
            self.save_best_fn(self.core, tmp)

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self, examples: Sequence, dummy: bool = False) -> dict[str, float]:
        """One optimizer step. ``dummy``: this process has no examples in this step (a last, small step
        under DDP); it runs ``examples`` with weight 0, so it contributes nothing but joins the all-reduce."""
        cfg = self.cfg
        model = self.model
        model.train()
        n_micro = min(cfg.grad_accum, len(examples))
        micro = [self.collate_fn([examples[i] for i in idx]) for idx in np.array_split(np.arange(len(examples)), n_micro)]
        local = torch.tensor(0.0 if dummy else float(sum(self.count_fn(mb) for mb in micro)), device=self.device)
        total = self.acc.reduce(local, reduction="sum") if self.world > 1 else local
        normalizer = float(total.item())
        stats_sum: dict[str, float] = {}
        loss_total = 0.0
        for i, mb in enumerate(micro):
            mb = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in mb.items()}
            ctx = self.acc.no_sync(model) if (i < len(micro) - 1 and self.world > 1) else _null()
            with ctx:
                loss, stats = model(mb, normalizer)
                if dummy:
                    loss, stats = loss * 0.0, {}
                # DDP averages gradients over processes; the loss is already globally normalised.
                self.acc.backward(loss * self.world)
            loss_total += float(loss.detach())
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + float(v)
        if not math.isfinite(loss_total):
            raise FloatingPointError(f"non-finite training loss ({loss_total}); lower train.lr or check the data")
        if cfg.grad_clip > 0:
            grad_norm = float(self.acc.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        else:
            grad_norm = float("nan")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.world > 1:
            loss_total = float(self.acc.reduce(torch.tensor(loss_total, device=self.device), reduction="sum"))
        return {"loss": loss_total, "grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0],
                "count": normalizer, **stats_sum}

    # ------------------------------------------------------------------ fit
    def fit(self, dataset: Sequence, resume: bool = True) -> TrainResult:
        cfg = self.cfg
        self.total_steps = cfg.epochs * math.ceil(len(dataset) / (cfg.batch_size * self.world)) * self.repeat
        state = self.load_checkpoint() if resume else None
        start_epoch = skip = 0
        best, best_epoch, bad, step, history = -math.inf, -1, 0, 0, []
        tokens, train_s, eval_s, ep_loss, ep_count = 0, 0.0, 0.0, 0.0, 0.0
        if state and state.get("batch") and state.get("world", 1) != self.world:
            raise RuntimeError(f"{self.ckpt_dir}: written mid-epoch by {state['world']} process(es); resume with "
                               f"the same number (now {self.world}) or start over (--no-resume)")
        if state:
            start_epoch, skip = state["epoch"], state.get("batch", 0)
            best, best_epoch, bad, step = state["best"], state["best_epoch"], state["bad"], state["step"]
            history, tokens, train_s, eval_s = state["history"], state["tokens"], state["train_s"], state["eval_s"]
            ep_loss, ep_count = state.get("ep_loss", 0.0), state.get("ep_count", 0.0)
            self._log(f"resuming from epoch {start_epoch}, batch {skip} (step {step})")
        stopped = state.get("stopped", False) if state else False
        epoch = start_epoch
        ep_stats: dict[str, float] = {}

        def evaluate(row: dict[str, Any], label: str) -> None:
            """Validation metrics into ``row``; best model and early-stopping bookkeeping."""
            nonlocal best, best_epoch, bad, stopped, eval_s
            t1 = time.perf_counter()
            metrics = self.evaluate_fn(self.core)
            eval_s += time.perf_counter() - t1
            row.update({f"valid/{k}": v for k, v in metrics.items()})
            value = metrics[self.monitor]
            if value > best:
                best, best_epoch, bad = value, row["epoch"], 0
                self.save_best()
            else:
                bad += 1
                stopped = bad >= cfg.patience
            loss = f"loss {row['train_loss']:.4f} " if "train_loss" in row else ""
            self._log(f"{label}: {loss}valid {self.monitor} {value:.4f} (best {best:.4f} @ {best_epoch})"
                      f" [{train_s:.0f}s]")

        if state is None and cfg.eval_at_start and self.evaluate_fn is not None:
            row0: dict[str, Any] = {"epoch": 0, "step": 0}
            evaluate(row0, f"{self.stage_name}before training")
            history.append(row0)
            self.on_log({k: v for k, v in row0.items() if k not in ("epoch", "step")}, 0)

        def checkpoint(batch: int = 0) -> None:
            self.save_checkpoint({"epoch": epoch, "batch": batch, "step": step, "best": best,
                                  "best_epoch": best_epoch, "bad": bad, "history": history, "tokens": tokens,
                                  "train_s": train_s, "eval_s": eval_s, "stopped": stopped, "ep_loss": ep_loss,
                                  "ep_count": ep_count, "world": self.world})

        while epoch < cfg.epochs and not stopped:
            batches = self.epoch_batches(len(dataset), epoch)
            t0 = time.perf_counter()
            bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, file=sys.stderr,
                       disable=not (self.progress and self.acc.is_main_process and sys.stderr.isatty()),
                       mininterval=1.0, initial=skip)
            for b, idx in enumerate(batches[skip:], start=skip):
                examples = [dataset[int(i)] for i in idx] if len(idx) else [dataset[0]]
                for _ in range(self.repeat):
                    out = self.train_step(examples, dummy=not len(idx))
                    step += 1
                    ep_loss += out["loss"] * out["count"]
                    ep_count += out["count"]
                    tokens += int(out["count"])
                    for k, v in out.items():
                        if k.endswith("_sum"):
                            ep_stats[k] = ep_stats.get(k, 0.0) + v
                    if step % 10 == 0:
                        self.on_log({"train/loss": out["loss"], "train/grad_norm": out["grad_norm"],
                                     "train/lr": out["lr"]}, step)
                bar.update(1)
                bar.set_postfix(loss=f"{out['loss']:.4f}")

                def crossed(every: int, step: int = step) -> bool:  # a multiple of `every` steps was reached
                    return bool(every) and (step - self.repeat) // every < step // every

                if crossed(cfg.eval_steps) and b + 1 < len(batches) and self.evaluate_fn is not None:
                    train_s += time.perf_counter() - t0
                    row_s: dict[str, Any] = {"epoch": round(epoch + (b + 1) / len(batches), 4), "step": step}
                    evaluate(row_s, f"{self.stage_name}step {step}")
                    history.append(row_s)  # in the summary's history; tracked curves stay per epoch
                    t0 = time.perf_counter()
                    if stopped:
                        break
                if crossed(cfg.checkpoint_steps) and b + 1 < len(batches):
                    train_s += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    checkpoint(b + 1)
            bar.close()
            skip = 0
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            train_s += time.perf_counter() - t0
            epoch += 1
            row: dict[str, Any] = {"epoch": epoch, "step": step, "train_loss": ep_loss / max(ep_count, 1)}
            # loss statistics summed over the epoch (``*_sum`` from the loss), per unit of the normaliser
            row.update({f"train_{k[:-4]}": v / max(ep_count, 1) for k, v in ep_stats.items()})
            ep_loss, ep_count, ep_stats = 0.0, 0.0, {}
            if (self.evaluate_fn is not None and not stopped
                    and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs)):
                evaluate(row, f"{self.stage_name}epoch {epoch}/{cfg.epochs}")
            history.append(row)
            self.on_log({k: v for k, v in row.items() if k not in ("epoch", "step")}, epoch)
            if epoch % cfg.checkpoint_every == 0 or stopped or epoch == cfg.epochs:
                checkpoint()
        if self.evaluate_fn is None:
            self.save_best()
            best_epoch = epoch
        self.acc.wait_for_everyone()
        return TrainResult(best_metric=best, best_epoch=best_epoch, epochs_run=epoch, steps=step,
                           stopped_early=stopped, history=history, train_seconds=train_s, eval_seconds=eval_s,
                           tokens=tokens, resumed_from_epoch=start_epoch)

    def _log(self, msg: str) -> None:
        if self.acc.is_main_process and self.progress:
            tqdm.write(msg, file=sys.stderr)


class _LossModule(torch.nn.Module):
    """``forward(batch, normalizer) = loss_fn(model, batch, normalizer)``: the unit DDP wraps."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict, normalizer: float):
        return self.loss_fn(self.model, batch, normalizer)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
