#!/usr/bin/env python
"""Peer baseline: RecBole 1.2.1 SASRec on ML-100K (CPU), with our own re-evaluation.

Runs inside the isolated venv made by ``benchmarks/recbole/setup.sh``
(``benchmarks/.venv-recbole``); it is NOT part of the project's own package.

Protocol (kept identical to the published peer run):
  * all 100,000 ML-100K ratings are interactions, nothing filtered
    (no k-core, no rating threshold);
  * leave-one-out by time: the last interaction of each user is test, the
    second-to-last is validation (``LS: valid_and_test``, ``order: TO``);
  * full ranking over all items, CE loss, no training negatives;
  * SASRec: 2 layers, 2 heads, hidden 64, inner 256, dropout 0.5/0.5,
    MAX_ITEM_LIST_LENGTH 50, batch 256, Adam lr 1e-3, seed 2020, up to 200
    epochs with early stopping on valid NDCG@10 (stopping_step 10);
  * CPU, ``torch.set_num_threads(--threads)``.

RecBole's full-sort evaluation for sequential models does NOT mask the items a
user has already interacted with.  After training we therefore reload RecBole's
best checkpoint and recompute the test metrics ourselves twice:
  * ``unmasked``: same as RecBole (only the padding item 0 is excluded) --
    a sanity check that our metric code and protocol match RecBole's;
  * ``masked``: the user's whole history (train + valid items) is set to -inf.
rank = number of items scoring strictly higher than the target;
HR@K = rank < K; NDCG@K = 1/log2(rank+2) if rank < K; MRR@K = 1/(rank+1) if
rank < K; MRR (full) = 1/(rank+1).

Usage (from the repo root):
  benchmarks/.venv-recbole/bin/python benchmarks/recbole/run_sasrec.py \
      --threads 1 --out benchmarks/work/recbole_sasrec_ml100k.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import socket
import sys
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA = "/work/shared/data/ml-100k"
DATASET_NAME = "ml-100k"  # keeps RecBole's built-in ml-100k defaults (see build_config)
ATOMIC_SUFFIXES = ("inter", "item", "user")
KS = (10, 50)

# Published reference from the peer run of exactly this config (same machines).
REFERENCE = {
    "epochs_run": 39,
    "best_epoch": 27,
    "wall_s": 5392,
    "threads": 1,
    "test_unmasked_recbole": {
        "ndcg@10": 0.0670, "hit@10": 0.1442, "ndcg@50": 0.1284,
        "hit@50": 0.4305, "mrr@10": 0.0438,
    },
    "test_masked": {
        "ndcg@10": 0.1096, "hit@10": 0.2078, "ndcg@50": 0.1779,
        "hit@50": 0.5186, "mrr@10": 0.0795,
    },
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=DEFAULT_DATA,
                   help="dir with ml-100k.inter/.item/.user (RecBole atomic files)")
    p.add_argument("--out", required=True, help="path of the result JSON")
    p.add_argument("--epochs", type=int, default=200, help="max epochs (default 200)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="stop training (before starting a new epoch) once this many "
                        "seconds of training have elapsed; the best checkpoint so far "
                        "is still evaluated and the JSON records that it was cut")
    p.add_argument("--work-dir", default=None,
                   help="scratch dir (default benchmarks/work/recbole_<out stem>)")
    p.add_argument("--seed", type=int, default=2020)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------
# Thread pinning must happen before torch is imported.
# ---------------------------------------------------------------------------
ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[_v] = str(ARGS.threads)

# RecBole's own checkpoints pickle its Config object; torch>=2.6 defaults to
# weights_only=True.  We never call torch.load through RecBole (we load the
# checkpoint ourselves with weights_only=False -- fine inside this venv only).
from logging import getLogger

import numpy as np
import torch
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.data.transform import construct_transform
from recbole.trainer import Trainer
from recbole.utils import get_flops, get_model, get_trainer, init_logger, init_seed


def build_config_dict(args, checkpoint_dir: Path) -> dict:
    return {
        # --- data: every rating is an interaction, nothing filtered -----------
        "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]},
        "val_interval": None,
        "rm_dup_inter": None,
        "filter_inter_by_user_or_item": True,
        "user_inter_num_interval": "[0,inf)",
        "item_inter_num_interval": "[0,inf)",
        # --- split / evaluation ----------------------------------------------
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO",
                      "mode": "full", "group_by": "user"},
        "repeatable": True,
        "metrics": ["Recall", "NDCG", "Hit", "MRR"],
        "topk": list(KS),
        "valid_metric": "NDCG@10",
        "valid_metric_bigger": True,
        "eval_batch_size": 4096,
        "metric_decimal_place": 6,
        # --- model ---------------------------------------------------------------
        "n_layers": 2,
        "n_heads": 2,
        "hidden_size": 64,
        "inner_size": 256,
        "hidden_dropout_prob": 0.5,
        "attn_dropout_prob": 0.5,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "initializer_range": 0.02,
        "loss_type": "CE",
        "MAX_ITEM_LIST_LENGTH": 50,
        # --- training ------------------------------------------------------------
        "train_neg_sample_args": None,
        "train_batch_size": 256,
        "learner": "adam",
        "learning_rate": 1e-3,
        "weight_decay": 0.0,
        "epochs": args.epochs,
        "eval_step": 1,
        "stopping_step": 10,
        "seed": args.seed,
        "reproducibility": True,
        # --- runtime ---------------------------------------------------------------
        "use_gpu": False,
        "gpu_id": "",
        "worker": 0,
        "show_progress": False,
        "log_wandb": False,
        "checkpoint_dir": str(checkpoint_dir),
        "state": "INFO",
    }


class _BudgetExhausted(Exception):
    pass


class BenchTrainer(Trainer):
    """RecBole's Trainer + per-epoch timing, a wall-clock budget and progress dumps."""

    def __init__(self, config, model, *, time_budget_s=None, on_epoch=None):
        super().__init__(config, model)
        self.time_budget_s = time_budget_s
        self.on_epoch = on_epoch
        self.fit_t0 = None
        self.epoch_log: list[dict] = []
        self.cut_by_budget = False

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        if self.fit_t0 is None:
            self.fit_t0 = time.perf_counter()
        elapsed = time.perf_counter() - self.fit_t0
        if self.time_budget_s is not None and elapsed >= self.time_budget_s:
            self.cut_by_budget = True
            raise _BudgetExhausted(f"budget {self.time_budget_s}s reached after "
                                   f"{elapsed:.1f}s, before epoch {epoch_idx}")
        t = time.perf_counter()
        loss = super()._train_epoch(train_data, epoch_idx, loss_func, show_progress)
        self.epoch_log.append({
            "epoch": epoch_idx,
            "train_s": time.perf_counter() - t,
            "train_loss": float(sum(loss) if isinstance(loss, tuple) else loss),
        })
        return loss

    def _valid_epoch(self, valid_data, show_progress=False):
        t = time.perf_counter()
        score, result = super()._valid_epoch(valid_data, show_progress)
        rec = self.epoch_log[-1]
        rec["valid_s"] = time.perf_counter() - t
        rec["valid_ndcg@10"] = float(score)
        rec["valid"] = {k: float(v) for k, v in result.items()}
        rec["elapsed_s"] = time.perf_counter() - self.fit_t0
        if self.on_epoch is not None:
            self.on_epoch(self)
        return score, result


