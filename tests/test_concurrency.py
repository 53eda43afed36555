"""Server-grade concurrency: retrains at once against a real Prefect server and a real MLflow tracking
server on loopback (see benchmarks/concurrent_retrain.py, which this drives with the tiny config) end
with one champion per product, the gates of one product serialised by the Prefect global concurrency
limit and products never compared; a crashed, cancelled or failed flow run closes its MLflow runs through
Prefect's state hooks, and runs left open are closed from the Prefect flow run's state, not from a pid."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_concurrent_retrains_against_servers_one_champion_per_product(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from concurrent_retrain import check, consistent, launch, servers
    from conftest import TINY, pinned_threads

    # one shared runs/ tree and DVC cache, not the repository's: for the commands (inherited) and check() here
    monkeypatch.setenv("ASFT_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("ASFT_DVC_CACHE_DIR", str(tmp_path / "dvc-cache"))
    with servers(tmp_path / "srv") as srv:
        # identical metrics are compared: every command runs with the suite's pinned math-library threads
        env = {**pinned_threads(), **srv["env"], "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "results")}
        # two retrains of product alpha and one of product beta, all started at the same moment
        per_run = [["registry.product=alpha"], ["registry.product=alpha"], ["registry.product=beta"]]
        results = launch(3, tmp_path, [*TINY, "posttrain.methods=[asft]"], env_extra=env, tracking_uri=srv["mlflow"],
                         per_run=per_run)
        report = check(tmp_path, results, srv["mlflow"])
        beta_model = MlflowClient(srv["mlflow"]).get_registered_model("asft-recommender-beta")
    failed = [r["log_tail"] for r in results if r["rc"] != 0]
    assert not failed, failed
    assert consistent(report, 3, products=2), report
    assert report["metric_values_compared"][0] > 100
    assert report["registered_versions"] == ["asft-recommender-alpha v1", "asft-recommender-alpha v2",
                                             "asft-recommender-beta v1", "asft-reward-alpha v1", "asft-reward-alpha v2",
                                             "asft-reward-beta v1"]
    # product alpha: one champion; the second gate compared against the first one's champion
    alpha = report["gates"]["alpha"]
    assert [g["champion_before"] for g in alpha] == [None, 1] and alpha[0]["alias"] == "champion"
    assert alpha[1]["alias"] == "challenger" and "re-evaluated" in alpha[1]["reason"]  # same model: not better
    assert all(g["gate"].startswith("prefect global concurrency limit asft-promotion-gate-asft-recommender-alpha")
               for g in alpha)
    assert report["champions"]["asft-recommender-alpha"] == 1 == report["champions"]["asft-reward-alpha"]
    # product beta: its own lineage, never compared with alpha's champion
    (beta,) = report["gates"]["beta"]
    assert beta["champion_before"] is None and beta["alias"] == "champion"
    assert beta["reason"].startswith("no current champion")
    assert beta_model.tags["product"] == "beta" and len(beta_model.tags["catalog_fingerprint"]) == 64


# -- state hooks and dead runs -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    """One SQLite MLflow store for these tests (creating its schema takes seconds); an experiment each."""
    return tmp_path_factory.mktemp("mlflow-store")


def _store(store_dir: Path, experiment: str) -> tuple[MlflowClient, str, str]:
    uri = f"sqlite:///{store_dir / 'mlflow.db'}"
    client = MlflowClient(uri)
    return client, uri, client.create_experiment(experiment, artifact_location=(store_dir / experiment).as_uri())


def _retrain_runs(client: MlflowClient, exp: str, flow_run_id: str, out: Path, host: str = "this-host"):
    parent = client.create_run(exp, tags={"kind": "retrain", "prefect.flow_run_id": flow_run_id,
                                          "output_dir": str(out), "host": host})
    done = client.create_run(exp, tags={"mlflow.parentRunId": parent.info.run_id, "stage": "ingest"})
    client.set_terminated(done.info.run_id, "FINISHED")
    open_ = client.create_run(exp, tags={"mlflow.parentRunId": parent.info.run_id, "stage": "train-base"})
    return parent.info.run_id, done.info.run_id, open_.info.run_id


@pytest.mark.parametrize("in_process", [True, False], ids=["flow-process", "found-from-parameters"])
def test_crashed_flow_hook_marks_the_mlflow_runs_killed(store_dir, tmp_path, in_process):
    """The on_crashed hook (a signal, a lost worker): parent and open stage runs KILLED with the flow run's
    state as the reason, failure.json naming the stage; the parent run is found in the flow's process or,
    from another process (a runner), through the tracking store the flow run's parameters name."""
    from prefect.client.schemas.objects import FlowRun
    from prefect.states import Crashed

    from flows import retrain as flow_mod

    client, uri, exp = _store(store_dir, f"hooks-{in_process}")
    out = tmp_path / "run"
    out.mkdir()
    fr = FlowRun(id=uuid.uuid4(), name="brave-fox", flow_id=uuid.uuid4(),
                 parameters={"config": None, "output": str(out),
                             "overrides": [f"tracking.mlflow_uri={uri}", f"tracking.experiment=hooks-{in_process}"]})
    pid, done, open_ = _retrain_runs(client, exp, str(fr.id), out)
    if in_process:
        stages = type("S", (), {"current": "train-base"})()
        flow_mod._ACTIVE[str(fr.id)] = {"uri": uri, "parent_run_id": pid, "out": out, "stages": stages}
    flow_mod._close_on("KILLED")(flow_mod.retrain, fr, Crashed(message="Execution was aborted by an interrupt signal."))
    assert str(fr.id) not in flow_mod._ACTIVE
    parent = client.get_run(pid)
    assert parent.info.status == "KILLED" and client.get_run(open_).info.status == "KILLED"
    assert client.get_run(done).info.status == "FINISHED"  # a finished stage stays finished
    reason = parent.data.tags["terminated_reason"]
    assert "brave-fox" in reason and "Crashed" in reason and "interrupt signal" in reason
    assert client.get_run(open_).data.tags["terminated_reason"] == reason
    failure = json.loads((out / "failure.json").read_text())
    assert failure["flow_run_state"] == "Crashed" and failure["mlflow_run_id"] == pid
    assert failure["stage"] == ("train-base" if in_process else "?")
    assert "failure.json" in {a.path for a in client.list_artifacts(pid)}


