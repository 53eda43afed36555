"""The Dask task runner (``orchestration.task_runner: dask``): config -> runner, and a real retrain whose
independent stages run on a Dask LocalCluster started on loopback (worker processes)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from asft.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def test_dask_runner_from_config():
    from prefect_dask import DaskTaskRunner

    from tasks.runners import dask_task_runner, local_cluster_kwargs

    oc = load_config(None, ["orchestration.task_runner=dask", "orchestration.max_parallel=3"]).orchestration
    runner = dask_task_runner(oc)
    assert isinstance(runner, DaskTaskRunner) and runner.address is None
    assert runner.cluster_class == "distributed.LocalCluster"
    assert runner.cluster_kwargs == local_cluster_kwargs(oc) == {
        "n_workers": 3, "threads_per_worker": 1, "processes": True, "host": "127.0.0.1", "dashboard_address": ":0"}
    oc = load_config(None, ["orchestration.task_runner=dask", "orchestration.dask_workers=4",
                            "orchestration.dask_threads_per_worker=2"]).orchestration
    assert local_cluster_kwargs(oc)["n_workers"] == 4 and local_cluster_kwargs(oc)["threads_per_worker"] == 2
    oc = load_config(None, ["orchestration.task_runner=dask",
                            "orchestration.dask_address=tcp://10.1.2.3:8786"]).orchestration
    runner = dask_task_runner(oc)
    assert runner.address == "tcp://10.1.2.3:8786" and runner.cluster_class is None
    assert load_config(None, []).orchestration.task_runner == "threads"  # the default
    for bad in ("http://x:8786", "tcp://"):
        with pytest.raises(ConfigError, match="dask_address"):
            load_config(None, [f"orchestration.dask_address={bad}"])


def test_fan_out_starts_and_stops_a_local_cluster():
    """Without an address the run starts one LocalCluster (on loopback, for all its groups) and stops it."""
    from distributed import Client

    from tasks.runners import DaskFanOut

    oc = load_config(None, ["orchestration.task_runner=dask", "orchestration.dask_workers=1"]).orchestration
    fan = DaskFanOut(oc)
    runner = fan.runner()
    address = fan.address
    assert address.startswith("tcp://127.0.0.1:") and runner.address == address
    assert fan.runner().address == address  # the same cluster for the next group
    with Client(address) as client:
        assert len(client.scheduler_info(n_workers=-1)["workers"]) == 1
    fan.close()
    with pytest.raises(OSError):
        Client(address, timeout=2)


def test_child_stage_wait_measures_cpu_and_kills_at_the_limit():
    """A stage's child process is reaped with wait4: its own CPU time and peak memory, or killed at the limit."""
    import subprocess
    import sys

    from tasks.stages import _wait

    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
    busy = subprocess.Popen([sys.executable, "-c", spin])
    status, ru, peak_kb = _wait(busy, 60)
    assert status is not None and busy.returncode == 0 and ru.ru_utime + ru.ru_stime >= 0.25 and peak_kb > 1000
    hung = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    status, _, _ = _wait(hung, 0.5)
    assert status is None and hung.returncode == -9


