"""Command line: ``retrain`` (the Prefect flow) and one command per declared stage (asft/pipeline.py; DVC runs them).

    asft retrain --data simulator --output runs/sim [--config params.yaml] [key=value ...]
    asft ingest --output DIR/raw [--data PATH] [--docs DIR]      load + validate (GX) the raw log
    asft validate --raw DIR/raw                                  the raw GX suite on a canonical raw dir
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
    asft evaluate-policies --posttrain DIR/models/posttrain --base ... --output DIR/reports/policies
    asft config [--config params.yaml] [--defaults] [key=value ...]   print the resolved (or default) config
    asft dvc-yaml                                           print dvc.yaml generated from the stage declarations

Operations (MLflow/Prefect; imported only when used):

    asft deploy [--name retrain-weekly] [--pool POOL]       create the scheduled deployment (prefect.yaml)
    asft compare [--experiment NAME] [--dataset-version MD5] [--since DATE] [--until DATE] [--output DIR]
    asft audit RUN_ID [--tracking-uri URI] [--output DIR] [--no-rerun]

Overrides are dotted ``key=value`` pairs read as YAML values, e.g. ``train.epochs=5``; every stage command
also takes a typed flag per config field it reads (``asft posttrain --help``), e.g. ``--advantage.lam 2``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from asft.env import configure_environment
from asft.pipeline import STAGES

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
    p.add_argument("--raw-dir", default=None, help=argparse.SUPPRESS)  # audits: a DVC-restored raw dataset
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

    p = sub.add_parser("config", help="print the resolved configuration")
    p.add_argument("--defaults", action="store_true", help="print params.yaml as generated from the code's defaults")
    _common(p)

    p = sub.add_parser("dvc-yaml", help="print dvc.yaml as generated from the stage declarations (asft/pipeline.py)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="params.yaml (its posttrain.methods are the foreach list)")

    for spec in STAGES:
        _stage_parser(sub, spec)
    return ap


def _stage_parser(sub, spec) -> None:
    """One subcommand per declared stage: its inputs, ``--output``, and a typed flag per config field it reads."""
    p = sub.add_parser(spec.name, help=spec.help, description=spec.help)
    if spec.name == "ingest":
        p.add_argument("--data", default=None, help="'simulator' or a data path (overrides data.source)")
    for name in spec.options:
        p.add_argument(f"--{name}", required=True)
    for inp in spec.inputs:
        p.add_argument(inp.flag, dest=inp.arg, required=inp.required, help=inp.help)
    if spec.output is not None:
        p.add_argument("--output", required=not spec.output_file,
                       help="output file (JSON)" if spec.output_file else "output directory (written atomically)")
    if spec.docs:
        p.add_argument("--docs", default=None, help="write the GX data docs here")
    if spec.training:
        p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    _common(p)
    _config_flags(p, spec.params)


def _config_flags(p: argparse.ArgumentParser, keys) -> None:
    """``--section.field VALUE`` for every config field under ``keys`` (typed from the pydantic model, help
    from its description), collected into ``key=value`` overrides -- TRL's HfArgumentParser idea."""
    from asft.config import config_fields

    g = p.add_argument_group("configuration (overrides the config file)")
    for f in config_fields(keys):
        g.add_argument(f"--{f.key}", dest=f"cfg:{f.key}", default=None, metavar=f.metavar, help=f.description,
                       **({"choices": f.choices} if f.choices else {}))


def _flag_overrides(args) -> list[str]:
    """``--section.field VALUE`` flags given on the command line, as ``key=value`` overrides."""
    return [f"{k[4:]}={v}" for k, v in vars(args).items() if k.startswith("cfg:") and v is not None]


def _load_cfg(args, extra: list[str] | None = None):
    from asft.config import load_config

    path = args.config if args.config and Path(args.config).is_file() else None
    if args.config and args.config != DEFAULT_CONFIG and path is None:
        from asft.config import ConfigError

        raise ConfigError(f"{args.config}: config file not found")
    return load_config(path, list(args.overrides) + _flag_overrides(args) + list(extra or []))


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
    cmd = args.command
    if getattr(args, "data", None):  # typed by a person on the command line: theirs to read (asft/data/paths.py)
        from asft.data.paths import allow_typed_path

        allow_typed_path(args.data)
    if cmd == "retrain":
        from flows.retrain import ensure_prefect_api, quiet_data_errors_on_console, retrain

        _load_cfg(args, [f"data.source={args.data}"] if args.data else [])  # fail fast on a bad config
        ensure_prefect_api()
        quiet_data_errors_on_console()
        result = retrain(data=args.data, output=args.output,
                         config=args.config if Path(args.config).is_file() else None,
                         overrides=list(args.overrides), use_cache=not args.no_cache,
                         register_models=not args.no_register, audit_of=args.audit_of, raw_dir=args.raw_dir)
        return 0 if result else 1
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

        from asft.config import defaults_yaml

        print(defaults_yaml() if args.defaults else yaml.safe_dump(_load_cfg(args).to_dict(), sort_keys=False),
              end="")
        return 0
    if cmd == "dvc-yaml":
        from asft.pipeline import render_dvc_yaml

        print(render_dvc_yaml(_load_cfg(argparse.Namespace(config=args.config, overrides=[])).posttrain.methods),
              end="")
        return 0
    return _run_stage(args)


def _run_stage(args) -> int:
    """A declared stage (asft/pipeline.py) on the paths given on the command line."""
    from asft.pipeline import call, get_stage

    spec = get_stage(args.command)
    cfg = _load_cfg(args, [f"data.source={args.data}"] if getattr(args, "data", None) else [])
    paths = {i.arg: (_best(v) if i.model else v) for i in spec.inputs if (v := getattr(args, i.arg)) is not None}
    options = {o: getattr(args, o) for o in spec.options}
    out = getattr(args, "output", None)
    summary = call(spec, cfg, None if spec.output_file else out, paths, options, docs_dir=getattr(args, "docs", None),
                   resume=not getattr(args, "no_resume", False), work_dir=args.work_dir, progress=True)
    if spec.name == "evaluate":
        _print_metrics(str(paths["model_dir"]), summary)
    elif spec.name == "evaluate-policy":
        _print_report(str(paths["model_dir"]), summary)
    if spec.output_file and out:
        from asft.utils import write_json

        write_json(out, summary)
    _emit(args, summary)
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
