"""Running one post-training method: load pi_ref (twice: the policy and the frozen reference), the
reward ensemble and the scored candidates; build the method's examples, loss and normaliser from its
registry entry (one fit function per family); train with validation-based selection; summarise.

Every method sees the same training contexts, the same optimiser and epoch budget
(``posttrain.train``) and the same selection. Dropout is disabled, so the policy starts exactly at
pi_ref."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import asft.posttrain.rounds  # noqa: F401  (plans resolved by name; imported so code deps list it)
from asft.advantages import Weights
from asft.advantages_stage import ADVANTAGES_METHOD, read_advantages
from asft.config import Config
from asft.data.preprocess import ProcessedData
from asft.models.recommender import load_recommender, save_recommender
from asft.policy_eval import PolicyScorer
from asft.posttrain.collate import collate_examples, context_examples
from asft.posttrain.full import context_weight
from asft.posttrain.online import online_horizon
from asft.posttrain.pairwise import count_rows, pair_examples, pairs_summary, preference_pairs
from asft.posttrain.registry import ADDED_ANCHOR_FAMILIES, MethodSpec, get_method
from asft.posttrain.weighted import (
    asft_weights,
    count_weight,
    filter_weights,
    weighted_examples,
    weighted_loss,
    with_anchor,
)
from asft.sampling import TrainContexts, read_candidates, sample_candidates, score_candidates
from asft.training.trainer import Trainer, TrainResult
from asft.utils import seed_everything, write_json

# (collate_fn, loss_fn, count_fn) of a Trainer
TrainSpec = tuple[Callable, Callable, Callable]


@dataclass
class PostTrainInputs:
    processed_dir: Path
    ref_dir: Path
    reward_dir: Path | None
    cand_dir: Path | None
    adv_dir: Path | None = None


def _freeze_dropout(model: torch.nn.Module) -> torch.nn.Module:
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    return model


def load_policy(ref_dir: str | Path):
    """(model with dropout off, vocabulary, metadata) of a saved recommender."""
    model, vocab, meta = load_recommender(ref_dir)
    return _freeze_dropout(model), vocab, meta


def anchor_coef(cfg: Config, method: str) -> float:
    """Coefficient of the added plain-SFT anchor term of the pairwise and online methods (0 unless
    ``posttrain.anchor_scope`` is 'all'): the anchor's share of a candidate-based method's loss."""
    pt = cfg.posttrain
    if pt.anchor_scope != "all" or pt.anchor_weight <= 0 or get_method(method).family not in ADDED_ANCHOR_FAMILIES:
        return 0.0
    return pt.anchor_weight / (cfg.sampling.n_candidates + pt.anchor_weight)


@dataclass
class _Run:
    """Everything a family's fit function needs for one method."""

    spec: MethodSpec
    cfg: Config
    inputs: PostTrainInputs
    out_dir: Path
    tc: TrainContexts
    policy: torch.nn.Module
    ref: torch.nn.Module
    ens: object | None  # asft.models.reward.RewardEnsemble
    frame: pd.DataFrame | None
    trainer_for: Callable[..., Trainer]  # (model, TrainSpec, out_dir, epochs=None, repeat=1)
    resume: bool
    progress: bool

    def weighted_spec(self) -> TrainSpec:
        masked = self.cfg.posttrain.mask_history
        return lambda ex: collate_examples(self.tc, ex, with_history=masked), weighted_loss, count_weight


# ---------------------------------------------------------------------------- one fit function per family
def _fit_weighted(run: _Run) -> tuple[list[TrainResult], dict]:
    if run.spec.name == ADVANTAGES_METHOD and run.inputs.adv_dir is not None:
        items, wts = read_advantages(run.inputs.adv_dir, run.frame)
    else:
        items, wts = run.spec.load_builder()(run.frame, run.cfg)
    anchor = run.cfg.posttrain.anchor_weight if run.spec.anchored else 0.0
    items, w = with_anchor(items, wts.weights, run.frame, anchor)
    examples = weighted_examples(run.frame, items, w)
    extra = {"weights": _weights_summary(wts, run.out_dir)}
    return [run.trainer_for(run.policy, run.weighted_spec(), run.out_dir).fit(examples, resume=run.resume)], extra


def _fit_pairwise(run: _Run) -> tuple[list[TrainResult], dict]:
    cfg, dpo = run.cfg, run.cfg.posttrain.dpo
    masked = cfg.posttrain.mask_history
    pairs = preference_pairs(run.frame, dpo.z, dpo.pairs_per_context, ref_col="ref_logp_masked" if masked else "ref_logp")
    if pairs.empty:
        raise ValueError("no candidate pair has non-overlapping reward intervals; lower posttrain.dpo.z")
    examples = pair_examples(pairs, run.tc)
    loss = run.spec.load_builder()(run.spec.name, dpo.beta, anchor_coef(cfg, run.spec.name))
    spec = (lambda ex: collate_examples(run.tc, ex, with_history=masked), loss, count_rows)
    result = run.trainer_for(run.policy, spec, run.out_dir).fit(examples, resume=run.resume)
    return [result], {"pairs": pairs_summary(pairs, len(run.frame))}