def test_failure_hook_keeps_the_flows_failure_record(store_dir, tmp_path):
    """on_failure after the flow recorded the failed stage itself: the stage and error stay, the flow run's
    state is added, open stage runs are closed FAILED; the parent (already FAILED) keeps its status."""
    from prefect.client.schemas.objects import FlowRun
    from prefect.states import Failed

    from flows import retrain as flow_mod

    client, uri, exp = _store(store_dir, "hooks-failed")
    out = tmp_path / "run"
    out.mkdir()
    fr = FlowRun(id=uuid.uuid4(), name="calm-owl", flow_id=uuid.uuid4(), parameters={})
    pid, _, open_ = _retrain_runs(client, exp, str(fr.id), out)
    (out / "failure.json").write_text(json.dumps({"stage": "score", "error": "RuntimeError: boom"}))
    client.set_terminated(pid, "FAILED")
    flow_mod._ACTIVE[str(fr.id)] = {"uri": uri, "parent_run_id": pid, "out": out}
    flow_mod._close_on("FAILED")(flow_mod.retrain, fr, Failed(message="Flow run encountered an exception"))
    failure = json.loads((out / "failure.json").read_text())
    assert (failure["stage"], failure["error"], failure["flow_run_state"]) == ("score", "RuntimeError: boom", "Failed")
    assert client.get_run(pid).info.status == "FAILED" and client.get_run(open_).info.status == "FAILED"


