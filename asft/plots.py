"""Plots of results people look at (PNG; logged to MLflow by the orchestration layer)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def training_curves(history: list[dict], path: str | Path, title: str = "training") -> Path:
    """Train loss per epoch and every validation metric at each evaluation (epoch 0 = before training,
    fractional epochs = evaluations inside an epoch)."""
    loss = [(h["epoch"], h["train_loss"]) for h in history if "train_loss" in h]
    valid_keys = sorted({k for h in history for k in h if k.startswith("valid/")})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    if loss:
        axes[0].plot(*zip(*loss), marker=".")
    axes[0].set(xlabel="epoch", ylabel="train loss", title=f"{title}: loss")
    for k in valid_keys:
        pts = [(h["epoch"], h[k]) for h in history if k in h]
        if pts and k.split("/")[1].startswith(("ndcg", "hr")):
            axes[1].plot(*zip(*pts), marker=".", label=k.split("/", 1)[1])
    axes[1].set(xlabel="epoch", ylabel="validation", title=f"{title}: validation")
    if axes[1].get_legend_handles_labels()[1]:
        axes[1].legend(fontsize=8)
    return _save(fig, path)


def metric_bars(metrics: dict[str, dict[str, float]], keys: list[str], path: str | Path, title: str) -> Path:
    """Grouped bars: one group per metric key, one bar per split/model."""
    import numpy as np

    names = list(metrics)
    x = np.arange(len(keys))
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(1.6 * len(keys) + 2, 3.6))
    for i, n in enumerate(names):
        ax.bar(x + i * width, [metrics[n].get(k, 0.0) for k in keys], width, label=n)
    ax.set_xticks(x + width * (len(names) - 1) / 2, keys)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def reliability(cal: dict, path: str | Path, title: str) -> Path:
    """Reliability diagram: observed frequency against mean predicted probability per bin."""
    import numpy as np

    pred, obs, count = np.asarray(cal["predicted"]), np.asarray(cal["observed"]), np.asarray(cal["count"])
    ok = count > 0
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    axes[0].plot([0, 1], [0, 1], "k--", lw=1, label="perfect")
    axes[0].plot(pred[ok], obs[ok], marker="o", label=f"model (ECE {cal['ece']:.3f})")
    axes[0].set(xlabel="predicted P(chosen > rejected)", ylabel="observed frequency", title=title)
    axes[0].legend(fontsize=8)
    edges = np.linspace(0, 1, len(count) + 1)
    axes[1].bar(edges[:-1], count, width=edges[1] - edges[0], align="edge")
    axes[1].set(xlabel="predicted probability", ylabel="pairs (both orders)", title="bin counts")
    return _save(fig, path)


def histogram(values, path: str | Path, title: str, xlabel: str, bins: int = 40) -> Path:
    import numpy as np

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    v = np.asarray(values, dtype=float)
    ax.hist(v[np.isfinite(v)], bins=bins)
    ax.set(xlabel=xlabel, ylabel="count", title=title)
    return _save(fig, path)


def metric_panels(metrics: dict[str, dict[str, float]], keys: list[str], path: str | Path, title: str) -> Path:
    """One small bar panel per metric (scales differ), one bar per method/model."""
    names = list(metrics)
    cols = min(4, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, k in zip(axes.ravel(), keys):
        vals = [metrics[n].get(k, float("nan")) for n in names]
        ax.bar(range(len(names)), vals, color=[f"C{i % 10}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), names, rotation=60, fontsize=7)
        ax.set_title(k, fontsize=9)
    for ax in axes.ravel()[len(keys):]:
        ax.axis("off")
    fig.suptitle(title)
    return _save(fig, path)


def frontier(points: dict[str, list[tuple[float, float, str]]], path: str | Path, title: str, xlabel: str,
             ylabel: str, xscale: str = "linear") -> Path:
    """Curves of (x, y, label) points, one per series (e.g. judged reward against KL over lambda);
    ``xscale="symlog"`` spreads KL values that span several orders of magnitude (0 stays visible)."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, (name, pts) in enumerate(points.items()):
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        reference = name.startswith("base")  # the starting point: a black star, never a series colour
        ax.plot(xs, ys, "*" if reference else "o-", color="black" if reference else f"C{i % 10}", label=name,
                markersize=12 if reference else 6)
        for x, y, lab in pts:
            ax.annotate(lab, (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
    if xscale == "symlog":
        pos = [p[0] for pts in points.values() for p in pts if p[0] > 0]
        ax.set_xscale("symlog", linthresh=min(pos) if pos else 1e-3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def run_method_bars(table, metrics: tuple[str, ...], path: str | Path, title: str) -> Path:
    """Grouped bars from a (run, method, metrics...) table: a panel per metric, runs on the x axis,
    one bar per method (``asft compare``)."""
    import math

    import numpy as np

    metrics = [m for m in metrics if table[m].notna().any()]
    runs = list(dict.fromkeys(table["run"]))
    methods = list(dict.fromkeys(table["method"]))
    cols = min(3, max(1, len(metrics)))
    rows = math.ceil(len(metrics) / cols) if metrics else 1
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    width = 0.8 / max(1, len(methods))
    x = np.arange(len(runs))
    for ax, metric in zip(axes.flat, metrics):
        for j, method in enumerate(methods):
            sub = table[table["method"] == method].set_index("run")[metric]
            ax.bar(x + j * width, [sub.get(r, np.nan) for r in runs], width, label=method)
        ax.set_title(metric)
        ax.set_xticks(x + width * (len(methods) - 1) / 2, [r[-15:] for r in runs], rotation=30, ha="right",
                      fontsize=7)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def cost_curves(sizes: list[float], costs: dict[str, dict[str, list[float]]], path: str | Path, title: str,
                xlabel: str = "events") -> Path:
    """Log-log cost curves: one panel per metric (e.g. wall s, CPU s, peak MB), one line per stage, each
    labelled with its least-squares slope (1 = linear in ``sizes``); a dotted slope-1 guide per panel."""
    import numpy as np

    metrics = sorted({m for per in costs.values() for m in per}, key=list(next(iter(costs.values()))).index)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.8), squeeze=False)
    x = np.asarray(sizes, dtype=float)
    for ax, m in zip(axes[0], metrics, strict=True):
        for i, (stage, per) in enumerate(costs.items()):
            y = np.maximum(np.asarray(per[m], dtype=float), 1e-3)
            slope = float(np.polyfit(np.log(x), np.log(y), 1)[0]) if len(x) > 1 else float("nan")
            ax.plot(x, y, "o-", color=f"C{i % 10}", label=f"{stage} (slope {slope:.2f})")
        last = max(per[m][-1] for per in costs.values())  # through the costliest last point: linear from there down
        ax.plot(x, last * x / x[-1], ":", color="grey", label="slope 1")
        ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=m, title=f"{title}: {m}")
        ax.legend(fontsize=7)
    return _save(fig, path)
