"""Pipeline stages as plain functions: config + paths in, JSON-able summary out.

No orchestration here. The Prefect tasks in ``tasks/`` wrap these with tracking; the CLI stage
commands (and so the DVC stages) call them directly. Every stage writes its outputs atomically.

Run directory layout::

    DIR/raw/            canonical interactions.parquet (+ catalog.parquet, simulator/), validation.json
    DIR/processed/      sequences/train/valid/test parquet, vocab.json, stats.json
    DIR/preferences/    pairs.parquet, stats.json (+ judges.json on the simulator)
    DIR/models/base/    checkpoint/ (resumable), best/ (save_pretrained + item vocab)
    DIR/models/reward/  member_K/{checkpoint,best}/, ensemble.json, train_summary.json
    DIR/reports/        gx/<suite>/ data docs, reward/ report and plots, validation_failure.json
    DIR/metrics.json    validation and test metrics per model, plus dataset statistics

Every dataset is validated (Great Expectations suites in :mod:`asft.data.expectations`) before it is
published; a failure raises :class:`asft.data.validation.DataValidationError` and nothing is written.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from asft.config import Config
from asft.data.schema import InteractionData
from asft.utils import atomic_dir, dir_sha256, write_json

RAW, PROCESSED, PREFERENCES = "raw", "processed", "preferences"
BASE_MODEL, REWARD_MODEL, REPORTS = "models/base", "models/reward", "reports"


def load_raw(cfg: Config) -> InteractionData:
    if cfg.data.source == "simulator":
        from asft.simulator import Simulator

        return Simulator(cfg.simulator, cfg.seed).generate()
    from asft.data.loaders import load_from_config

    return load_from_config(cfg.data)


def _write_raw(data: InteractionData, cfg: Config, tmp: Path) -> None:
    data.interactions.to_parquet(tmp / "interactions.parquet", index=False)
    if data.items is not None:
        data.items.to_parquet(tmp / "catalog.parquet", index=False)
    if cfg.data.source == "simulator":
        from asft.simulator import Simulator

        Simulator(cfg.simulator, cfg.seed).save(tmp / "simulator")
    write_json(tmp / "source.json", {"source": cfg.data.source, "format": data.format,
                                     "rows": len(data.interactions)})


def stage_load(cfg: Config, out_dir: str | Path) -> dict:
    """Load (or simulate) the interaction log and write it in canonical form to ``out_dir``."""
    t0 = time.perf_counter()
    data = load_raw(cfg)
    with atomic_dir(out_dir) as tmp:
        _write_raw(data, cfg, tmp)
    return {"raw_dir": str(out_dir), "rows": len(data.interactions), "format": data.format,
            "has_catalog": data.items is not None, "sha256": dir_sha256(out_dir),
            "seconds": time.perf_counter() - t0}


def stage_ingest(cfg: Config, out_dir: str | Path, docs_dir: str | Path | None = None) -> dict:
    """Load and validate the raw log; the canonical table is published only if validation passes."""
    t0 = time.perf_counter()
    data = load_raw(cfg)
    report = _validate_raw_data(data, cfg, docs_dir)
    with atomic_dir(out_dir) as tmp:
        _write_raw(data, cfg, tmp)
        write_json(tmp / "validation.json", persisted_report(report))
    return {"raw_dir": str(out_dir), "rows": len(data.interactions), "format": data.format,
            "has_catalog": data.items is not None, "sha256": dir_sha256(out_dir), "validation": report,
            "seconds": time.perf_counter() - t0}


def persisted_report(report: dict) -> dict:
    """A validation report as stored inside a dataset: no timings or local paths, so DVC hashes are
    reproducible."""
    return {k: v for k, v in report.items() if k not in ("seconds", "docs")}


def _validate_raw_data(data: InteractionData, cfg: Config, docs_dir: str | Path | None) -> dict:
    from asft.data.expectations import validate_raw

    return validate_raw(data.interactions, data.items, cfg, data.source or "interactions", docs_dir)


def read_raw(raw_dir: str | Path) -> InteractionData:
    raw_dir = Path(raw_dir)
    src = json.loads((raw_dir / "source.json").read_text())
    items = pd.read_parquet(raw_dir / "catalog.parquet") if (raw_dir / "catalog.parquet").is_file() else None
    return InteractionData(pd.read_parquet(raw_dir / "interactions.parquet"), items, src["source"], src["format"])


def stage_validate(raw_dir: str | Path, cfg: Config) -> dict:
    """Schema validation of the raw table; raises DataValidationError (nothing downstream runs)."""
    from asft.data.validation import validate_interactions

    data = read_raw(raw_dir)
    return validate_interactions(data.interactions, f"{data.source} ({Path(raw_dir) / 'interactions.parquet'})",
                                 cfg.preprocess.min_user_events)


def stage_preprocess(raw_dir: str | Path, cfg: Config, out_dir: str | Path, docs_dir: str | Path | None = None) -> dict:
    from asft.data.expectations import validate_processed
    from asft.data.preprocess import preprocess

    report: dict = {}

    def check(tmp: Path) -> None:
        report.update(validate_processed(tmp, cfg, docs_dir))
        write_json(tmp / "validation.json", persisted_report(report))

    stats = preprocess(read_raw(raw_dir), cfg.preprocess, out_dir, validate_fn=check)
    return {**stats, "processed_dir": str(out_dir), "sha256": dir_sha256(out_dir), "validation": report}


def load_simulator(raw_dir: str | Path):
    """The simulator saved with a simulated raw dataset (None for logged data)."""
    sim_dir = Path(raw_dir) / "simulator"
    if not sim_dir.is_dir():
        return None
    from asft.simulator import Simulator

    return Simulator.load(sim_dir)


def stage_preferences(raw_dir: str | Path, processed_dir: str | Path, cfg: Config, out_dir: str | Path,
                      docs_dir: str | Path | None = None) -> dict:
    """Build and validate the preference dataset (judge sources need the simulator in ``raw_dir``)."""
    from asft.data.expectations import validate_preferences
    from asft.data.preferences import build_preferences

    t0 = time.perf_counter()

    report: dict = {}

    def check(pairs: pd.DataFrame, tmp: Path) -> dict:
        report.update(validate_preferences(pairs, processed_dir, cfg,
                                           f"preference pairs ({Path(out_dir) / 'pairs.parquet'})", docs_dir))
        return persisted_report(report)

    stats = build_preferences(processed_dir, cfg, out_dir, simulator=load_simulator(raw_dir), validate_fn=check)
    stats["validation"] = report
    return {**stats, "preferences_dir": str(out_dir), "sha256": dir_sha256(out_dir),
            "seconds": time.perf_counter() - t0}


def stage_train_reward(processed_dir: str | Path, pref_dir: str | Path, base_model_dir: str | Path, cfg: Config,
                       out_dir: str | Path, on_log: Callable[[dict, int], None] | None = None,
                       progress: bool = True, resume: bool = True) -> dict:
    from asft.training.reward import train_reward_ensemble

    return train_reward_ensemble(processed_dir, pref_dir, base_model_dir, cfg, out_dir, on_log=on_log,
                                 progress=progress, resume=resume)


def stage_reward_report(reward_dir: str | Path, pref_dir: str | Path, processed_dir: str | Path,
                        raw_dir: str | Path, base_model_dir: str | Path | None, cfg: Config,
                        out_dir: str | Path) -> dict:
    from asft.reward_report import reward_report

    return reward_report(reward_dir, pref_dir, processed_dir, cfg, out_dir, simulator=load_simulator(raw_dir),
                         base_model_dir=base_model_dir)


def stage_train_base(processed_dir: str | Path, cfg: Config, out_dir: str | Path,
                     on_log: Callable[[dict, int], None] | None = None, progress: bool = True) -> dict:
    from asft.training.sft import train_base

    summary = train_base(processed_dir, cfg, out_dir, on_log=on_log, progress=progress)
    summary["model_dir"] = str(Path(out_dir) / "best")
    return summary


def stage_evaluate(model_dir: str | Path, processed_dir: str | Path, cfg: Config) -> dict:
    from asft.training.sft import evaluate_model

    return evaluate_model(model_dir, processed_dir, cfg)
