"""Test-suite environment: offline, no telemetry, Prefect state in a temp dir, tiny configs."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_PREFECT_HOME = tempfile.mkdtemp(prefix="asft-prefect-home-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME  # never the user's home
os.environ.setdefault("ASFT_DATA_ROOTS", tempfile.gettempdir())  # tests read data from tmp_path (under it)
os.environ.setdefault("PREFECT_API_URL", "")  # no ambient server: the harness provides one
if not os.environ["PREFECT_API_URL"]:
    del os.environ["PREFECT_API_URL"]
os.environ.pop("MLFLOW_TRACKING_URI", None)

from asft.env import configure_environment

configure_environment(_PREFECT_HOME)

REPO = Path(__file__).resolve().parents[1]

# A whole pipeline in seconds: small simulator, tiny model, two epochs.
TINY = [
    "simulator.n_users=60",
    "simulator.n_items=40",
    "simulator.min_len=8",
    "simulator.max_len=16",
    "preprocess.max_len=12",
    "preprocess.window_stride=6",
    "model.n_layer=1",
    "model.n_head=1",
    "model.n_embd=16",
    "train.epochs=2",
    "train.batch_size=16",
    "train.warmup_steps=2",
    "train.device=cpu",
    "eval.batch_size=64",
    "preferences.judge.n_judges=4",
    "reward.members=2",
    "reward.train.epochs=2",
    "reward.train.batch_size=32",
    "reward.train.warmup_steps=2",
    "reward.train.device=cpu",
    "judge.members=1",
    "sampling.n_candidates=4",
    "posttrain.pg.group_size=4",
    "posttrain.train.epochs=2",
    "posttrain.train.batch_size=16",
    "posttrain.train.warmup_steps=2",
    "posttrain.train.device=cpu",
]


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect ephemeral server (temp DB) for the whole session: it takes 5-11 s to start."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture()
def tiny_overrides() -> list[str]:
    return list(TINY)
