"""Security: no code execution from model files, checkpoints or configs; no secrets in the repository.

Fast and offline (no servers):

* a scan of the tracked files: no unsafe deserialisation (``torch.load`` without ``weights_only=True``,
  pickle/joblib/dill loads, ``yaml.load`` without a safe loader), no ``eval``/``exec``, no
  ``trust_remote_code=True``, no shell commands built from strings; no secret-looking strings;
* models: saved as safetensors only, and every loader reads the safetensors file even when a
  malicious pickle (``pytorch_model.bin``) lies next to it, and refuses a directory with only the pickle;
* resumable training checkpoints: a malicious ``optimizer.pt`` / ``scheduler.pt`` / ``torch_rng.pt``
  is refused by ``torch.load(..., weights_only=True)`` and never executed;
* untrusted configs: python/* YAML tags (in a file or an override) and unknown keys are refused.

Every malicious payload here is live: :func:`test_payload_is_live` shows that unpickling it
*without* the protections does run its command (in a subprocess, touching a file under tmp_path).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve().relative_to(REPO).as_posix()

# Code that ships or runs (not the tests: they build malicious inputs on purpose).
PROJECT_DIRS = ("asft/", "tasks/", "flows/", "ops/", "benchmarks/", "scripts/", "infra/")

# (file, rule) -> why it is acceptable. Keep this list short and justified.
ALLOWED = {
    ("benchmarks/recbole/run_sasrec.py", "torch.load without weights_only=True"):
        "external RecBole baseline (own venv, not the pipeline): reloads the checkpoint RecBole wrote"
        " seconds earlier in the same run; RecBole pickles its Config object into it",
}


def _tracked() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return [p for p in out.decode().split("\0") if p and (REPO / p).is_file()]


@pytest.fixture(scope="module")
def tracked() -> list[str]:
    files = _tracked()
    assert "pyproject.toml" in files and "asft/models/recommender.py" in files
    return files


# ------------------------------------------------------------------------------------------------
# Repository scan: dangerous calls (Python AST, so comments, strings and docs never match)
# ------------------------------------------------------------------------------------------------

def _dotted(node: ast.AST) -> str:
    """'torch.load' for torch.load, 'yaml.load' for yaml.load, '' for anything not a plain name chain."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _kw(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


UNSAFE_LOADERS = {  # module-level functions that unpickle (or otherwise run code from) their input
    "pickle.load", "pickle.loads", "pickle.Unpickler", "cPickle.load", "cPickle.loads",
    "cloudpickle.load", "cloudpickle.loads", "dill.load", "dill.loads", "joblib.load",
    "marshal.load", "marshal.loads", "shelve.open", "pd.read_pickle", "pandas.read_pickle",
    "torch.serialization.load", "jsonpickle.decode", "yaml.unsafe_load", "yaml.full_load",
    "yaml.unsafe_load_all", "yaml.full_load_all",
}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def _violations(path: str, source: str) -> list[tuple[str, int, str]]:
    """(rule, line, code) for every dangerous construct in one Python file."""
    tree = ast.parse(source, filename=path)
    found = []

    def hit(rule: str, node: ast.AST) -> None:
        found.append((rule, node.lineno, ast.get_source_segment(source, node) or ""))

    pickle_imported = any(
        isinstance(n, (ast.Import, ast.ImportFrom))
        and any(a.name.split(".")[0] in {"pickle", "cPickle", "cloudpickle", "dill", "joblib", "marshal", "shelve"}
                for a in n.names)
        or (isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] in {"pickle", "cloudpickle", "dill",
                                                                                "joblib", "marshal", "shelve"})
        for n in ast.walk(tree))
    if pickle_imported:
        found.append(("imports a pickle-based serialiser", 1, ""))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name in ("eval", "exec", "compile", "execfile"):
            hit(f"builtin {name}()", node)
        if name == "torch.load" and not _is_true(_kw(node, "weights_only")):
            hit("torch.load without weights_only=True", node)
        if name in UNSAFE_LOADERS:
            hit(f"unsafe deserialisation {name}", node)
        if name.split(".")[-1] == "load" and name.split(".")[0] in ("np", "numpy") and _is_true(_kw(node, "allow_pickle")):
            hit("numpy load with allow_pickle=True", node)
        if name in ("yaml.load", "yaml.load_all"):
            loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if loader is None or _dotted(loader).split(".")[-1] not in SAFE_YAML_LOADERS:
                hit("yaml.load without a safe Loader", node)
        if _is_true(_kw(node, "trust_remote_code")):
            hit("trust_remote_code=True", node)
        if name in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput"):
            hit(f"shell command {name}", node)
        if _is_true(_kw(node, "shell")):
            hit("subprocess with shell=True", node)
    return found


