"""The ``retrain`` flow.

validate-raw (load + GX suite) -> preprocess (+ GX suite) -> preferences (+ GX suite) -> train-base
(or the champion's base, reused when data, params and code are unchanged) -> evaluate -> train-reward
(BT ensemble, reward.fold) -> reward-report -> train-judge (held-out ensemble, judge.fold) -> sample ->
score -> advantages -> posttrain-<method> for every method in posttrain.methods -> evaluate-policies ->
promote (register recommender + reward model; champion or challenger by the gate).

- Every run writes to its own output directory (``runs/<start time>-<flow run name>`` unless given).
- Stage tasks are cached on input dataset hashes, params and code version (``tasks.lineage``); a cached
  result points into the earlier run's directory and is verified (hash of its outputs) before use,
  and recorded as a nested run tagged ``cache_hit``. ``use_cache=False`` recomputes everything.
- I/O and tracking errors are retried with backoff; a failure records the stage and error on the MLflow
  parent run and in ``OUTPUT/failure.json``, and nothing is registered.
- Lineage on the parent run: git commit, dirty flag (+ the diff), code version, DVC hash of every
  dataset (also committed to the DVC cache), params, seeds, package versions, model file hashes.
Every dataset is validated before it is published. Writes ``OUTPUT/metrics.json``.
"""

from __future__ import annotations

import json
import subprocess
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import deployment as current_deployment
from prefect.runtime import flow_run as current_flow_run

from asft import datastore, stages
from asft.config import dump_config, load_config
from asft.utils import dvc_md5, write_json
from tasks import lineage
from tasks.stages import (
    advantages_task,
    evaluate_policies_task,
    evaluate_task,
    ingest_task,
    posttrain_task,
    preferences_task,
    preprocess_task,
    promote_task,
    reward_report_task,
    sample_task,
    score_task,
    train_base_task,
    train_judge_task,
    train_reward_task,
)
from tasks.tracking import record_cached_stage, start_parent

RUNS_DIR = "runs"
WORK_DIR = ".work"  # under RUNS_DIR: resumable work directories of training stages
METRIC_TIMING_KEYS = ("seconds", "_s", "per_s", "timing", "flow_", "time")


def default_output_dir() -> Path:
    """``runs/<expected start>-<flow run name>``: stable across retries of the same flow run."""
    start = current_flow_run.scheduled_start_time or datetime.now(UTC)
    name = current_flow_run.name or "local"
    return Path(RUNS_DIR) / f"{start:%Y%m%d-%H%M%S}-{name}"


def ensure_prefect_api() -> None:
    """Start this process's Prefect API before the flow, one process at a time per ``PREFECT_HOME``.

    Without a Prefect server (``PREFECT_API_URL`` unset) every ``retrain`` starts an ephemeral server
    on the SQLite database in ``PREFECT_HOME``; two starting together on a new database both run its
    migrations and one fails. The lock serialises the start (a few seconds); the flows then run
    concurrently on the migrated database.
    """
    import os

    from filelock import FileLock
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url:
        return
    home = Path(os.environ.get("PREFECT_HOME") or settings.home)
    home.mkdir(parents=True, exist_ok=True)
    with FileLock(str(home / "ephemeral-server.lock"), timeout=600), get_client(sync_client=True) as client:
        client.hello()


def report_failure(flow_, flow_run, state) -> None:
    """Flow on_failure/on_crashed hook: one line naming the stage and the error (the place to plug a
    notification). The stage comes from ``failure.json`` written by the flow."""
    out = (flow_run.parameters or {}).get("output")
    info = {}
    for cand in ([Path(out)] if out else []) + sorted(Path(RUNS_DIR).glob(f"*-{flow_run.name}")):
        f = cand / "failure.json"
        if f.is_file():
            info = json.loads(f.read_text())
            break
    get_run_logger().error("retrain %s failed at stage '%s': %s", flow_run.name, info.get("stage", "?"),
                           info.get("error", state.message))


