"""``asft audit RUN_ID``: check how a retrain run's models came to be, then reproduce it.

Lineage checks (from what the flow recorded on the MLflow parent run):

- the git commit exists in this repository (and, for a dirty run, the recorded diff is there);
- every dataset version (``dvc.<name>.md5``) is restored through DVC into ``<output>/datasets/<name>``
  (from the DVC cache, or fetched from the remote the run recorded, ``dvc.remote`` / ``dvc.remote.url`` /
  ``dvc.remote.endpoint_url``, when the cache lacks it: on a fresh machine with an empty cache, that is
  the remote the worker pushed to, e.g. S3) with its hash verified;
- every model the run trained is downloaded from MLflow (the ``model`` artifact of each training stage's
  run, or of the run a cached stage came from) and its files' sha256 compared with the recorded
  ``lineage/model_hashes.json``;
- package versions and the code version against the current environment (differences are listed);
- the recorded artifacts (resolved params, seeds, model hashes, metrics.json) are present.

Re-run: the pipeline is run again with the recorded resolved params, without the stage cache and
without touching the registry (``kind=audit``, tag ``audit_of``), from the recorded code: in place
when the current code version equals the recorded one, otherwise in a temporary git worktree at the
recorded commit (with the recorded diff applied). Then every metric in metrics.json is compared for
exact equality (timings, throughputs and run ids excluded), as are the dataset hashes and the model
file hashes (the re-run's files against those downloaded from MLflow, file by file). Writes
``audit.json`` and logs it to the audit run; exit status 0 only if all match.

S3 credentials come from the environment (``AWS_ACCESS_KEY_ID`` ...); ``storage.s3_endpoint_url`` of the
audit's ``--config`` replaces the recorded endpoint (the worker's address of the server may not be
this machine's).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
from dvc.exceptions import DvcException
from mlflow.tracking import MlflowClient

from asft import datastore
from tasks import lineage

VOLATILE = ("timings_s", "core_seconds", "mlflow", "output_dir", "lineage", "promotion", "train_seconds",
            "seconds", "eval_seconds", "tokens_per_s", "per_s", "run_id", "_dir", "out_md5",
            "resumed_from_epoch", "docs")


def _volatile(path: str) -> bool:
    parts = path.split("/")
    return any(p in VOLATILE or p.endswith(("_seconds", "per_s", "_dir")) for p in parts)


def flatten(obj, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}/"))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}{i}/"))
    else:
        out[prefix.rstrip("/")] = obj
    return out


def compare_metrics(recorded: dict, rerun: dict) -> dict:
    """Exact comparison of every non-volatile leaf of two metrics.json documents."""
    def leaves(doc: dict) -> dict:
        root = str(doc.get("output_dir") or "\0")  # paths inside the run's own directory are relative
        return {k: (v.replace(root, "<output>") if isinstance(v, str) else v) for k, v in flatten(doc).items()
                if not _volatile(k)}

    a, b = leaves(recorded), leaves(rerun)
    mismatched = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "<missing>"), b.get(k, "<missing>")
        same = va == vb or (isinstance(va, float) and isinstance(vb, float) and math.isnan(va) and math.isnan(vb))
        if not same:
            mismatched.append({"key": k, "recorded": va, "rerun": vb})
    numeric = sum(isinstance(v, (int, float)) and not isinstance(v, bool) for v in a.values())
    return {"compared": len(a), "numeric": numeric, "mismatched": mismatched}


def _git(*args: str, cwd: Path = lineage.REPO) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)


def _download(client: MlflowClient, run_id: str, path: str, dst: Path) -> Path | None:
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst),
                                                        tracking_uri=client.tracking_uri))
    except Exception:  # noqa: BLE001 - missing artifact: reported as a failed check
        return None


def recorded_remote(tags: dict[str, str], endpoint_url: str | None = None,
                    root: Path = lineage.REPO) -> datastore.Remote | None:
    """The DVC remote a run pushed its datasets to, from its tags (None: the repository's default).
    A recorded local path that does not exist here is left to the repository's remote of that name."""
    name, url = tags.get("dvc.remote"), tags.get("dvc.remote.url")
    if not name or not url:
        return None
    if "://" not in url and not Path(url).is_dir():
        return None
    return datastore.Remote(name, url, endpoint_url or tags.get("dvc.remote.endpoint_url"))


def check_dataset(md5: str | None, dest: Path, root: Path = lineage.REPO,
                  remote: datastore.Remote | None = None) -> dict:
    """Restore a recorded dataset version into ``dest`` through DVC (from the repository's cache, or
    fetched from ``remote``, default the repository's default remote, when the cache lacks it) and verify
    the restored hash."""
    if md5 is None:
        return {"md5": None, "retrievable": False, "error": "no dataset version recorded on the run"}
    if dest.is_dir() and not dest.is_symlink():
        shutil.rmtree(dest)
    elif dest.exists() or dest.is_symlink():
        dest.unlink()
    try:
        got = datastore.retrieve(md5, root, dest, remote)
    except (OSError, ValueError, DvcException) as exc:
        return {"md5": md5, "retrievable": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"md5": md5, "retrievable": True, "from": got["source"], "path": got["path"]}


def _model_name(stage_label: str) -> str | None:
    """The key of ``lineage/model_hashes.json`` for a training stage's run label."""
    if stage_label in ("train-base", "train-reward", "train-judge"):
        return stage_label.removeprefix("train-")
    if stage_label.startswith("posttrain-"):
        return "posttrain/" + stage_label.removeprefix("posttrain-")
    return None


def check_models(client: MlflowClient, run_id: str, recorded: dict[str, dict[str, str]] | None,
                 dst: Path) -> dict:
    """Download every trained model of the run from MLflow (each training stage run's ``model``
    artifact; a cached stage's from the run it came from) into ``dst/<name>`` and compare the sha256 of
    its files with the recorded hashes."""
    run = client.get_run(run_id)
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'",
                                  max_results=500)
    models: dict[str, dict] = {}
    for child in children:
        name = _model_name(child.data.tags.get("stage", ""))
        if name is None:
            continue
        source = child.data.tags.get("source_run_id") or child.info.run_id
        if dst.joinpath(name).exists():
            shutil.rmtree(dst / name)
        got = _download(client, source, "model", dst / name)
        if got is None:
            models[name] = {"ok": False, "run_id": source, "error": "no model artifact"}
            continue
        hashes = lineage.file_hashes(got)
        want = (recorded or {}).get(name)
        models[name] = {"ok": want is not None and hashes == want, "run_id": source, "files": len(hashes),
                        "path": str(got), "sha256": hashes}
        if want is not None and hashes != want:
            models[name]["differs"] = sorted(k for k in set(hashes) | set(want) if hashes.get(k) != want.get(k))
    missing = sorted(set(recorded or {}) - set(models))
    return {"ok": bool(models) and not missing and all(m["ok"] for m in models.values()),
            "compared": sorted(models), "missing": missing,
            **{n: {k: v for k, v in m.items() if k != "sha256"} for n, m in models.items()}, "_hashes":
            {n: m.get("sha256") for n, m in models.items()}}


