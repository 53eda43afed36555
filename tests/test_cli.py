"""CLI stage commands (the ones DVC stages call) and their error handling."""

from __future__ import annotations

import json

from asft.cli import main


def test_stage_commands_end_to_end(tmp_path, tiny_overrides):
    raw, proc, base = tmp_path / "raw", tmp_path / "processed", tmp_path / "base"
    cfg = ["--config", str(tmp_path / "none.yaml")]
    (tmp_path / "none.yaml").write_text("seed: 7\n")
    assert main(["ingest", "--output", str(raw), *cfg, *tiny_overrides]) == 0
    assert main(["validate", "--raw", str(raw), *cfg, *tiny_overrides]) == 0
    assert main(["preprocess", "--raw", str(raw), "--output", str(proc), *cfg, *tiny_overrides]) == 0
    stats = json.loads((proc / "stats.json").read_text())
    assert stats["users"] == 60
    assert main(["train-base", "--processed", str(proc), "--output", str(base), *cfg, *tiny_overrides]) == 0
    out = tmp_path / "m.json"
    assert main(["evaluate", "--model", str(base / "best"), "--processed", str(proc), "--output", str(out),
                 *cfg, *tiny_overrides]) == 0
    m = json.loads(out.read_text())
    assert set(m) >= {"valid", "test", "test_unmasked"} and "ndcg@10" in m["test"]
    # published atomically: no checkpoint in the output, no work directory left behind
    assert not (base / "checkpoint").exists() and not [p for p in tmp_path.glob(".base.work*") if p.is_dir()]


def test_bad_override_and_bad_data_exit_2(tmp_path, capsys):
    assert main(["config", "train.lr=-1"]) == 2
    assert "train.lr" in capsys.readouterr().err
    assert main(["config", "nonsense.key=1"]) == 2
    assert main(["ingest", "--data", str(tmp_path / "missing"), "--output", str(tmp_path / "raw")]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and not (tmp_path / "raw").exists()


def test_config_prints_resolved_yaml(capsys):
    assert main(["config", "train.epochs=3"]) == 0
    assert "epochs: 3" in capsys.readouterr().out


def test_data_typed_on_the_command_line_is_accepted_config_paths_stay_contained(tmp_path, monkeypatch, capsys):
    """`--data PATH` typed by a person is read even outside every data root; the same path through a
    `key=value` override (or a config file, a deployment parameter) is still refused by containment."""
    from asft.config import SimulatorConfig
    from asft.data.paths import ROOTS_ENV
    from asft.simulator import simulate

    monkeypatch.delenv(ROOTS_ENV, raising=False)  # tmp_path is outside the project and ../shared/data
    d = tmp_path / "mine"
    d.mkdir()
    simulate(SimulatorConfig(n_users=60, n_items=40, min_len=6, max_len=12), 3).interactions.to_csv(
        d / "interactions.csv", index=False)
    assert main(["ingest", "--output", str(tmp_path / "refused"), f"data.source={d}"]) == 2
    err = capsys.readouterr().err
    assert "data.source" in err and ROOTS_ENV in err and not (tmp_path / "refused").exists()
    assert main(["ingest", "--data", str(d), "--output", str(tmp_path / "raw")]) == 0
    assert (tmp_path / "raw").is_dir()
