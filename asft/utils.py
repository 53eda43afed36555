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


_DVC_IGNORED_DIRS = frozenset({".git", ".hg", ".dvc"})  # dvc.ignore.DvcIgnoreFilter defaults


def dvc_md5(path: str | Path, chunk: int = 1 << 20) -> str:
    """The content hash DVC 3 records for ``path`` in ``dvc.lock`` (``md5:``), without importing dvc.

    A file: the md5 of its bytes. A directory: ``<md5>.dir``, the md5 of DVC's directory manifest,
    i.e. ``json.dumps([{"md5": <file md5>, "relpath": "a/b.parquet"}, ...], sort_keys=True)``
    with the entries sorted by their POSIX relative path (``dvc_data.hashfile.tree.Tree``).
    As DVC does, the walk does not descend into symlinked directories, follows symlinked files,
    leaves out empty directories and DVC's default ignores (``.git``, ``.hg``, ``.dvc``); patterns in
    the repository's ``.dvcignore`` are not applied (the pipeline's outputs are not matched by any).
    Used to record the exact dataset version (the one ``dvc pull`` restores) in MLflow.
    """
    p = Path(path)
    if p.is_file():
        return _md5_file(p, chunk)
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such file or directory")
    entries = []
    for root, dirs, files in os.walk(p):
        dirs[:] = [d for d in dirs if d not in _DVC_IGNORED_DIRS]
        rel = Path(root).relative_to(p)
        for name in files:
            if name == ".git":  # a git worktree/submodule pointer file
                continue
            if name == ".dvcignore":
                raise ValueError(f"{Path(root) / name}: a .dvcignore file cannot be inside a DVC-tracked directory")
            entries.append({"md5": _md5_file(Path(root) / name, chunk), "relpath": (rel / name).as_posix()})
    entries.sort(key=lambda e: e["relpath"])
    manifest = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(manifest, usedforsecurity=False).hexdigest() + ".dir"


def _md5_file(path: Path, chunk: int) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()