def check_lineage(client: MlflowClient, run_id: str, work: Path,
                  endpoint_url: str | None = None) -> tuple[dict, dict]:
    """-> (checks, downloaded artifact paths)."""
    run = client.get_run(run_id)
    tags = run.data.tags
    checks: dict[str, dict] = {}
    files = {name: _download(client, run_id, art, work / "recorded") for name, art in (
        ("params", "params.resolved.yaml"), ("metrics", "metrics.json"), ("lineage", "lineage"))}
    checks["artifacts"] = {"ok": all(files.values()), "missing": [k for k, v in files.items() if v is None]}
    commit = tags.get("git_commit", "unknown")
    present = commit != "unknown" and _git("cat-file", "-e", f"{commit}^{{commit}}").returncode == 0
    dirty = tags.get("git_dirty") == "true"
    patch = files["lineage"] / "git_diff.patch" if files["lineage"] else None
    checks["git"] = {"ok": present and (not dirty or bool(patch and patch.is_file())), "commit": commit,
                     "present": present, "dirty": dirty, "diff_recorded": bool(patch and patch.is_file())}
    remote = recorded_remote(tags, endpoint_url)
    data = {key: check_dataset(tags.get(f"dvc.{key}.md5"), work / "datasets" / key, remote=remote)
            for key in ("raw", "processed", "preferences")}
    checks["datasets"] = {"ok": all(d["retrievable"] for d in data.values()),
                          "remote": {"name": tags.get("dvc.remote"), "url": tags.get("dvc.remote.url"),
                                     "used": remote.name if remote else "repository default"}, **data}
    hashes_file = files["lineage"] / "model_hashes.json" if files["lineage"] else None
    recorded_models = json.loads(hashes_file.read_text()) if hashes_file and hashes_file.is_file() else None
    checks["models"] = check_models(client, run_id, recorded_models, work / "models")
    now = lineage.environment()
    recorded_env = {k[4:]: v for k, v in tags.items() if k.startswith("env.")}
    env_diff = {k: {"recorded": v, "now": now.get(k)} for k, v in recorded_env.items()
                if k != "platform" and now.get(k) != v}
    checks["environment"] = {"ok": not env_diff, "differences": env_diff}
    checks["code"] = {"recorded": tags.get("code_version"), "now": lineage.code_version(),
                      "ok": tags.get("code_version") == lineage.code_version()}
    return checks, {**files, "patch": patch, "commit": commit, "dirty": dirty,
                    "model_hashes": checks["models"].pop("_hashes")}


