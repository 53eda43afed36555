"""Distributed data parallel on 2 CPU processes (``torchrun``, gloo) against 1 process with the same
global batch: base SFT, reward-model training and A-SFT follow the same loss curve; sampling and
scoring shard across the processes and give the single-process rows.

The single-process side runs in this process (the core stage functions); the 2-process side is the
stage's CLI command under ``python -m torch.distributed.run --nproc_per_node 2``. Dropout is off so
the only difference is the order of floating-point sums (the all-reduce).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import pinned_threads

from asft import stages
from asft.config import load_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RTOL = 1e-5  # per-epoch mean training loss, 2 processes vs 1 (measured: <= 2e-7)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from conftest import TINY

    d = tmp_path_factory.mktemp("ddp")
    common = [*TINY, "seed=5", "model.dropout=0", "train.epochs=3", "train.batch_size=16",
              "reward.members=1", "reward.train.epochs=3", "reward.train.batch_size=32",
              "posttrain.train.epochs=3", "posttrain.train.batch_size=16", "sampling.batch_size=8",
              "train.num_threads=1", "reward.train.num_threads=1", "posttrain.train.num_threads=1",
              # warmup spans several steps: a scheduler stepped once per process would show (it did)
              "train.warmup_steps=8", "reward.train.warmup_steps=8", "posttrain.train.warmup_steps=8"]
    (d / "params.yaml").write_text("{}\n")
    cfg = load_config(d / "params.yaml", common)
    raw = stages.stage_ingest(cfg, d / "raw")["raw_dir"]
    proc = stages.stage_preprocess(raw, cfg, d / "processed")["processed_dir"]
    prefs = stages.stage_preferences(raw, proc, cfg, d / "preferences")["preferences_dir"]
    return {"dir": d, "cfg": cfg, "common": common, "raw": raw, "proc": proc, "prefs": prefs}


def _half(common: list[str], key: str, value: int) -> list[str]:
    """The same config with ``key`` (a per-process batch size) halved: 2 processes x half = 1 x full."""
    return [o for o in common if not o.startswith(f"{key}=")] + [f"{key}={value // 2}"]


def torchrun(setup, *args: str, overrides: list[str]) -> None:
    # Sampling is compared bit for bit with this process's: the same math-library threads on both sides.
    env = {**os.environ, **pinned_threads(), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "asft.cli", *args, "--config", str(setup["dir"] / "params.yaml"), *overrides]
    p = subprocess.run(cmd, cwd=setup["dir"], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-5000:]


def _losses(history: list[dict]) -> np.ndarray:
    """Per-epoch training losses (post-training histories also hold pi_ref's evaluation, epoch 0)."""
    return np.array([h["train_loss"] for h in history if "train_loss" in h])


def test_base_sft_two_processes_match_one(setup):
    d = setup["dir"]
    one = stages.stage_train_base(setup["proc"], setup["cfg"], d / "base1", progress=False)
    torchrun(setup, "train-base", "--processed", setup["proc"], "--output", str(d / "base2"),
             overrides=_half(setup["common"], "train.batch_size", 16))
    h1 = json.loads((d / "base1" / "train_summary.json").read_text())["history"]
    h2 = json.loads((d / "base2" / "train_summary.json").read_text())["history"]
    assert len(h1) == len(h2) == 3
    np.testing.assert_allclose(_losses(h2), _losses(h1), rtol=RTOL)
    assert one["steps"] == json.loads((d / "base2" / "train_summary.json").read_text())["steps"]
    assert abs(h2[-1]["valid/ndcg@10"] - h1[-1]["valid/ndcg@10"]) < 1e-3


def test_reward_training_two_processes_match_one(setup):
    d = setup["dir"]
    base = str(d / "base1" / "best")
    stages.stage_train_reward(setup["proc"], setup["prefs"], base, setup["cfg"], d / "reward1", progress=False)
    torchrun(setup, "train-reward", "--processed", setup["proc"], "--preferences", setup["prefs"], "--base", base,
             "--output", str(d / "reward2"), overrides=_half(setup["common"], "reward.train.batch_size", 32))
    h1 = json.loads((d / "reward1" / "train_summary.json").read_text())["histories"][0]
    h2 = json.loads((d / "reward2" / "train_summary.json").read_text())["histories"][0]
    assert len(h1) == len(h2) == 3
    np.testing.assert_allclose(_losses(h2), _losses(h1), rtol=RTOL)


def test_sampling_and_scoring_shard_across_processes(setup):
    d, cfg = setup["dir"], setup["cfg"]
    base = str(d / "base1" / "best")
    stages.stage_sample(setup["proc"], base, cfg, d / "cand1", progress=False)
    torchrun(setup, "sample", "--processed", setup["proc"], "--base", base, "--output", str(d / "cand2"),
             overrides=setup["common"])
    c1, c2 = pd.read_parquet(d / "cand1" / "candidates.parquet"), pd.read_parquet(d / "cand2" / "candidates.parquet")
    assert len(c1) == len(c2) > 2 * cfg.sampling.batch_size  # more than one batch per process
    pd.testing.assert_frame_equal(c1, c2)  # the same rows, bit for bit

    stages.stage_score(str(d / "cand1"), setup["proc"], base, str(d / "reward1"), cfg, d / "scored1", progress=False)
    torchrun(setup, "score", "--candidates", str(d / "cand1"), "--processed", setup["proc"], "--base", base,
             "--reward", str(d / "reward1"), "--output", str(d / "scored2"), overrides=setup["common"])
    s1, s2 = pd.read_parquet(d / "scored1" / "candidates.parquet"), pd.read_parquet(d / "scored2" / "candidates.parquet")
    assert list(s1.columns) == list(s2.columns) and len(s1) == len(s2)
    for c in s1.columns:
        a, b = np.stack(s1[c].to_numpy()) if s1[c].dtype == object else s1[c].to_numpy(), \
            np.stack(s2[c].to_numpy()) if s2[c].dtype == object else s2[c].to_numpy()
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6, err_msg=c)


