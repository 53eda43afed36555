"""Tests for asft.config: defaults, dotted overrides, error messages, params.yaml round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from asft.config import Config, ConfigError, dump_config, load_config, parse_overrides

PARAMS = Path(__file__).parents[1] / "params.yaml"


def test_defaults():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.seed == 2026
    assert cfg.model.n_embd == 64 and cfg.model.n_head == 2 and cfg.model.n_positions is None
    assert cfg.train.lr == 2e-3 and cfg.train.betas == (0.9, 0.98) and cfg.train.device == "auto"
    assert cfg.preprocess.min_user_events == 3 and cfg.preprocess.train_windows == "all"
    assert cfg.eval.ks == [10, 50]
    assert cfg.data.source == "simulator" and cfg.data.columns == {}


def test_overrides_dotted_keys_and_yaml_types():
    cfg = load_config(
        None,
        [
            "seed=5",
            "train.lr=1e-3",
            "train.betas=[0.8, 0.9]",
            "train.device=cpu",
            "eval.ks=[50, 5, 5]",
            "eval.mask_history=false",
            "model.n_positions=null",
            "model.dropout=0",
            "data.columns={user_id: uid, item_id: iid}",
            "data.sep=",
            "tracking.mlflow_uri=sqlite:///x.db",
        ],
    )
    assert cfg.seed == 5
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.train.betas == (0.8, 0.9)
    assert cfg.train.device == "cpu"
    assert cfg.eval.ks == [5, 50]  # sorted, deduplicated
    assert cfg.eval.mask_history is False
    assert cfg.model.n_positions is None and cfg.model.dropout == 0.0
    assert cfg.data.columns == {"user_id": "uid", "item_id": "iid"}
    assert cfg.data.sep is None  # empty value -> None
    assert cfg.tracking.mlflow_uri == "sqlite:///x.db"
    # untouched values keep their defaults
    assert cfg.train.batch_size == Config().train.batch_size


def test_parse_overrides():
    assert parse_overrides(["a.b=1", "c=x=y", "d=[1, 2]", "e="]) == [
        ("a.b", 1),
        ("c", "x=y"),
        ("d", [1, 2]),
        ("e", None),
    ]
    assert parse_overrides(None) == []
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["novalue"])
    with pytest.raises(ConfigError, match="empty key"):
        parse_overrides(["=3"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_overrides(["a=[1, 2"])


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigError, match=r"train\.learning_rate") as e:
        load_config(None, ["train.learning_rate=0.1"])
    assert "<defaults>" in str(e.value)
    with pytest.raises(ConfigError, match="bogus"):
        load_config(None, ["bogus=1"])
    with pytest.raises(ConfigError, match="seed"):
        load_config(None, ["seed.x=1"])  # not a section


def test_invalid_value_names_the_key():
    with pytest.raises(ConfigError, match=r"train\.lr"):
        load_config(None, ["train.lr=-1"])
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        load_config(None, ["train.batch_size=0"])
    with pytest.raises(ConfigError, match=r"preprocess\.min_user_events"):
        load_config(None, ["preprocess.min_user_events=2"])
    with pytest.raises(ConfigError, match=r"preprocess\.train_windows"):
        load_config(None, ["preprocess.train_windows=some"])
    with pytest.raises(ConfigError, match=r"eval\.ks"):
        load_config(None, ["eval.ks=[0, 10]"])
    with pytest.raises(ConfigError, match=r"eval\.ks"):
        load_config(None, ["eval.ks=[]"])
    with pytest.raises(ConfigError, match=r"model\.dropout"):
        load_config(None, ["model.dropout=1.0"])


def test_heads_must_divide_embedding():
    with pytest.raises(ConfigError, match="divisible"):
        load_config(None, ["model.n_embd=30", "model.n_head=4"])
    assert load_config(None, ["model.n_embd=32", "model.n_head=4"]).model.n_embd == 32


def test_bad_yaml_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml") as e:
        load_config(bad)
    assert "YAML" in str(e.value)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(ConfigError, match="scalar.yaml"):
        load_config(scalar)
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text("train:\n  lr: -1\n")
    with pytest.raises(ConfigError, match=r"invalid.yaml[\s\S]*train\.lr"):
        load_config(invalid)


def test_empty_file_gives_defaults(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("")
    assert load_config(p) == Config()


def test_file_plus_overrides(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("seed: 1\ntrain:\n  lr: 0.5\n  epochs: 3\n")
    cfg = load_config(p, ["train.epochs=4"])
    assert cfg.seed == 1 and cfg.train.lr == 0.5 and cfg.train.epochs == 4
    # the override does not leak into a later load of the same file
    assert load_config(p).train.epochs == 3


def test_repo_params_yaml_loads_and_round_trips(tmp_path):
    assert PARAMS.is_file()
    cfg = load_config(PARAMS)
    assert isinstance(cfg, Config)
    out = tmp_path / "dumped.yaml"
    dump_config(cfg, out)
    again = load_config(out)
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()
    assert again.section_hash("model", "train") == cfg.section_hash("model", "train")
    # every key of the file is a real setting (dotted views agree on the keys the file sets)
    flat = cfg.flat()
    assert set(flat) == set(Config().flat())


def test_flat_and_section_hash():
    cfg = Config()
    flat = cfg.flat()
    assert flat["train.lr"] == 2e-3 and flat["eval.ks"] == [10, 50] and flat["data.columns"] == {}
    h = cfg.section_hash("model")
    assert h == Config().section_hash("model")
    assert h != load_config(None, ["model.n_layer=3"]).section_hash("model")
    assert h == load_config(None, ["train.lr=0.1"]).section_hash("model")  # other sections don't matter
