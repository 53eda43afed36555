"""Where the flows' independent stages run: Prefect's thread pool (default) or a Dask cluster.

``orchestration.task_runner: dask`` fans the independent stages of a retrain (the post-training methods and
the lambda sweep, the reward ensemble with the judge and the base evaluation) and the tuning trials out to a
Dask cluster through prefect-dask's :class:`~prefect_dask.DaskTaskRunner`: each group of stages is a
``fan-out`` subflow whose task runner is chosen from the configuration at run time
(``flow.with_options(task_runner=...)``, Prefect's way of giving part of a flow another task runner). The
cluster is the one at ``orchestration.dask_address`` or a ``LocalCluster`` started once per flow run (its
workers stay up for every group of the run, so they import the code once).

On a worker a stage runs as its own child process (the stage's CLI command, as for concurrent stages on the
thread pool), killed at the stage's time limit, with the host's cores divided among the stage slots of
the workers on that host. Tasks exchange the typed config, paths and run ids, so the workers need the
code, a filesystem where the run's paths are the same, and the MLflow/Prefect stores the flow uses.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from typing import Any

from asft.config import OrchestrationConfig

LOOPBACK = "127.0.0.1"


def local_cluster_kwargs(oc: OrchestrationConfig) -> dict[str, Any]:
    """``distributed.LocalCluster`` arguments of a run without ``dask_address``: worker processes on
    loopback; its HTTP server (dashboard, metrics) on a free port, never a taken default."""
    return {"n_workers": oc.dask_workers or oc.max_parallel, "threads_per_worker": oc.dask_threads_per_worker,
            "processes": True, "host": LOOPBACK, "dashboard_address": ":0"}


def dask_task_runner(oc: OrchestrationConfig, address: str | None = None):
    """The task runner of a fan-out: the scheduler at ``address`` (else ``oc.dask_address``), or a
    temporary ``LocalCluster`` built from :func:`local_cluster_kwargs`."""
    from prefect_dask import DaskTaskRunner

    address = address or oc.dask_address
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=local_cluster_kwargs(oc))


class DaskFanOut:
    """One flow run's Dask cluster: the configured scheduler, or a ``LocalCluster`` started on first use
    and closed by :meth:`close` (the flow's end). :meth:`runner` gives each fan-out its task runner."""

    def __init__(self, oc: OrchestrationConfig):
        self.oc = oc
        self._stack = contextlib.ExitStack()
        self.address: str | None = oc.dask_address

    def runner(self):
        if self.address is None:
            from prefect.utilities.importtools import from_qualified_name

            runner = dask_task_runner(self.oc)
            cluster = self._stack.enter_context(from_qualified_name(runner.cluster_class)(**runner.cluster_kwargs))
            self.address = cluster.scheduler_address
        return dask_task_runner(self.oc, self.address)

    def close(self) -> None:
        # Every task has finished: a worker slow to exit (a busy machine) is killed after the nanny's grace
        # period, which it reports as a warning on the person's console; nothing is lost, so it stays quiet.
        nanny = logging.getLogger("distributed.nanny")
        level = nanny.level
        nanny.setLevel(logging.ERROR)
        try:
            self._stack.close()
        finally:
            nanny.setLevel(level)


@contextlib.contextmanager
def workers_reach_this_api():
    """The settings a fan-out's tasks carry to the workers name this process's Prefect API. Without
    ``PREFECT_API_URL`` (an ephemeral server on this machine) that is the ephemeral server's address, so
    LocalCluster workers report to it instead of each starting its own server on the same database
    (remote workers need a real Prefect server and ``PREFECT_API_URL``)."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    if get_current_settings().api.url:
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # this process's ephemeral server (the instance its client started)
    if server.server_process is None:
        yield
        return
    with temporary_settings({PREFECT_API_URL: server.api_url}):
        yield


def cluster_slots(address: str) -> int:
    """Task slots (worker threads) of the cluster at ``address``."""
    from distributed import Client

    with Client(address, set_as_default=False) as client:
        return max(1, sum(w["nthreads"] for w in client.scheduler_info(n_workers=-1)["workers"].values()))


def dask_worker():
    """The Dask worker running the current task, or None outside Dask."""
    try:
        from distributed import get_worker
    except ImportError:  # pragma: no cover - prefect-dask brings distributed
        return None
    try:
        return get_worker()
    except ValueError:
        return None


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def dask_stage_threads() -> int | None:
    """Math-library threads of a stage's child process on this Dask worker: the host's cores divided by the
    stage slots (worker threads) of every worker on this host, as the scheduler reports them; None outside
    Dask. Two LocalCluster workers on 2 cores -> 1 thread each; one worker per node -> every core."""
    worker = dask_worker()
    if worker is None:
        return None
    host = worker.address.split("://", 1)[-1].rsplit(":", 1)[0]
    slots = worker.state.nthreads
    try:
        from distributed import get_client

        infos = get_client().scheduler_info(n_workers=-1)["workers"].values()
        slots = sum(w["nthreads"] for w in infos if w.get("host") == host) or slots
    except Exception as e:  # noqa: BLE001 - an unreachable scheduler: this worker's own slots
        logging.getLogger(__name__).debug("no scheduler information (%s): counting this worker's slots", e)
    return max(1, _cores() // max(slots, 1))


def executor_info() -> dict[str, Any]:
    """Where a stage ran: host, process id and (on Dask) the worker's address."""
    worker = dask_worker()
    return {"host": socket.gethostname(), "pid": os.getpid(), "dask_worker": worker.address if worker else None}
