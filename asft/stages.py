"""Pipeline stages as plain functions: config + paths in, JSON-able summary out.

No orchestration here. The Prefect tasks in ``tasks/`` wrap these with tracking; the CLI stage
commands (and so the DVC stages) call them directly. Every stage writes its outputs atomically.

Run directory layout::

    DIR/raw/            canonical interactions.parquet (+ catalog.parquet, simulator/), validation.json
    DIR/processed/      sequences/train/valid/test parquet, vocab.json, stats.json
    DIR/preferences/    pairs.parquet, stats.json (+ judges.json on the simulator)
    DIR/models/base/    best/ (save_pretrained + item vocab), train_summary.json
    DIR/models/reward/  member_K/best/, ensemble.json, train_summary.json
    DIR/models/judge/   the held-out judge ensemble (other preference fold, other seeds)
    DIR/candidates/     sampled/ candidates from pi_ref; scored/ with ensemble rewards
    DIR/advantages/     advantages.parquet, weights.json, histograms (A-SFT weights)
    DIR/models/posttrain/<method>/  best/ (save_pretrained), train_summary.json
    DIR/reports/        gx/<suite>/ data docs, reward/ report and plots, policies/<method>.json,
                        validation_failure.json
    DIR/metrics.json    validation and test metrics per model, plus dataset statistics

Training stages (base, reward, judge, post-training) run in a resumable work directory (checkpoints:
model, optimizer, scheduler, RNG states, data position, best model so far) and publish their output
directory atomically when they finish (:func:`asft.utils.staged_output`); a killed run resumes from
its last checkpoint and ends with the same models.

Every dataset is validated (Great Expectations suites in :mod:`asft.data.expectations`) before it is
published; a failure raises :class:`asft.data.validation.DataValidationError` and nothing is written.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from asft.config import Config
from asft.data.schema import InteractionData
from asft.utils import atomic_dir, dir_sha256, rebase_paths, staged_output, write_json

RAW, PROCESSED, PREFERENCES = "raw", "processed", "preferences"
BASE_MODEL, REWARD_MODEL, REPORTS = "models/base", "models/reward", "reports"
JUDGE_MODEL, CANDIDATES, SCORED, ADVANTAGES = "models/judge", "candidates/sampled", "candidates/scored", "advantages"
POSTTRAIN = "models/posttrain"


def load_raw(cfg: Config) -> InteractionData:
    if cfg.data.source == "simulator":
        from asft.simulator import Simulator

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = cfg.simulator.workers or cores
        return Simulator(cfg.simulator, cfg.seed).generate(workers=workers)
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

    return validate_raw(data.interactions, data.items, cfg, data.source or "interactions", docs_dir, fmt=data.format)


def read_raw(raw_dir: str | Path) -> InteractionData:
    raw_dir = Path(raw_dir)
    src = json.loads((raw_dir / "source.json").read_text())
    items = pd.read_parquet(raw_dir / "catalog.parquet") if (raw_dir / "catalog.parquet").is_file() else None
    return InteractionData(pd.read_parquet(raw_dir / "interactions.parquet"), items, src["source"], src["format"])


def stage_validate(raw_dir: str | Path, cfg: Config, docs_dir: str | Path | None = None) -> dict:
    """The raw GX suite (the one ``retrain`` runs) on a canonical raw dir; raises DataValidationError."""
    from asft.data.expectations import validate_raw_dir

    return validate_raw_dir(raw_dir, cfg, docs_dir)


def stage_preprocess(raw_dir: str | Path, cfg: Config, out_dir: str | Path, docs_dir: str | Path | None = None) -> dict:
    from asft.data.expectations import validate_processed
    from asft.data.preprocess import preprocess_raw_dir

    report: dict = {}

    def check(tmp: Path) -> None:
        report.update(validate_processed(tmp, cfg, docs_dir))
        write_json(tmp / "validation.json", persisted_report(report))

    # = preprocess(read_raw(raw_dir), ...), without holding the raw log while the output is validated
    stats = preprocess_raw_dir(raw_dir, cfg.preprocess, out_dir, validate_fn=check)
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
                       progress: bool = True, resume: bool = True, work_dir: str | Path | None = None) -> dict:
    from asft.training.reward import train_reward_ensemble

    return _resumable(out_dir, work_dir, resume, lambda work: train_reward_ensemble(
        processed_dir, pref_dir, base_model_dir, cfg, work, on_log=on_log, progress=progress, resume=resume), cfg)


def _resumable(out_dir: str | Path, work_dir: str | Path | None, resume: bool, train: Callable[[Path], dict],
               cfg: Config | None = None) -> dict:
    """Run a training stage in a resumable work directory; ``out_dir`` is published atomically at the end
    (:func:`asft.utils.staged_output`). A crashed run leaves no ``out_dir``; the next run resumes. In a keyed
    work directory (``work_dir`` given, resuming) its checkpoints are also synced to
    ``storage.checkpoints_url``, so the next run may be on another machine (:mod:`asft.storage`)."""
    from asft import storage

    with staged_output(out_dir, work_dir, resume) as work:
        st = cfg.storage if cfg is not None else None
        keyed = st is not None and resume and work_dir is not None and Path(work) == Path(work_dir)
        with storage.checkpoint_sync(st.checkpoints_url if keyed else None, work, st.s3_endpoint_url if st else None):
            summary = train(work)
    return rebase_paths(summary, work, out_dir)


def stage_reward_report(reward_dir: str | Path, pref_dir: str | Path, processed_dir: str | Path,
                        raw_dir: str | Path, base_model_dir: str | Path | None, cfg: Config,
                        out_dir: str | Path) -> dict:
    from asft.reward_report import reward_report

    return reward_report(reward_dir, pref_dir, processed_dir, cfg, out_dir, simulator=load_simulator(raw_dir),
                         base_model_dir=base_model_dir)


def stage_train_base(processed_dir: str | Path, cfg: Config, out_dir: str | Path,
                     on_log: Callable[[dict, int], None] | None = None, progress: bool = True, resume: bool = True,
                     work_dir: str | Path | None = None) -> dict:
    from asft.training.sft import train_base

    def train(work: Path) -> dict:
        res = train_base(processed_dir, cfg, work, on_log=on_log, progress=progress, resume=resume)
        write_history_csv(work / "train_summary.json", work / "history.csv")
        return res

    summary = _resumable(out_dir, work_dir, resume, train, cfg)
    summary["model_dir"] = str(Path(out_dir) / "best")
    return summary


def write_history_csv(train_summary: str | Path, out: str | Path) -> Path:
    """The per-epoch rows of a training summary's history as CSV (a DVC plot; step evaluations left out)."""
    hist = json.loads(Path(train_summary).read_text())["history"]
    rows = pd.DataFrame([r for r in hist if float(r.get("epoch", 0.5)).is_integer()])
    rows.columns = [c.replace("/", "_") for c in rows.columns]
    rows.to_csv(out, index=False)
    return Path(out)


