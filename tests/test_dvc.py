"""The DVC pipeline from a fresh copy of the project: ``dvc repro`` rebuilds the same content hashes,
``dvc push`` / ``dvc pull`` round-trip them through the default local remote, ``dvc exp run -S``
changes them, and :func:`asft.utils.dvc_md5` computes exactly what DVC records.

The copy holds the working tree's code and DVC files (not a ``git clone``, so uncommitted work is
tested too), a tiny ``params.yaml`` and its own git repository. DVC runs from the virtual
environment of this interpreter; nothing is written outside the temporary directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from asft.config import load_config
from asft.utils import dvc_md5

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin/, not resolved: `python` there is the venv's
DVC = shutil.which("dvc", path=str(BIN)) or shutil.which("dvc")

pytestmark = pytest.mark.skipif(DVC is None or shutil.which("git") is None, reason="dvc or git not installed")

# Small enough that every stage runs in a few seconds.
TINY = [
    "simulator.n_users=60", "simulator.n_items=40", "simulator.min_len=8", "simulator.max_len=16",
    "preprocess.max_len=12", "model.n_layer=1", "model.n_head=1", "model.n_embd=16", "train.epochs=1",
    "train.device=cpu", "train.num_threads=1", "validation.data_docs=false", "preferences.contexts_per_user=2",
    "preferences.judge.n_judges=4", "reward.members=1", "reward.train.epochs=1", "reward.centring_contexts=16",
    "tracking.enabled=false",
]
# The data stages, upstream first; the test reproduces up to the last one dvc.yaml defines.
DATA_STAGES = ["ingest", "preprocess", "preferences"]


def _dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _env(tmp: Path) -> dict:
    env = dict(os.environ)
    home = tmp / "home"
    for d in ("home", "dvc-global", "dvc-system", "dvc-site"):
        (tmp / d).mkdir(exist_ok=True)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_CACHE_HOME=str(home / ".cache"),
        DVC_NO_ANALYTICS="1",
        DVC_GLOBAL_CONFIG_DIR=str(tmp / "dvc-global"),
        DVC_SYSTEM_CONFIG_DIR=str(tmp / "dvc-system"),
        DVC_SITE_CACHE_DIR=str(tmp / "dvc-site"),
        GIT_CONFIG_NOSYSTEM="1",
        GIT_CONFIG_GLOBAL=os.devnull,
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
    )
    env.pop("PYTHONPATH", None)
    return env


def _run(args: list[str], cwd: Path, env: dict, stdout_only: bool = False) -> str:
    proc = subprocess.run(args, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(args)} failed ({proc.returncode}):\n{out}"
    return proc.stdout if stdout_only else out


def _copy_project(dst: Path, overrides: list[str]) -> None:
    """The code and DVC files of the working tree, with a tiny params.yaml, in a new git repo."""
    shutil.copytree(ROOT / "asft", dst / "asft", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("dvc.yaml", ".dvcignore", ".gitignore", "pyproject.toml", ".dvc/config", ".dvc/.gitignore"):
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dst / name)  # never .dvc/config.local (a developer's own remote)
    cfg = load_config(ROOT / "params.yaml", overrides)
    (dst / "params.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _lock_outs(repo: Path) -> dict[str, str]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for st in lock["stages"].values() for o in st.get("outs", [])}


def _files(repo: Path, outs) -> dict[str, str]:
    """md5 of every file in the outputs (to name the files that differ when a hash does)."""
    return {str(p.relative_to(repo)): dvc_md5(p) for o in outs for p in sorted((repo / o).rglob("*")) if p.is_file()}


def _wipe(repo: Path, outs) -> None:
    for o in outs:
        shutil.rmtree(repo / o, ignore_errors=True)
    shutil.rmtree(repo / ".dvc" / "cache", ignore_errors=True)


def test_dvc_params_are_in_params_yaml():
    """Every key a stage lists under `params:` exists in params.yaml (dvc fails on a missing one)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    missing = []
    for name, st in _dvc_stages().items():
        for key in st.get("params", []):
            assert isinstance(key, str), f"stage {name}: params must read params.yaml ({key!r})"
            cur = params
            for part in key.split("."):
                if not isinstance(cur, dict) or part not in cur:
                    missing.append(f"{name}: {key}")
                    break
                cur = cur[part]
    assert not missing, f"params.yaml lacks keys that dvc.yaml stages read: {missing}"


