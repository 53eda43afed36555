"""Lineage and caching for the orchestration layer.

- :func:`code_version`: content hash of the pipeline's code (``asft/``, ``tasks/`` and ``flows/``
  sources, byte-compiled caches left out): what "the code" is for caching and audits (a git commit
  misses uncommitted edits; this does not).
- :func:`task_key`: a stage instance's key, over the config keys its declaration lists
  (:attr:`asft.pipeline.StageSpec.params`, the same list ``dvc.yaml``'s ``params:`` is generated from).
- :class:`StageCache`: the Prefect cache policy of every stage task. The key is the stage name, the
  DVC hashes of the task's input paths (datasets and models), the stage's params and the code
  version; never tensors or frames. A cached result is the earlier run's summary (paths into that
  run's output directory), and the flow verifies those outputs before trusting it.
- :func:`environment` (package versions), :func:`seeds`, :func:`file_hashes` (model files): what a
  reproducibility audit needs, recorded on every run.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import platform
import sys
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy

from asft import datastore
from asft.config import Config
from asft.pipeline import StageSpec, stage_params
from asft.utils import dvc_md5, file_sha256

REPO = Path(__file__).resolve().parents[1]
# What a stage's result depends on besides its inputs and params: the core library, the task
# bodies and the flows that call them (ops/, benchmarks/ and tests/ never change a result).
CODE_DIRS = ("asft", "tasks", "flows")
PACKAGES = ("torch", "transformers", "accelerate", "numpy", "pandas", "pyarrow", "prefect", "mlflow", "dvc",
            "great-expectations", "pydantic", "safetensors")

# Flow stage -> DVC stage whose ``params:`` list it shares.

def code_files(root: Path, dirs: tuple[str, ...] = CODE_DIRS) -> list[Path]:
    """The source files under ``root/<dir>`` for each of ``dirs``, sorted (``__pycache__`` left out)."""
    return sorted(p for d in dirs for p in (root / d).rglob("*.py")
                  if p.is_file() and "__pycache__" not in p.relative_to(root).parts)


def code_hash(root: Path, dirs: tuple[str, ...] = CODE_DIRS) -> str:
    """sha256 (16 hex digits) of the relative paths and bytes of :func:`code_files`."""
    h = hashlib.sha256()
    for p in code_files(root, dirs):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The code every stage task runs (the core library, the tasks and the flows), in this process."""
    return code_hash(REPO)


def input_hashes(paths: dict[str, Any]) -> dict[str, Any]:
    """DVC hash of every input path (a dict of paths is hashed entry by entry)."""
    out: dict[str, Any] = {}
    for name, p in paths.items():
        if isinstance(p, dict):
            out[name] = input_hashes(p)
        elif p is not None and Path(p).exists():
            out[name] = dvc_md5(p)
        else:
            out[name] = None
    return out


def source_hash(cfg: Config) -> str | None:
    """The DVC hash of the raw source when it is a path (new files -> new key); None for the simulator."""
    if cfg.data.source == "simulator":
        return None
    return dvc_md5(cfg.data.source)


def task_key(spec: StageSpec, cfg: Config, paths: dict[str, Any], options: dict[str, Any] | None = None) -> str:
    """The cache key of a stage instance (also matches the champion's base model): its inputs' DVC hashes,
    the config keys its declaration lists (:attr:`StageSpec.params`), its options and the code version."""
    doc = {"stage": spec.name, "inputs": input_hashes(paths), "code": code_version(),
           "params": stage_params(spec, cfg.to_dict()), "values": options or {}}
    if spec.name == "ingest":
        doc["source"] = source_hash(cfg)
    return f"{spec.name}-" + hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def digest(hashes: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()


def dvc_cache_dir() -> Path:
    """The project's DVC cache (``cache.dir``, default ``.dvc/cache``), as DVC resolves its config;
    ``$ASFT_DVC_CACHE_DIR`` overrides it (tests, and workers that keep a cache on a volume)."""
    return datastore.cache_dir(REPO)


class StageCache(CachePolicy):
    """The Prefect cache policy of a stage task: :func:`task_key` over the task's ``cfg``, ``paths`` and
    ``options`` arguments (output dirs, tracking ids and run options are deliberately not part of it)."""

    def __init__(self, spec: StageSpec):
        super().__init__()
        self.spec = spec

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str | None:
        return task_key(self.spec, inputs["cfg"], inputs["paths"], inputs.get("options"))


def environment() -> dict[str, str]:
    env = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            env[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env[name] = "absent"
    try:
        import torch

        env["torch.cuda"] = str(torch.version.cuda)
    except ImportError:  # pragma: no cover
        pass
    return env


def seeds(cfg: Config) -> dict[str, int]:
    """Every seed the pipeline derives from the config (one ``seed`` drives them all)."""
    out = {"seed": cfg.seed}
    out.update({f"reward.member_{k}": cfg.seed + 1009 * (k + 1) for k in range(cfg.reward.members)})
    judge = cfg.seed + cfg.judge.seed_offset
    out.update({f"judge.member_{k}": judge + 1009 * (k + 1) for k in range(cfg.judge.members)})
    return out


MODEL_FILES = ("*.safetensors", "item_vocab.json", "config.json", "ensemble.json")


def file_hashes(root: str | Path) -> dict[str, str]:
    """sha256 of the model files under ``root`` (weights, vocabularies, configs; resumable training
    checkpoints and summaries with timings are left out), keyed by relative POSIX path."""
    root = Path(root)
    files = {p for pat in MODEL_FILES for p in root.rglob(pat) if p.is_file() and "checkpoint" not in
             p.relative_to(root).parts}
    return {p.relative_to(root).as_posix(): file_sha256(p) for p in sorted(files)}
