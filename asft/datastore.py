"""Dataset versions through DVC's own API: hashing, the cache, ``.dvc`` pointers and remotes.

Nothing here re-implements DVC; every operation is the one ``dvc add`` / ``dvc commit`` /
``dvc push`` / ``dvc fetch`` / ``dvc checkout`` performs, called through ``dvc`` and ``dvc-data``:

- :func:`hash_path`: the hash ``dvc add`` records (``md5`` of a file, ``<md5>.dir`` of a directory's
  manifest), from ``dvc_data.hashfile.build`` with DVC's ignore rules (``.git``/``.hg``/``.dvc`` and
  the ``.dvcignore`` of the enclosing DVC repository, if any);
- :func:`commit`: build and transfer into a DVC cache in one pass (each file is read once), returning
  that hash; :func:`missing` / :func:`checkout` query and restore a version in a cache;
- :func:`pointer_file`: a ``.dvc`` file (validated against DVC's own schema) that ``dvc status`` /
  ``dvc checkout`` / ``dvc pull`` understand;
- repository level (configuration read by :class:`dvc.repo.Repo`, never parsed here):
  :func:`cache_dir`, :func:`default_remote`, :func:`commit_dataset` (commit + pointer + push),
  :func:`push`, :func:`fetch`, :func:`remote_missing` and :func:`retrieve` (checkout of a version,
  fetched from the remote when the local cache lacks it);
- remotes given by URL (:class:`Remote`: ``s3://bucket/prefix`` with an optional S3-compatible endpoint,
  or a path): added to the repository's configuration for the duration of the call, exactly what
  ``dvc remote add NAME URL`` + ``dvc remote modify NAME endpointurl ...`` would write, validated by
  DVC's own config schema; credentials come from the environment (``AWS_ACCESS_KEY_ID`` ...), never
  from here. :func:`describe_remote` gives the name and URL to record.

A ``cache`` argument is a DVC cache directory (the ``cache.dir`` of a repository: objects live under
``files/md5/``) or an object database from ``dvc_data`` (e.g. ``Repo(...).cache.local``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dvc_data.hashfile import load
from dvc_data.hashfile.build import build
from dvc_data.hashfile.checkout import checkout as _dvc_checkout
from dvc_data.hashfile.db import HashFileDB, get_odb
from dvc_data.hashfile.hash_info import HashInfo
from dvc_data.hashfile.status import status
from dvc_data.hashfile.transfer import find_tree_by_obj_id, transfer
from dvc_objects.fs.local import LocalFileSystem

if TYPE_CHECKING:
    from dvc.ignore import DvcIgnoreFilter
    from dvc.repo import Repo
    from dvc_data.hashfile.meta import Meta
    from dvc_data.hashfile.obj import HashFile

HASH_NAME = "md5"  # DVC 3's default hash; its objects live under <cache>/files/md5/
_FS = LocalFileSystem()


# -- hashing ----------------------------------------------------------------------------------------
def _ignore(path: str) -> DvcIgnoreFilter:
    """DVC's ignore filter for ``path``: the enclosing repository's (its ``.dvcignore`` applies, as
    for ``dvc add`` there), else one rooted at the path (DVC's default ignores only)."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.ignore import DvcIgnoreFilter
    from dvc.repo import Repo

    start = path if os.path.isdir(path) else os.path.dirname(path) or os.curdir
    try:
        root = Repo.find_root(start)
    except NotDvcRepoError:
        root = start
    return DvcIgnoreFilter(_FS, os.path.abspath(root))


def _build(path: str | Path, odb: HashFileDB, dry_run: bool) -> tuple[HashFileDB, Meta, HashFile]:
    p = os.path.abspath(path)
    if not os.path.exists(p):
        raise FileNotFoundError(f"{path}: no such file or directory")
    return build(odb, p, _FS, HASH_NAME, ignore=_ignore(p), dry_run=dry_run)


# ``build`` needs a destination database even for a dry run; nothing is ever written to this one.
_HASH_ONLY = get_odb(_FS, _FS.join(tempfile.gettempdir(), "asft-dvc-hash-only"), hash_name=HASH_NAME)


def hash_path(path: str | Path) -> str:
    """The hash DVC records for ``path`` (``md5:`` in ``.dvc`` files and ``dvc.lock``), computed by
    DVC itself without storing anything."""
    return _build(path, _HASH_ONLY, dry_run=True)[2].hash_info.value


# -- one cache ------------------------------------------------------------------------------------------
def cache_odb(cache: str | Path | HashFileDB) -> HashFileDB:
    """DVC's object database of a cache directory (what ``Repo.cache.local`` is for that ``cache.dir``)."""
    if isinstance(cache, HashFileDB):
        return cache
    return get_odb(_FS, _FS.join(os.path.abspath(cache), "files", HASH_NAME), hash_name=HASH_NAME)


def object_path(cache: str | Path | HashFileDB, md5: str) -> Path:
    """Where the cache keeps object ``md5`` (a file's bytes, or a directory's ``.dir`` manifest)."""
    return Path(cache_odb(cache).oid_to_path(md5))


def _commit(path: str | Path, odb: HashFileDB) -> tuple[str, Meta]:
    staging, meta, obj = _build(path, odb, dry_run=False)
    res = transfer(staging, odb, {obj.hash_info}, shallow=False, hardlink=False)
    if res.failed:
        raise OSError(f"{path}: {len(res.failed)} objects could not be stored in the DVC cache {odb.path}")
    return obj.hash_info.value, meta


def commit(path: str | Path, cache: str | Path | HashFileDB) -> str:
    """Store ``path`` in the cache as ``dvc commit`` does (one read of every file); returns its hash."""
    return _commit(path, cache_odb(cache))[0]


def missing(md5: str, cache: str | Path | HashFileDB) -> list[str]:
    """Objects of version ``md5`` absent from ``cache`` (empty: fully retrievable from it)."""
    odb = cache_odb(cache)
    hi = HashInfo(HASH_NAME, md5)
    try:
        res = status(odb, {hi}, shallow=False)
    except FileNotFoundError:  # the .dir manifest itself is absent
        return [md5]
    return sorted(h.value for h in res.missing)


def checkout(md5: str, cache: str | Path | HashFileDB, dest: str | Path) -> Path:
    """Restore version ``md5`` from ``cache`` into ``dest`` (must not exist) with DVC's checkout
    (independent copies, never links into the cache), then verify the restored hash."""
    dest = Path(dest)
    if dest.exists() or dest.is_symlink():
        raise FileExistsError(f"{dest} already exists")
    odb = cache_odb(cache)
    lost = missing(md5, odb)
    if lost:
        raise FileNotFoundError(f"DVC cache {odb.path}: version {md5} is incomplete "
                                f"({len(lost)} objects missing)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    copies = get_odb(odb.fs, odb.path, hash_name=HASH_NAME, type=["reflink", "copy"])  # never hard/symlinks
    _dvc_checkout(str(dest.absolute()), _FS, load(copies, HashInfo(HASH_NAME, md5)), copies)
    got = hash_path(dest)
    if got != md5:
        raise ValueError(f"{dest}: restored hash {got} != {md5}")
    return dest


def pointer_file(md5: str, path: str, out: str | Path, meta: Meta | None = None) -> Path:
    """A ``.dvc`` file for version ``md5`` at workspace ``path`` (relative to the file): ``dvc
    checkout``/``dvc pull`` of it restores that exact dataset in any clone sharing the cache or
    remote. ``meta`` (from a commit) adds ``size``/``nfiles`` as ``dvc add`` writes them."""
    from dvc.schema import COMPILED_SINGLE_STAGE_SCHEMA
    from dvc.utils.serialize import dump_yaml

    entry: dict = {"md5": md5}
    if meta is not None:
        entry.update({k: v for k, v in (("size", meta.size), ("nfiles", meta.nfiles if meta.isdir else None))
                      if v is not None})
    entry.update({"hash": HASH_NAME, "path": path})
    doc = COMPILED_SINGLE_STAGE_SCHEMA({"outs": [entry]})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    dump_yaml(str(tmp), doc)
    os.replace(tmp, out)
    return out


# -- a DVC repository: its configured cache and remotes --------------------------------------------------
@dataclass(frozen=True)
class Remote:
    """A DVC remote given by URL (``s3://bucket/prefix`` or a local/shared path), configured under
    ``name`` for one repository call; ``endpoint_url``: an S3-compatible server (DVC's ``endpointurl``)."""

    name: str
    url: str
    endpoint_url: str | None = None

    def dvc_config(self) -> dict:
        """The ``remote`` section ``dvc remote add NAME URL`` (+ ``modify endpointurl``) writes."""
        url = self.url
        if "://" not in url:  # a path: absolute, as DVC resolves a relative one against the config file
            url = os.path.abspath(url)
        elif url.startswith("file://"):
            url = url[len("file://"):]
        entry = {"url": url}
        if self.endpoint_url and url.startswith("s3://"):
            entry["endpointurl"] = self.endpoint_url
        return {self.name: entry}


@contextmanager
def open_repo(root: str | Path, remote: Remote | None = None) -> Iterator[Repo]:
    """The DVC repository at ``root`` (its config merged from system, global, repo and local levels),
    plus ``remote`` when given (not written to any config file). Opened without git (``core.no_scm``):
    caches and remotes never need it, and a deployed copy of the project may have no ``.git``."""
    from dvc.repo import Repo

    config: dict = {"core": {"no_scm": True}}
    if os.environ.get("ASFT_DVC_CACHE_DIR"):  # a cache elsewhere (tests, workers with a volume): push/fetch agree
        config["cache"] = {"dir": os.environ["ASFT_DVC_CACHE_DIR"]}
    if remote is not None:
        config["remote"] = remote.dvc_config()
    repo = Repo(str(root), config=config)
    try:
        yield repo
    finally:
        repo.close()


def cache_dir(root: str | Path) -> Path:
    """The repository's cache directory (``cache.dir``, default ``.dvc/cache``), as DVC resolves it."""
    with open_repo(root) as repo:
        return Path(repo.cache.local_cache_dir)


def _remote_name(repo: Repo, remote: str | Remote | None) -> str:
    from dvc.config import NoRemoteError

    if isinstance(remote, Remote):
        return remote.name
    name = remote or repo.config["core"].get("remote")
    if not name:
        raise NoRemoteError(f"{repo.root_dir}: no DVC remote given and no default remote (core.remote) set")
    if name not in repo.config["remote"]:
        raise NoRemoteError(f"{repo.root_dir}: DVC remote '{name}' is not configured")
    return name


def default_remote(root: str | Path) -> str:
    with open_repo(root) as repo:
        return _remote_name(repo, None)


def _given(remote: str | Remote | None) -> Remote | None:
    return remote if isinstance(remote, Remote) else None


def describe_remote(root: str | Path, remote: str | Remote | None = None) -> dict:
    """``{"name", "url", "endpoint_url"}`` of ``remote`` (default: the repository's default remote) as
    DVC resolves it (a relative path in ``.dvc/config`` becomes absolute): what a run records so that
    another machine can fetch its datasets."""
    with open_repo(root, _given(remote)) as repo:
        name = _remote_name(repo, remote)
        conf = repo.config["remote"][name]
        return {"name": name, "url": str(conf["url"]), "endpoint_url": conf.get("endpointurl")}


def _objects(md5s: Iterable[str], *odbs: HashFileDB) -> set[HashInfo]:
    """The objects of versions ``md5s``: each ``.dir`` manifest with every file it lists (read from the
    first of ``odbs`` holding it), as DVC's own push/fetch pass them to the transfer."""
    ids: set[HashInfo] = set()
    for md5 in md5s:
        hi = HashInfo(HASH_NAME, md5)
        ids.add(hi)
        if hi.isdir:
            tree = find_tree_by_obj_id(odbs, hi)
            if tree is None:
                raise FileNotFoundError(f"the manifest of version {md5} is in none of "
                                        f"{[o.path for o in odbs]}")
            ids.update(oid for _, _, oid in tree)
    return ids


def _push(repo: Repo, md5s: Iterable[str], remote: str | Remote | None) -> str:
    name = _remote_name(repo, remote)
    md5s = list(md5s)
    lost = {m: missing(m, repo.cache.local) for m in md5s}
    lost = {m: v for m, v in lost.items() if v}
    if lost:
        raise FileNotFoundError(f"cannot push: the local DVC cache lacks objects of {sorted(lost)}")
    res = repo.cloud.push(_objects(md5s, repo.cache.local), remote=name)
    if res.failed:
        raise OSError(f"pushing to DVC remote '{name}' failed for {sorted(h.value for h in res.failed)}")
    return name


def push(md5s: Iterable[str], root: str | Path, remote: str | Remote | None = None) -> str:
    """``dvc push`` of committed versions to ``remote`` (a configured name, a :class:`Remote`, or the
    repository's default remote); returns the remote's name."""
    with open_repo(root, _given(remote)) as repo:
        return _push(repo, md5s, remote)


def _fetch(repo: Repo, md5s: Iterable[str], remote: str | Remote | None) -> str:
    name = _remote_name(repo, remote)
    odb = repo.cloud.get_remote_odb(name, "fetch")
    res = repo.cloud.pull(_objects(md5s, repo.cache.local, odb), remote=name)
    if res.failed:
        raise OSError(f"fetching from DVC remote '{name}' failed for {sorted(h.value for h in res.failed)}")
    return name


def fetch(md5s: Iterable[str], root: str | Path, remote: str | Remote | None = None) -> str:
    """``dvc fetch`` of versions from ``remote`` into the repository's cache; returns the remote's name."""
    with open_repo(root, _given(remote)) as repo:
        return _fetch(repo, md5s, remote)


def remote_missing(md5: str, root: str | Path, remote: str | Remote | None = None) -> list[str]:
    """Objects of version ``md5`` absent from the remote (empty: ``dvc pull`` can restore it)."""
    with open_repo(root, _given(remote)) as repo:
        odb = repo.cloud.get_remote_odb(_remote_name(repo, remote), "status")
        return missing(md5, odb)


def commit_dataset(path: str | Path, name: str, pointer_out: str | Path, root: str | Path,
                   remote: str | Remote | None = None, push_to_remote: bool = True) -> dict:
    """Commit ``path`` to the repository's cache (hashing every file once), write the ``.dvc``
    pointer ``pointer_out`` (workspace path ``name``) and push the version to ``remote`` (default:
    the default remote). Returns ``{"md5", "size", "nfiles", "pointer", "remote"}`` (``remote`` is
    None when not pushed)."""
    with open_repo(root, _given(remote)) as repo:
        md5, meta = _commit(path, repo.cache.local)
        pointer = pointer_file(md5, name, pointer_out, meta)
        where = _push(repo, [md5], remote) if push_to_remote else None
    nfiles = meta.nfiles if meta.isdir else 1
    return {"md5": md5, "size": meta.size, "nfiles": nfiles, "pointer": str(pointer), "remote": where}


def retrieve(md5: str, root: str | Path, dest: str | Path, remote: str | Remote | None = None) -> dict:
    """Check version ``md5`` out into ``dest`` from the repository's cache, first fetching it from the
    remote (default: the default remote) when the cache lacks any of its objects. Returns
    ``{"md5", "path", "source"}`` (``source``: ``"cache"`` or ``"remote:<name>"``)."""
    with open_repo(root, _given(remote)) as repo:
        odb = repo.cache.local
        source = "cache"
        local = missing(md5, odb)
        if local:
            name = _remote_name(repo, remote)
            lost = set(local) & set(missing(md5, repo.cloud.get_remote_odb(name, "fetch")))
            if lost:
                raise FileNotFoundError(f"version {md5}: {len(lost)} objects are neither in the DVC cache "
                                        f"{odb.path} nor in remote '{name}'")
            _fetch(repo, [md5], name)
            source = f"remote:{name}"
        return {"md5": md5, "path": str(checkout(md5, odb, dest)), "source": source}