@pytest.mark.slow
def test_dead_runs_are_closed_from_the_prefect_flow_run_state(prefect_server, store_dir, tmp_path):
    """MLflow runs left RUNNING by a flow run that Prefect knows ended (here Crashed, on another host) are
    closed KILLED with the state as the reason; a flow run still running and one this Prefect API does not
    know are left alone. A run of this host whose process is gone while Prefect still says Running: its
    flow run is marked Crashed in Prefect first, then closed from that state."""
    import socket
    import subprocess
    import sys

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed, Running

    from tasks.tracking import close_dead_runs

    @flow(name="asft-dead-run-probe")
    def probe():
        return None

    client, _, exp = _store(store_dir, "dead-runs")
    with get_client(sync_client=True) as pc:
        crashed = pc.create_flow_run(probe, state=Running())
        pc.set_flow_run_state(crashed.id, Crashed(message="Flow run stopped sending heartbeats"), force=True)
        alive = pc.create_flow_run(probe, state=Running())
        orphan = pc.create_flow_run(probe, state=Running())
    dead_pid, _, dead_stage = _retrain_runs(client, exp, str(crashed.id), tmp_path / "a", host="gpu-pod-7")
    live_pid, _, live_stage = _retrain_runs(client, exp, str(alive.id), tmp_path / "b", host=socket.gethostname())
    client.set_tag(live_pid, "pid", str(os.getpid()))  # this host, a live process: left alone
    unknown_pid, _, _ = _retrain_runs(client, exp, str(uuid.uuid4()), tmp_path / "c")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()  # a process of this host that has exited
    orphan_pid, _, orphan_stage = _retrain_runs(client, exp, str(orphan.id), tmp_path / "d", host=socket.gethostname())
    client.set_tag(orphan_pid, "pid", gone)
    assert sorted(close_dead_runs(client, exp)) == sorted([dead_pid, orphan_pid])
    assert client.get_run(dead_pid).info.status == "KILLED" == client.get_run(dead_stage).info.status
    assert "Crashed" in client.get_run(dead_pid).data.tags["terminated_reason"]
    assert "heartbeats" in client.get_run(dead_pid).data.tags["terminated_reason"]
    for rid in (live_pid, live_stage, unknown_pid):
        assert client.get_run(rid).info.status == "RUNNING"
    # the orphan: Prefect's record now says Crashed, and the MLflow runs were closed from that state
    with get_client(sync_client=True) as pc:
        assert pc.read_flow_run(orphan.id).state.is_crashed()
    reason = client.get_run(orphan_pid).data.tags["terminated_reason"]
    assert client.get_run(orphan_stage).info.status == "KILLED" and "ended Crashed" in reason and "died" in reason


