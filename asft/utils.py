"""Small shared helpers: atomic writes, seeding, devices, hashing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Write a directory atomically: yield a temp sibling, rename it over ``target`` on success.

    On any exception the temporary directory is removed and ``target`` is left untouched, so a
    crashed or rejected stage never leaves a half-written artifact.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def staged_output(out_dir: str | Path, work_dir: str | Path | None = None, resume: bool = True) -> Iterator[Path]:
    """Run a long (training) stage in a resumable work directory and publish ``out_dir`` atomically.

    The stage writes everything, checkpoints included, under the yielded work directory. On success
    its contents, less ``checkpoint/`` directories, are copied into a temporary sibling of ``out_dir``
    and renamed over it, and the work directory is removed; on a crash (or ``kill -9``) ``out_dir`` is
    untouched and the work directory keeps the last checkpoints, from which the next run resumes.

    ``work_dir`` defaults to the hidden sibling ``.NAME.work``; the orchestration passes one keyed by
    the stage's inputs, params and code (so any later run of the same stage resumes). The work
    directory is locked (``flock``, released by the OS if the process dies): a concurrent run of the
    same stage gets a private work directory instead of sharing checkpoints. ``resume=False`` clears
    an existing work directory first.
    """
    from filelock import FileLock, Timeout

    out = Path(out_dir)
    work = Path(work_dir) if work_dir is not None else out.parent / f".{out.name}.work"
    work.parent.mkdir(parents=True, exist_ok=True)
    rank, world = dist_rank()
    lock = FileLock(f"{work}.lock") if world == 1 else None  # one distributed job = one run: no lock
    try:
        if lock is not None:
            lock.acquire(timeout=0)
    except Timeout:
        lock = None
        work = out.parent / f".{out.name}.work-{uuid.uuid4().hex[:8]}"
    try:
        if not resume and work.exists() and rank == 0:
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        if rank == 0:  # temporaries of a writer that was killed mid-write (we hold the lock: nobody else writes)
            for stale in [*work.rglob(".*.tmp-*"), *work.rglob(".*.old-*")]:
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)
        yield work
        if rank != 0:  # the main process publishes (after the trainer's final barrier)
            return
        with atomic_dir(out) as tmp:
            shutil.copytree(work, tmp, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("checkpoint", ".*.tmp-*", ".*.old-*"))
            for f in tmp.glob("*.json"):  # summaries name the final location, not the work directory
                f.write_text(f.read_text().replace(str(work), str(out)))
        shutil.rmtree(work, ignore_errors=True)
    finally:
        if lock is not None:
            lock.release()


def dist_rank() -> tuple[int, int]:
    """(rank, world size) of this process in a ``torchrun``/``accelerate launch`` job; (0, 1) otherwise."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def rebase_paths(obj, old: str | Path, new: str | Path):
    """``obj`` (a JSON-able summary) with every string path under ``old`` moved under ``new``."""
    old, new = str(old), str(new)
    if isinstance(obj, str):
        return new + obj[len(old):] if obj == old or obj.startswith(old + os.sep) else obj
    if isinstance(obj, dict):
        return {k: rebase_paths(v, old, new) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rebase_paths(v, old, new) for v in obj]
    return obj


def link_tree(src: str | Path, dst: str | Path) -> None:
    """Mirror ``src`` into ``dst`` with hard links (copies across file systems). Safe for trees whose
    files are only ever replaced, never modified in place (what :func:`atomic_dir` produces)."""
    src, dst = Path(src), Path(dst)
    for p in src.rglob("*"):
        q = dst / p.relative_to(src)
        if p.is_dir():
            q.mkdir(parents=True, exist_ok=True)
            continue
        q.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(p, q)
        except OSError:
            shutil.copy2(p, q)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default))


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device '{spec}' requested but CUDA is not available")
    return dev


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def dir_sha256(path: str | Path) -> str:
    """Content hash of a directory: relative paths and file hashes, sorted."""
    root = Path(path)
    h = hashlib.sha256()
    for p in sorted(x for x in root.rglob("*") if x.is_file()):
        h.update(str(p.relative_to(root)).encode())
        h.update(file_sha256(p).encode())
    return h.hexdigest()


def dvc_md5(path: str | Path) -> str:
    """The content hash DVC 3 records for ``path`` in ``.dvc`` files and ``dvc.lock`` (``md5:``):
    the md5 of a file, or ``<md5>.dir`` of a directory's manifest, computed by DVC itself
    (:func:`asft.datastore.hash_path`). Used to record the exact dataset version (the one ``dvc
    pull`` restores) in MLflow."""
    from asft.datastore import hash_path  # DVC is imported only where a hash is needed

    return hash_path(path)
