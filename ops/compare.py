"""``asft compare``: retrain runs and their post-training methods side by side, from MLflow.

Reads the parent (retrain) runs of one or more experiments, filtered by dataset version (the DVC
md5 of the raw, processed or preference data, any prefix) and start date, and builds one row per
(run, method) with the method's metrics as logged by the flow (``posttrain/<method>/<split>/...``),
plus the base model. Prints the table, writes ``compare.csv`` and a plot ``compare.png`` (one panel
per metric, runs on the x axis, one bar per method).
"""

from __future__ import annotations

import math
import re
import sys
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from asft.plots import run_method_bars

DEFAULT_METRICS = ("ndcg@10", "hr@10", "judged_top10", "true_top10", "kl_ref", "coverage@10")
DATASET_TAGS = ("dvc.raw.md5", "dvc.processed.md5", "dvc.preferences.md5")


def _ms(date: str) -> int:
    dt = datetime.fromisoformat(date)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def find_runs(client: MlflowClient, experiments: list[str], dataset_version: str | None = None,
              since: str | None = None, until: str | None = None, max_runs: int = 20, kind: str = "retrain"):
    exps = [client.get_experiment_by_name(e) for e in experiments]
    missing = [e for e, x in zip(experiments, exps) if x is None]
    if missing:
        raise ValueError(f"no MLflow experiment named {missing}")
    clauses = [f"tags.kind = '{kind}'", "attributes.status = 'FINISHED'"]
    if since:
        clauses.append(f"attributes.start_time >= {_ms(since)}")
    if until:
        clauses.append(f"attributes.start_time < {_ms(until)}")
    runs = client.search_runs([x.experiment_id for x in exps], " and ".join(clauses),
                              order_by=["attributes.start_time DESC"], max_results=max(max_runs * 5, 100))
    if dataset_version:
        runs = [r for r in runs if any(r.data.tags.get(t, "").startswith(dataset_version) for t in DATASET_TAGS)]
    return runs[:max_runs]


def comparison_table(runs, split: str = "test", metrics: tuple[str, ...] = DEFAULT_METRICS) -> pd.DataFrame:
    """One row per (run, method) with the requested metrics (NaN when a run did not log one)."""
    rows = []
    pat = re.compile(rf"^posttrain/([^/]+)/{split}/(.+)$")
    for r in runs:
        per: dict[str, dict[str, float]] = {}
        for key, val in r.data.metrics.items():
            m = pat.match(key)
            if m:
                per.setdefault(m.group(1), {})[m.group(2).replace("_at_", "@")] = val
        started = datetime.fromtimestamp(r.info.start_time / 1000, UTC).strftime("%Y-%m-%d %H:%M")
        for method, vals in sorted(per.items(), key=lambda kv: (kv[0] != "base", kv[0])):
            rows.append({"run": r.info.run_name, "run_id": r.info.run_id, "started": started,
                         "dataset": r.data.tags.get("dvc.processed.md5", "")[:8],
                         "product": r.data.tags.get("registry.product", ""),  # the registry lineage, if registered
                         "alias": r.data.tags.get("promotion.alias", "") if method == r.data.params.get(
                             "posttrain.champion_method") else "",
                         "method": method, **{k: vals.get(k, math.nan) for k in metrics}})
    return pd.DataFrame(rows, columns=["run", "run_id", "started", "dataset", "product", "alias", "method", *metrics])


def compare_main(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from asft.config import load_config
    from tasks.tracking import resolve_tracking_uri

    cfg = load_config(args.config if Path(args.config).is_file() else None)
    uri = args.tracking_uri or resolve_tracking_uri(cfg)
    experiments = args.experiment or [cfg.tracking.experiment]
    metrics = tuple(args.metrics or DEFAULT_METRICS)
    runs = find_runs(MlflowClient(uri), experiments, args.dataset_version, args.since, args.until, args.max_runs)
    table = comparison_table(runs, args.split, metrics)
    if table.empty:
        print(f"no finished retrain runs in {experiments} match the filters", file=sys.stderr)
        return 1
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "compare.csv", index=False)
    png = run_method_bars(table, metrics, out / "compare.png", f"{', '.join(experiments)} ({args.split})")
    t = Table(title=f"runs x methods ({args.split}) - {', '.join(experiments)}")
    for c in ("run", "started", "dataset", "product", "alias", "method", *metrics):
        t.add_column(c, justify="right" if c in metrics else "left")
    for _, row in table.iterrows():
        t.add_row(row["run"], row["started"], row["dataset"], row["product"], row["alias"], row["method"],
                  *["" if pd.isna(row[m]) else f"{row[m]:.4f}" for m in metrics])
    Console(width=200).print(t)
    print(f"table: {out / 'compare.csv'}  plot: {png}", file=sys.stderr)
    return 0