# ---------------------------------------------------------------------------
# Our own metric code (masked and unmasked)
# ---------------------------------------------------------------------------
def metrics_from_ranks(ranks: np.ndarray) -> dict:
    ranks = np.asarray(ranks, dtype=np.float64)
    out = {"n_users": int(ranks.size), "mean_rank": float(ranks.mean()),
           "mrr": float(np.mean(1.0 / (ranks + 1.0)))}
    for k in KS:
        hit = ranks < k
        out[f"hit@{k}"] = float(hit.mean())
        out[f"recall@{k}"] = float(hit.mean())  # one target per user
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean())
        out[f"mrr@{k}"] = float(np.where(hit, 1.0 / (ranks + 1.0), 0.0).mean())
    return out


def raw_interactions(dataset, config):
    """(user ids, item ids) of every line of the .inter file, in RecBole's id space."""
    import pandas as pd

    uid_f, iid_f = config["USER_ID_FIELD"], config["ITEM_ID_FIELD"]
    path = Path(config["data_path"]) / f"{config['dataset']}.inter"
    df = pd.read_csv(path, sep="\t", dtype=str)
    df.columns = [c.split(":")[0] for c in df.columns]
    u2id = dataset.field2token_id[uid_f]
    i2id = dataset.field2token_id[iid_f]
    users = np.array([u2id[t] for t in df[uid_f]], dtype=np.int64)
    items = np.array([i2id[t] for t in df[iid_f]], dtype=np.int64)
    return users, items