def test_dvc_stages_call_the_cli():
    stages = _dvc_stages()
    for name in ("ingest", "preprocess", "preferences"):
        assert name in stages
    assert "${item}" in stages["posttrain"]["do"]["cmd"]  # one stage per method in posttrain.methods
    for name, st in stages.items():
        st = st.get("do", st)  # foreach stages
        assert st["cmd"].startswith("python -m asft.cli "), name
        assert (st.get("outs") or st.get("metrics")) and st.get("deps") and st.get("params"), name


def test_dvc_md5_matches_dvc_add(tmp_path):
    env = _env(tmp_path)
    repo = tmp_path / "repo"
    d = repo / "d"
    (d / "sub" / "deeper").mkdir(parents=True)
    (d / "empty").mkdir()
    (d / "é").mkdir()
    (d / ".git").mkdir()  # ignored by DVC
    (d / ".git" / "x").write_text("x")
    (d / "a").write_text("a\n")
    (d / "a.b").write_bytes(b"\x00\x01binary")
    (d / "A-b").write_text("upper")
    (d / "sub" / "b.txt").write_bytes(b"crlf\r\n")  # DVC 3 hashes raw bytes (no dos2unix)
    (d / "sub" / "deeper" / "c").write_text("c")
    (d / "é" / "ü ñ.txt").write_text("unicode")
    (d / "link").symlink_to("a")
    (d / "dirlink").symlink_to("sub")  # DVC does not descend into symlinked directories
    (repo / "f.bin").write_bytes(bytes(range(256)) * 5000)
    _run(["git", "init", "-q"], repo, env)
    _run([DVC, "init", "-q"], repo, env)
    want = {}
    for target in ("d", "f.bin"):
        # hash before `dvc add` links/copies anything into the cache
        want[target] = dvc_md5(repo / target)
    _run([DVC, "add", "-q", "d", "f.bin"], repo, env)
    for target in ("d", "f.bin"):
        (out,) = yaml.safe_load((repo / f"{target}.dvc").read_text())["outs"]
        assert out["hash"] == "md5"
        assert want[target] == out["md5"] == dvc_md5(repo / target), target
    assert want["d"].endswith(".dir") and not want["f.bin"].endswith(".dir")


