"""Command line: ``retrain`` (the Prefect flow) and one command per stage (used by DVC).

    asft retrain --data simulator --output runs/sim [--config params.yaml] [key=value ...]
    asft ingest --output DIR/raw [--data PATH] [--docs DIR]      load + validate (GX) the raw log
    asft load --output DIR/raw            asft validate --raw DIR/raw
    asft preprocess --raw DIR/raw --output DIR/processed [--docs DIR]
    asft preferences --raw DIR/raw --processed DIR/processed --output DIR/preferences [--docs DIR]
    asft train-base --processed DIR/processed --output DIR/models/base
    asft train-reward --processed DIR/processed --preferences DIR/preferences --base DIR/models/base
                      --output DIR/models/reward
    asft reward-report --reward DIR/models/reward --preferences DIR/preferences --processed DIR/processed
                       --raw DIR/raw [--base DIR/models/base] --output DIR/reports/reward
    asft evaluate --model DIR/models/base/best --processed DIR/processed [--output metrics.json]
    asft train-judge --processed DIR/processed --preferences DIR/preferences --base DIR/models/base
                     --output DIR/models/judge          (held-out judge: other fold, other seeds)
    asft sample --processed DIR/processed --base DIR/models/base --output DIR/candidates/sampled
    asft score --candidates DIR/candidates/sampled --processed DIR/processed --base DIR/models/base
               --reward DIR/models/reward --output DIR/candidates/scored
    asft advantages --scored DIR/candidates/scored --output DIR/advantages
    asft posttrain --method asft --processed DIR/processed --base DIR/models/base --reward DIR/models/reward
                   --scored DIR/candidates/scored [--advantages DIR/advantages] --output DIR/models/posttrain/asft
    asft evaluate-policy --model DIR/models/posttrain/asft --base DIR/models/base --processed DIR/processed
                         [--reward DIR/models/reward] [--judge DIR/models/judge] [--raw DIR/raw] [--output F]
    asft tune --data PATH --output DIR [--trials N]         Optuna search of base-model settings on the
                                                            validation split; writes DIR/best.yaml (resumable)
    asft config [--config params.yaml] [key=value ...]      print the resolved configuration

Operations (MLflow/Prefect; imported only when used):

    asft deploy [--name retrain-weekly] [--pool POOL]       create the scheduled deployment (prefect.yaml)
    asft compare [--experiment NAME] [--dataset-version MD5] [--since DATE] [--until DATE] [--output DIR]
    asft audit RUN_ID [--tracking-uri URI] [--output DIR] [--no-rerun]

Overrides are dotted ``key=value`` pairs read as YAML values, e.g. ``train.epochs=5``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from asft.env import configure_environment

DEFAULT_CONFIG = "params.yaml"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=DEFAULT_CONFIG, help="params.yaml (defaults used if it does not exist)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=5")
    # Used by the flow when it launches a stage under torchrun: the summary as JSON (main process), and the
    # stage's resumable work directory.
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work-dir", default=None, help=argparse.SUPPRESS)


def _emit(args, summary: dict) -> None:
    """Print a stage summary; with ``--result``, the main process also writes it there."""
    from asft.utils import dist_rank, write_json

    print(json.dumps(summary, indent=2, default=str))
    if args.result and dist_rank()[0] == 0:
        write_json(args.result, summary)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="asft", description="A-SFT post-training pipeline for generative recommenders")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("retrain", help="run the whole retrain flow through Prefect, tracked in MLflow")
    p.add_argument("--data", default=None, help="'simulator' or a data path (overrides data.source)")
    p.add_argument("--output", default=None, help="run output directory (default: a new runs/<time>-<name>/)")
    p.add_argument("--no-cache", action="store_true", help="recompute every stage (ignore the stage cache)")
    p.add_argument("--no-register", action="store_true", help="do not register models in the MLflow registry")
    p.add_argument("--audit-of", default=None, help=argparse.SUPPRESS)
    _common(p)

    p = sub.add_parser("tune", help="Optuna search of base-model settings (validation NDCG@10); writes best.yaml")
    p.add_argument("--data", default=None, help="'simulator' or a data path (overrides data.source)")
    p.add_argument("--output", default="runs/tune", help="study directory (SQLite study, best.yaml, trials.json)")
    p.add_argument("--trials", type=int, default=None, help="trials to finish (default: tune.n_trials)")
    _common(p)

    p = sub.add_parser("deploy", help="create the Prefect deployment defined in prefect.yaml (cron schedule)")
    p.add_argument("--name", default="retrain-weekly", help="deployment name in prefect.yaml")
    p.add_argument("--pool", default=None, help="work pool (default: the one in prefect.yaml)")
    p.add_argument("--inactive", action="store_true", help="create the schedule paused")

    p = sub.add_parser("compare", help="side-by-side table and plot of retrain runs and methods from MLflow")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default: tracking.mlflow_uri / env / ./mlflow.db)")
    p.add_argument("--experiment", action="append", default=None, help="experiment name (repeatable)")
    p.add_argument("--dataset-version", default=None, help="DVC md5 (prefix) of the raw, processed or preference data")
    p.add_argument("--since", default=None, help="runs started on or after this date (YYYY-MM-DD[THH:MM])")
    p.add_argument("--until", default=None, help="runs started before this date")
    p.add_argument("--split", default="test", choices=["test", "valid"])
    p.add_argument("--metrics", nargs="+", default=None, help="metric keys (default: ndcg@10 judged_top10 ...)")
    p.add_argument("--max-runs", type=int, default=20)
    p.add_argument("--output", default="reports/compare", help="directory for compare.csv and compare.png")
    p.add_argument("--config", default=DEFAULT_CONFIG)

    p = sub.add_parser("audit", help="check a retrain run's lineage and re-run it to compare every metric")
    p.add_argument("run_id", help="MLflow run id of the retrain (parent) run")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--output", default=None, help="audit directory (default: runs/audit-<run id>)")
    p.add_argument("--no-rerun", action="store_true", help="only check the lineage")
    p.add_argument("--config", default=DEFAULT_CONFIG)

    p = sub.add_parser("load", help="load or simulate raw interactions into canonical Parquet")
    p.add_argument("--data", default=None)
    p.add_argument("--output", required=True)
    _common(p)

    p = sub.add_parser("ingest", help="load (or simulate) and validate raw interactions; nothing is written on failure")
    p.add_argument("--data", default=None)
    p.add_argument("--output", required=True)
    p.add_argument("--docs", default=None, help="write the GX data docs here")
    _common(p)

    p = sub.add_parser("validate", help="validate the canonical raw table")
    p.add_argument("--raw", required=True)
    _common(p)

    p = sub.add_parser("preprocess", help="k-core, ordering, vocabulary, leave-one-out split (validated)")
    p.add_argument("--raw", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--docs", default=None, help="write the GX data docs here")
    _common(p)

    p = sub.add_parser("preferences", help="build and validate the preference-pair dataset")
    p.add_argument("--raw", required=True, help="raw dir (its simulator/ enables the judge sources)")
    p.add_argument("--processed", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--docs", default=None, help="write the GX data docs here")
    _common(p)

    p = sub.add_parser("train-reward", help="train the Bradley-Terry reward ensemble")
    p.add_argument("--processed", required=True)
    p.add_argument("--preferences", required=True)
    p.add_argument("--base", required=True, help="base model dir (DIR/models/base or its best/)")
    p.add_argument("--output", required=True)
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    _common(p)

    p = sub.add_parser("reward-report", help="held-out accuracy, AUC, calibration, naive predictors")
    p.add_argument("--reward", required=True)
    p.add_argument("--preferences", required=True)
    p.add_argument("--processed", required=True)
    p.add_argument("--raw", required=True)
    p.add_argument("--base", default=None)
    p.add_argument("--output", required=True)
    _common(p)

    p = sub.add_parser("train-base", help="next-item SFT of the base generative recommender")
    p.add_argument("--processed", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    _common(p)

    p = sub.add_parser("evaluate", help="full-ranking evaluation of a saved model")
    p.add_argument("--model", required=True)
    p.add_argument("--processed", required=True)
    p.add_argument("--output", default=None, help="write metrics JSON here")
    _common(p)

    p = sub.add_parser("train-judge", help="train the held-out judge ensemble (other fold, other seeds)")
    p.add_argument("--processed", required=True)
    p.add_argument("--preferences", required=True)
    p.add_argument("--base", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    _common(p)

    p = sub.add_parser("sample", help="sample N candidates per training context from pi_ref")
    p.add_argument("--processed", required=True)
    p.add_argument("--base", required=True, help="pi_ref (base model dir or its best/)")
    p.add_argument("--output", required=True)
    _common(p)

    p = sub.add_parser("score", help="score sampled candidates with the reward ensemble")
    p.add_argument("--candidates", required=True)
    p.add_argument("--processed", required=True)
    p.add_argument("--base", required=True)
    p.add_argument("--reward", required=True)
    p.add_argument("--output", required=True)
    _common(p)

    p = sub.add_parser("advantages", help="A-SFT advantages and weights of the scored candidates")
    p.add_argument("--scored", required=True)
    p.add_argument("--output", required=True)
    _common(p)

    p = sub.add_parser("posttrain", help="post-train pi_ref with one method (A-SFT or a baseline)")
    p.add_argument("--method", required=True)
    p.add_argument("--processed", required=True)
    p.add_argument("--base", required=True)
    p.add_argument("--reward", default=None)
    p.add_argument("--scored", default=None)
    p.add_argument("--advantages", default=None)
    p.add_argument("--output", required=True)
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    _common(p)

    p = sub.add_parser("evaluate-policy", help="section-7 report of a post-trained policy")
    p.add_argument("--model", required=True)
    p.add_argument("--base", required=True)
    p.add_argument("--processed", required=True)
    p.add_argument("--reward", default=None)
    p.add_argument("--judge", default=None)
    p.add_argument("--raw", default=None, help="raw dir (its simulator/ adds the true reward)")
    p.add_argument("--output", default=None)
    _common(p)

    p = sub.add_parser("config", help="print the resolved configuration")
    _common(p)
    return ap


def _load_cfg(args, extra: list[str] | None = None):
    from asft.config import load_config

    path = args.config if args.config and Path(args.config).is_file() else None
    if args.config and args.config != DEFAULT_CONFIG and path is None:
        from asft.config import ConfigError

        raise ConfigError(f"{args.config}: config file not found")
    return load_config(path, list(args.overrides) + list(extra or []))


def _print_metrics(title: str, metrics: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    splits = [k for k, v in metrics.items() if isinstance(v, dict)]
    keys = [k for k in next(iter(metrics[s] for s in splits)) if k != "n_users"] if splits else []
    t = Table(title=title)
    t.add_column("split")
    for k in keys:
        t.add_column(k, justify="right")
    for s in splits:
        t.add_row(s, *[f"{metrics[s].get(k, float('nan')):.4f}" for k in keys])
    Console(stderr=True).print(t)


def _print_report(title: str, report: dict) -> None:
    """One row per metric, one column per split (policy reports have many metrics)."""
    from rich.console import Console
    from rich.table import Table

    splits = list(report)
    t = Table(title=title)
    t.add_column("metric")
    for sp in splits:
        t.add_column(sp, justify="right")
    for k in report[splits[0]]:
        t.add_row(k, *[f"{report[sp].get(k, float('nan')):.4f}" for sp in splits])
    Console(stderr=True).print(t)


def main(argv: list[str] | None = None) -> int:
    configure_environment()
    args = build_parser().parse_args(argv)
    from asft.config import ConfigError
    from asft.data.preferences import PreferenceConfigError
    from asft.data.schema import DataFormatError
    from asft.data.validation import DataValidationError

    try:
        return _dispatch(args)
    except (ConfigError, DataFormatError, DataValidationError, PreferenceConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _dispatch(args) -> int:
    from asft import stages

    cmd = args.command
    if cmd == "retrain":
        cfg = _load_cfg(args, [f"data.source={args.data}"] if args.data else [])  # fail fast on bad config
        del cfg
        from flows.retrain import ensure_prefect_api, retrain

        ensure_prefect_api()
        overrides = list(args.overrides)
        result = retrain(data=args.data, output=args.output,
                         config=args.config if Path(args.config).is_file() else None, overrides=overrides,
                         use_cache=not args.no_cache, register_models=not args.no_register, audit_of=args.audit_of)
        _print_metrics("base model", {k: v for k, v in result["models"]["base"].items() if k != "train"})
        print(f"metrics: {Path(result['output_dir']) / 'metrics.json'}", file=sys.stderr)
        return 0
    if cmd == "tune":
        _load_cfg(args, [f"data.source={args.data}"] if args.data else [])  # fail fast on bad config
        from flows.retrain import ensure_prefect_api
        from flows.tune import tune

        ensure_prefect_api()
        res = tune(data=args.data, output=args.output, config=args.config if Path(args.config).is_file() else None,
                   overrides=list(args.overrides), n_trials=args.trials)
        print(json.dumps(res, indent=2, default=str))
        return 0
    if cmd == "deploy":
        from flows.deploy import deploy

        dep = deploy(args.name, work_pool=args.pool, schedule_active=False if args.inactive else None)
        print(f"deployment {args.name}: {dep}")
        return 0
    if cmd == "compare":
        from ops.compare import compare_main

        return compare_main(args)
    if cmd == "audit":
        from ops.audit import audit_main

        return audit_main(args)
    if cmd == "config":
        import yaml

        print(yaml.safe_dump(_load_cfg(args).to_dict(), sort_keys=False))
        return 0
    if cmd == "load":
        cfg = _load_cfg(args, [f"data.source={args.data}"] if args.data else [])
        print(json.dumps(stages.stage_load(cfg, args.output), indent=2))
        return 0
    if cmd == "ingest":
        cfg = _load_cfg(args, [f"data.source={args.data}"] if args.data else [])
        print(json.dumps(stages.stage_ingest(cfg, args.output, args.docs), indent=2))
        return 0
    cfg = _load_cfg(args)
    if cmd == "validate":
        print(json.dumps(stages.stage_validate(args.raw, cfg), indent=2))
    elif cmd == "preprocess":
        print(json.dumps(stages.stage_preprocess(args.raw, cfg, args.output, args.docs), indent=2))
    elif cmd == "preferences":
        print(json.dumps(stages.stage_preferences(args.raw, args.processed, cfg, args.output, args.docs), indent=2))
    elif cmd == "train-reward":
        _emit(args, stages.stage_train_reward(args.processed, args.preferences, _best(args.base), cfg, args.output,
                                              resume=not args.no_resume, work_dir=args.work_dir))
    elif cmd == "reward-report":
        rep = stages.stage_reward_report(args.reward, args.preferences, args.processed, args.raw,
                                         _best(args.base) if args.base else None, cfg, args.output)
        print(json.dumps(rep, indent=2))
    elif cmd == "train-base":
        _emit(args, stages.stage_train_base(args.processed, cfg, args.output, resume=not args.no_resume,
                                            work_dir=args.work_dir))
    elif cmd == "train-judge":
        _emit(args, stages.stage_train_judge(args.processed, args.preferences, _best(args.base), cfg, args.output,
                                             resume=not args.no_resume, work_dir=args.work_dir))
    elif cmd == "sample":
        _emit(args, stages.stage_sample(args.processed, _best(args.base), cfg, args.output))
    elif cmd == "score":
        _emit(args, stages.stage_score(args.candidates, args.processed, _best(args.base), args.reward, cfg,
                                       args.output))
    elif cmd == "advantages":
        print(json.dumps(stages.stage_advantages(args.scored, cfg, args.output), indent=2))
    elif cmd == "posttrain":
        _emit(args, stages.stage_posttrain(args.method, args.processed, _best(args.base), args.reward, args.scored,
                                           args.advantages, cfg, args.output, resume=not args.no_resume,
                                           work_dir=args.work_dir))
    elif cmd == "evaluate-policy":
        rep = stages.stage_evaluate_policy(_best(args.model), _best(args.base), args.processed, args.reward,
                                           args.judge, args.raw, cfg, args.output)
        _print_report(str(args.model), rep)
        if not args.output:
            print(json.dumps(rep, indent=2))
    elif cmd == "evaluate":
        metrics = stages.stage_evaluate(args.model, args.processed, cfg)
        _print_metrics(str(args.model), metrics)
        if args.output:
            from asft.utils import write_json

            write_json(args.output, metrics)
        else:
            print(json.dumps(metrics, indent=2))
    return 0


def _best(model_dir: str) -> str:
    """Accept a training output dir (DIR/models/base) or its best/ model."""
    p = Path(model_dir)
    return str(p / "best") if (p / "best").is_dir() else str(p)


def retrain_main() -> int:
    """The ``retrain`` console script: same as ``asft retrain``."""
    return main(["retrain", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
