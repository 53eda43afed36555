"""Post-training methods registered by name (verl-style), importable without torch or pandas.

Each method is one :class:`MethodSpec`: its family (how the runner trains it), what it needs (a reward
ensemble, the sampled-and-scored candidate dataset), whether the ``posttrain.anchor_weight`` anchor
applies, and the dotted path of its builder, imported only when the method runs. The config validates
``posttrain.methods`` and ``posttrain.champion_method`` against :func:`method_names`, so this module
uses the standard library only.

A family fixes the builder's signature (the runner in :mod:`asft.posttrain.runner` calls it so):

==========  ======================================================  ===================================
family      builder                                                 trains
==========  ======================================================  ===================================
weighted    ``(frame, cfg) -> (items [C, M], Weights)``             ``-sum(w log pi(a|s)) / sum(w)``
rounds      ``(keep_fracs) -> list[Round]``                         weighted rounds (filter, then A-SFT)
pairwise    ``(method, beta, anchor) -> loss_fn``                   DPO/IPO on candidate pairs
online      ``(method, cfg, ref, members, anchor) -> loss_fn``      on-policy PG (PPO clip, KL to pi_ref)
full        ``(cfg, ref, members, reward_scale) -> loss_fn``        soft target over the whole catalogue
==========  ======================================================  ===================================

Adding a method is one :func:`register_method` call here and its builder in the family's module.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

FAMILIES = ("weighted", "rounds", "pairwise", "online", "full")
# families that get the anchor as an added plain-SFT term when posttrain.anchor_scope is 'all'
ADDED_ANCHOR_FAMILIES = ("pairwise", "online")

_BUILDER = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class MethodSpec:
    """One post-training method.

    ``needs_candidates``: trains on the sampled and scored candidate dataset (``sample``/``score``
    stages). ``anchored``: trained on pi_ref's candidates or on the whole catalogue, so each context
    also gets its logged item with weight ``posttrain.anchor_weight``. ``builder``:
    ``"package.module:function"`` with the family's signature (module docstring)."""

    name: str
    family: str
    needs_reward: bool
    needs_candidates: bool
    anchored: bool
    description: str
    builder: str

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"method name '{self.name}' must be lower-case letters, digits and '_'")
        if self.family not in FAMILIES:
            raise ValueError(f"method '{self.name}': unknown family '{self.family}'; choose from {list(FAMILIES)}")
        if not _BUILDER.match(self.builder):
            raise ValueError(f"method '{self.name}': builder '{self.builder}' is not 'package.module:function'")

    def load_builder(self) -> Callable:
        """Import and return the builder (this is where torch and pandas get imported)."""
        module, attr = self.builder.split(":")
        fn = getattr(importlib.import_module(module), attr, None)
        if not callable(fn):
            raise TypeError(f"method '{self.name}': builder '{self.builder}' is not a callable")
        return fn


_METHODS: dict[str, MethodSpec] = {}
METHODS: Mapping[str, MethodSpec] = MappingProxyType(_METHODS)


def register_method(name: str, *, family: str, builder: str, description: str, needs_reward: bool = False,
                    needs_candidates: bool = False, anchored: bool = False) -> MethodSpec:
    """Register a method under ``name`` (once: a second registration of the name is an error)."""
    if name in _METHODS:
        raise ValueError(f"post-training method '{name}' is already registered")
    spec = MethodSpec(name, family, needs_reward, needs_candidates, anchored, description, builder)
    _METHODS[name] = spec
    return spec


def method_names() -> tuple[str, ...]:
    """The registered method names, in registration order."""
    return tuple(_METHODS)


def get_method(name: str) -> MethodSpec:
    if name not in _METHODS:
        raise ValueError(f"unknown post-training method '{name}'; choose from {list(_METHODS)}")
    return _METHODS[name]


# ---------------------------------------------------------------------------- the methods
_W = "asft.posttrain.weighted"
register_method("sft", family="weighted", builder=f"{_W}:sft_weights", needs_candidates=True,
                description="logged next items, all weights 1 (behaviour cloning)")
register_method("rwr", family="weighted", builder=f"{_W}:rwr_weights", needs_reward=True, needs_candidates=True,
                description="logged next items, w = r (linear; the rating, else the ensemble's reward)")
register_method("asft", family="weighted", builder=f"{_W}:asft_weights", needs_reward=True, needs_candidates=True,
                anchored=True, description="N sampled candidates, w = transform(A/lambda) from `advantage`")
register_method("asft_logged", family="weighted", builder=f"{_W}:asft_logged_weights", needs_candidates=True,
                description="logged (s, a, rating): w = exp((r - mean r)/lambda); no reward model")
register_method("asft_mix", family="weighted", builder=f"{_W}:asft_mix_weights", needs_reward=True,
                needs_candidates=True, anchored=True,
                description="sampled candidates + the logged item, all scored by the ensemble")
register_method("asft_full", family="full", builder="asft.posttrain.full:make_full_loss", needs_reward=True,
                anchored=True,
                description="full-catalogue A-SFT: soft-target cross-entropy to the exact tilted policy"
                " pi_ref * exp(A/lambda) / Z over every item (no sampling), A = ensemble reward / its centring std")
register_method("anchor_only", family="weighted", builder=f"{_W}:anchor_only_weights", needs_candidates=True,
                anchored=True, description="control: the same pi_ref candidates with uniform weights (+ anchor);"
                " what A-SFT gains over it is what the reward adds")
register_method("rft", family="rounds", builder="asft.posttrain.rounds:rft_plan", needs_reward=True,
                needs_candidates=True, anchored=True,
                description="best-of-N: SFT on the top share of each context's candidates; each round re-samples"
                " from the current policy, with a rising threshold (`rft.keep_fracs`)")
register_method("rft_asft", family="rounds", builder="asft.posttrain.rounds:rft_asft_plan", needs_reward=True,
                needs_candidates=True, anchored=True,
                description="two-stage: filtered SFT (first keep_frac), then A-SFT")
for _name, _kind in (("dpo", "DPO"), ("ipo", "IPO")):
    register_method(_name, family="pairwise", builder="asft.posttrain.pairwise:make_pair_loss", needs_reward=True,
                    needs_candidates=True,
                    description=f"{_kind} on pairs of candidates whose ensemble reward intervals do not overlap")
for _name, _kind in (("rloo", "RLOO"), ("grpo", "GRPO")):
    register_method(_name, family="online", builder="asft.posttrain.online:make_online_loss", needs_reward=True,
                    description=f"{_kind}: G samples per context from the current policy, ensemble reward, group"
                    " advantages, PPO clip over `pg.ppo_epochs` passes, KL to pi_ref added, entropy bonus")
register_method("rec_r1", family="online", builder="asft.posttrain.online:make_online_loss",
                description="GRPO whose reward is NDCG@K of a sampled slate against the user's real next"
                " training items (no reward model)")
del _name, _kind