def _fit_online(run: _Run) -> tuple[list[TrainResult], dict]:
    cfg, name = run.cfg, run.spec.name
    horizon = online_horizon(name, cfg)
    members = run.ens.members if run.ens is not None and run.spec.needs_reward else None
    group = cfg.posttrain.pg.group_size
    spec = (lambda ex: collate_examples(run.tc, ex, with_history=True, next_horizon=horizon),
            run.spec.load_builder()(name, cfg, run.ref, members, anchor_coef(cfg, name)),
            lambda b: float(len(b["ctx_b"]) * group))
    trainer = run.trainer_for(run.policy, spec, run.out_dir, repeat=cfg.posttrain.pg.ppo_epochs)
    _to_device(trainer.device, run.ref, *(members or []))
    return [trainer.fit(context_examples(run.tc), resume=run.resume)], {}


def _fit_full(run: _Run) -> tuple[list[TrainResult], dict]:
    scale = float(run.ens.centring.get("std", 1.0)) or 1.0
    per_ctx = context_weight(run.cfg)
    spec = (lambda ex: collate_examples(run.tc, ex, with_history=True),
            run.spec.load_builder()(run.cfg, run.ref, run.ens.members, scale),
            lambda bt: float(len(bt["ctx_b"]) * per_ctx))
    trainer = run.trainer_for(run.policy, spec, run.out_dir)
    _to_device(trainer.device, run.ref, *run.ens.members)
    return [trainer.fit(context_examples(run.tc), resume=run.resume)], {"reward_scale": scale}


