"""Remote storage for the orchestration layer: the DVC remote of the run's datasets, Prefect's result storage.

- :func:`dvc_remote`: ``storage.dvc_remote`` as a :class:`asft.datastore.Remote` (None: the repository's
  default remote from ``.dvc/config``).
- :func:`push_datasets`: ``dvc push`` of every dataset version of a run, then the remote recorded on the
  MLflow parent run (tags ``dvc.remote``, ``dvc.remote.url``, ``dvc.remote.endpoint_url``, next to the
  ``dvc.<name>.md5`` tags) and the ``.dvc`` pointers plus ``lineage/dvc_remote.json`` as artifacts, so
  that any machine reaching the tracking server and the remote can fetch the exact data (``asft audit``).
  A configured ``storage.dvc_remote`` that cannot be reached fails the run (its lineage would not
  survive the worker); the repository's default remote only warns, as before.
- :func:`result_storage`: the Prefect result storage block of ``storage.results_url`` (an fsspec
  ``RemoteFileSystem`` for ``s3://``, with the S3-compatible endpoint in its settings and no credentials,
  which the S3 client reads from the environment; ``LocalFileSystem`` for a path), saved on the Prefect
  server under a name derived from the URL (Prefect persists results only through saved blocks).

Credentials never appear in config, tags, artifacts or logs: URLs with user info are refused by the
config, and S3 clients read ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` themselves.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from asft import datastore
from asft.config import Config, StorageConfig
from asft.utils import write_json
from tasks import lineage


def dvc_remote(cfg: Config) -> datastore.Remote | None:
    st = cfg.storage
    if not st.dvc_remote:
        return None
    return datastore.Remote(st.dvc_remote_name, st.dvc_remote, st.s3_endpoint_url)


def push_datasets(parent, cfg: Config, datasets: dict[str, str], out: Path, logger=None) -> dict | None:
    """Push the run's dataset versions (``{name: md5}``) to the DVC remote and record where they are.
    Returns ``{"name", "url", "endpoint_url", "datasets"}``; None when the default remote was not
    reachable (a warning through ``logger``)."""
    remote = dvc_remote(cfg)
    try:
        datastore.push(list(datasets.values()), lineage.REPO, remote)
        where = datastore.describe_remote(lineage.REPO, remote)
    except Exception as e:
        if remote is not None:
            raise RuntimeError(f"pushing the datasets to DVC remote '{remote.name}' ({remote.url}) failed: "
                               f"{type(e).__name__}: {e}") from e
        if logger is not None:
            logger.warning("DVC push skipped: %s", e)
        return None
    record = {**where, "datasets": dict(datasets)}
    write_json(out / "lineage" / "dvc_remote.json", record)
    parent.set_tags({"dvc.remote": where["name"], "dvc.remote.url": where["url"],
                     **({"dvc.remote.endpoint_url": where["endpoint_url"]} if where["endpoint_url"] else {})})
    parent.log_artifact(out / "lineage" / "dvc_remote.json", "lineage")
    if (out / "dvc").is_dir():
        parent.log_artifact(out / "dvc", "dvc")
    return record


@functools.lru_cache(maxsize=8)
def _saved_block(url: str, endpoint_url: str | None, api_url: str | None):  # one save per server and URL
    from prefect.filesystems import LocalFileSystem, RemoteFileSystem

    if url.startswith("s3://"):
        block = RemoteFileSystem(basepath=url, settings={"endpoint_url": endpoint_url} if endpoint_url else {})
    else:
        block = LocalFileSystem(basepath=str(Path(url.removeprefix("file://")).resolve()))
    name = "asft-results-" + hashlib.sha256(f"{url}|{endpoint_url}".encode()).hexdigest()[:12]
    try:
        block.save(name, overwrite=True)
    except Exception:  # noqa: BLE001 - a concurrent run saved the same block first: use that one
        block = type(block).load(name)
    return block


def result_storage(st: StorageConfig):
    """The saved Prefect block for ``storage.results_url`` (None: Prefect's default local storage)."""
    if not st.results_url:
        return None
    from prefect.settings import get_current_settings

    return _saved_block(st.results_url, st.s3_endpoint_url, get_current_settings().api.url)