class _Stages:
    """Runs stage tasks: timing, cache-hit verification and attribution, the current stage for failures."""

    def __init__(self, uri: str, pid: str, use_cache: bool):
        self.uri, self.pid, self.use_cache = uri, pid, use_cache
        self.timings: dict[str, float] = {}
        self.core: dict[str, float] = {}
        self.cache: dict[str, dict] = {}
        self.current = "setup"

    def __call__(self, name: str, stage_name: str, task_fn, *args):
        self.current = name
        t = time.perf_counter()
        fn = task_fn if self.use_cache else task_fn.with_options(refresh_cache=True)
        state = fn(*args, return_state=True)
        res = state.result()
        if state.name == "Cached":
            if res.get("out_dir") and (not Path(res["out_dir"]).exists() or dvc_md5(res["out_dir"]) != res["out_md5"]):
                get_run_logger().warning("%s: cached outputs in %s are gone or changed; recomputing", name,
                                         res["out_dir"])
                res = task_fn.with_options(refresh_cache=True)(*args)
                self.cache[name] = {"hit": False, "stale_cache": True}
            else:
                src = res.get("stage_run_id")
                new_run = record_cached_stage(self.uri, self.pid, stage_name, src)
                if "run_id" in res:
                    res["run_id"] = new_run
                self.cache[name] = {"hit": True, "source_run_id": src, "out_dir": res.get("out_dir")}
                res["core_seconds"] = 0.0
        else:
            self.cache[name] = {"hit": False}
        self.timings[name] = time.perf_counter() - t
        if isinstance(res, dict) and "core_seconds" in res:
            self.core[name] = res.pop("core_seconds")
        return res


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=lineage.REPO, capture_output=True, text=True, timeout=20,
                              check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def working_tree_patch() -> str:
    """``git diff HEAD`` plus every untracked, not ignored file as an addition: applying it to the
    commit (``git apply``) recreates the working tree the run used."""
    patch = _git("diff", "HEAD", "--binary")
    for f in filter(None, _git("ls-files", "--others", "--exclude-standard").splitlines()):
        patch += _git("diff", "--no-index", "--binary", "/dev/null", f)
    return patch


def _record_lineage(parent, cfg, out: Path) -> dict:
    """Params, seeds, package versions, code version and (if dirty) the git diff, on the parent run."""
    lin = {"code_version": lineage.code_version(), "environment": lineage.environment(), "seeds": lineage.seeds(cfg)}
    write_json(out / "lineage" / "environment.json", lin["environment"])
    write_json(out / "lineage" / "seeds.json", lin["seeds"])
    diff = working_tree_patch()
    if diff:
        (out / "lineage" / "git_diff.patch").write_text(diff)
    parent.log_artifact(out / "lineage", "lineage")
    parent.set_tags({"code_version": lin["code_version"], **{f"env.{k}": v for k, v in lin["environment"].items()}})
    parent.log_params({f"seeds.{k}": v for k, v in lin["seeds"].items()})
    return lin


def _commit_dataset(parent, name: str, res: dict, out: Path) -> str:
    """Store a dataset version in the DVC cache (what ``dvc push`` uploads) with a ``.dvc`` pointer."""
    md5 = datastore.commit(res[f"{name}_dir"], lineage.dvc_cache_dir())
    datastore.pointer_file(md5, name, out / "dvc" / f"{name}.dvc")
    parent.set_tags({f"dvc.{name}.md5": md5, f"{name}_sha256": res["sha256"]})
    return md5


@flow(name="retrain", log_prints=True, validate_parameters=True, on_failure=[report_failure],
      on_crashed=[report_failure])