def test_asft_two_processes_match_one(setup):
    d, cfg = setup["dir"], setup["cfg"]
    base = str(d / "base1" / "best")
    adv = stages.stage_advantages(str(d / "scored1"), cfg, d / "adv")["advantages_dir"]
    stages.stage_posttrain("asft", setup["proc"], base, str(d / "reward1"), str(d / "scored1"), adv, cfg,
                           d / "asft1", progress=False)
    torchrun(setup, "posttrain", "--method", "asft", "--processed", setup["proc"], "--base", base, "--reward",
             str(d / "reward1"), "--scored", str(d / "scored1"), "--advantages", adv, "--output", str(d / "asft2"),
             overrides=_half(setup["common"], "posttrain.train.batch_size", 16))
    h1 = json.loads((d / "asft1" / "train_summary.json").read_text())["history"]
    h2 = json.loads((d / "asft2" / "train_summary.json").read_text())["history"]
    assert len(h1) == len(h2) == 4 and h1[0]["epoch"] == h2[0]["epoch"] == 0  # pi_ref, then 3 epochs
    assert len(_losses(h1)) == 3
    np.testing.assert_allclose(_losses(h2), _losses(h1), rtol=RTOL)
    curves = {"base": None, "asft": {"1 process": _losses(h1).tolist(), "2 processes": _losses(h2).tolist()}}
    (d / "curves.json").write_text(json.dumps(curves))


def _steps_per_epoch(n: int, per_process_batch: int, world: int) -> int:
    return math.ceil(n / (per_process_batch * world))


def test_retrain_flow_launches_stages_under_torchrun(prefect_server, isolated_runs, tmp_path):
    """``distributed.nproc_per_node=2``: the flow runs base, reward, judge, sampling, scoring and A-SFT as
    2-process torchrun jobs (gloo here, NCCL on a GPU worker) and finishes as usual; the training stages
    really ran on 2 processes (their optimizer steps cover 2 x the per-process batch)."""
    from conftest import TINY
    from mlflow.tracking import MlflowClient

    from flows.retrain import retrain

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = tmp_path / "run"
    res = retrain(output=str(run), config=None, register_models=False,
                  overrides=[*TINY, "distributed.nproc_per_node=2", "train.batch_size=8", "reward.train.batch_size=16",
                             "posttrain.train.batch_size=8", "reward.members=1", "posttrain.methods=[asft]",
                             f"tracking.mlflow_uri={store}", "tracking.experiment=ddp-flow"])
    assert res["models"]["base"]["test"]["ndcg@10"] > 0
    assert (run / "models" / "posttrain" / "asft" / "best" / "model.safetensors").is_file()
    base = json.loads((run / "models" / "base" / "train_summary.json").read_text())
    n = base["train_windows"]
    assert n > 2 * 8 * 2  # enough windows that 1 and 2 processes need different numbers of steps
    assert _steps_per_epoch(n, 8, 2) != _steps_per_epoch(n, 8, 1)
    assert base["steps"] == base["epochs_run"] * _steps_per_epoch(n, 8, world=2), base
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("ddp-flow").experiment_id])
    assert {r.info.status for r in runs} == {"FINISHED"}