# -- products and catalogs (pure) ------------------------------------------------------------------------------
def test_products_scope_the_registered_names_and_catalog_changes_are_not_compared(tmp_path):
    from asft.config import load_config
    from asft.data.preprocess import ItemVocab
    from asft.promotion import catalog_change_decision, catalog_fingerprint, product_name, registered_name
    from tasks.registry import model_names

    fp = catalog_fingerprint(["i1", "i2", "i3"])
    assert fp != catalog_fingerprint(["i2", "i1", "i3"]) and len(fp) == 64  # the order fixes the tokens
    assert product_name(None, "simulator", fp) == f"simulator-{fp[:8]}"
    assert product_name(None, "/data/ML 100K/", fp) == f"ML-100K-{fp[:8]}"
    assert product_name(None, "/data/shop/events.parquet", fp) == f"events-{fp[:8]}"
    assert product_name("shop-eu", "simulator", fp) == "shop-eu"
    assert registered_name("asft-recommender", "shop-eu") == "asft-recommender-shop-eu"

    ItemVocab(["i1", "i2", "i3"]).save(tmp_path / "vocab.json")
    names = model_names(load_config(None, ["data.source=simulator"]), tmp_path)
    assert names == {"product": f"simulator-{fp[:8]}", "recommender": f"asft-recommender-simulator-{fp[:8]}",
                     "reward": f"asft-reward-simulator-{fp[:8]}", "catalog": fp, "items": "3"}
    named = model_names(load_config(None, ["registry.product=shop-eu"]), tmp_path)
    assert (named["recommender"], named["reward"]) == ("asft-recommender-shop-eu", "asft-reward-shop-eu")
    with pytest.raises(Exception, match="registry.product"):
        load_config(None, ["registry.product=../other"])

    new = {"ndcg@10": 0.12, "judged_top10": 0.3}
    kept = catalog_change_decision(new, 4, "shop-eu", ("a" * 64, 1682), ("b" * 64, 1700))
    assert (kept.promote, kept.alias, kept.champion) == (False, "challenger", None)
    assert "catalog changed in product 'shop-eu'" in kept.reason and "not compared" in kept.reason
    assert "1682 items" in kept.reason and "1700 items" in kept.reason and "NDCG" not in kept.reason
    took = catalog_change_decision(new, 4, "shop-eu", ("a" * 64, 1682), ("b" * 64, 1700), "champion")
    assert (took.promote, took.alias) == (True, "champion") and "newest catalog" in took.reason


# -- the gate ---------------------------------------------------------------------------------------------------
def _hold(gate_cm, entered, release):
    with gate_cm:
        entered.set()
        release.wait(60)


def test_gate_file_lock_times_out_clearly_and_passes_inner_errors(tmp_path, monkeypatch):
    """A local store without a Prefect server: the file lock next to the store; a second promotion waits,
    and past its limit fails with GateTimeout (not retried as transient); an error inside passes through."""
    import threading

    from tasks import registry
    from tasks.stages import is_transient

    monkeypatch.setattr(registry, "prefect_server_url", lambda: None)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    entered, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=_hold, args=(registry.promotion_gate(uri, "rec-a", 30), entered, release))
    holder.start()
    try:
        assert entered.wait(30)
        with pytest.raises(registry.GateTimeout, match="held by another promotion"), \
                registry.promotion_gate(uri, "rec-a", 0.3):
            pass
        with registry.promotion_gate(uri, "rec-b", 0.3) as how:  # another product: its own gate
            assert how == "file lock next to the store"
    finally:
        release.set()
        holder.join()
    assert not is_transient(registry.GateTimeout("x"))
    with pytest.raises(TimeoutError), registry.promotion_gate(uri, "rec-a", 5):
        raise TimeoutError("inside the critical section")  # not mistaken for a gate time-out


@pytest.mark.slow
def test_gate_is_a_one_slot_prefect_global_concurrency_limit(prefect_server, tmp_path):
    """With a Prefect API: the gate is the global concurrency limit asft-promotion-gate-<name>, created with
    one slot (and set back to one if widened); a second holder waits and times out; after release it enters."""
    import threading

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    from tasks import registry

    uri = "http://127.0.0.1:9/not-a-local-store"  # no file lock: only the Prefect limit serialises
    name = registry.GATE_PREFIX + "rec-gcl"
    registry.ensure_gate_limit(name)
    with get_client(sync_client=True) as pc:
        pc.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=3))
    entered, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=_hold, args=(registry.promotion_gate(uri, "rec-gcl", 30), entered, release))
    holder.start()
    try:
        assert entered.wait(60)
        with get_client(sync_client=True) as pc:
            limit = pc.read_global_concurrency_limit_by_name(name)
        assert (limit.limit, limit.active_slots) == (1, 1)  # widened to 3 above, set back to one slot
        with pytest.raises(registry.GateTimeout, match=name), registry.promotion_gate(uri, "rec-gcl", 1.0):
            pass
    finally:
        release.set()
        holder.join()
    with registry.promotion_gate(uri, "rec-gcl", 30) as how:
        assert how == f"prefect global concurrency limit {name}"
