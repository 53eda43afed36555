"""Crash and resume of the real ``retrain`` command: ``kill -9`` during base training, reward-model
training and A-SFT, then ``retrain`` again.

One uninterrupted reference run, then a chain on another stage cache and MLflow store: run 1 is
killed in train-base, run 2 resumes it and is killed in train-reward, run 3 resumes that and is killed
in posttrain-asft, run 4 resumes and finishes. Each killed stage leaves no output directory and no
registered model; its next run resumes from the last checkpoint (model, optimizer, scheduler, RNG
states, data position, best model), and run 4's metrics.json equals the reference's on every
non-volatile value (the audit's comparison), with bit-identical model files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ops.audit import compare_metrics

REPO = Path(__file__).resolve().parents[1]


def timeout_scale() -> float:
    """``$ASFT_TEST_TIMEOUT_SCALE`` (default 1): multiplies this module's time limits, for slow or busy
    machines. The limits only stop a hung run; a healthy chain stays far below them."""
    raw = os.environ.get("ASFT_TEST_TIMEOUT_SCALE", "1")
    try:
        scale = float(raw)
    except ValueError:
        scale = float("nan")
    if not scale > 0:
        raise ValueError(f"ASFT_TEST_TIMEOUT_SCALE must be a positive number, got {raw!r}")
    return scale


# One retrain command takes 1-3 min on two busy cores; the chain fixture runs five of them, inside the
# first test that uses it (whose limit is pytest-timeout's, set here, not the suite's default). A command
# that writes nothing under its directory for STALL_S is stuck (e.g. waiting for a concurrency slot
# that a killed run still holds) and fails the test early, saying which Prefect slots are held.
RUN_LIMIT_S = 900 * timeout_scale()
STALL_S = 240 * timeout_scale()
STALL_CHECK_S = 5.0
pytestmark = [pytest.mark.slow, pytest.mark.timeout(6 * RUN_LIMIT_S)]

# Long enough stages (checkpoint every optimizer step, several epochs) that a kill lands inside them and
# the resumed run crosses epoch boundaries. One reward member: the kill lands in the first one anyway.
CHAIN_OVERRIDES = [
    "train.epochs=3", "train.patience=10", "train.checkpoint_steps=1", "model.dropout=0.1",
    "reward.members=1", "reward.train.epochs=3", "reward.train.patience=10", "reward.train.checkpoint_steps=1",
    "posttrain.train.epochs=3", "posttrain.train.patience=10", "posttrain.train.checkpoint_steps=1",
    "posttrain.methods=[asft]", "posttrain.champion_method=asft",
]

# stage -> (work directory glob, trainer_state.json glob inside it)
KILL_AT = {
    "train-base": "train-base-*/checkpoint/trainer_state.json",
    "train-reward": "train-reward-*/member_*/checkpoint/trainer_state.json",
    "posttrain-asft": "posttrain-*/checkpoint/trainer_state.json",
}


def _env(tmp: Path, name: str) -> dict[str, str]:
    """The environment of one chain's ``retrain`` commands: the session's Prefect server, its own stage
    cache and DVC cache, and the suite's pinned math-library threads (model files are compared bit for
    bit between the reference and the resumed chain)."""
    from conftest import pinned_threads
    from prefect.settings import get_current_settings

    env = {**os.environ, **pinned_threads()}
    env["PREFECT_API_URL"] = str(get_current_settings().api.url)  # the session's server: no start-up per run
    env["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(tmp / f"prefect-results-{name}")  # own stage cache
    env["ASFT_DVC_CACHE_DIR"] = str(tmp / f"dvc-cache-{name}")  # never the repository's .dvc/cache
    env["PYTHONPATH"] = str(REPO)
    return env


def _cmd(tiny: list[str], store: str, exp: str, config: Path) -> list[str]:
    return [sys.executable, "-m", "asft.cli", "retrain", "--config", str(config), *tiny,
            *CHAIN_OVERRIDES, f"tracking.mlflow_uri={store}", f"tracking.experiment={exp}"]


def _last_write(root: Path) -> float:
    """The newest modification time of anything under ``root`` (what vanishes meanwhile is skipped)."""
    newest = root.stat().st_mtime
    for parent, dirs, files in os.walk(root):  # os.walk ignores directories removed during the walk
        for name in dirs + files:
            try:
                newest = max(newest, os.stat(os.path.join(parent, name), follow_symlinks=False).st_mtime)
            except FileNotFoundError:
                continue
    return newest


def _held_concurrency_slots() -> dict[str, str]:
    """The session Prefect server's global concurrency limits with slots in use (``name: held/limit``)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {lim.name: f"{lim.active_slots}/{lim.limit}" for lim in client.read_global_concurrency_limits()
                if lim.active_slots}