@torch.no_grad()
def recompute_test_metrics(model, dataset, test_data, config) -> dict:
    """Full ranking on the test split, with and without the user's history masked."""
    uid_f, iid_f = config["USER_ID_FIELD"], config["ITEM_ID_FIELD"]
    n_items = dataset.item_num  # includes the padding id 0
    n_users = dataset.user_num
    # interaction counts per (user, item) over the WHOLE raw interaction file
    # (dataset.inter_feat is RecBole's augmented prefix->target table, which
    # lacks each user's first item, so we go back to the atomic file).
    all_u, all_i = raw_interactions(dataset, config)
    counts = np.zeros((n_users, n_items), dtype=np.int32)
    np.add.at(counts, (all_u, all_i), 1)

    model.eval()
    ranks_unmasked, ranks_masked = [], []
    n_target_in_history = 0
    n_seq_not_in_history = 0
    n_hist_items = []
    for batch in test_data:
        interaction = batch[0].to(config["device"])
        scores = model.full_sort_predict(interaction).view(-1, n_items).clone()
        scores[:, 0] = -np.inf  # padding item
        users = interaction[uid_f].cpu().numpy()
        targets = interaction[iid_f].cpu().numpy()
        rows = torch.arange(len(targets))
        tgt = torch.as_tensor(targets)
        tscore = scores[rows, tgt].unsqueeze(1)
        ranks_unmasked.append((scores > tscore).sum(1).cpu().numpy())

        # history = every interaction of the user except the test one
        hist = counts[users].copy()
        hist[np.arange(len(targets)), targets] -= 1
        hist_mask = hist > 0
        n_target_in_history += int(hist_mask[np.arange(len(targets)), targets].sum())
        # sanity: RecBole's input sequence must be inside that history
        seq = interaction[config["ITEM_ID_FIELD"] + config["LIST_SUFFIX"]].cpu().numpy()
        for r in range(len(targets)):
            s = seq[r][seq[r] > 0]
            n_seq_not_in_history += int((~hist_mask[r, s]).sum())
        hist_mask[np.arange(len(targets)), targets] = False  # never mask the target
        hist_mask[:, 0] = True
        n_hist_items.append(hist_mask[:, 1:].sum(1))
        masked = scores.masked_fill(torch.from_numpy(hist_mask), -np.inf)
        ranks_masked.append((masked > tscore).sum(1).cpu().numpy())

    ru = np.concatenate(ranks_unmasked)
    rm = np.concatenate(ranks_masked)
    return {
        "unmasked": metrics_from_ranks(ru),
        "masked": metrics_from_ranks(rm),
        "checks": {
            "n_test_users": int(ru.size),
            "n_items_ranked": int(n_items - 1),
            "targets_also_in_history": n_target_in_history,
            "seq_items_outside_history": n_seq_not_in_history,
            "mean_history_len_masked": float(np.concatenate(n_hist_items).mean()),
        },
    }


# ---------------------------------------------------------------------------
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def machine_info(threads: int) -> dict:
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import pandas
    import recbole
    import scipy
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "nice": os.nice(0),
        "threads_requested": threads,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "python": sys.version.split()[0],
        "versions": {
            "torch": torch.__version__, "recbole": recbole.__version__,
            "numpy": np.__version__, "pandas": pandas.__version__,
            "scipy": scipy.__version__,
        },
    }