def stage_evaluate(model_dir: str | Path, processed_dir: str | Path, cfg: Config) -> dict:
    from asft.training.sft import evaluate_model

    return evaluate_model(model_dir, processed_dir, cfg)


def stage_train_judge(processed_dir: str | Path, pref_dir: str | Path, base_model_dir: str | Path, cfg: Config,
                      out_dir: str | Path, on_log: Callable[[dict, int], None] | None = None,
                      progress: bool = True, resume: bool = True, work_dir: str | Path | None = None) -> dict:
    """The held-out judge: a reward ensemble on the other preference fold with other seeds."""
    from asft.training.reward import train_reward_ensemble

    return _resumable(out_dir, work_dir, resume, lambda work: train_reward_ensemble(
        processed_dir, pref_dir, base_model_dir, cfg, work, on_log=on_log, progress=progress, resume=resume,
        fold=cfg.judge.fold, members=cfg.judge.members, seed=cfg.seed + cfg.judge.seed_offset, kind="bt-judge-ensemble"), cfg)


def _processes():
    """Accelerate's process state under ``torchrun``/``accelerate launch`` (sampling and scoring shard
    across its processes; the process group is gloo on CPU, NCCL on GPUs); None for one process."""
    from asft.utils import dist_rank

    if dist_rank()[1] == 1:
        return None
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _gather_frames(frame: pd.DataFrame, out_dir: str | Path, state) -> pd.DataFrame | None:
    """Every process's candidate rows -> the main process, in window/position order (the single-process
    order); None on the other processes. Shards go through the shared file system next to ``out_dir``."""
    from asft.sampling import read_candidates, write_candidates

    shards = Path(out_dir).parent / f".{Path(out_dir).name}.shards"
    mine = shards / f"rank_{state.process_index}"
    mine.mkdir(parents=True, exist_ok=True)
    if len(frame):
        write_candidates(frame, mine)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    parts = [read_candidates(d) for d in sorted(shards.glob("rank_*")) if any(d.iterdir())]
    shutil.rmtree(shards, ignore_errors=True)
    return pd.concat(parts, ignore_index=True).sort_values(["window", "pos"], kind="stable").reset_index(drop=True)