def test_repo_has_no_unsafe_deserialisation_or_code_execution(tracked):
    py = [p for p in tracked if p.endswith(".py") and p != THIS]
    assert len(py) > 30
    problems = []
    for path in py:
        for rule, line, code in _violations(path, (REPO / path).read_text()):
            if (path, rule) in ALLOWED:
                continue
            if rule == "imports a pickle-based serialiser" and not path.startswith(PROJECT_DIRS):
                continue  # tests may build malicious pickles; project code may not even import them
            problems.append(f"{path}:{line}: {rule}: {code[:120]}")
    assert not problems, "\n".join(problems)


def test_scanner_catches_what_it_must():
    """The AST rules find each dangerous form (and leave the safe ones alone)."""
    bad = """
import pickle
torch.load(p)
torch.load(p, weights_only=False)
pickle.loads(b)
joblib.load(p)
yaml.load(s)
yaml.load(s, Loader=yaml.Loader)
yaml.unsafe_load(s)
eval(s)
exec(s)
AutoModel.from_pretrained(p, trust_remote_code=True)
subprocess.run(cmd, shell=True)
os.system(cmd)
np.load(p, allow_pickle=True)
"""
    rules = [r for r, _, _ in _violations("x.py", bad)]
    assert len(rules) == 14, rules
    safe = """
torch.load(p, weights_only=True)
yaml.safe_load(s)
yaml.load(s, Loader=yaml.SafeLoader)
model.eval()
ast.literal_eval(s)
np.load(p, allow_pickle=False)
subprocess.run(['git', 'status'], check=True)
AutoModel.from_pretrained(p, use_safetensors=True)
"""
    assert _violations("y.py", safe) == []


def test_allowlist_entries_still_needed(tracked):
    """An ALLOWED entry whose file no longer has the construct must be removed."""
    for path, rule in ALLOWED:
        assert path in tracked, path
        rules = [r for r, _, _ in _violations(path, (REPO / path).read_text())]
        assert rule in rules, f"{path}: '{rule}' is gone; drop it from ALLOWED"


# ------------------------------------------------------------------------------------------------
# Repository scan: secrets
# ------------------------------------------------------------------------------------------------

SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key": re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b|\bgithub_pat_[A-Za-z0-9_]{40,}\b"),
    "Slack token": re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),
    "OpenAI-style key": re.compile(r"\bsk-(?:proj-)?[A-Za-z0-9_-]{32,}\b"),
    "Hugging Face token": re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),
    "Google API key": re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"),
    "Stripe key": re.compile(r"\b[rs]k_live_[0-9a-zA-Z]{20,}\b"),
    "JWT": re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"),
}
# A URL with a literal password: scheme://user:password@host (not ${VAR}, not a placeholder).
URL_CREDS = re.compile(r"\b[a-z][a-z0-9+.-]*://([^\s:/@'\"`]+):([^\s@/'\"`]+)@[\w.-]+")
# key = value / key: value / KEY=value assignments of a secret in config-like files.
SECRET_KEY = r"[A-Za-z0-9_.-]*(?:password|passwd|secret|token|api[_-]?key|auth[_-]?string|access[_-]?key)[A-Za-z0-9_]*"
ASSIGNMENT = re.compile(rf"^\s*(?:export\s+)?[\"']?({SECRET_KEY})[\"']?\s*[:=]\s*(.*?)\s*$", re.IGNORECASE)
CONFIG_SUFFIXES = (".yaml", ".yml", ".ini", ".cfg", ".conf", ".toml", ".json", ".env", ".properties",
                   ".env.example", "Dockerfile", ".dockerignore")
CONFIG_NAMES = {".dvc/config", "dvc.lock", "params.yaml", "prefect.yaml", "infra/dvc/config.s3"}
PLACEHOLDER = re.compile(r"^(?:|\.\.\.|<[^>]*>|\*+|x+|changeme|null|none|~|\"\"|''|true|false)$", re.IGNORECASE)