def dump(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str))
    tmp.replace(path)


def main(args) -> int:
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(args.threads)
    except RuntimeError:
        pass

    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir).resolve() if args.work_dir else \
        (REPO_ROOT / "benchmarks" / "work" / f"recbole_{out.stem}")
    data_root = work / "dataset"
    ds_dir = data_root / DATASET_NAME
    ckpt_dir = work / "saved"
    if ds_dir.exists():
        shutil.rmtree(ds_dir)
    ds_dir.mkdir(parents=True)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    src = Path(args.data_dir)
    files = {}
    for suf in ATOMIC_SUFFIXES:
        f = src / f"{DATASET_NAME}.{suf}"
        if not f.exists():
            raise FileNotFoundError(f)
        shutil.copy2(f, ds_dir / f.name)
        files[f.name] = sha256(f)
    os.chdir(work)  # RecBole writes ./log and ./log_tensorboard relative to cwd

    result: dict = {
        "benchmark": "recbole-1.2.1 SASRec on ML-100K (peer baseline)",
        "status": "running",
        "started_at": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "argv": sys.argv,
        "args": vars(args),
        "data": {"src": str(src), "copied_to": str(ds_dir), "sha256": files},
        "machine": machine_info(args.threads),
        "reference_peer_run": REFERENCE,
    }
    dump(out, result)
    t_total = time.perf_counter()

    config_dict = build_config_dict(args, ckpt_dir)
    # dataset='ml-100k' keeps RecBole's built-in ml-100k yaml defaults
    # (normalize_all etc., exactly what a stock run uses) but RecBole then
    # forces data_path to its bundled copy; point it at our scratch copy.
    config = Config(model="SASRec", dataset=DATASET_NAME, config_dict=config_dict)
    config["data_path"] = str(ds_dir)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()
    logger.info(sys.argv)
    logger.info(config)

    t = time.perf_counter()
    dataset = create_dataset(config)
    logger.info(dataset)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    data_s = time.perf_counter() - t
    result["data"].update({
        "n_interactions": len(raw_interactions(dataset, config)[0]),
        "n_augmented_sequences": int(dataset.inter_num),
        "n_users": int(dataset.user_num - 1),
        "n_items": int(dataset.item_num - 1),
        "n_train_sequences": len(train_data._dataset),
        "n_valid": len(valid_data._dataset),
        "n_test": len(test_data._dataset),
        "prep_s": data_s,
    })

    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    logger.info(model)
    try:  # run_recbole does this too (it also advances the RNG: keep it for parity)
        transform = construct_transform(config)
        flops = get_flops(model, dataset, config["device"], logger, transform)
    except Exception as e:  # noqa: BLE001  # pragma: no cover (RecBole's FLOP counter: informational only)
        flops = f"failed: {e!r}"
    n_params = sum(p.numel() for p in model.parameters())

    assert get_trainer(config["MODEL_TYPE"], config["model"]) is Trainer

    def on_epoch(tr: BenchTrainer):
        result["training"] = {"epochs_run": len(tr.epoch_log), "epoch_log": tr.epoch_log,
                              "elapsed_s": tr.epoch_log[-1].get("elapsed_s")}
        dump(out, result)

    trainer = BenchTrainer(config, model, time_budget_s=args.time_budget_s,
                           on_epoch=on_epoch)
    t = time.perf_counter()
    try:
        trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    except _BudgetExhausted as e:
        logger.info(f"time budget exhausted: {e}")
    fit_s = time.perf_counter() - t

    # ---- reload RecBole's best checkpoint (weights_only=False: RecBole pickles Config)
    ckpt = torch.load(trainer.saved_model_file, map_location=config["device"],
                      weights_only=False)
    model.load_state_dict(ckpt["state_dict"])
    model.load_other_parameter(ckpt.get("other_parameter"))
    best_epoch = int(ckpt["epoch"])

    t = time.perf_counter()
    recbole_test = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
    recbole_eval_s = time.perf_counter() - t
    recbole_valid = trainer.evaluate(valid_data, load_best_model=False, show_progress=False)
    t = time.perf_counter()
    ours = recompute_test_metrics(model, dataset, test_data, config)
    ours_eval_s = time.perf_counter() - t

    recbole_test = {k: float(v) for k, v in recbole_test.items()}
    cmp_keys = [f"{m}@{k}" for k in KS for m in ("ndcg", "hit", "recall", "mrr")]
    diffs = {k: ours["unmasked"][k] - recbole_test[k] for k in cmp_keys if k in recbole_test}
    max_abs = max(abs(v) for v in diffs.values())
    epochs_run = len(trainer.epoch_log)
    train_s = [e["train_s"] for e in trainer.epoch_log]
    valid_s = [e.get("valid_s", 0.0) for e in trainer.epoch_log]

    result.update({
        "status": "done",
        "finished_at": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "model": {"name": "SASRec", "n_params": int(n_params), "flops": flops,
                  "checkpoint": trainer.saved_model_file},
        "config": {k: config[k] for k in sorted(config_dict)
                   if k not in ("checkpoint_dir",)} | {"normalize_all": config["normalize_all"],
                                                       "device": str(config["device"])},
        "training": {
            "epochs_run": epochs_run,
            "best_epoch": best_epoch,          # 0-based, as in RecBole's log
            "max_epochs": args.epochs,
            "early_stopped": (not trainer.cut_by_budget) and epochs_run < args.epochs,
            "cut_by_time_budget": trainer.cut_by_budget,
            "time_budget_s": args.time_budget_s,
            "fit_wall_s": fit_s,
            "mean_train_epoch_s": float(np.mean(train_s)) if train_s else None,
            "mean_valid_s": float(np.mean(valid_s)) if valid_s else None,
            "best_valid_ndcg@10": float(trainer.best_valid_score),
            "epoch_log": trainer.epoch_log,
        },
        "wall_s": time.perf_counter() - t_total,
        "test": {
            "recbole_unmasked": recbole_test,
            "ours_unmasked": ours["unmasked"],
            "ours_masked": ours["masked"],
            "ours_vs_recbole_unmasked_diff": diffs,
            "ours_vs_recbole_unmasked_max_abs_diff": max_abs,
            "protocol_check_ok": bool(max_abs < 1e-4),
            "checks": ours["checks"],
            "recbole_eval_s": recbole_eval_s,
            "ours_eval_s": ours_eval_s,
        },
        "valid_best_recbole_unmasked": {k: float(v) for k, v in recbole_valid.items()},
    })
    dump(out, result)

    def fmt(d):
        return " ".join(f"{k}={d[k]:.4f}" for k in ("ndcg@10", "hit@10", "ndcg@50", "hit@50", "mrr@10"))
    print(f"[recbole-sasrec] epochs_run={epochs_run} best_epoch={best_epoch} "
          f"fit_wall_s={fit_s:.1f} total_wall_s={result['wall_s']:.1f} "
          f"cut_by_budget={trainer.cut_by_budget}")
    print(f"[recbole-sasrec] recbole unmasked: {fmt(recbole_test)}")
    print(f"[recbole-sasrec] ours    unmasked: {fmt(ours['unmasked'])} (max|diff|={max_abs:.2e})")
    print(f"[recbole-sasrec] ours      masked: {fmt(ours['masked'])} mrr={ours['masked']['mrr']:.4f}")
    print(f"[recbole-sasrec] wrote {out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(ARGS))
    except Exception:  # noqa: BLE001 (any failure is recorded in the result file, then exit 1)
        traceback.print_exc()
        try:
            p = Path(ARGS.out).resolve()
            prev = json.loads(p.read_text()) if p.exists() else {}
            prev.update({"status": "failed", "error": traceback.format_exc()})
            dump(p, prev)
        except OSError as e:
            print(f"could not record the failure in {ARGS.out}: {e}", file=sys.stderr)
        sys.exit(1)
