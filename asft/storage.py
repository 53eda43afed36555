"""Remote storage for what must outlive a worker: training checkpoints (core library: fsspec/s3fs only).

A GPU pod that is preempted takes its disk with it. With ``storage.checkpoints_url`` set, every
training stage that runs in a keyed work directory (``runs/.work/<stage cache key>``, the key being
the stage's input hashes, params and code version, so another machine running the same stage computes
the same key) uploads each checkpoint it writes to ``<checkpoints_url>/<key>[/<sub>]/`` and, when it
starts without a local checkpoint, downloads the latest one first and resumes from it.

Layout under one key (one trainer: ``<key>`` for the base model and post-training, ``<key>/member_<k>``
for each ensemble member)::

    LATEST.json            {"version": "s000000042-e1-b3", "files": {relpath: {"size", "sha256"}}, ...}
    s000000042-e1-b3/...   the checkpoint directory as the trainer wrote it (model, optimizer, RNG, best/)

A version is uploaded completely before ``LATEST.json`` (one object, replaced atomically by S3 and by
a rename on a file system) points at it; older versions are then deleted. A download verifies every
file's size and sha256 and is renamed into place, so a reader never sees half a checkpoint.

URLs are ``s3://bucket/prefix`` (AWS or an S3-compatible server given by ``endpoint_url``; credentials
from the environment: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, profiles, IAM roles) or a
local/shared path. The trainer calls :func:`after_checkpoint_write` and :func:`before_checkpoint_load`;
the stage that owns the work directory activates the sync with :func:`checkpoint_sync`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

LATEST = "LATEST.json"


def filesystem(url: str, endpoint_url: str | None = None):
    """``(fsspec file system, root path)`` of ``url``: S3 (s3fs; ``endpoint_url`` for an S3-compatible
    server) or the local file system (a path or ``file://``)."""
    import fsspec

    if url.startswith("s3://"):
        kwargs = {"endpoint_url": endpoint_url} if endpoint_url else {}
        return fsspec.filesystem("s3", **kwargs), url[len("s3://"):].rstrip("/")
    path = url.removeprefix("file://")
    return fsspec.filesystem("file"), os.path.abspath(path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _version(ckpt_dir: Path) -> str:
    """A checkpoint's version name from its position (optimizer step, epoch, batch)."""
    st = json.loads((ckpt_dir / "trainer_state.json").read_text())
    return f"s{int(st.get('step', 0)):09d}-e{int(st.get('epoch', 0))}-b{int(st.get('batch', 0))}"


@dataclass(frozen=True)
class CheckpointStore:
    """Checkpoints of training runs under ``url`` (see the module doc for the layout)."""

    url: str
    endpoint_url: str | None = None

    def _fs(self):
        return filesystem(self.url, self.endpoint_url)

    def latest(self, key: str) -> dict | None:
        """The ``LATEST.json`` record under ``key`` (None: nothing uploaded yet)."""
        fs, root = self._fs()
        path = f"{root}/{key}/{LATEST}"
        if not fs.exists(path):
            return None
        return json.loads(fs.cat_file(path))

    def upload(self, ckpt_dir: str | Path, key: str) -> str:
        """Upload the checkpoint directory ``ckpt_dir`` as the latest version under ``key``; returns the
        version name. Earlier versions are deleted once ``LATEST.json`` names the new one."""
        ckpt_dir = Path(ckpt_dir)
        fs, root = self._fs()
        version = _version(ckpt_dir)
        base = f"{root}/{key}"
        files = {p.relative_to(ckpt_dir).as_posix(): p for p in sorted(ckpt_dir.rglob("*")) if p.is_file()}
        record = {"version": version, "files": {}}
        for rel, p in files.items():
            record["files"][rel] = {"size": p.stat().st_size, "sha256": _sha256(p)}
            fs.makedirs(f"{base}/{version}/{rel}".rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(str(p), f"{base}/{version}/{rel}")
        fs.pipe_file(f"{base}/{LATEST}", json.dumps(record, indent=1).encode())
        for entry in fs.ls(base, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if name != version and name != LATEST and name.startswith("s") and "-e" in name:
                fs.rm(entry, recursive=True)
        return version

    def download(self, key: str, ckpt_dir: str | Path) -> str | None:
        """Download the latest version under ``key`` into ``ckpt_dir`` (which must not exist), verified
        file by file; returns the version name, or None when there is none."""
        record = self.latest(key)
        if record is None:
            return None
        ckpt_dir = Path(ckpt_dir)
        fs, root = self._fs()
        tmp = ckpt_dir.parent / f".{ckpt_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            for rel, info in record["files"].items():
                dst = tmp / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{root}/{key}/{record['version']}/{rel}", str(dst))
                if dst.stat().st_size != info["size"] or _sha256(dst) != info["sha256"]:
                    raise OSError(f"{self.url}/{key}/{record['version']}/{rel}: downloaded file does not match "
                                  "the checkpoint record (size or sha256)")
            os.replace(tmp, ckpt_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return record["version"]


_ACTIVE: ContextVar[tuple[CheckpointStore, Path] | None] = ContextVar("asft_checkpoint_sync", default=None)


@contextmanager
def checkpoint_sync(url: str | None, work_dir: str | Path, endpoint_url: str | None = None) -> Iterator[None]:
    """While active, trainers writing checkpoints under ``work_dir`` upload them to ``url`` under
    ``<work_dir name>/<path inside it>`` and restore the latest one when they have none. ``url=None``:
    no sync."""
    if not url:
        yield
        return
    token = _ACTIVE.set((CheckpointStore(url, endpoint_url), Path(work_dir).resolve()))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def _target(ckpt_dir: Path) -> tuple[CheckpointStore, str] | None:
    active = _ACTIVE.get()
    if active is None:
        return None
    store, work = active
    try:
        sub = Path(ckpt_dir).resolve().parent.relative_to(work)
    except ValueError:  # a trainer outside the synced work directory
        return None
    return store, "/".join([work.name, *sub.parts])


def syncing(ckpt_dir: str | Path) -> bool:
    """Whether checkpoints written to ``ckpt_dir`` are synced to remote storage."""
    return _target(Path(ckpt_dir)) is not None


def after_checkpoint_write(ckpt_dir: str | Path) -> str | None:
    """Upload a checkpoint just written (main process); returns its version, None without a sync."""
    target = _target(Path(ckpt_dir))
    if target is None:
        return None
    store, key = target
    return store.upload(ckpt_dir, key)


def before_checkpoint_load(ckpt_dir: str | Path) -> str | None:
    """When ``ckpt_dir`` holds no checkpoint, download the latest one from remote storage (a run
    preempted elsewhere); returns the version restored, None when nothing was downloaded."""
    ckpt_dir = Path(ckpt_dir)
    target = _target(ckpt_dir)
    if target is None or (ckpt_dir / "trainer_state.json").is_file():
        return None
    if ckpt_dir.exists():  # an unfinished directory without a state file: not a checkpoint
        shutil.rmtree(ckpt_dir)
    store, key = target
    return store.download(key, ckpt_dir)