def _is_reference(value: str) -> bool:
    """An environment/template reference or a placeholder, not a literal secret."""
    v = value.strip().strip("\"'").rstrip(",")
    if PLACEHOLDER.match(v):
        return True
    if re.search(r"\$\{[^}]+\}|\$[A-Za-z_][A-Za-z0-9_]*|\{\{[^}]+\}\}|\$\([^)]*\)", v):
        return True  # built from ${VAR:?..}, $VAR, {{ template }} or $(command)
    return bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*:\s*", v))  # a nested mapping key (yaml "password:\n  ...")


def _looks_like_secret_assignment(path: str, line: str) -> str | None:
    m = ASSIGNMENT.match(line)
    if not m:
        return None
    key, value = m.group(1), m.group(2)
    if value.startswith(("{", "[")) or value.endswith(("{", "[")):
        return None  # structure (a JSON object, a yaml flow mapping): its entries are lines of their own
    value = value.split(" #")[0].strip().rstrip(",")  # a JSON line's separator is not part of the value
    if _is_reference(value):
        return None
    low = key.lower()
    # Settings that mention a secret but are not one (names, paths, sizes, switches).
    if re.search(r"(?:_file|_path|_name|_id|_url|_uri|_dir|_length|_ttl|_size|_enabled|_required|_prefix|tokens?_"
                 r"|_permission|description|title|_ref|_key_ref)$", low) or low in {"max_tokens", "tokens"}:
        return None
    if value.lower() in {"true", "false", "null"} or re.fullmatch(r"-?[\d.]+(?:[eE][-+]?\d+)?", value):
        return None
    return f"{key} = {value[:40]}"


def test_no_secrets_in_tracked_files(tracked):
    problems = []
    for path in tracked:
        full = REPO / path
        if path == THIS or full.stat().st_size > 2_000_000:
            continue
        try:
            text = full.read_text()
        except UnicodeDecodeError:
            continue  # binary
        for name, pat in SECRET_PATTERNS.items():
            for m in pat.finditer(text):
                problems.append(f"{path}: {name}: {m.group(0)[:24]}...")
        for m in URL_CREDS.finditer(text):
            password = m.group(2)
            if not (_is_reference(password) or password.lower() in {"...", "password", "pass", "token"}
                    or password.startswith(("${", "$", "{{", "<", "***"))):
                problems.append(f"{path}: URL with a literal password: {m.group(0)[:60]}")
        if path.endswith(CONFIG_SUFFIXES) or path in CONFIG_NAMES or Path(path).name.startswith("Dockerfile"):
            for i, line in enumerate(text.splitlines(), 1):
                if line.lstrip().startswith(("#", "//", ";")):
                    continue
                bad = _looks_like_secret_assignment(path, line)
                if bad:
                    problems.append(f"{path}:{i}: secret-looking assignment: {bad}")
    assert not problems, "\n".join(problems)


def test_secret_scanner_catches_what_it_must():
    fake_key_id = "AKIA" + "ABCDEFGHIJKLMNOP"
    assert SECRET_PATTERNS["AWS access key id"].search(f"aws_access_key_id = {fake_key_id}")
    assert SECRET_PATTERNS["private key"].search("-----BEGIN OPENSSH " + "PRIVATE KEY-----")
    assert SECRET_PATTERNS["private key"].search("-----BEGIN " + "PRIVATE KEY-----")
    assert SECRET_PATTERNS["GitHub token"].search("ghp_" + "a1" * 18)
    assert URL_CREDS.search("postgresql://asft:" + "hunter2hunter2" + "@db:5432/x")
    assert _looks_like_secret_assignment("x.yaml", "  password: " + "hunter2hunter2")
    assert _looks_like_secret_assignment("x.env", "AWS_SECRET_ACCESS_KEY=" + "abc123abc123")
    assert _looks_like_secret_assignment("x.ini", "admin_password = " + "hunter2hunter2")
    assert _looks_like_secret_assignment("x.json", '  "api_token": "' + "abc123abc123" + '",')
    for ok in ("POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?set it}", "POSTGRES_PASSWORD=", "password: ...",
               'secret_access_key: "<your key>"', "MLFLOW_TRACKING_PASSWORD: '{{ password }}'",
               "PREFECT_API_AUTH_STRING=asft:$(rand)", "auth_cache_ttl_seconds = 0",
               '  "tokens_per_s": 26041.83346,', '"cost_per_token": 1e-05,', '"token_budget": null,'):
        assert not _looks_like_secret_assignment("x.yaml", ok), ok


