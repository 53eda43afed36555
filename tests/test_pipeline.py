"""The stage declarations (asft/pipeline.py) and what is generated from them: CLI, dvc.yaml, params.yaml."""

from __future__ import annotations

import argparse
import inspect
import json
import subprocess
import sys

import pytest
import yaml
from conftest import REPO

from asft import pipeline
from asft.cli import build_parser, main
from asft.config import Config, ConfigError, ConfigOverrides, defaults_yaml, load_config, overrides_from_model


def test_params_yaml_is_the_code_defaults():
    """One source of defaults: params.yaml is generated from asft/config.py (`asft config --defaults`)."""
    assert (REPO / "params.yaml").read_text() == defaults_yaml(), \
        "params.yaml differs from the code's defaults: run `asft config --defaults > params.yaml`"
    assert load_config(REPO / "params.yaml") == Config()


def test_dvc_yaml_is_generated_from_the_stage_declarations():
    methods = load_config(REPO / "params.yaml").posttrain.methods
    assert (REPO / "dvc.yaml").read_text() == pipeline.render_dvc_yaml(methods), \
        "dvc.yaml differs from asft/pipeline.py: run `asft dvc-yaml > dvc.yaml`"


def test_every_stage_function_takes_what_its_spec_declares():
    for spec in pipeline.STAGES:
        params = inspect.signature(spec.function).parameters
        assert "cfg" in params, spec.name
        for inp in spec.inputs:
            assert inp.arg in params, f"{spec.name}: {spec.func} has no parameter {inp.arg}"
        for opt in spec.options:
            assert opt in params, f"{spec.name}: option {opt}"
        if spec.output and not spec.output_file:
            assert "out_dir" in params, spec.name
        if spec.training:
            assert {"on_log", "resume", "work_dir"} <= set(params), spec.name
        for key in spec.params:  # every declared config key exists
            pipeline.stage_params(spec, Config().to_dict())


def test_one_name_per_stage_everywhere():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    from tasks.stages import TASKS

    for spec in pipeline.STAGES:
        assert spec.name in sub.choices, spec.name
        if spec.dvc:
            assert spec.name in dvc
        if spec.flow:
            assert TASKS[spec.name].name == spec.name
    assert set(dvc) == {s.name for s in pipeline.STAGES if s.dvc}


def test_code_deps_follow_the_real_imports():
    deps = {s.name: set(pipeline.code_deps(s)) for s in pipeline.STAGES}
    assert "asft/simulator.py" in deps["ingest"]  # stage_ingest -> load_raw -> Simulator
    assert "asft/data/expectations.py" in deps["preprocess"]
    assert "asft/posttrain/runner.py" in deps["posttrain"]
    assert "asft/posttrain/rounds.py" in deps["posttrain"]  # resolved by name, imported for the deps
    assert "asft/training/reward.py" in deps["train-reward"]
    assert not any(d.startswith("asft/posttrain/") and not d.endswith(("registry.py", "__init__.py"))
                   for d in deps["ingest"]), "the data stages do not run the post-training losses"
    assert "asft/training/trainer.py" not in deps["preprocess"]
    for d in deps.values():
        assert all((REPO / f).is_file() for f in d)


def test_stage_cli_has_typed_flags_for_the_config_it_reads(tmp_path):
    parser = build_parser()
    args = parser.parse_args(["advantages", "--scored", "s", "--output", "o", "--advantage.lam", "2.5",
                              "--advantage.transform", "softmax"])
    from asft.cli import _flag_overrides

    assert sorted(_flag_overrides(args)) == ["advantage.lam=2.5", "advantage.transform=softmax"]
    with pytest.raises(SystemExit):  # a stage only takes the settings it declares
        parser.parse_args(["advantages", "--scored", "s", "--output", "o", "--train.epochs", "3"])
    with pytest.raises(SystemExit):  # Literal fields are choices
        parser.parse_args(["advantages", "--scored", "s", "--output", "o", "--advantage.reward", "max"])


def test_unknown_registered_names_fail_at_load_with_the_valid_ones():
    for key, value, listed in (("advantage.baseline", "meen", "loo"), ("advantage.transform", "expp", "softmax"),
                               ("posttrain.methods", "[asft, sfft]", "rloo"),
                               ("posttrain.champion_method", "asfft", "asft_full")):
        with pytest.raises(ConfigError) as e:
            load_config(None, [f"{key}={value}"])
        assert key in str(e.value) and listed in str(e.value)


def test_typed_overrides_round_trip():
    ov = ConfigOverrides(advantage={"lam": 2.0}, posttrain={"methods": ["asft", "sft"], "train": {"epochs": 3}},
                         data={"columns": {"user": "uid"}})
    cfg = load_config(None, overrides_from_model(ov))
    assert cfg.advantage.lam == 2.0 and cfg.posttrain.methods == ["asft", "sft"]
    assert cfg.posttrain.train.epochs == 3 and cfg.data.columns == {"user": "uid"}
    assert cfg.train == Config().train  # unset fields keep the file's values
    assert overrides_from_model(ConfigOverrides()) == []
    schema = ConfigOverrides.model_json_schema()  # what the Prefect UI renders as a form
    assert "advantage" in schema["properties"]


def test_cli_stage_command_runs_the_declared_function(tmp_path, tiny_overrides):
    """`asft ingest` and `asft preprocess` through the generated parser, then the raw GX suite (`validate`)."""
    raw, processed = tmp_path / "raw", tmp_path / "processed"
    assert main(["ingest", "--output", str(raw), *tiny_overrides]) == 0
    assert main(["preprocess", "--raw", str(raw), "--output", str(processed), "--preprocess.max_len", "10",
                 *[o for o in tiny_overrides if not o.startswith("preprocess.max_len")]]) == 0
    stats = json.loads((processed / "stats.json").read_text())
    assert stats["max_len"] == 10
    assert main(["validate", "--raw", str(raw), *tiny_overrides]) == 0


def test_dvc_yaml_command_matches_the_committed_file():
    out = subprocess.run([sys.executable, "-m", "asft.cli", "dvc-yaml"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    assert out == (REPO / "dvc.yaml").read_text()


def stale_lock_entries(root) -> dict[str, list]:
    """What `dvc status` reports beyond missing pipeline outputs: a code dep, a param or a command that
    differs from dvc.lock (or a stage never locked). Missing data (a fresh clone before `dvc pull` /
    `dvc repro`) is not staleness."""
    from asft.datastore import open_repo

    with open_repo(root) as repo:
        status = repo.status()
    stale: dict[str, list] = {}
    for stage, changes in status.items():
        for change in changes:
            if isinstance(change, dict):
                for kind, entries in change.items():
                    if kind == "changed outs":
                        continue
                    bad = {p: st for p, st in entries.items()
                           if not (st == "deleted" and p.startswith(pipeline.DVC_DATA + "/"))}
                    if bad:
                        stale.setdefault(stage, []).append({kind: bad})
            else:
                stale.setdefault(stage, []).append(change)
    return stale


def test_dvc_lock_is_current_for_the_code_and_params():
    """dvc.lock was produced by `dvc repro` of the committed code and params.yaml: `dvc status` finds
    nothing changed but the (uncommitted) pipeline data. After a change, run `dvc repro` and commit the lock."""
    assert stale_lock_entries(REPO) == {}