def _checkout(commit: str, patch: Path | None, dst: Path) -> Path:
    res = _git("worktree", "add", "--detach", str(dst), commit)
    if res.returncode != 0:
        raise RuntimeError(f"git worktree add {commit}: {res.stderr.strip()}")
    if patch and patch.is_file():
        res = _git("apply", str(patch.resolve()), cwd=dst)
        if res.returncode != 0:
            raise RuntimeError(f"applying the recorded diff failed: {res.stderr.strip()}")
    return dst


def source_here(params: Path, code_dir: Path) -> tuple[str, bool]:
    """The recorded ``data.source`` and whether this machine has it (the simulator always)."""
    import yaml

    source = str((yaml.safe_load(params.read_text()) or {}).get("data", {}).get("source", "simulator"))
    if source == "simulator":
        return source, True
    path = Path(source) if Path(source).is_absolute() else code_dir / source
    return source, path.exists()


def rerun(run_id: str, params: Path, output: Path, tracking_uri: str, code_dir: Path,
          raw_dir: Path | None = None, source: str | None = None) -> dict:
    """Run ``retrain`` again from ``code_dir`` with the recorded params; returns its metrics.json. With
    ``raw_dir`` (the recorded raw dataset restored through DVC) the re-run starts from it instead of
    ingesting the recorded ``source``, which this machine lacks (its path is only allowed as a data root
    so that the recorded config loads; it is never read)."""
    env = {**os.environ, "PYTHONPATH": str(code_dir), "MLFLOW_TRACKING_URI": tracking_uri}
    cmd = [sys.executable, "-m", "asft.cli", "retrain", "--config", str(params), "--output", str(output),
           "--no-cache", "--no-register", "--audit-of", run_id, f"tracking.mlflow_uri={tracking_uri}"]
    if raw_dir is not None:
        cmd += ["--raw-dir", str(raw_dir)]
        if source:
            parent = str(Path(source if Path(source).is_absolute() else code_dir / source).parent)
            env["ASFT_DATA_ROOTS"] = os.pathsep.join(filter(None, [env.get("ASFT_DATA_ROOTS"), parent]))
    proc = subprocess.run(cmd, cwd=code_dir, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"the re-run failed (exit {proc.returncode}); see {output}/failure.json")
    return json.loads((output / "metrics.json").read_text())


