"""Hyperparameter search for the base model (Optuna), as a stage users can run: ``asft tune``.

Each trial trains the base recommender with values drawn from ``tune.space`` and reports the
validation metric (``train.monitor``, NDCG@10 by default) after every epoch, so that a median or
Hyperband pruner stops hopeless trials early. The objective is the best validation value of the
trial (the checkpoint early stopping keeps); the test split is never read.

The study lives in a local SQLite file (``DIR/study.db``) or a database URL (``tune.storage``);
``load_if_exists`` plus a heartbeat make it resumable: run the same command again after a crash,
or on several machines at once, and it continues until ``tune.n_trials`` trials have finished
(pruned trials count; a trial whose process died is marked failed and retried once).

The best values are written as a config file (``DIR/best.yaml``): the settings that differ from
the code's defaults, so ``retrain --config DIR/best.yaml`` trains exactly the best trial's model.

No MLflow or Prefect here: callers pass ``trial_logger`` to track trials (``flows/tune.py`` makes
each a nested MLflow run).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from asft.config import Config, SearchParam, _set_dotted, load_config

BEST_FILE = "best.yaml"
TRIALS_FILE = "trials.json"
STUDY_DB = "study.db"

TrialLogger = Callable[[int, dict[str, Any]], contextlib.AbstractContextManager]


def suggest(trial, space: dict[str, SearchParam]) -> dict[str, Any]:
    """Draw one value per searched key (dotted config keys)."""
    out: dict[str, Any] = {}
    for key, p in space.items():
        if p.choices is not None:
            out[key] = trial.suggest_categorical(key, p.choices)
        elif p.type == "int":
            out[key] = trial.suggest_int(key, int(p.low), int(p.high), log=p.log)
        else:
            out[key] = trial.suggest_float(key, float(p.low), float(p.high), log=p.log)
    return out


def apply_values(cfg: Config, values: dict[str, Any]) -> Config:
    """``cfg`` with dotted ``values`` set (validated like any configuration)."""
    raw = cfg.to_dict()
    for k, v in values.items():
        _set_dotted(raw, k, v, "tune")
    return Config.model_validate(raw)


def config_diff(cfg: Config, defaults: Config | None = None) -> dict[str, Any]:
    """The nested settings of ``cfg`` that differ from the defaults (a minimal config file)."""
    base = (defaults or load_config(None)).to_dict()

    def walk(a: Any, b: Any) -> Any:
        if isinstance(a, dict) and isinstance(b, dict):
            out = {k: walk(v, b.get(k)) for k, v in a.items() if v != b.get(k)}
            return {k: v for k, v in out.items() if v is not None or a.get(k) is None}
        return a

    return walk(cfg.to_dict(), base)


def make_pruner(kind: str, warmup: int):
    import optuna

    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=warmup)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, warmup))
    return optuna.pruners.NopPruner()


def open_study(cfg: Config, out_dir: Path, worker: int = 0):
    """Create or resume the study (SQLite file in ``out_dir`` unless ``tune.storage`` names a database).
    ``worker``: the index of this worker among those started together on one study (a distinct sampler seed)."""
    import warnings

    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    tc = cfg.tune
    url = tc.storage or f"sqlite:///{(out_dir / STUDY_DB).resolve()}"
    with warnings.catch_warnings():  # heartbeats are marked experimental; they are what makes resuming safe
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = RDBStorage(url, heartbeat_interval=30, grace_period=120,
                             heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=tc.study_name, storage=storage, direction="maximize", load_if_exists=True,
                                pruner=make_pruner(tc.pruner, tc.pruner_warmup_epochs))
    # Each worker (and each resumption) seeds its sampler with the number of trials it finds, so workers
    # that join a running study draw different values, while one uninterrupted worker is reproducible.
    seed = tc.sampler_seed + len(study.get_trials(deepcopy=False)) + 100_003 * worker
    study.sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=tc.startup_trials)
    return study


def _finished(study) -> int:
    from optuna.trial import TrialState

    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.get_trials(deepcopy=False))


def tune_base(raw_dir: str | Path, cfg: Config, out_dir: str | Path, n_trials: int | None = None,
              trial_logger: TrialLogger | None = None, log: Callable[[str], None] = print, worker: int = 0) -> dict:
    """Run (or resume) the study until ``n_trials`` (default ``tune.n_trials``) trials have finished;
    write ``best.yaml`` and ``trials.json`` in ``out_dir``. Returns the summary."""
    import optuna
    from filelock import FileLock

    from asft import stages
    from asft.training.sft import train_base

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = int(n_trials or cfg.tune.n_trials)
    study = open_study(cfg, out, worker)
    space = cfg.tune.space
    monitor = f"valid/{cfg.train.monitor}"
    t_start = time.perf_counter()

    def processed_for(tcfg: Config) -> Path:
        """Preprocessed data per distinct preprocess section, shared by trials and workers."""
        d = out / "processed" / tcfg.section_hash("preprocess")
        with FileLock(str(d) + ".lock", timeout=3600):
            if not (d / "stats.json").is_file():
                stages.stage_preprocess(raw_dir, tcfg, d)
        return d

    def objective(trial) -> float:
        values = suggest(trial, space)
        tcfg = apply_values(cfg, values)
        trial.set_user_attr("config", json.dumps(config_diff(tcfg)))
        work = out / "trials" / f"{trial.number:04d}"
        shutil.rmtree(work, ignore_errors=True)
        log(f"tune: trial {trial.number} ({_finished(study) + 1}/{target}) " +
            " ".join(f"{k}={_fmt(v)}" for k, v in values.items()))

        def on_log(metrics: dict[str, float], step: int) -> None:
            if monitor in metrics:
                trial.report(float(metrics[monitor]), step)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"{monitor} {metrics[monitor]:.4f} at epoch {step}")

        ctx = trial_logger(trial.number, values) if trial_logger else contextlib.nullcontext(None)
        with ctx as tracker:
            def both(metrics: dict[str, float], step: int) -> None:
                if tracker is not None:
                    tracker(metrics, step)
                on_log(metrics, step)

            try:
                summary = train_base(processed_for(tcfg), tcfg, work, on_log=both, resume=False, progress=False)
            finally:
                shutil.rmtree(work, ignore_errors=True)  # trials keep their metrics, not their weights
        value = float(summary["best_metric"])
        trial.set_user_attr("best_epoch", int(summary["best_epoch"]))
        trial.set_user_attr("train_seconds", float(summary["train_seconds"]))
        log(f"tune: trial {trial.number} {cfg.train.monitor} {value:.4f} (best epoch {summary['best_epoch']})")
        return value

    stop = optuna.study.MaxTrialsCallback(target, states=(optuna.trial.TrialState.COMPLETE,
                                                          optuna.trial.TrialState.PRUNED))
    if _finished(study) < target:
        study.optimize(objective, callbacks=[stop], catch=(FloatingPointError,), gc_after_trial=True)
    return write_results(study, cfg, out, time.perf_counter() - t_start)


def write_results(study, cfg: Config, out: Path, seconds: float) -> dict:
    from optuna.trial import TrialState

    trials = [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
               "best_epoch": t.user_attrs.get("best_epoch"), "train_seconds": t.user_attrs.get("train_seconds"),
               "last_epoch": max(t.intermediate_values) if t.intermediate_values else None}
              for t in study.get_trials(deepcopy=False)]
    (out / TRIALS_FILE).write_text(json.dumps(trials, indent=2))
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not complete:
        raise RuntimeError(f"study '{study.study_name}': no trial completed")
    best = study.best_trial
    best_cfg = apply_values(cfg, best.params)
    header = (f"# Tuned by `asft tune` (Optuna TPE, {cfg.tune.pruner} pruning): study '{study.study_name}',"
              f" trial {best.number} of {len(trials)},\n# best validation {cfg.train.monitor} {best.value:.4f}."
              f" Use with: retrain --config {out / BEST_FILE}\n")
    diff = {k: v for k, v in config_diff(best_cfg).items() if k != "tune"}
    (out / BEST_FILE).write_text(header + yaml.safe_dump(diff, sort_keys=False))
    return {"study": study.study_name, "best_value": best.value, "best_trial": best.number,
            "best_params": best.params, "trials": len(trials),
            "complete": len(complete), "pruned": sum(t["state"] == "PRUNED" for t in trials),
            "best_file": str(out / BEST_FILE), "seconds": seconds}


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
