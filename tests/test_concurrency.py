"""Two ``retrain`` commands at once on one SQLite MLflow store, one DVC cache and one Prefect home
(each starting its own ephemeral Prefect server): both finish, with identical metrics, and the store
stays consistent (see benchmarks/concurrent_retrain.py, which this drives with the tiny config)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def test_two_concurrent_retrains_share_the_stores_consistently(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from concurrent_retrain import check, consistent, launch
    from conftest import TINY, pinned_threads

    # one shared runs/ tree and DVC cache, not the repository's: for the commands (inherited) and check() here
    monkeypatch.setenv("ASFT_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("ASFT_DVC_CACHE_DIR", str(tmp_path / "dvc-cache"))
    # identical metrics are asserted: both commands run with the suite's pinned math-library threads
    env = {**pinned_threads(), "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "results")}
    results = launch(2, tmp_path, [*TINY, "posttrain.methods=[asft]"], env_extra=env)
    report = check(tmp_path, results)
    failed = [r["log_tail"] for r in results if r["rc"] != 0]
    assert not failed, failed
    assert consistent(report, 2), report
    assert report["metric_values_compared"][0] > 100
    # one promotion at a time: the second run's gate saw the first run's champion
    assert report["champion_versions"] == [1, 1] and len(report["registered_versions"]) == 4