def audit(run_id: str, tracking_uri: str, output: Path, do_rerun: bool = True,
          endpoint_url: str | None = None) -> dict:
    client = MlflowClient(tracking_uri)
    output.mkdir(parents=True, exist_ok=True)
    checks, files = check_lineage(client, run_id, output, endpoint_url)
    report: dict = {"run_id": run_id, "tracking_uri": tracking_uri, "checks": checks}
    if do_rerun and files["params"] and files["metrics"]:
        recorded = json.loads(files["metrics"].read_text())
        worktree = None
        try:
            if checks["code"]["ok"]:
                code_dir = lineage.REPO
            elif checks["git"]["ok"]:
                worktree = Path(tempfile.mkdtemp(prefix="asft-audit-")) / "src"
                code_dir = _checkout(files["commit"], files["patch"] if files["dirty"] else None, worktree)
            else:
                raise RuntimeError("the recorded code is neither the current code nor a retrievable commit")
            report["code_dir"] = str(code_dir)
            rerun_out = output / "rerun"
            if rerun_out.exists():
                shutil.rmtree(rerun_out)
            source, present = source_here(files["params"], code_dir)
            raw = checks["datasets"]["raw"]
            raw_dir = None
            if not present:
                if not raw.get("retrievable"):
                    raise RuntimeError(f"the data source {source} is not on this machine and the recorded raw "
                                       f"dataset could not be restored: {raw.get('error')}")
                raw_dir = Path(raw["path"])
            report["rerun_input"] = ("source " + source if raw_dir is None
                                     else f"raw dataset {raw['md5']} restored from {raw['from']} (source {source} absent)")
            again = rerun(run_id, files["params"], rerun_out, tracking_uri, code_dir, raw_dir, source)
        finally:
            if worktree is not None:
                _git("worktree", "remove", "--force", str(worktree))
        cmp = compare_metrics(recorded, again)
        cmp["datasets_equal"] = recorded.get("datasets") == again.get("datasets")
        cmp["model_hashes_equal"] = (recorded.get("lineage", {}).get("model_sha256")
                                     == again.get("lineage", {}).get("model_sha256"))
        rerun_hashes_file = rerun_out / "lineage" / "model_hashes.json"
        rerun_hashes = json.loads(rerun_hashes_file.read_text()) if rerun_hashes_file.is_file() else {}
        fetched = {n: h for n, h in files["model_hashes"].items() if h is not None}
        cmp["models_vs_mlflow"] = {"compared": sorted(fetched), "files": sum(len(h) for h in fetched.values()),
                                   "equal": bool(fetched) and all(rerun_hashes.get(n) == h for n, h in fetched.items()),
                                   "differ": sorted(n for n, h in fetched.items() if rerun_hashes.get(n) != h)}
        cmp["audit_run_id"] = again["mlflow"]["parent_run_id"]
        report["rerun"] = cmp
        report["reproduced"] = (not cmp["mismatched"] and cmp["datasets_equal"] and cmp["model_hashes_equal"]
                                and cmp["models_vs_mlflow"]["equal"])
    # Code that differs from the recorded version is a lineage problem only when the recorded commit cannot be
    # checked out (otherwise the re-run runs in a worktree at that commit, and the comparison decides).
    report["lineage_ok"] = all(c.get("ok", True) for k, c in checks.items()
                               if k != "environment" and not (k == "code" and checks["git"]["ok"]))
    path = output / "audit.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    audit_run = report.get("rerun", {}).get("audit_run_id")
    for rid in filter(None, (audit_run, run_id)):
        client.set_tag(rid, "audit.status", "reproduced" if report.get("reproduced") else
                       ("lineage_ok" if report["lineage_ok"] and not do_rerun else "failed"))
    if audit_run:
        client.log_artifact(audit_run, str(path))
    return report


def audit_main(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from asft.config import load_config
    from tasks.tracking import resolve_tracking_uri

    cfg = load_config(args.config if Path(args.config).is_file() else None)
    uri = args.tracking_uri or resolve_tracking_uri(cfg)
    out = Path(args.output or f"runs/audit-{args.run_id}")
    rep = audit(args.run_id, uri, out, do_rerun=not args.no_rerun, endpoint_url=cfg.storage.s3_endpoint_url)
    t = Table(title=f"audit of {args.run_id}")
    t.add_column("check")
    t.add_column("ok")
    t.add_column("detail")
    for name, c in rep["checks"].items():
        detail = {k: v for k, v in c.items() if k != "ok"}
        t.add_row(name, "yes" if c.get("ok") else "NO", json.dumps(detail, default=str)[:150])
    if "rerun" in rep:
        r = rep["rerun"]
        t.add_row("metrics", "yes" if not r["mismatched"] else "NO",
                  f"{r['compared'] - len(r['mismatched'])}/{r['compared']} values equal ({r['numeric']} numeric)")
        t.add_row("datasets", "yes" if r["datasets_equal"] else "NO", "DVC hashes of raw, processed, preferences")
        t.add_row("models", "yes" if r["model_hashes_equal"] else "NO", "sha256 of every model file")
        t.add_row("re-run input", "", rep.get("rerun_input", ""))
        mv = r["models_vs_mlflow"]
        t.add_row("models vs MLflow", "yes" if mv["equal"] else "NO",
                  f"{mv['files']} files of {len(mv['compared'])} models downloaded from MLflow = the re-run's"
                  + (f"; differ: {mv['differ']}" if mv["differ"] else ""))
        for m in r["mismatched"][:20]:
            t.add_row("  differs", "", f"{m['key']}: {m['recorded']} -> {m['rerun']}")
    Console(width=200).print(t)
    print(f"report: {out / 'audit.json'}", file=sys.stderr)
    ok = rep["lineage_ok"] and rep.get("reproduced", True)
    return 0 if ok else 1
