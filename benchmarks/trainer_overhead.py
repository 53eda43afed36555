"""Trainer overhead: tokens/s of asft's Trainer vs a bare PyTorch loop, same model and batches.

    python benchmarks/trainer_overhead.py [--data simulator|PATH] [--epochs 3] [--repeats 3] [key=value ...]

Both loops start from the same initial weights and see identical batches (the Trainer's own
epoch_batches + collate); they run interleaved (bare, trainer, bare, trainer, ...) in one process
so machine load affects both alike. The Trainer is timed over its whole ``fit`` (data assembly,
logging, checkpoint writes included), evaluation turned off. Prints the ratio.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from asft.env import configure_environment

configure_environment()

import torch

from asft import stages
from asft.config import load_config
from asft.data.preprocess import ProcessedData
from asft.models.recommender import build_model
from asft.training.sft import collate_windows, count_targets, make_trainer, sft_batch_loss
from asft.training.trainer import lr_factor, param_groups


def bare_loop(model, windows, cfg, batches_per_epoch) -> tuple[float, int]:
    opt = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr, betas=tuple(cfg.train.betas))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg.train.warmup_steps))
    model.train()
    tokens = 0
    t0 = time.perf_counter()
    for batches in batches_per_epoch:
        for idx in batches:
            b = collate_windows([windows[int(i)] for i in idx])
            n = count_targets(b)
            loss, _ = sft_batch_loss(model, b, n)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            tokens += int(n)
    return time.perf_counter() - t0, tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="simulator")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    cfg = load_config("params.yaml" if Path("params.yaml").is_file() else None,
                      [*a.overrides, f"data.source={a.data}", f"train.epochs={a.epochs}", "train.device=cpu"])
    work = Path(tempfile.mkdtemp(prefix="asft-overhead-"))
    stages.stage_load(cfg, work / "raw")
    stages.stage_preprocess(work / "raw", cfg, work / "processed")
    data = ProcessedData.open(work / "processed")
    windows = data.train_windows()
    init = build_model(cfg.model, data.vocab.size, cfg.preprocess.max_len, seed=cfg.seed)
    rows = []
    for r in range(a.repeats):
        # bare loop over exactly the batches the trainer will use
        m_bare = copy.deepcopy(init)
        probe = make_trainer(copy.deepcopy(init), cfg, work / f"probe{r}", progress=False)
        batches = [probe.epoch_batches(len(windows), e) for e in range(cfg.train.epochs)]
        torch.manual_seed(cfg.seed + r)
        bare_s, bare_tok = bare_loop(m_bare, windows, cfg, batches)
        m_tr = copy.deepcopy(init)
        torch.manual_seed(cfg.seed + r)
        t0 = time.perf_counter()
        trainer = make_trainer(m_tr, cfg, work / f"trainer{r}", progress=False)
        res = trainer.fit(windows, resume=False)
        tr_s = time.perf_counter() - t0
        same = all(torch.allclose(p, q, atol=1e-5) for p, q in zip(m_bare.parameters(), m_tr.parameters()))
        rows.append({"bare_tokens_per_s": bare_tok / bare_s, "trainer_tokens_per_s": res.tokens / tr_s,
                     "ratio": (res.tokens / tr_s) / (bare_tok / bare_s), "same_weights": bool(same)})
        print(json.dumps(rows[-1]), flush=True)
    ratios = sorted(x["ratio"] for x in rows)
    summary = {"median_ratio": ratios[len(ratios) // 2], "runs": rows, "tokens_per_epoch": rows and res.tokens // cfg.train.epochs,
               "threads": torch.get_num_threads(), "command": " ".join(sys.argv)}
    print(json.dumps(summary, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