@pytest.mark.slow
def test_retrain_runs_independent_stages_on_dask(prefect_server, isolated_runs, tmp_path, tiny_overrides):
    """Post-training methods, reward ensemble and judge run on the cluster's workers (separate processes),
    tracked as nested MLflow runs of the retrain, with the same metrics as the thread-pool runner; a rerun
    on the cluster takes them from the stage cache."""
    from distributed import Client, LocalCluster
    from mlflow.tracking import MlflowClient

    from flows.retrain import retrain

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = [*tiny_overrides, f"tracking.mlflow_uri={uri}", "posttrain.methods=[asft,sft]", "reward.members=1"]
    fanned = ["evaluate", "train-reward", "train-judge", "posttrain-asft", "posttrain-sft"]  # the groups
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        worker_pids = client.run(os.getpid)  # {worker address: pid}
        on_dask = [*common, "orchestration.task_runner=dask", f"orchestration.dask_address={cluster.scheduler_address}"]
        dask = retrain(data="simulator", output=str(tmp_path / "dask"), config=None, overrides=on_dask,
                       register_models=False)
        threads = retrain(data="simulator", output=str(tmp_path / "threads"), config=None, overrides=common,
                          register_models=False, use_cache=False)
        again = retrain(data="simulator", output=str(tmp_path / "again"), config=None, overrides=on_dask,
                        register_models=False)

    where = dask["lineage"]["executors"]
    for label in fanned:
        assert where[label]["dask_worker"] in worker_pids, label
        assert where[label]["pid"] == worker_pids[where[label]["dask_worker"]] != os.getpid()
        assert dask["cpu_seconds"][label] > 0
    assert where["train-base"]["dask_worker"] is None and where["train-base"]["pid"] == os.getpid()
    assert len({where[label]["dask_worker"] for label in fanned}) == 2  # both workers took stages
    assert all(threads["lineage"]["executors"][label]["dask_worker"] is None for label in fanned)

    # The nested MLflow runs were created from the workers, under the retrain's parent run.
    ml = MlflowClient(uri)
    parent = dask["mlflow"]["parent_run_id"]
    runs = ml.search_runs([ml.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    stage_runs = {r.data.tags["stage"]: r for r in runs}
    for label, stage in (("posttrain-sft", "posttrain-sft"), ("train-reward", "train-reward")):
        run = stage_runs[stage]
        assert run.info.status == "FINISHED" and run.data.tags["executor.dask_worker"] == where[label]["dask_worker"]
        assert run.data.metrics["stage_cpu_seconds"] > 0

    # Same stages, same inputs, same thread count per child process: the same numbers (evaluate runs in the
    # flow's process on the thread pool and in a child process on Dask; float sums may differ in the last bits).
    for m in ("asft", "sft"):
        for split in ("valid", "test"):
            for k, v in threads["posttrain"][m][split].items():
                assert dask["posttrain"][m][split][k] == pytest.approx(v, rel=1e-6, abs=1e-9), (m, split, k)
    assert dask["reward"]["report"]["ensemble"] == pytest.approx(threads["reward"]["report"]["ensemble"], rel=1e-6)
    assert dask["models"]["base"]["test"] == pytest.approx(threads["models"]["base"]["test"], rel=1e-6)

    # Caching: the rerun's fan-out tasks found the results the workers persisted.
    assert all(again["lineage"]["cache"][label]["hit"] for label in fanned)
    assert again["posttrain"]["sft"]["test"] == dask["posttrain"]["sft"]["test"]


@pytest.mark.slow
def test_tune_trials_run_on_a_local_dask_cluster(prefect_server, tmp_path, tiny_overrides, monkeypatch):
    """``asft tune`` with the Dask runner and no address: a LocalCluster for the run, one study worker per
    slot on one study; every trial's MLflow run was created on a worker process."""
    from mlflow.tracking import MlflowClient

    from flows.tune import tune

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = "tune.space={train.lr: {low: 0.001, high: 0.01, log: true}}"
    ov = [*tiny_overrides, space, f"tracking.mlflow_uri={uri}", "tune.startup_trials=2",
          "orchestration.task_runner=dask", "orchestration.dask_workers=2"]
    res = tune(data="simulator", output=str(tmp_path / "tune"), config=None, overrides=ov, n_trials=2)
    assert res["complete"] + res["pruned"] >= 2
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("asft-retrain")
    parent = client.search_runs([exp.experiment_id], "tags.kind = 'tune'")[0]
    trials = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(trials) == res["trials"] >= 2
    for t in trials:
        assert t.data.tags["executor.dask_worker"].startswith("tcp://127.0.0.1:")
        assert int(t.data.tags["executor.pid"]) != os.getpid()
    values = [t.data.params["train.lr"] for t in trials]
    assert len(set(values)) == len(values)  # the workers' samplers drew different values