def _fit_rounds(run: _Run) -> tuple[list[TrainResult], dict]:
    """Each round trains from the previous round's selected policy; the best round's model is kept."""
    cfg = run.cfg
    plan = run.spec.load_builder()(cfg.posttrain.rft.keep_fracs)
    per_round = max(1, cfg.posttrain.train.epochs // len(plan))
    results, rounds = [], []
    current, frame = run.policy, run.frame
    for r, rd in enumerate(plan):
        if rd.resample:  # re-sample from the current policy, score with the ensemble
            frame = sample_candidates(current, run.tc, cfg.sampling, cfg.seed + 101 * r, progress=run.progress)
            frame = score_candidates(frame, current, run.ens.members, run.tc, cfg.sampling, cfg.reward.kappa,
                                     progress=run.progress)
        items, wts = filter_weights(frame, cfg, rd.keep_frac) if rd.kind == "filter" else asft_weights(frame, cfg)
        items, w = with_anchor(items, wts.weights, frame, cfg.posttrain.anchor_weight)
        sub = run.out_dir / f"round_{r}"
        res = run.trainer_for(current, run.weighted_spec(), sub, per_round).fit(weighted_examples(frame, items, w),
                                                                             resume=run.resume)
        results.append(res)
        rounds.append({"round": r, "kind": rd.kind, "keep_frac": rd.keep_frac, "best_metric": res.best_metric,
                       "best_epoch": res.best_epoch, "weights": wts.stats})
        current = load_policy(sub / "best")[0]
    best_r = int(np.argmax([x["best_metric"] for x in rounds]))
    if (run.out_dir / "best").exists():
        shutil.rmtree(run.out_dir / "best")
    shutil.copytree(run.out_dir / f"round_{best_r}" / "best", run.out_dir / "best")
    return results, {"rounds": rounds, "best_round": best_r}


_FIT = {"weighted": _fit_weighted, "pairwise": _fit_pairwise, "online": _fit_online, "full": _fit_full,
        "rounds": _fit_rounds}


def _to_device(device, *models: torch.nn.Module) -> None:
    for m in models:
        m.to(device)


# ---------------------------------------------------------------------------- running a method
def run_method(method: str, cfg: Config, inputs: PostTrainInputs, out_dir: str | Path,
               on_log: Callable[[dict, int], None] | None = None, progress: bool = True, resume: bool = True) -> dict:
    """Post-train pi_ref with ``method``; writes ``out_dir/best`` (the selected model) and a summary."""
    from asft.models.reward import RewardEnsemble

    spec = get_method(method)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed = cfg.seed
    seed_everything(seed)
    data = ProcessedData.open(inputs.processed_dir)
    tc = TrainContexts.from_processed(data)
    policy, vocab, ref_meta = load_policy(inputs.ref_dir)
    ref, _, _ = load_policy(inputs.ref_dir)
    for p in ref.parameters():
        p.requires_grad_(False)
    ens = RewardEnsemble.load(inputs.reward_dir) if inputs.reward_dir else None
    if ens is None and spec.needs_reward:
        raise ValueError(f"method '{method}' needs a reward ensemble")
    frame = read_candidates(inputs.cand_dir) if inputs.cand_dir else None
    t0 = time.perf_counter()
    scorer = PolicyScorer.build(data, "valid", ref, cfg.eval.ks, reward_ens=ens,
                                ndcg_tolerance=cfg.posttrain.ndcg_tolerance, batch_size=cfg.eval.batch_size,
                                memory_mb=cfg.eval.memory_mb)
    setup_s = time.perf_counter() - t0
    meta = {"method": method, "ref_model": str(inputs.ref_dir), "max_len": ref_meta.get("max_len")}

    def save_best(m, path):
        save_recommender(m, vocab, path, meta=meta)

    def trainer_for(model, train_spec: TrainSpec, sub: Path, epochs: int | None = None, repeat: int = 1) -> Trainer:
        collate, loss_fn, count_fn = train_spec
        return Trainer(model, _train_cfg(cfg, epochs), sub, collate_fn=collate, loss_fn=loss_fn, count_fn=count_fn,
                       evaluate_fn=scorer.evaluate, save_best_fn=save_best, monitor=cfg.posttrain.train.monitor,
                       seed=seed, on_log=on_log, progress=progress, name=f"posttrain-{method}",
                       repeat_batches=repeat)

    if spec.needs_candidates and frame is None:
        raise ValueError(f"method '{method}' needs the candidate dataset (run the sample/score stages)")
    run = _Run(spec, cfg, inputs, out_dir, tc, policy, ref, ens, frame, trainer_for, resume, progress)
    results, extra = _FIT[spec.family](run)
    summary = _summarise(method, results, setup_s, extra)
    summary["base_valid"] = {"ndcg@10": scorer.base_ndcg}
    summary["returned_ref"] = summary["best_epoch"] == 0  # no evaluated update beat pi_ref itself
    summary["model_dir"] = str(out_dir / "best")
    history = [h for r in results for h in r.history]
    summary["outcome"] = _outcome(summary, history, cfg, scorer.base_ndcg)
    write_json(out_dir / "train_summary.json", {**summary, "history": history})
    return summary


def _outcome(summary: dict, history: list[dict], cfg: Config, base_ndcg: float) -> str:
    """One line for the console: which checkpoint was selected, or why pi_ref itself was kept."""
    if not summary["returned_ref"]:
        return f"best valid {summary['best_metric']:.4f} at epoch {summary['best_epoch']}"
    ndcg = [h["valid/ndcg@10"] for h in history if h.get("step", 0) > 0 and "valid/ndcg@10" in h]
    reached = f"; the updates' valid ndcg@10 {min(ndcg):.4f}-{max(ndcg):.4f}" if ndcg else ""
    return (f"pi_ref kept: no update beat it on valid {cfg.posttrain.train.monitor} with valid ndcg@10 >="
            f" {1 - cfg.posttrain.ndcg_tolerance:.0%} of pi_ref's {base_ndcg:.4f}{reached}")


def _train_cfg(cfg: Config, epochs: int | None = None):
    t = cfg.posttrain.train
    return t if epochs is None else t.model_copy(update={"epochs": epochs})


def _summarise(method: str, results: list[TrainResult], setup_s: float, extra: dict) -> dict:
    best = max(results, key=lambda r: r.best_metric)
    last = next((dict(h) for h in best.history if h.get("epoch") == best.best_epoch), {})
    return {"method": method, "best_metric": best.best_metric, "best_epoch": best.best_epoch,
            "epochs_run": sum(r.epochs_run for r in results), "steps": sum(r.steps for r in results),
            "train_seconds": sum(r.train_seconds for r in results), "eval_seconds": sum(r.eval_seconds for r in results),
            "setup_seconds": setup_s, "best_valid": last, "stopped_early": any(r.stopped_early for r in results),
            **extra}


def _weights_summary(w: Weights, out_dir: Path) -> dict:
    """Histograms of the weights and advantages and their statistics (``weights.json``) in ``out_dir``."""
    from asft.plots import histogram

    histogram(w.weights.ravel(), out_dir / "weights_hist.png", "A-SFT weights", "weight")
    histogram(w.advantages.ravel(), out_dir / "advantages_hist.png", "advantages", "A (standardised)")
    write_json(out_dir / "weights.json", w.stats)
    return dict(w.stats)
