"""Speed of the post-training data path: candidates sampled and scored per second, and the time of
one A-SFT epoch against one plain-SFT epoch over the same training windows (same model, trainer and
batch size; the epochs alternate, SFT first, and each is repeated ``--repeats`` times).

    python benchmarks/asft_speed.py --work benchmarks/work/rm_sim --reward benchmarks/work/rm_sim/noise_medium/reward \
        --out benchmarks/work/asft_speed_sim.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asft.env import configure_environment

configure_environment()

import numpy as np
import torch

from asft.config import load_config
from asft.data.preprocess import ProcessedData
from asft.models.reward import RewardEnsemble
from asft.posttrain import (
    collate_examples,
    count_weight,
    load_policy,
    method_weights,
    weighted_examples,
    weighted_loss,
)
from asft.sampling import (
    TrainContexts,
    batch_generator,
    sample_candidates,
    sample_slates,
    score_candidates,
    slate_logprobs,
)
from asft.training.sft import collate_windows, count_targets, sft_batch_loss
from asft.training.trainer import Trainer


def epoch_seconds(trainer: Trainer, dataset, epoch: int) -> float:
    t0 = time.perf_counter()
    for idx in trainer.epoch_batches(len(dataset), epoch):
        trainer.train_step([dataset[int(i)] for i in idx])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True, help="dir with processed/ and base/best")
    ap.add_argument("--reward", required=True, help="reward ensemble dir")
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--config", default="params.yaml")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    cfg = load_config(a.config, a.overrides)
    work = Path(a.work)
    data = ProcessedData.open(work / "processed")
    tc = TrainContexts.from_processed(data)
    ens = RewardEnsemble.load(a.reward)
    ref, _, _ = load_policy(work / "base" / "best")
    out: dict = {"machine": {"python": platform.python_version(), "platform": platform.platform(),
                             "torch_threads": torch.get_num_threads()},
                 "date": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC", "command": " ".join(sys.argv),
                 "n_candidates": cfg.sampling.n_candidates, "contexts": tc.n_contexts(), "windows": len(tc.windows)}

    t0 = time.perf_counter()
    frame = sample_candidates(ref, tc, cfg.sampling, cfg.seed, progress=False)
    t_sample = time.perf_counter() - t0
    t0 = time.perf_counter()
    frame = score_candidates(frame, ref, ens.members, tc, cfg.sampling, cfg.reward.kappa, progress=False)
    t_score = time.perf_counter() - t0
    n_cand = len(frame) * cfg.sampling.n_candidates
    out["sampling"] = {"candidates": n_cand, "sample_seconds": t_sample, "score_seconds": t_score,
                       "candidates_sampled_per_s": n_cand / t_sample, "candidates_scored_per_s": n_cand / t_score,
                       "candidates_sampled_and_scored_per_s": n_cand / (t_sample + t_score),
                       "reward_members": len(ens.members)}
    valid = [np.asarray(x, dtype=np.int64) for x in data.table("valid")["input"]]
    k = cfg.sampling.slate_size
    t0 = time.perf_counter()
    for s in range(0, len(valid), cfg.sampling.batch_size):
        sample_slates(ref, valid[s : s + cfg.sampling.batch_size], k, batch_generator(cfg.seed, s))
    t_slates = time.perf_counter() - t0
    t0 = time.perf_counter()
    n_ref = min(64, len(valid))
    slates, _ = sample_slates(ref, valid[:n_ref], k, batch_generator(cfg.seed, 0))
    slate_logprobs(ref, valid[:n_ref], slates)
    t_nocache = time.perf_counter() - t0
    out["slates"] = {"slate_size": k, "contexts": len(valid), "kv_cache_slates_per_s": len(valid) / t_slates,
                     "no_cache_recompute_slates_per_s (one context at a time)": n_ref / t_nocache}
    out["sampling"]["slates"] = out["slates"]
    print(json.dumps(out["sampling"], indent=1), file=sys.stderr)

    items, w = method_weights("asft", frame, cfg)
    asft_ds = weighted_examples(frame, items, w.weights)
    sft_ds = data.train_windows()
    tcfg = cfg.posttrain.train
    times: dict[str, list[float]] = {"sft": [], "asft": []}
    for r in range(a.repeats):
        for name in ("sft", "asft"):
            model, _, _ = load_policy(work / "base" / "best")
            if name == "sft":
                tr = Trainer(model, tcfg, work / "speed_tmp", collate_fn=collate_windows, loss_fn=sft_batch_loss,
                             count_fn=count_targets, seed=cfg.seed, progress=False)
                times[name].append(epoch_seconds(tr, sft_ds, r))
            else:
                tr = Trainer(model, tcfg, work / "speed_tmp", collate_fn=lambda e: collate_examples(tc, e),
                             loss_fn=weighted_loss, count_fn=count_weight, seed=cfg.seed, progress=False)
                times[name].append(epoch_seconds(tr, asft_ds, r))
            print(f"{name} epoch {r}: {times[name][-1]:.2f}s", file=sys.stderr)
    out["epoch_seconds"] = times
    med = {k: float(np.median(v)) for k, v in times.items()}
    out["epoch_seconds_median"] = med
    out["asft_over_sft"] = med["asft"] / med["sft"]
    out["steps_per_epoch"] = {"sft": len(tr.epoch_batches(len(sft_ds), 0)), "asft": len(tr.epoch_batches(len(asft_ds), 0))}
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("epoch_seconds_median", "asft_over_sft")}, indent=1))


if __name__ == "__main__":
    main()
