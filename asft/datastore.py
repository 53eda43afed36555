"""Datasets in the DVC cache, by content hash, without importing DVC.

``commit(path, cache)`` stores a file or directory in a DVC 3 cache exactly as ``dvc add``/``dvc
commit`` would (``files/md5/<2>/<30>`` objects, plus the ``.dir`` manifest for a directory), so the
same objects are what ``dvc push``/``dvc pull``/``dvc checkout`` move; ``checkout(md5, cache,
dest)`` restores a version; ``missing(md5, cache)`` lists what a cache (or a local remote, which
has the same layout) lacks. The hash is :func:`asft.utils.dvc_md5`, the one recorded in dvc.lock
and on every MLflow run, so a run's dataset versions can be checked and restored from it.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from asft.utils import _md5_file, dvc_md5


def object_path(cache: str | Path, md5: str) -> Path:
    return Path(cache) / "files" / "md5" / md5[:2] / md5[2:]


def _store(src: Path, dst: Path) -> None:
    if dst.is_file():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex}.tmp")
    shutil.copyfile(src, tmp)
    os.chmod(tmp, 0o444)  # DVC keeps cache objects read-only
    os.replace(tmp, dst)


def _manifest(path: Path) -> list[dict]:
    entries = []
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if d not in (".git", ".hg", ".dvc")]
        rel = Path(root).relative_to(path)
        entries.extend({"md5": _md5_file(Path(root) / f, 1 << 20), "relpath": (rel / f).as_posix()} for f in files
                       if f != ".git")
    return sorted(entries, key=lambda e: e["relpath"])


def commit(path: str | Path, cache: str | Path) -> str:
    """Store ``path`` in the cache; returns its DVC hash (``<md5>.dir`` for a directory)."""
    p = Path(path)
    if p.is_file():
        md5 = _md5_file(p, 1 << 20)
        _store(p, object_path(cache, md5))
        return md5
    entries = _manifest(p)
    for e in entries:
        _store(p / e["relpath"], object_path(cache, e["md5"]))
    manifest = json.dumps(entries, sort_keys=True).encode("utf-8")
    md5 = dvc_md5(p)
    obj = object_path(cache, md5)
    if not obj.is_file():
        tmp = obj.parent / f".{uuid.uuid4().hex}.tmp"
        obj.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(manifest)
        os.chmod(tmp, 0o444)
        os.replace(tmp, obj)
    return md5


def missing(md5: str, cache: str | Path) -> list[str]:
    """Objects of version ``md5`` absent from ``cache`` (empty: fully retrievable)."""
    obj = object_path(cache, md5)
    if not obj.is_file():
        return [md5]
    if not md5.endswith(".dir"):
        return []
    return [e["md5"] for e in json.loads(obj.read_text()) if not object_path(cache, e["md5"]).is_file()]


def checkout(md5: str, cache: str | Path, dest: str | Path) -> Path:
    """Restore version ``md5`` from ``cache`` into ``dest`` (must not exist); verifies the hash."""
    dest = Path(dest)
    if dest.exists():
        raise FileExistsError(f"{dest} already exists")
    lost = missing(md5, cache)
    if lost:
        raise FileNotFoundError(f"DVC cache {cache}: version {md5} is incomplete ({len(lost)} objects missing)")
    if md5.endswith(".dir"):
        for e in json.loads(object_path(cache, md5).read_text()):
            out = dest / e["relpath"]
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(object_path(cache, e["md5"]), out)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(object_path(cache, md5), dest)
    got = dvc_md5(dest)
    if got != md5:
        raise ValueError(f"{dest}: restored hash {got} != {md5}")
    return dest


def pointer_file(md5: str, path: str, out: str | Path) -> Path:
    """A ``.dvc`` file for version ``md5`` at workspace ``path``: ``dvc checkout``/``dvc pull`` of it
    restores that exact dataset in any clone that shares the cache or remote."""
    import yaml

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump({"outs": [{"md5": md5, "path": path, "hash": "md5"}]}, sort_keys=False))
    return out
