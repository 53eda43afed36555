"""The post-training method registry and the advantage registries: every method the config accepts is
registered (and the reverse), unknown names list the valid ones, builders resolve to callables, the
RFT round plans, and the registries import without torch (the config validates names against them)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from asft.advantages import BASELINES, TRANSFORMS, baseline_names, transform_names
from asft.config import AdvantageConfig, load_config
from asft.posttrain.registry import (
    ADDED_ANCHOR_FAMILIES,
    FAMILIES,
    METHODS,
    MethodSpec,
    get_method,
    method_names,
    register_method,
)
from asft.posttrain.rounds import Round, rft_asft_plan, rft_plan

EXPECTED = {  # name: (family, needs_reward, needs_candidates, anchored), as the methods behave
    "sft": ("weighted", False, True, False),
    "rwr": ("weighted", True, True, False),
    "asft": ("weighted", True, True, True),
    "asft_logged": ("weighted", False, True, False),
    "asft_mix": ("weighted", True, True, True),
    "asft_full": ("full", True, False, True),
    "anchor_only": ("weighted", False, True, True),
    "rft": ("rounds", True, True, True),
    "rft_asft": ("rounds", True, True, True),
    "dpo": ("pairwise", True, True, False),
    "ipo": ("pairwise", True, True, False),
    "rloo": ("online", True, False, False),
    "grpo": ("online", True, False, False),
    "rec_r1": ("online", False, False, False),
}


def _python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


# ---------------------------------------------------------------------------- method registry
def test_every_method_registered_once_with_its_family_and_needs():
    assert method_names() == tuple(EXPECTED)
    assert set(METHODS) == set(EXPECTED)
    for name, (family, reward, cands, anchored) in EXPECTED.items():
        spec = get_method(name)
        assert (spec.name, spec.family, spec.needs_reward, spec.needs_candidates, spec.anchored) == \
            (name, family, reward, cands, anchored)
        assert spec.description
    assert {s.family for s in METHODS.values()} == set(FAMILIES)
    assert set(ADDED_ANCHOR_FAMILIES) <= set(FAMILIES)


def test_config_accepts_exactly_the_registered_methods():
    for name in method_names():
        cfg = load_config(None, [f"posttrain.methods=[{name}]", f"posttrain.champion_method={name}"])
        assert cfg.posttrain.methods == [name] and cfg.posttrain.champion_method == name
    default = load_config(None, []).posttrain
    assert set(default.methods) <= set(method_names()) and default.champion_method in method_names()
    with pytest.raises(Exception, match="unknown post-training"):
        load_config(None, ["posttrain.methods=[asft, ppo]"])


def test_unknown_method_error_lists_every_valid_name():
    with pytest.raises(ValueError, match="unknown post-training method 'ppo'") as err:
        get_method("ppo")
    for name in method_names():
        assert f"'{name}'" in str(err.value)


def test_registration_is_checked_and_the_mapping_read_only():
    before = method_names()
    with pytest.raises(ValueError, match="already registered"):
        register_method("asft", family="weighted", builder="asft.posttrain.weighted:asft_weights", description="x")
    with pytest.raises(ValueError, match="unknown family 'bandit'"):
        MethodSpec("m", "bandit", False, False, False, "x", "asft.posttrain.weighted:asft_weights")
    with pytest.raises(ValueError, match="not 'package.module:function'"):
        MethodSpec("m", "weighted", False, False, False, "x", "asft.posttrain.weighted.asft_weights")
    with pytest.raises(ValueError, match="lower-case"):
        MethodSpec("Bad Name", "weighted", False, False, False, "x", "asft.posttrain.weighted:asft_weights")
    with pytest.raises(TypeError):
        METHODS["new"] = get_method("asft")  # type: ignore[index]
    with pytest.raises(TypeError, match="not a callable"):
        MethodSpec("m", "weighted", False, False, False, "x", "asft.posttrain.weighted:Weights_missing").load_builder()
    assert method_names() == before


def test_every_builder_resolves_and_every_family_has_a_runner():
    from asft.posttrain.runner import _FIT

    assert set(_FIT) == set(FAMILIES)
    for spec in METHODS.values():
        assert callable(spec.load_builder()), spec.name


def test_method_weights_only_for_the_weighted_family():
    import pandas as pd

    from asft.posttrain.weighted import method_weights

    cfg = load_config(None, [])
    with pytest.raises(ValueError, match="pairwise family"):
        method_weights("dpo", pd.DataFrame(), cfg)
    with pytest.raises(ValueError, match="choose from"):
        method_weights("ppo", pd.DataFrame(), cfg)


def test_anchor_coefficient_follows_the_family():
    from asft.posttrain.runner import anchor_coef

    cfg = load_config(None, ["posttrain.anchor_scope=all", "posttrain.anchor_weight=4"])
    share = 4 / (cfg.sampling.n_candidates + 4)
    for name, spec in METHODS.items():
        expected = share if spec.family in ADDED_ANCHOR_FAMILIES else 0.0
        assert anchor_coef(cfg, name) == pytest.approx(expected), name


def test_rft_plans():
    assert rft_plan([0.5, 0.25, 0.125]) == [Round("filter", 0.5, False), Round("filter", 0.25, True),
                                             Round("filter", 0.125, True)]
    assert rft_asft_plan([0.3, 0.1]) == [Round("filter", 0.3, False), Round("asft", None, False)]
    for plan in (rft_plan, rft_asft_plan):
        with pytest.raises(ValueError, match="keep_fracs is empty"):
            plan([])


# ---------------------------------------------------------------------------- lazy package, no torch
def test_registries_import_without_torch_or_pandas():
    out = _python("""
        import sys
        import asft.posttrain.registry as r
        import asft.advantages as a
        assert len(r.method_names()) == 14
        print(sorted(m for m in ("torch", "pandas", "asft.config", "asft.posttrain.runner") if m in sys.modules))
        print(a.baseline_names(), a.transform_names())
    """)
    loaded, names = out.splitlines()
    assert loaded == "[]"
    assert "'mean'" in names and "'exp'" in names


@pytest.mark.parametrize("first", ["asft.config", "asft.advantages", "asft.posttrain.registry"])
def test_no_circular_import_between_config_and_registries(first):
    """The config imports the registries lazily in its validators; whichever is imported first works."""
    out = _python(f"""
        import importlib
        importlib.import_module("{first}")
        from asft.config import load_config
        from asft.advantages import baseline_names, transform_names
        from asft.posttrain.registry import method_names
        cfg = load_config(None, [])
        print(cfg.advantage.baseline in baseline_names(), cfg.advantage.transform in transform_names(),
              cfg.posttrain.champion_method in method_names())
    """)
    assert out == "True True True"


def test_package_exports_resolve_lazily():
    import asft.posttrain as pt

    assert sorted(pt.__all__) == sorted(pt._WHERE)
    for name in pt.__all__:
        assert getattr(pt, name) is not None, name
    assert pt.write_advantages.__module__ == "asft.advantages_stage"
    with pytest.raises(AttributeError, match="no attribute 'FAMILY'"):
        pt.FAMILY  # noqa: B018 - replaced by the registry


# ---------------------------------------------------------------------------- advantage registries
def test_advantage_registry_names_are_public_and_cover_the_config_defaults():
    assert baseline_names() == tuple(BASELINES) == ("mean", "loo", "expectation", "global_mean", "none")
    assert transform_names() == tuple(TRANSFORMS) == ("exp", "softmax", "linear", "top_q", "ones")
    default = AdvantageConfig()
    assert default.baseline in baseline_names() and default.transform in transform_names()