def stage_sample(processed_dir: str | Path, ref_dir: str | Path, cfg: Config, out_dir: str | Path,
                 progress: bool = True) -> dict:
    """N candidates per training context from pi_ref (plus optional KV-cache slates).

    Under ``torchrun``/``accelerate launch`` each process samples every world-th batch of contexts on
    its own device and the main process writes the union: the same rows as one process."""
    from asft.data.preprocess import ProcessedData
    from asft.posttrain.runner import load_policy
    from asft.sampling import (
        TrainContexts,
        sample_candidates,
        sampling_summary,
        save_sampling_meta,
        shard_by_batches,
        write_candidates,
        write_slates,
    )

    data = ProcessedData.open(processed_dir)
    tc = TrainContexts.from_processed(data)
    policy, _, _ = load_policy(ref_dir)
    state = _processes()
    windows, device = None, "cpu"
    if state is not None:
        windows = shard_by_batches(list(range(len(tc.windows))), cfg.sampling.batch_size, state.process_index,
                                   state.num_processes)
        device = state.device
        policy.to(device)
    t0 = time.perf_counter()
    frame = sample_candidates(policy, tc, cfg.sampling, cfg.seed, windows=windows, progress=progress, device=device)
    if state is not None:
        frame = _gather_frames(frame, out_dir, state)
        if frame is None:
            return {"candidates_dir": str(out_dir), "rank": state.process_index}
        policy.to("cpu")
    summary = sampling_summary(frame, time.perf_counter() - t0, cfg.sampling.n_candidates)
    with atomic_dir(out_dir) as tmp:
        write_candidates(frame, tmp)
        if cfg.sampling.slates_per_user:
            summary["slates"] = write_slates(policy, data, cfg.sampling, cfg.seed, tmp)
        save_sampling_meta(tmp, summary, cfg)
    return {**summary, "candidates_dir": str(out_dir)}


def stage_score(cand_dir: str | Path, processed_dir: str | Path, ref_dir: str | Path, reward_dir: str | Path,
                cfg: Config, out_dir: str | Path, progress: bool = True) -> dict:
    """Score the sampled candidates (and logged items) with the reward ensemble; under a multi-process
    launch each process scores every world-th batch of windows and the main process writes the union."""
    from asft.data.preprocess import ProcessedData
    from asft.models.reward import RewardEnsemble
    from asft.posttrain.runner import load_policy
    from asft.sampling import (
        TrainContexts,
        read_candidates,
        sampling_summary,
        save_sampling_meta,
        score_candidates,
        shard_by_batches,
        write_candidates,
    )

    data = ProcessedData.open(processed_dir)
    tc = TrainContexts.from_processed(data)
    policy, _, _ = load_policy(ref_dir)
    ens = RewardEnsemble.load(reward_dir)
    frame = read_candidates(cand_dir)
    state = _processes()
    device = "cpu"
    if state is not None:
        import numpy as np

        mine = shard_by_batches(sorted(np.unique(frame["window"]).tolist()), cfg.sampling.batch_size,
                                state.process_index, state.num_processes)
        frame = frame[frame["window"].isin(mine)].reset_index(drop=True)
        device = state.device
        for m in (policy, *ens.members):
            m.to(device)
    t0 = time.perf_counter()
    scored = score_candidates(frame, policy, ens.members, tc, cfg.sampling, cfg.reward.kappa, progress=progress,
                              device=device)
    if state is not None:
        scored = _gather_frames(scored, out_dir, state)
        if scored is None:
            return {"scored_dir": str(out_dir), "rank": state.process_index}
    secs = time.perf_counter() - t0
    summary = sampling_summary(scored, secs, cfg.sampling.n_candidates)
    summary["candidates_scored_per_s"] = summary.pop("candidates_per_s")
    with atomic_dir(out_dir) as tmp:
        write_candidates(scored, tmp)
        save_sampling_meta(tmp, summary, cfg)
    return {**summary, "scored_dir": str(out_dir)}


def stage_advantages(scored_dir: str | Path, cfg: Config, out_dir: str | Path) -> dict:
    """A-SFT advantages and weights (``advantage`` section) with their statistics and histograms."""
    from asft.advantages_stage import write_advantages

    return write_advantages(scored_dir, cfg, out_dir)


def stage_posttrain(method: str, processed_dir: str | Path, ref_dir: str | Path, reward_dir: str | Path | None,
                    scored_dir: str | Path | None, adv_dir: str | Path | None, cfg: Config, out_dir: str | Path,
                    on_log: Callable[[dict, int], None] | None = None, progress: bool = True,
                    resume: bool = True, work_dir: str | Path | None = None) -> dict:
    from asft.posttrain.runner import PostTrainInputs, run_method

    inputs = PostTrainInputs(Path(processed_dir), Path(ref_dir), Path(reward_dir) if reward_dir else None,
                             Path(scored_dir) if scored_dir else None, Path(adv_dir) if adv_dir else None)
    return _resumable(out_dir, work_dir, resume, lambda work: run_method(method, cfg, inputs, work, on_log=on_log,
                                                                        progress=progress, resume=resume), cfg)


