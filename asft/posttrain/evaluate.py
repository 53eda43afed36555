"""Scoring several post-trained policies on the same contexts (section-7 reports)."""

from __future__ import annotations

from pathlib import Path

from asft.config import Config
from asft.data.preprocess import ProcessedData
from asft.policy_eval import PolicyScorer
from asft.posttrain.runner import load_policy


def evaluate_policies(model_dirs: dict[str, str | Path], ref_dir: str | Path, processed_dir: str | Path,
                      reward_dir: str | Path | None, judge_dir: str | Path | None, simulator, cfg: Config,
                      splits: tuple[str, ...] = ("valid", "test")) -> dict[str, dict]:
    """Section-7 reports of several policies (and ``base`` = pi_ref when asked) on the same contexts;
    everything that does not depend on the policy is computed once."""
    from asft.models.reward import RewardEnsemble

    data = ProcessedData.open(processed_dir)
    ref, _, _ = load_policy(ref_dir)
    ens = RewardEnsemble.load(reward_dir) if reward_dir else None
    judge = RewardEnsemble.load(judge_dir) if judge_dir else None
    scorers = {sp: PolicyScorer.build(data, sp, ref, cfg.eval.ks, reward_ens=ens, judge_ens=judge, simulator=simulator,
                                      ndcg_tolerance=cfg.posttrain.ndcg_tolerance, batch_size=cfg.eval.batch_size,
                                      memory_mb=cfg.eval.memory_mb)
               for sp in splits}
    out = {}
    for name, d in model_dirs.items():
        model = ref if Path(d).resolve() == Path(ref_dir).resolve() else load_policy(d)[0]
        out[name] = {sp: sc.evaluate(model) for sp, sc in scorers.items()}
    return out
