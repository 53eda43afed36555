"""Post-training of pi_ref: A-SFT and its baselines in one framework (METHODS.md sections 5-6).

Every method starts from the base model (pi_ref), sees the same training contexts (every scored
position of the training windows), the same N candidates per context where it uses candidates,
the same optimiser and epoch budget (``posttrain.train``) and the same validation-based selection.
Dropout is disabled during post-training (as TRL does), so the policy starts exactly at pi_ref.

The methods (``posttrain.methods``) are registered by name in :mod:`asft.posttrain.registry` with
their family, what they need and their builder:

- ``collate``: examples, their collation and the policy's log-probabilities at the contexts;
- ``weighted`` (sft, rwr, asft, asft_logged, asft_mix, anchor_only), ``rounds`` (rft, rft_asft),
  ``pairwise`` (dpo, ipo), ``online`` (rloo, grpo, rec_r1), ``full`` (asft_full): one module per family;
- ``runner``: :func:`run_method`; ``evaluate``: :func:`evaluate_policies` (several policies, one pass).

With ``posttrain.mask_history`` (default) the weighted and pairwise methods fit the history-masked
policy, the distribution the candidates were sampled from: pi_ref puts a third of its mass on
already-consumed items, and fitting masked samples with the unmasked softmax drags that mass down
through the shared embeddings and flattens the policy (measured: NDCG@10 0.69x the base for uniform
weights). With ``posttrain.anchor_weight`` > 0 each context of the anchored methods (asft, asft_mix,
asft_full, anchor_only, rft, rft_asft) also gets its logged item with that weight (the candidates'
weights average 1); ``posttrain.anchor_scope=all`` adds the same anchor to DPO/IPO and the online
methods as a plain-SFT term with the anchor's share of the weighted loss as its coefficient.

The names below are imported lazily (on first access), so ``import asft.posttrain.registry`` (the
config's validation of method names) imports neither torch nor pandas.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "registry": ("MethodSpec", "METHODS", "get_method", "method_names", "register_method"),
    "collate": ("Example", "group_rows", "context_examples", "collate_examples", "context_log_probs"),
    "weighted": ("weighted_loss", "count_weight", "weighted_examples", "with_anchor", "method_weights"),
    "pairwise": ("preference_pairs", "make_pair_loss", "count_rows"),
    "online": ("slate_ndcg", "plackett_luce_logp", "make_online_loss"),
    "full": ("make_full_loss",),
    "runner": ("PostTrainInputs", "load_policy", "run_method", "anchor_coef"),
    "evaluate": ("evaluate_policies",),
}
# the advantages stage's files live in asft.advantages_stage; re-exported for existing importers
_OUTSIDE = {name: "asft.advantages_stage" for name in ("ADVANTAGES_FILE", "write_advantages", "read_advantages")}
_WHERE = {name: f"{__name__}.{mod}" for mod, names in _EXPORTS.items() for name in names} | _OUTSIDE

__all__ = [  # the names of _WHERE, spelt out for static tools
    "ADVANTAGES_FILE", "METHODS", "Example", "MethodSpec", "PostTrainInputs", "anchor_coef", "collate_examples",
    "context_examples", "context_log_probs", "count_rows", "count_weight", "evaluate_policies", "get_method",
    "group_rows", "load_policy", "make_full_loss", "make_online_loss", "make_pair_loss", "method_names",
    "method_weights", "plackett_luce_logp", "preference_pairs", "read_advantages", "register_method", "run_method",
    "slate_ndcg", "weighted_examples", "weighted_loss", "with_anchor", "write_advantages",
]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
