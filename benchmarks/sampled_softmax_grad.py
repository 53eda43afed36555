"""Gradient fidelity of the sampled softmax on ML-100K (issue 15): after 30 full-softmax steps, one batch;
loss and cosine between the sampled and the full-softmax gradient, per K, logQ and sampler.

    python benchmarks/sampled_softmax_grad.py --processed /work/scale/ss/ml-100k/processed --config configs/ml-100k.yaml
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np
import torch

from asft.config import load_config
from asft.data.preprocess import ProcessedData
from asft.models.recommender import build_model
from asft.training.sft import (
    NegativeSampler,
    base_windows,
    collate_windows,
    count_targets,
    sft_batch_loss,
    target_counts,
)

ap = argparse.ArgumentParser()
ap.add_argument("--processed", required=True)
ap.add_argument("--config", default="configs/ml-100k.yaml")
ap.add_argument("--draws", type=int, default=10)
a = ap.parse_args()
torch.set_num_threads(1)
cfg = load_config(a.config, ["model.dropout=0"])
data = ProcessedData.open(a.processed)
windows = base_windows(data, True)
model = build_model(cfg.model, data.vocab.size, 50, seed=0)
# train a little with full softmax so logits are not uniform
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
rng = np.random.default_rng(0)
for step in range(30):
    b = collate_windows([windows[i] for i in rng.integers(0, len(windows), 32)])
    loss, _ = sft_batch_loss(model, b, count_targets(b), 0.1); opt.zero_grad(); loss.backward(); opt.step()
b = collate_windows([windows[i] for i in rng.integers(0, len(windows), 32)]); n = count_targets(b)
def grads(fn):
    model.zero_grad(); l = fn(); l.backward()
    return l.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).clone()
lf, gf = grads(lambda: sft_batch_loss(model, b, n, 0.1)[0])
counts = target_counts(windows, data.vocab.size)
for K in (64, 256, 1024):
    for logq in (True, False):
        for samp in ("uniform", "popularity"):
            c = cfg.train.model_copy(update={"negatives": K, "logq_correction": logq, "negative_sampler": samp})
            s = NegativeSampler.from_config(c, data.vocab.size, counts)
            torch.manual_seed(1); ls, gs = [], []
            for _ in range(a.draws):
                l, g = grads(lambda s=s: sft_batch_loss(model, b, n, 0.1, sampler=s)[0]); ls.append(l); gs.append(g)
            gm = torch.stack(gs).mean(0)
            cos = torch.nn.functional.cosine_similarity(gm, gf, dim=0).item()
            cos1 = np.mean([torch.nn.functional.cosine_similarity(g, gf, dim=0).item() for g in gs])
            print(f"K={K:5d} logq={logq!s:5} {samp:10s} loss {np.mean(ls):.3f} (full {lf:.3f})  cos(mean grad, full) {cos:.3f}  mean cos(single) {cos1:.3f}  |g|/|gf| {gm.norm()/gf.norm():.2f}", flush=True)