def retrain(
    data: str | None = None,
    output: str | None = None,
    config: str | None = "params.yaml",
    overrides: list[str] | None = None,
    use_cache: bool = True,
    register_models: bool = True,
    audit_of: str | None = None,
) -> dict:
    """Retrain and post-train; ``output`` defaults to a fresh per-run directory under ``runs/``.

    ``use_cache=False`` recomputes every stage; ``register_models=False`` (and audits, ``audit_of=RUN_ID``)
    never touch the model registry.
    """
    t_start = time.perf_counter()
    logger = get_run_logger()
    ov = list(overrides or [])
    if data is not None:
        ov.append(f"data.source={data}")
    cfg = load_config(config if config and Path(config).is_file() else None, ov)
    out = Path(output or default_output_dir()).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "failure.json").unlink(missing_ok=True)
    cfg_path = str(out / "params.resolved.yaml")
    dump_config(cfg, cfg_path)

    run_name = f"{'audit' if audit_of else 'retrain'}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    tags = {"data_source": cfg.data.source, "output_dir": str(out), "kind": "audit" if audit_of else "retrain",
            "prefect.flow_run_id": str(current_flow_run.id or ""),
            "prefect.deployment": str(current_deployment.name or "")}
    if audit_of:
        tags["audit_of"] = audit_of
    parent = start_parent(cfg, run_name, tags)
    uri, pid = parent.client.tracking_uri, parent.run_id
    parent.log_params(cfg.flat())
    parent.log_artifact(cfg_path)
    run = _Stages(uri, pid, use_cache)
    # Training stages checkpoint into work directories keyed by their inputs, params and code: a rerun
    # after a crash resumes them. Without the cache (audits, --no-cache) everything starts afresh in
    # private work directories.
    train_kw = (str(Path(RUNS_DIR).resolve() / WORK_DIR), True) if use_cache else (None, False)
    run.timings["flow_setup"] = time.perf_counter() - t_start
    reports = str(out / stages.REPORTS)
    do_register = register_models and cfg.registry.enabled and not audit_of
    try:
        lin = _record_lineage(parent, cfg, out)
        raw = run("validate_raw", "validate-raw", ingest_task, cfg_path, str(out / stages.RAW), reports, uri, pid)
        datasets = {"raw": _commit_dataset(parent, "raw", raw, out)}
        stats = run("preprocess", "preprocess", preprocess_task, raw["raw_dir"], cfg_path, str(out / stages.PROCESSED),
                    reports, uri, pid)
        datasets["processed"] = _commit_dataset(parent, "processed", stats, out)
        prefs = run("preferences", "preferences", preferences_task, raw["raw_dir"], stats["processed_dir"], cfg_path,
                    str(out / stages.PREFERENCES), reports, uri, pid)
        datasets["preferences"] = _commit_dataset(parent, "preferences", prefs, out)

        run.current = "train_base"
        base_key = lineage.task_key("train-base", cfg, {"processed_dir": stats["processed_dir"]})
        base = _champion_base(cfg, uri, pid, base_key, out, run) if (do_register and use_cache and
                                                                     cfg.registry.reuse_champion_base) else None
        if base is None:
            base = run("train_base", "train-base", train_base_task, stats["processed_dir"], cfg_path,
                       str(out / stages.BASE_MODEL), uri, pid, *train_kw)
        base_run_id = base.get("base_run_id") or base["stage_run_id"]
        base_metrics = run("evaluate", "evaluate-base", evaluate_task, base["model_dir"], stats["processed_dir"],
                           cfg_path, "base", uri, pid)
        reward = run("train_reward", "train-reward", train_reward_task, stats["processed_dir"],
                     prefs["preferences_dir"], base["model_dir"], cfg_path, str(out / stages.REWARD_MODEL), uri, pid,
                     *train_kw)
        report = run("reward_report", "reward-report", reward_report_task, reward["ensemble_dir"],
                     prefs["preferences_dir"], stats["processed_dir"], raw["raw_dir"], base["model_dir"], cfg_path,
                     str(out / stages.REPORTS / "reward"), uri, pid)
        judge = run("train_judge", "train-judge", train_judge_task, stats["processed_dir"], prefs["preferences_dir"],
                    base["model_dir"], cfg_path, str(out / stages.JUDGE_MODEL), uri, pid, *train_kw)
        sampled = run("sample", "sample", sample_task, stats["processed_dir"], base["model_dir"], cfg_path,
                      str(out / stages.CANDIDATES), uri, pid)
        scored = run("score", "score", score_task, sampled["candidates_dir"], stats["processed_dir"], base["model_dir"],
                     reward["ensemble_dir"], cfg_path, str(out / stages.SCORED), uri, pid)
        adv = run("advantages", "advantages", advantages_task, scored["scored_dir"], cfg_path,
                  str(out / stages.ADVANTAGES), uri, pid)
        post: dict[str, dict] = {}
        for method in cfg.posttrain.methods:
            post[method] = run(f"posttrain_{method}", f"posttrain-{method}", posttrain_task, method,
                               stats["processed_dir"], base["model_dir"], reward["ensemble_dir"], scored["scored_dir"],
                               adv["advantages_dir"], cfg_path, str(out / stages.POSTTRAIN / method), uri, pid,
                               *train_kw)
        for lam in cfg.posttrain.lambda_sweep:
            if lam == cfg.advantage.lam or "asft" not in cfg.posttrain.methods:
                continue
            lam_cfg = out / f"params.lam{lam:g}.yaml"
            dump_config(cfg.model_copy(update={"advantage": cfg.advantage.model_copy(update={"lam": lam})}), lam_cfg)
            adv_l = run(f"advantages_lam{lam:g}", "advantages", advantages_task, scored["scored_dir"], str(lam_cfg),
                        str(out / f"{stages.ADVANTAGES}_lam{lam:g}"), uri, pid)
            post[f"asft@lam={lam:g}"] = run(
                f"posttrain_asft_lam{lam:g}", "posttrain-asft", posttrain_task, "asft", stats["processed_dir"],
                base["model_dir"], reward["ensemble_dir"], scored["scored_dir"], adv_l["advantages_dir"], str(lam_cfg),
                str(out / stages.POSTTRAIN / f"asft_lam{lam:g}"), uri, pid, *train_kw)
        policies = run("evaluate_policies", "evaluate-policies", evaluate_policies_task,
                       {m: r["model_dir"] for m, r in post.items()}, {m: r["run_id"] for m, r in post.items()},
                       base["model_dir"], stats["processed_dir"], reward["ensemble_dir"], judge["ensemble_dir"],
                       raw["raw_dir"], cfg_path, str(out / stages.REPORTS / "policies"), uri, pid)["reports"]

        run.current = "lineage"
        models = {"base": base["model_dir"], "reward": reward["ensemble_dir"], "judge": judge["ensemble_dir"],
                  **{f"posttrain/{m}": r["model_dir"] for m, r in post.items()}}
        model_hashes = {name: lineage.file_hashes(d) for name, d in models.items()}
        write_json(out / "lineage" / "model_hashes.json", model_hashes)
        parent.log_artifact(out / "lineage" / "model_hashes.json", "lineage")
        parent.set_tags({f"model_sha256.{n}": lineage.digest(h) for n, h in model_hashes.items()})

        promotion = None
        method = cfg.posttrain.champion_method
        if do_register and method in post:
            lineage_tags = {"base_key": base_key, "base_run_id": base_run_id, "code_version": lin["code_version"],
                            **{f"dvc.{k}.md5": v for k, v in datasets.items()}}
            promotion = run("promote", "promote", promote_task, method, post[method]["model_dir"],
                            policies[method]["valid"], reward["ensemble_dir"], lineage_tags, base["model_dir"],
                            stats["processed_dir"], judge["ensemble_dir"], raw["raw_dir"], cfg_path, str(out), uri, pid)
            parent.set_tags({"promotion.alias": promotion["alias"], "promotion.reason": promotion["reason"][:4000]})
    except BaseException as e:
        failure = {"stage": run.current, "error": f"{type(e).__name__}: {e}"[:5000],
                   "traceback": traceback.format_exc()[-8000:], "output_dir": str(out), "mlflow_run_id": pid}
        write_json(out / "failure.json", failure)
        parent.set_tags({"failed_stage": run.current, "failed_stage_error": failure["error"]})
        parent.log_artifact(out / "failure.json")
        parent.client.set_terminated(pid, "FAILED")
        logger.error("retrain failed at stage %s: %s", run.current, e)
        raise

    run.timings["flow_total"] = time.perf_counter() - t_start
    result = {
        "dataset": {k: v for k, v in stats.items() if k not in ("processed_dir",) and not k.startswith(("out_",
                                                                                                     "stage_run"))},
        "preferences": {k: v for k, v in prefs.items() if k not in ("preferences_dir", "validation")
                        and not k.startswith(("out_", "stage_run"))},
        "models": {"base": {**{k: v for k, v in base_metrics.items() if k in ("valid", "test", "test_unmasked",
                                                                               "test_high_rated")},
                            "train": {k: base.get(k) for k in ("best_epoch", "epochs_run", "tokens_per_s",
                                                               "train_seconds")}}},
        "reward": {"report": {k: v for k, v in report.items() if k not in ("plots",) and not k.startswith(
            ("out_", "stage_run"))},
                   "train": {"members": reward["members"], "train_seconds": reward["train_seconds"],
                             "centring": reward["centring"]}},
        "judge": {"train_seconds": judge["train_seconds"], "fold": judge["fold"]},
        "sampling": {k: v for k, v in {**sampled, **scored}.items() if isinstance(v, (int, float))},
        "advantages": {k: v for k, v in adv.items() if k not in ("plots", "advantages_dir", "out_dir", "out_md5",
                                                                  "stage_run_id")},
        "posttrain": {m: {"valid": policies[m]["valid"], "test": policies[m]["test"],
                          "train": {k: v for k, v in r.items() if k in ("best_metric", "best_epoch", "epochs_run",
                                                                         "train_seconds", "weights", "pairs")}}
                      for m, r in post.items()},
        "policy_base": policies["base"],
        "promotion": promotion,
        "datasets": datasets,
        "lineage": {"code_version": lin["code_version"], "base_key": base_key, "base_run_id": base_run_id,
                    "cache": run.cache, "model_sha256": {n: lineage.digest(h) for n, h in model_hashes.items()}},
        "timings_s": run.timings,
        "core_seconds": run.core,
        "output_dir": str(out),
        "mlflow": {"tracking_uri": uri, "parent_run_id": pid, "experiment": cfg.tracking.experiment},
    }
    write_json(out / "metrics.json", result)
    parent.log_nested_metrics({f"base/{k}": v for k, v in result["models"]["base"].items() if k != "train"})
    parent.log_metrics({f"reward/{k}": v for k, v in report["ensemble"].items()})
    for m in post:
        parent.log_metrics(policies[m]["test"], prefix=f"posttrain/{m}/test/")
        parent.log_metrics(policies[m]["valid"], prefix=f"posttrain/{m}/valid/")
    parent.log_metrics(policies["base"]["test"], prefix="posttrain/base/test/")
    parent.log_metrics(policies["base"]["valid"], prefix="posttrain/base/valid/")
    parent.log_metrics({f"timing/{k}": v for k, v in run.timings.items()})
    parent.log_metrics({"cache_hits": sum(c["hit"] for c in run.cache.values())})
    parent.log_artifact(out / "metrics.json")
    parent.client.set_terminated(pid, "FINISHED")
    logger.info("retrain finished in %.1fs (%s): base test ndcg@10 %.4f", run.timings["flow_total"], out,
                base_metrics["test"]["ndcg@10"])
    print(json.dumps({"test": base_metrics["test"]}, indent=1))
    if post:
        _print_methods(policies)
    if promotion:
        print(f"registered {cfg.registry.recommender_model} v{promotion['recommender_version']} as "
              f"{promotion['alias']}: {promotion['reason']}")
    return result