def stage_evaluate_policy(model_dir: str | Path, ref_dir: str | Path, processed_dir: str | Path,
                          reward_dir: str | Path | None, judge_dir: str | Path | None, raw_dir: str | Path | None,
                          cfg: Config, out_path: str | Path | None = None) -> dict:
    """Section-7 report of one policy on valid and test contexts (see :mod:`asft.policy_eval`)."""
    from asft.posttrain.evaluate import evaluate_policies

    rep = evaluate_policies({"policy": model_dir}, ref_dir, processed_dir, reward_dir, judge_dir,
                            load_simulator(raw_dir) if raw_dir else None, cfg)["policy"]
    if out_path is not None:
        write_json(out_path, rep)
    return rep


POLICY_KEYS = ("ndcg@10", "hr@10", "high_rated/ndcg@10", "judged_top10", "true_top10", "kl_ref", "entropy",
               "coverage@10")


def stage_evaluate_policies(posttrain_dir: str | Path, ref_dir: str | Path, processed_dir: str | Path,
                            reward_dir: str | Path | None, judge_dir: str | Path | None, raw_dir: str | Path | None,
                            cfg: Config, out_dir: str | Path, policies: dict[str, str] | None = None,
                            lams: dict[str, float] | None = None) -> dict:
    """Section-7 reports of pi_ref ("base") and every post-trained policy on the same contexts.

    ``policies`` maps names to model dirs (default: each ``posttrain.methods`` entry found under
    ``posttrain_dir``); ``lams`` gives the A-SFT temperature of the policies that form the lambda sweep
    (default: ``asft`` at ``advantage.lam``). Writes one JSON report per policy, ``metrics.json`` (test
    metrics per policy: DVC metrics), ``methods.csv`` (a DVC plot) and the comparison plots."""
    from asft.plots import metric_panels
    from asft.posttrain.evaluate import evaluate_policies

    if policies is None:
        root = Path(posttrain_dir)
        policies = {m: str(root / m / "best") for m in cfg.posttrain.methods if (root / m / "best").is_dir()}
    if lams is None:
        lams = {"asft": cfg.advantage.lam} if "asft" in policies else {}
    t0 = time.perf_counter()
    reports = evaluate_policies({"base": ref_dir, **policies}, ref_dir, processed_dir, reward_dir, judge_dir,
                                load_simulator(raw_dir) if raw_dir else None, cfg)
    secs = time.perf_counter() - t0
    keys = [k for k in POLICY_KEYS if k in reports["base"]["test"]]
    with atomic_dir(out_dir) as tmp:
        for name, rep in reports.items():
            write_json(tmp / f"{name}.json", rep)
        write_json(tmp / "metrics.json", {n: {k: r["test"][k] for k in keys} for n, r in reports.items()})
        pd.DataFrame([{"method": n, **{k: r["test"][k] for k in keys}} for n, r in reports.items()]).to_csv(
            tmp / "methods.csv", index=False)
        metric_panels({n: r["test"] for n, r in reports.items()}, keys, tmp / "methods_test.png",
                      "post-training methods (test)")
        lambda_frontiers(reports, lams, tmp)
    plots = sorted(str(Path(out_dir) / p.name) for p in Path(out_dir).glob("*.png"))
    return {"reports": reports, "n_policies": len(reports), "plots": plots, "seconds": secs}


def lambda_frontiers(reports: dict[str, dict], lams: dict[str, float], out: Path) -> list[Path]:
    """Judged reward vs KL (and, on the simulator, true reward vs NDCG@10) on test: the A-SFT policies
    of ``lams`` (name -> lambda) as one curve, every other policy as a point."""
    from asft.plots import frontier

    paths = []
    for (xk, yk, fname) in (("kl_ref", "judged_top10", "frontier_judged_kl.png"),
                            ("ndcg@10", "true_top10", "frontier_true_ndcg.png")):
        if yk not in reports["base"]["test"]:
            continue
        sweep = sorted((lams[n], r["test"]) for n, r in reports.items() if n in lams)
        points = {"A-SFT (lambda)": [(t[xk], t[yk], f"{la:g}") for la, t in sweep]} if sweep else {}
        points.update({n: [(r["test"][xk], r["test"][yk], n)] for n, r in reports.items() if n not in lams})
        paths.append(frontier(points, out / fname, f"test: {yk} vs {xk}", xk, yk))
    return paths