def test_env_files_are_git_ignored_and_only_the_template_tracked(tracked):
    for p in ("infra/.env", ".env", "ops/.env", "infra/.env.local", "secrets.env", ".services/credentials.env"):
        r = subprocess.run(["git", "check-ignore", "-q", "--no-index", p], cwd=REPO, check=False)
        assert r.returncode == 0, f"{p} is not git-ignored"
    envs = [p for p in tracked if Path(p).name == ".env" or p.endswith(".env") or "/.env." in f"/{p}"]
    assert envs == ["infra/.env.example"], envs


# ------------------------------------------------------------------------------------------------
# Malicious pickles
# ------------------------------------------------------------------------------------------------

class _Payload:
    """Unpickling this runs a shell command (what an attacker would plant in a .bin / .pt file)."""

    def __init__(self, marker: Path):
        self.cmd = f"touch {shlex.quote(str(marker))}"

    def __reduce__(self):
        return (os.system, (self.cmd,))


def _plant(path: Path, marker: Path) -> Path:
    """A torch checkpoint (zip + pickle, as torch.save writes) whose unpickling creates ``marker``."""
    torch.save({"state": _Payload(marker), "weight": torch.zeros(2)}, path)
    return path


def test_payload_is_live(tmp_path):
    """Unprotected loading of the planted file does run the command (so the tests below test something)."""
    marker = tmp_path / "pwned"
    bad = _plant(tmp_path / "evil.pt", marker)
    code = f"import torch; torch.load({str(bad)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)
    assert marker.exists()


def test_weights_only_refuses_the_payload(tmp_path):
    marker = tmp_path / "pwned"
    bad = _plant(tmp_path / "evil.pt", marker)
    with pytest.raises(Exception, match="(?i)weights only|weights_only|unsupported global"):
        torch.load(bad, weights_only=True)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------
# Models: safetensors only
# ------------------------------------------------------------------------------------------------

WEIGHT_SUFFIXES_UNSAFE = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".h5", ".msgpack")


@pytest.fixture(scope="module")
def tiny():
    from asft.config import ModelConfig
    from asft.data.preprocess import ItemVocab
    from asft.models.recommender import build_model

    vocab = ItemVocab(items=[f"i{k}" for k in range(12)])
    model = build_model(ModelConfig(n_layer=1, n_head=1, n_embd=16, dropout=0.0), vocab.size, 6, seed=5).eval()
    return model, vocab


def _logits(model) -> torch.Tensor:
    ids = torch.tensor([[4, 5, 6, 7], [8, 9, 0, 0]])
    am = (ids > 0).long()
    from asft.models.recommender import next_item_logits

    with torch.no_grad():
        return next_item_logits(model, ids, am)


# Two instances with the same weights: float32 outputs agree to rounding (not necessarily bit for bit).
LOGIT_RTOL, LOGIT_ATOL = 1e-5, 1e-6


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Bit-identical parameters: what a loader read is exactly what was saved."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _weight_files(d: Path) -> list[str]:
    return sorted(p.name for p in d.rglob("*") if p.is_file() and p.suffix in (".safetensors", *WEIGHT_SUFFIXES_UNSAFE))


def test_recommender_saved_as_safetensors_only(tiny, tmp_path):
    from safetensors import safe_open

    from asft.models.recommender import save_recommender

    model, vocab = tiny
    out = save_recommender(model, vocab, tmp_path / "m", meta={"max_len": 6})
    assert _weight_files(out) == ["model.safetensors"]
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:  # a real safetensors file
        names = list(f.keys())
    assert any("wte" in k for k in names)