def _run(cmd, cwd: Path, env, kill_glob: str | None = None, timeout: float = RUN_LIMIT_S,
         stall: float = STALL_S) -> tuple[int, str, dict | None]:
    """Run retrain; with ``kill_glob``, SIGKILL its process group as soon as a checkpoint matching it
    appears under ``cwd/runs/.work``. Returns (exit code, output, checkpoint seen at the kill). Fails
    when the command runs longer than ``timeout`` or writes nothing under ``cwd`` for ``stall`` seconds."""
    log = cwd / f"log-{time.monotonic_ns()}.txt"
    env = {**env, "ASFT_RUNS_DIR": str(cwd / "runs")}  # where the kill glob looks, whatever the caller's env says
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        seen, t0 = None, time.monotonic()
        problem, checked = None, t0
        while p.poll() is None:
            now = time.monotonic()
            if now - t0 > timeout:
                problem = f"did not finish in {timeout:.0f} s"
                break
            if now - checked > STALL_CHECK_S:
                checked = now
                idle = time.time() - _last_write(cwd)
                if idle > stall:
                    problem = (f"wrote nothing for {idle:.0f} s (Prefect concurrency slots held: "
                               f"{_held_concurrency_slots() or 'none'})")
                    break
            if kill_glob:
                hits = list((cwd / "runs" / ".work").glob(kill_glob))
                if hits:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
                    seen = {"path": str(hits[0])}
                    break
            time.sleep(0.01)
        if problem:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            raise AssertionError(f"retrain {problem}; on a slow machine raise ASFT_TEST_TIMEOUT_SCALE. Its output:\n"
                                 f"{log.read_text()[-3000:]}")
    return p.returncode, log.read_text(), seen


def _newest_run(cwd: Path) -> Path:
    return max((d for d in (cwd / "runs").iterdir() if not d.name.startswith(".")), key=lambda d: d.stat().st_mtime)


def _outputs(console: str, run_dir: Path) -> dict[str, str]:
    """What a run printed: its console, and the log of each stage it ran in a child process
    (``logs/<stage label>.log``: concurrent training stages print there, not on the console)."""
    return {"console": console, **{f.stem: f.read_text() for f in sorted((run_dir / "logs").glob("*.log"))}}