@pytest.mark.slow  # dvc repro of the whole tiny pipeline, push, pull and an experiment: about 75 s
def test_dvc_repro_push_pull_exp(tmp_path):
    env = _env(tmp_path)
    repo = tmp_path / "project"
    _copy_project(repo, TINY)
    stages = _dvc_stages()
    chain = [s for s in DATA_STAGES if s in stages]
    target = chain[-1]
    outs = [o for s in chain for o in stages[s]["outs"]]
    _run(["git", "init", "-q", "-b", "main"], repo, env)
    _run(["git", "config", "user.name", "test"], repo, env)
    _run(["git", "config", "user.email", "test@example.com"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-q", "-m", "project"], repo, env)

    # 1. dvc repro: the lock records exactly dvc_md5 of every output; git sees only dvc.lock
    out = _run([DVC, "repro", target], repo, env)
    for s in chain:
        assert f"Running stage '{s}'" in out
    first = _lock_outs(repo)
    assert set(first) == set(outs)
    for o, h in first.items():
        assert h.endswith(".dir")
        assert dvc_md5(repo / o) == h, o
    files = _files(repo, outs)
    status = _run(["git", "status", "--porcelain", "--untracked-files=all"], repo, env).splitlines()
    assert status == ["?? dvc.lock"], status
    _run(["git", "add", "dvc.lock"], repo, env)
    _run(["git", "commit", "-q", "-m", "lock"], repo, env)

    # 2. empty cache, no outputs: repro runs every stage again and gets the same hashes
    _wipe(repo, outs)
    out = _run([DVC, "repro", target], repo, env)
    for s in chain:
        assert f"Running stage '{s}'" in out
    rebuilt = _files(repo, outs)
    differ = sorted(f for f in files.keys() | rebuilt.keys() if files.get(f) != rebuilt.get(f))
    assert not differ, f"stage outputs are not reproducible; files that differ between two runs: {differ}"
    assert _lock_outs(repo) == first
    assert {o: dvc_md5(repo / o) for o in outs} == first
    assert _run(["git", "status", "--porcelain"], repo, env).strip() == ""

    # 3. push to the default remote (repo-root .dvc-storage/), pull into an empty cache
    _run([DVC, "push", *chain], repo, env)
    storage = repo / ".dvc-storage"
    assert storage.is_dir() and any(p.is_file() for p in storage.rglob("*"))
    _wipe(repo, outs)
    _run([DVC, "pull", *chain], repo, env)
    assert {o: dvc_md5(repo / o) for o in outs} == first
    assert "up to date" in _run([DVC, "status", *chain], repo, env)

    # 4. an experiment with a changed parameter re-runs only what reads it and changes its output
    out = _run([DVC, "exp", "run", "-n", "short", "-S", "preprocess.max_len=10", "preprocess"], repo, env)
    assert "Running stage 'preprocess'" in out and "Running stage 'ingest'" not in out
    second = _lock_outs(repo)
    assert second["data/raw"] == first["data/raw"]  # ingest does not read preprocess.max_len
    assert second["data/processed"] != first["data/processed"]
    assert {o: dvc_md5(repo / o) for o in outs} == second
    assert yaml.safe_load((repo / "params.yaml").read_text())["preprocess"]["max_len"] == 10
    shown = json.loads(_run([DVC, "exp", "show", "--json"], repo, env, stdout_only=True))
    exps = [e for row in shown for e in (row.get("experiments") or [])]
    (exp,) = [e for e in exps if e.get("name") == "short"]
    rev = exp["revs"][0]["data"]
    assert rev["params"]["params.yaml"]["data"]["preprocess"]["max_len"] == 10
    assert rev["outs"]["data/processed"]["hash"] == second["data/processed"]


# -- asft.datastore: DVC's own API for hashing, the cache, pointers and remotes -----------------------------
@pytest.fixture
def dvc_repo(tmp_path, monkeypatch):
    """A new git + DVC repository (isolated DVC config and site cache, also for in-process DVC calls)
    with a default local remote ``store`` at ``<tmp>/storage``; -> (repo, env)."""
    env = _env(tmp_path)
    for var in ("DVC_GLOBAL_CONFIG_DIR", "DVC_SYSTEM_CONFIG_DIR", "DVC_SITE_CACHE_DIR", "DVC_NO_ANALYTICS"):
        monkeypatch.setenv(var, env[var])
    repo = tmp_path / "repo"
    repo.mkdir()
    _run(["git", "init", "-q"], repo, env)
    _run([DVC, "init", "-q"], repo, env)
    _run([DVC, "remote", "add", "-d", "store", str(tmp_path / "storage")], repo, env)
    return repo, env


def _dataset(root: Path) -> Path:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".git").mkdir()  # DVC's default ignores apply
    (root / ".git" / "x").write_text("ignored")
    (root / "a.parquet").write_bytes(bytes(range(256)) * 4000)
    (root / "sub" / "b.json").write_text('{"b": 1}\n')
    (root / "sub" / "deeper" / "c.bin").write_bytes(b"\x00\x01" * 3)
    return root


def _tree(root: Path) -> dict[str, bytes]:
    """The files DVC tracks under ``root`` (``.git`` left out), by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).parts[0] != ".git"}


def test_commit_equals_dvc_add_and_pointer_is_read_by_dvc(dvc_repo):
    from asft import datastore

    repo, env = dvc_repo
    src = _dataset(repo / "ds")
    shutil.copytree(src, repo / "twin")
    res = datastore.commit_dataset(src, "ds", repo / "ds.dvc", repo, push_to_remote=False)
    assert res["remote"] is None and Path(res["pointer"]) == repo / "ds.dvc"
    assert datastore.missing(res["md5"], datastore.cache_dir(repo)) == []

    # `dvc add` of an identical directory records the same hash, size and file count
    _run([DVC, "add", "-q", "twin"], repo, env)
    (twin,) = yaml.safe_load((repo / "twin.dvc").read_text())["outs"]
    assert twin["md5"] == res["md5"] == dvc_md5(src) and res["md5"].endswith(".dir")
    size = sum(map(len, _tree(src).values()))
    assert (twin["size"], twin["nfiles"]) == (res["size"], res["nfiles"]) == (size, 3)

    # DVC reads the pointer: up to date, then a changed file is seen, then `dvc checkout` restores it
    want = _tree(src)
    assert "up to date" in _run([DVC, "status", "ds.dvc"], repo, env)
    (src / "sub" / "b.json").write_text('{"b": 2}\n')
    assert "modified" in _run([DVC, "status", "ds.dvc"], repo, env)
    shutil.rmtree(src)
    _run([DVC, "checkout", "ds.dvc"], repo, env)
    assert _tree(src) == want


def test_push_then_checkout_from_remote_into_an_empty_cache(dvc_repo, tmp_path):
    from asft import datastore

    repo, _ = dvc_repo
    src = _dataset(tmp_path / "data")
    want = _tree(src)
    res = datastore.commit_dataset(src, "data", tmp_path / "ptr" / "data.dvc", repo)
    assert res["remote"] == "store" == datastore.default_remote(repo)
    md5 = res["md5"]
    assert datastore.remote_missing(md5, repo) == []
    assert datastore.push([md5], repo) == "store"  # already there: a no-op, not an error

    # the local cache is lost: retrieval fetches from the remote, restores the bytes, refills the cache
    shutil.rmtree(datastore.cache_dir(repo))
    assert datastore.missing(md5, datastore.cache_dir(repo)) == [md5]
    got = datastore.retrieve(md5, repo, tmp_path / "restored")
    assert got["source"] == "remote:store" and _tree(Path(got["path"])) == want
    assert datastore.missing(md5, datastore.cache_dir(repo)) == []
    again = datastore.retrieve(md5, repo, tmp_path / "again")
    assert again["source"] == "cache" and _tree(tmp_path / "again") == want
    with pytest.raises(FileExistsError):
        datastore.retrieve(md5, repo, tmp_path / "again")

    # an object lost from both the cache and the remote: reported, never a partial checkout
    lost = dvc_md5(src / "sub" / "b.json")
    storage = tmp_path / "storage"
    for cache in (datastore.cache_dir(repo), storage):
        obj = datastore.object_path(cache, lost)
        obj.chmod(0o644)
        obj.unlink()
    assert datastore.missing(md5, datastore.cache_dir(repo)) == [lost]
    assert datastore.remote_missing(md5, repo) == [lost]
    with pytest.raises(FileNotFoundError, match="1 objects are neither in the DVC cache .* nor in remote 'store'"):
        datastore.retrieve(md5, repo, tmp_path / "partial")
    assert not (tmp_path / "partial").exists()
    with pytest.raises(FileNotFoundError, match="lacks objects"):
        datastore.push([md5], repo)


def test_audit_restores_recorded_datasets_through_dvc(dvc_repo, tmp_path):
    from asft import datastore
    from ops.audit import check_dataset

    repo, _ = dvc_repo
    src = _dataset(tmp_path / "raw")
    md5 = datastore.commit_dataset(src, "raw", tmp_path / "raw.dvc", repo)["md5"]
    shutil.rmtree(datastore.cache_dir(repo))  # only the remote has it now
    dest = tmp_path / "audit" / "datasets" / "raw"
    dest.mkdir(parents=True)
    (dest / "stale").write_text("from an earlier audit")
    got = check_dataset(md5, dest, root=repo)
    assert got == {"md5": md5, "retrievable": True, "from": "remote:store", "path": str(dest)}
    assert _tree(dest) == _tree(src)
    assert check_dataset(md5, dest, root=repo)["from"] == "cache"
    unknown = check_dataset("0" * 32 + ".dir", tmp_path / "x", root=repo)
    assert not unknown["retrievable"] and "FileNotFoundError" in unknown["error"]
    assert not check_dataset(None, tmp_path / "y", root=repo)["retrievable"]


def test_cache_dir_and_remote_come_from_dvc_config(dvc_repo, tmp_path):
    from asft import datastore

    repo, env = dvc_repo
    assert datastore.cache_dir(repo) == repo / ".dvc" / "cache"
    _run([DVC, "cache", "dir", "--local", str(tmp_path / "elsewhere")], repo, env)  # .dvc/config.local
    _run([DVC, "remote", "add", "other", str(tmp_path / "other")], repo, env)
    assert datastore.cache_dir(repo) == tmp_path / "elsewhere"
    res = datastore.commit_dataset(_dataset(tmp_path / "d"), "d", tmp_path / "d.dvc", repo, remote="other")
    assert res["remote"] == "other"
    assert datastore.missing(res["md5"], tmp_path / "elsewhere") == []
    assert datastore.missing(res["md5"], tmp_path / "other") == []
    assert not (tmp_path / "storage").exists() and not (repo / ".dvc" / "cache").exists()
    from dvc.config import NoRemoteError

    with pytest.raises(NoRemoteError, match="'nope' is not configured"):
        datastore.push([res["md5"]], repo, remote="nope")


def test_datastore_works_in_a_copy_without_git(tmp_path, monkeypatch):
    """A deployed copy of the project may lack .git: DVC's cache and remotes do not need it."""
    from asft import datastore

    env = _env(tmp_path)
    for var in ("DVC_GLOBAL_CONFIG_DIR", "DVC_SYSTEM_CONFIG_DIR", "DVC_SITE_CACHE_DIR"):
        monkeypatch.setenv(var, env[var])
    repo = tmp_path / "copy"
    repo.mkdir()
    _run([DVC, "init", "-q", "--no-scm"], repo, env)
    _run([DVC, "config", "--unset", "core.no_scm"], repo, env)  # as in the project's committed config
    _run([DVC, "remote", "add", "-d", "store", "../storage"], repo, env)
    src = _dataset(tmp_path / "d")
    res = datastore.commit_dataset(src, "d", repo / "d.dvc", repo)
    assert res["remote"] == "store" and datastore.missing(res["md5"], tmp_path / "storage") == []
    shutil.rmtree(repo / ".dvc" / "cache")
    got = datastore.retrieve(res["md5"], repo, tmp_path / "back")
    assert got["source"] == "remote:store" and _tree(tmp_path / "back") == _tree(src)


def test_checkout_verifies_and_refuses_incomplete_versions(tmp_path):
    from asft import datastore

    src = _dataset(tmp_path / "ds")
    cache = tmp_path / "cache"
    md5 = datastore.commit(src, cache)
    single = datastore.commit(src / "a.parquet", cache)
    assert single == dvc_md5(src / "a.parquet") and not single.endswith(".dir")
    datastore.checkout(single, cache, tmp_path / "one" / "a.parquet")
    assert (tmp_path / "one" / "a.parquet").read_bytes() == (src / "a.parquet").read_bytes()
    back = datastore.checkout(md5, cache, tmp_path / "back")
    assert _tree(back) == _tree(src) and not (back / ".git").exists()
    (back / "sub" / "b.json").write_text("edited")  # a copy: the cache object is untouched
    assert datastore.missing(md5, cache) == [] and dvc_md5(back) != md5
    assert datastore.checkout(md5, cache, tmp_path / "b2") and dvc_md5(tmp_path / "b2") == md5
    assert datastore.missing(md5, tmp_path / "empty") == [md5]
    with pytest.raises(FileNotFoundError, match="incomplete"):
        datastore.checkout(md5, tmp_path / "empty", tmp_path / "never")


def test_code_version_covers_tasks_and_flows(tmp_path, monkeypatch):
    from tasks import lineage

    for d in lineage.CODE_DIRS:
        shutil.copytree(ROOT / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")  # the stage's params list
    cfg = load_config(ROOT / "params.yaml")

    from asft.pipeline import get_stage

    def key() -> str:
        lineage.code_version.cache_clear()
        return lineage.task_key(get_stage("preprocess"), cfg, {})

    monkeypatch.setattr(lineage, "REPO", tmp_path)
    try:
        first = key()
        assert lineage.code_version() == lineage.code_hash(tmp_path)
        keys = {first}
        for d in lineage.CODE_DIRS:  # an edit anywhere in the code changes the stage cache key
            f = tmp_path / d / "__init__.py"
            f.write_text(f.read_text() + "\n# edited\n")
            keys.add(key())
        assert len(keys) == 1 + len(lineage.CODE_DIRS)
        last = key()
        pyc = tmp_path / "tasks" / "__pycache__"  # byte-compiled caches do not
        pyc.mkdir()
        (pyc / "stages.cpython-311.pyc").write_bytes(b"\x00compiled")
        (tmp_path / "ops").mkdir(exist_ok=True)
        (tmp_path / "ops" / "new.py").write_text("x = 1\n")  # nor does code no stage runs
        assert key() == last
    finally:
        lineage.code_version.cache_clear()