def test_recommender_loaders_ignore_a_planted_pickle(tiny, tmp_path):
    """A pytorch_model.bin next to model.safetensors is never unpickled by any of the project's loaders."""
    from transformers import AutoModelForCausalLM

    from asft.models.recommender import load_recommender, save_recommender
    from asft.posttrain import load_policy
    from asft.serving import Recommender

    model, vocab = tiny
    out = save_recommender(model, vocab, tmp_path / "m", meta={"max_len": 6})
    marker = tmp_path / "pwned"
    _plant(out / "pytorch_model.bin", marker)
    expected = _logits(model)
    loaded, _, _ = load_recommender(out)
    _same_weights(loaded, model)  # the safetensors weights, not the planted file
    for other in (loaded, load_policy(out)[0], Recommender.load(out).model,
                  AutoModelForCausalLM.from_pretrained(out, use_safetensors=True).eval()):
        torch.testing.assert_close(_logits(other), expected, rtol=LOGIT_RTOL, atol=LOGIT_ATOL)
    assert not marker.exists()


def test_recommender_loader_refuses_a_pickle_only_dir(tiny, tmp_path):
    from asft.models.recommender import load_recommender, save_recommender
    from asft.serving import Recommender

    model, vocab = tiny
    out = save_recommender(model, vocab, tmp_path / "m")
    (out / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    _plant(out / "pytorch_model.bin", marker)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_recommender(out)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        Recommender.load(out)
    # and even past the project's own check, transformers refuses non-safetensors weights here
    from transformers import AutoModelForCausalLM

    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    assert not marker.exists()


def test_reward_ensemble_saved_as_safetensors_and_ignores_planted_pickles(tiny, tmp_path):
    import json

    from asft.models.reward import (
        ENSEMBLE_FILE,
        RewardEnsemble,
        RewardModel,
        load_reward_model,
        save_reward_model,
    )
    from asft.serving import RewardScorer

    model, vocab = tiny
    members = []
    for k in range(2):
        torch.manual_seed(k)
        m = RewardModel.from_base(model, head_init_scale=1.0, rating_head=k == 1, rating_mean=3.0).eval()
        save_reward_model(m, vocab, tmp_path / "ens" / f"member_{k}" / "best")
        members.append(m)
    (tmp_path / "ens" / ENSEMBLE_FILE).write_text(json.dumps(
        {"member_dirs": ["member_0/best", "member_1/best"], "kappa": 1.0, "centring": {"mean": 0.0, "std": 1.0}}))
    assert _weight_files(tmp_path / "ens") == ["model.safetensors", "model.safetensors"]
    marker = tmp_path / "pwned"
    for k in range(2):
        _plant(tmp_path / "ens" / f"member_{k}" / "best" / "pytorch_model.bin", marker)
    ctx = [torch.tensor([4, 5, 6]).numpy()]
    ens = RewardEnsemble(members, vocab)
    expected = ens.score_all(ctx).mean
    for loaded in (RewardEnsemble.load(tmp_path / "ens"), RewardScorer.load(tmp_path / "ens").ensemble):
        np.testing.assert_allclose(loaded.score_all(ctx).mean, expected, rtol=LOGIT_RTOL, atol=LOGIT_ATOL)
    assert not marker.exists()
    (tmp_path / "ens" / "member_1" / "best" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_reward_model(tmp_path / "ens" / "member_1" / "best")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        RewardEnsemble.load(tmp_path / "ens")
    assert not marker.exists()


def test_project_loaders_pin_safetensors():
    """Every from_pretrained in project code passes use_safetensors=True (transformers would otherwise
    fall back to pytorch_model.bin when the safetensors file is missing)."""
    problems = []
    for path in _tracked():
        if not (path.endswith(".py") and path.startswith(PROJECT_DIRS)):
            continue
        source = (REPO / path).read_text()
        for node in ast.walk(ast.parse(source)):
            if (isinstance(node, ast.Call) and _dotted(node.func).endswith("from_pretrained")
                    and not _is_true(_kw(node, "use_safetensors"))):
                problems.append(f"{path}:{node.lineno}: {ast.get_source_segment(source, node)}")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------------
# Resumable checkpoints: torch.load(weights_only=True)
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def checkpointed_trainer(tmp_path):
    from asft.config import load_config
    from asft.models.recommender import build_model
    from asft.training.sft import make_trainer

    cfg = load_config(None, ["model.n_layer=1", "model.n_head=1", "model.n_embd=16", "model.dropout=0",
                             "preprocess.max_len=6", "train.device=cpu", "train.num_threads=1"])
    model = build_model(cfg.model, 16, cfg.preprocess.max_len, seed=0)
    trainer = make_trainer(model, cfg, tmp_path / "run", progress=False)
    trainer.save_checkpoint({"epoch": 1, "step": 3, "best": 0.1, "best_epoch": 1, "bad": 0, "history": [],
                             "tokens": 0, "train_s": 0.0, "eval_s": 0.0, "stopped": False})
    assert trainer.load_checkpoint()["epoch"] == 1  # the genuine checkpoint loads
    return trainer  # the threads train.num_threads set are restored by conftest's isolation fixture


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "torch_rng.pt"])
def test_trainer_refuses_a_malicious_checkpoint_file(checkpointed_trainer, tmp_path, name):
    ckpt = checkpointed_trainer.ckpt_dir
    assert (ckpt / name).is_file()
    marker = tmp_path / "pwned"
    _plant(ckpt / name, marker)
    with pytest.raises(Exception, match="(?i)weights only|weights_only|unsupported global"):
        checkpointed_trainer.load_checkpoint()
    assert not marker.exists()