@pytest.fixture(scope="module")
def chain(prefect_server, tmp_path_factory):
    from conftest import TINY

    tiny = [o for o in TINY if not o.startswith(("train.epochs", "reward.train.epochs", "posttrain.train.epochs",
                                                 "reward.members"))]
    base = tmp_path_factory.mktemp("resume")
    ref_cwd, cwd = base / "reference", base / "chain"
    ref_cwd.mkdir()
    cwd.mkdir()
    config = base / "params.yaml"
    config.write_text("seed: 3\n")
    rc, out, _ = _run(_cmd(tiny, f"sqlite:///{base / 'ref.db'}", "ref", config), ref_cwd, _env(base, "ref"))
    assert rc == 0, out[-4000:]
    reference = json.loads((_newest_run(ref_cwd) / "metrics.json").read_text())

    store = f"sqlite:///{base / 'chain.db'}"
    cmd, env = _cmd(tiny, store, "chain", config), _env(base, "chain")
    killed: dict[str, dict] = {}
    logs: list[dict[str, str]] = []
    for stage, pattern in KILL_AT.items():
        rc, out, seen = _run(cmd, cwd, env, kill_glob=pattern)
        assert rc == -signal.SIGKILL and seen, f"{stage}: not killed (rc {rc}): {out[-3000:]}"
        run_dir = _newest_run(cwd)
        ckpts = sorted((cwd / "runs" / ".work").glob(pattern))
        killed[stage] = {"run_dir": run_dir, "states": [json.loads(Path(c).read_text()) for c in ckpts],
                         "versions": _versions(store)}
        logs.append(_outputs(out, run_dir))
    rc, out, _ = _run(cmd, cwd, env)
    assert rc == 0, out[-4000:]
    final = _newest_run(cwd)
    logs.append(_outputs(out, final))
    return {"reference": reference, "ref_dir": _newest_run(ref_cwd), "final": json.loads(
        (final / "metrics.json").read_text()), "final_dir": final, "killed": killed, "logs": logs, "store": store,
        "work": cwd / "runs" / ".work"}


def _versions(store: str) -> int:
    client = MlflowClient(store)
    try:
        return len(client.search_model_versions())
    except Exception:  # noqa: BLE001 - no registry tables yet
        return 0


OUT_DIR = {"train-base": "models/base", "train-reward": "models/reward", "posttrain-asft": "models/posttrain/asft"}


@pytest.mark.parametrize("stage", list(KILL_AT))
def test_killed_stage_leaves_nothing_half_written_and_next_run_resumes(chain, stage):
    k = chain["killed"][stage]
    # killed inside the stage: its checkpoints are mid-training
    assert k["states"] and all(s["step"] >= 1 for s in k["states"])
    assert not (k["run_dir"] / OUT_DIR[stage]).exists()  # published atomically: nothing half-written
    assert not list(k["run_dir"].glob("models/**/.*.tmp-*"))
    assert k["versions"] == 0  # nothing registered by a crashed run
    # the next run resumed this stage from its checkpoint (not from scratch): said in the stage's own log
    # when the stage ran in a child process, else on the console
    nxt = chain["logs"][list(KILL_AT).index(stage) + 1]
    said = nxt.get(stage, nxt["console"])
    assert "resuming from epoch" in said, said[-3000:]


def test_resumed_chain_ends_with_the_uninterrupted_metrics(chain):
    cmp = compare_metrics(chain["reference"], chain["final"])
    print(f"RESUME compared={cmp['compared']} numeric={cmp['numeric']} mismatched={len(cmp['mismatched'])} "
          f"killed_at={ {k: [st['step'] for st in v['states']] for k, v in chain['killed'].items()} }")
    assert cmp["compared"] > 100 and not cmp["mismatched"], cmp["mismatched"][:10]
    assert chain["final"]["lineage"]["model_sha256"] == chain["reference"]["lineage"]["model_sha256"]
    assert chain["final"]["datasets"] == chain["reference"]["datasets"]
    # work directories are removed once their stage is published
    assert not [d for d in chain["work"].iterdir() if d.is_dir()]


def test_killed_runs_are_closed_in_mlflow_and_only_the_finished_run_registers(chain):
    client = MlflowClient(chain["store"])
    exp = client.get_experiment_by_name("chain")
    parents = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    status = sorted(r.info.status for r in parents)
    assert status == ["FINISHED", "KILLED", "KILLED", "KILLED"], status
    assert all("died" in r.data.tags["terminated_reason"] for r in parents if r.info.status == "KILLED")
    assert not [r for r in client.search_runs([exp.experiment_id]) if r.info.status == "RUNNING"]
    versions = client.search_model_versions()
    assert {v.run_id for v in versions} == {r.info.run_id for r in parents if r.info.status == "FINISHED"}