def _champion_base(cfg, uri: str, pid: str, base_key: str, out: Path, run: _Stages) -> dict | None:
    """The champion's base model when it was trained on this data with these params and code."""
    from mlflow.tracking import MlflowClient

    from tasks.registry import champion_base

    t = time.perf_counter()
    got = champion_base(MlflowClient(uri), cfg.registry.recommender_model, base_key,
                        out / stages.BASE_MODEL / "best")
    if got is None:
        return None
    record_cached_stage(uri, pid, "train-base", got["base_run_id"],
                        tags={"reused_champion_base": "true", "champion_version": str(got["champion_version"])})
    run.cache["train_base"] = {"hit": True, "source_run_id": got["base_run_id"], "champion_base": True}
    run.timings["train_base"] = time.perf_counter() - t
    get_run_logger().info("reusing the champion's base model (run %s): same data, params and code",
                          got["base_run_id"])
    return {**got, "stage_run_id": got["base_run_id"]}


def _print_methods(reports: dict[str, dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    keys = [k for k in ("ndcg@10", "hr@10", "high_rated/ndcg@10", "judged_top10", "true_top10", "kl_ref", "entropy",
                        "coverage@10") if k in reports["base"]["test"]]
    t = Table(title="post-training methods (test)")
    t.add_column("method")
    for k in keys:
        t.add_column(k, justify="right")
    for name, rep in reports.items():
        t.add_row(name, *[f"{rep['test'].get(k, float('nan')):.4f}" for k in keys])
    Console(stderr=True, width=160).print(t)