def test_trainer_checkpoint_model_is_safetensors(checkpointed_trainer):
    files = _weight_files(checkpointed_trainer.ckpt_dir)
    assert "model.safetensors" in files
    # the .pt files hold only tensors and plain containers: they load with weights_only=True
    for p in checkpointed_trainer.ckpt_dir.glob("*.pt"):
        torch.load(p, weights_only=True)


# ------------------------------------------------------------------------------------------------
# Untrusted configs
# ------------------------------------------------------------------------------------------------

PY_TAGS = [
    '!!python/object/apply:os.system ["touch {m}"]',
    "!!python/object/apply:subprocess.call [[touch, {m}]]",
    '!!python/object/new:os.system ["touch {m}"]',
    "!!python/name:os.system",
    "!!python/module:os",
]


@pytest.mark.parametrize("tag", PY_TAGS)
def test_config_file_with_python_tags_is_refused(tmp_path, tag):
    from asft.config import ConfigError, load_config

    marker = tmp_path / "pwned"
    payload = tag.format(m=marker)
    for doc in (f"seed: {payload}\n", f"data:\n  source: {payload}\n", f"{payload}\n",
                f"model: &a\n  n_layer: {payload}\n"):
        p = tmp_path / "params.yaml"
        p.write_text(doc)
        with pytest.raises(ConfigError):
            load_config(p)
    assert not marker.exists()


@pytest.mark.parametrize("tag", PY_TAGS)
def test_override_with_python_tags_is_refused(tmp_path, tag):
    from asft.config import ConfigError, load_config

    marker = tmp_path / "pwned"
    with pytest.raises(ConfigError):
        load_config(None, [f"data.source={tag.format(m=marker)}"])
    assert not marker.exists()


def test_code_looking_values_stay_plain_strings(tmp_path):
    from asft.config import ConfigError, load_config

    marker = tmp_path / "pwned"
    code = f"__import__('os').system('touch {marker}')"
    try:
        cfg = load_config(None, [f"data.source={code}", f"tracking.experiment=$(touch {marker})"])
    except ConfigError:
        pass  # refusing the value is fine too
    else:
        assert cfg.data.source == code and cfg.tracking.experiment == f"$(touch {marker})"
    assert not marker.exists()


def test_unknown_config_keys_are_refused(tmp_path):
    from asft.config import ConfigError, load_config

    for doc in ("sede: 1\n", "data:\n  sorce: simulator\n", "train:\n  lr: 0.1\n  callback: os.system\n",
                "__class__: x\n"):
        p = tmp_path / "params.yaml"
        p.write_text(doc)
        with pytest.raises(ConfigError):
            load_config(p)
    for ov in ("train.evil=1", "model.__init__=x", "evil.section.key=1"):
        with pytest.raises(ConfigError):
            load_config(None, [ov])


def test_reward_ensemble_refuses_member_dirs_outside_itself(tmp_path):
    from asft.models.reward import ENSEMBLE_FILE, RewardEnsemble

    ens = tmp_path / "ensemble"
    ens.mkdir()
    for bad in (["../elsewhere/best"], ["/etc"], []):
        (ens / ENSEMBLE_FILE).write_text(json.dumps({"member_dirs": bad}))
        with pytest.raises(ValueError, match="member_dirs"):
            RewardEnsemble.load(ens)
