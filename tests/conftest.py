"""Test-suite environment: offline, no telemetry, Prefect state in a temp dir, tiny configs, and every
test isolated from the process-wide state the others leave behind.

Determinism: the suite pins the CPU math libraries to ``ASFT_TEST_THREADS`` threads (default 1) before
torch is imported, in this process and (through the environment) in every subprocess it starts, so the
bit-exact comparisons between processes (resume, concurrency, DDP) compare like with like. Each test
starts from the same global RNG state and torch settings whatever ran before it; see
:func:`_isolate_process_state`.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import tempfile
from pathlib import Path

import pytest

TEST_THREADS = os.environ.get("ASFT_TEST_THREADS", "1")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def pinned_threads() -> dict[str, str]:
    """The math-library thread settings of this suite, for the environment of a subprocess whose
    results are compared bit for bit with another process's."""
    return {v: TEST_THREADS for v in THREAD_VARS}


os.environ.update(pinned_threads())  # before torch/numpy start their thread pools; subprocesses inherit it

_PREFECT_HOME = tempfile.mkdtemp(prefix="asft-prefect-home-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME  # never the user's home
os.environ.setdefault("ASFT_DATA_ROOTS", tempfile.gettempdir())  # tests read data from tmp_path (under it)
os.environ.setdefault("PREFECT_API_URL", "")  # no ambient server: the harness provides one
if not os.environ["PREFECT_API_URL"]:
    del os.environ["PREFECT_API_URL"]
os.environ.pop("MLFLOW_TRACKING_URI", None)

# Imported only after the thread pins above.
import numpy as np
import torch

from asft.env import configure_environment

configure_environment(_PREFECT_HOME)
torch.set_num_threads(int(TEST_THREADS))

REPO = Path(__file__).resolve().parents[1]
TEST_SEED = 1234  # every test starts from this global RNG state (python, numpy, torch)

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


# ------------------------------------------------------------------------------------------------
# Isolation: what one test changes in the process never reaches the next one
# ------------------------------------------------------------------------------------------------

def _is_pytest_handler(handler: logging.Handler) -> bool:
    """pytest's own capture handlers: it attaches a fresh one per test phase, so they are left alone."""
    return type(handler).__module__.startswith("_pytest")


def _logging_state() -> dict:
    root = logging.getLogger()
    return {"level": root.level, "disable": logging.root.manager.disable,
            "handlers": [h for h in root.handlers if not _is_pytest_handler(h)]}


def _restore_logging(saved: dict) -> None:
    root = logging.getLogger()
    for h in [h for h in root.handlers if not _is_pytest_handler(h) and h not in saved["handlers"]]:
        root.removeHandler(h)
    for h in saved["handlers"]:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(saved["level"])
    logging.disable(saved["disable"])


def _mlflow_state() -> tuple | None:
    """The module-wide default tracking URI, when mlflow is loaded (never imported here for nothing)."""
    if "mlflow" not in sys.modules:
        return None
    from mlflow.tracking._tracking_service import utils as tracking_utils

    return (tracking_utils._tracking_uri,)


def _restore_mlflow(saved: tuple | None) -> None:
    if "mlflow" not in sys.modules:
        return
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    while mlflow.active_run() is not None:  # a run left open by a failed test would parent the next one's
        mlflow.end_run("FAILED")
    tracking_utils._tracking_uri = saved[0] if saved else None


@pytest.fixture(autouse=True)
def _isolate_process_state():
    """Save, then restore after the test: torch threads, default dtype and deterministic mode; the
    environment; the working directory; ``sys.path``; root logging; mlflow's default tracking URI and
    active runs. Seed the python/numpy/torch global RNGs to :data:`TEST_SEED` so a test that draws from
    them sees the same numbers whatever ran before it (and restore the previous states afterwards)."""
    threads = torch.get_num_threads()
    dtype = torch.get_default_dtype()
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    env = dict(os.environ)
    cwd = os.getcwd()
    path = list(sys.path)
    log = _logging_state()
    ml = _mlflow_state()
    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    random.seed(TEST_SEED)
    np.random.seed(TEST_SEED)
    torch.manual_seed(TEST_SEED)
    try:
        yield
    finally:
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        _restore_mlflow(ml)
        _restore_logging(log)
        sys.path[:] = path
        os.chdir(cwd)
        if dict(os.environ) != env:
            os.environ.clear()
            os.environ.update(env)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.set_default_dtype(dtype)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------
# Shared fixtures
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect ephemeral server (temp DB) for the whole session: it takes 5-11 s to start."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture()
def tiny_overrides() -> list[str]:
    return list(TINY)


@pytest.fixture()
def isolated_runs(tmp_path, monkeypatch) -> Path:
    """In-process flows write their run and work directories (``runs/``, ``runs/.work``) and the DVC
    cache under ``tmp_path``, never into the repository: the working directory becomes ``tmp_path``
    (``flows/retrain.py`` resolves ``runs`` against it; ``ASFT_RUNS_DIR`` names it explicitly) and
    ``tasks.lineage.dvc_cache_dir`` (looked up through the module by the flow) answers a temp cache."""
    from tasks import lineage

    runs, cache = tmp_path / "runs", tmp_path / "dvc-cache"
    cache.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ASFT_RUNS_DIR", str(runs))
    monkeypatch.setenv("ASFT_DVC_CACHE_DIR", str(cache))
    monkeypatch.setattr(lineage, "dvc_cache_dir", lambda: cache)
    return runs


@pytest.fixture(scope="module")
def tiny_processed(tmp_path_factory):
    """A processed simulator dataset of 30 users x 30 items (windows of 8, stride 4) and its config."""
    from asft.config import load_config
    from asft.data.preprocess import ProcessedData, preprocess
    from asft.simulator import simulate

    cfg = load_config(None, ["simulator.n_users=30", "simulator.n_items=30", "simulator.min_len=14",
                             "simulator.max_len=30", "preprocess.max_len=8", "preprocess.window_stride=4"])
    root = tmp_path_factory.mktemp("proc")
    preprocess(simulate(cfg.simulator, seed=cfg.seed), cfg.preprocess, root / "p")
    return ProcessedData.open(root / "p"), cfg
