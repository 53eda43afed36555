"""MLflow Model Registry: serving models, champion/challenger aliases, champion base reuse.

Two registered models (names in ``registry.*``): the generative recommender (the post-trained
``posttrain.champion_method`` policy) and the reward ensemble that trained it. Both are MLflow pyfunc
models built from code (``tasks/pyfunc_model.py``; no pickle), carrying the ``save_pretrained``
weights and item vocabulary as artifacts, so ``mlflow models serve -m models:/NAME@champion`` serves
them. Every retrain registers one version of each; the gate (:mod:`asft.promotion`) decides whether
the pair gets alias ``champion`` or ``challenger``, and the reason is stored on the versions and on
the retrain's MLflow run.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from asft.data.preprocess import ItemVocab
from asft.models.recommender import VOCAB_FILE

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
CORE = Path(__file__).resolve().parents[1] / "asft"
CHAMPION, CHALLENGER = "champion", "challenger"


def _requirements() -> list[str]:
    from tasks.lineage import environment

    env = environment()
    return [f"{p}=={env[p]}" for p in ("mlflow", "transformers", "pandas", "numpy", "pyarrow", "safetensors")
            if env.get(p, "absent") != "absent"] + [f"torch=={env['torch'].split('+')[0]}"]


def save_serving_model(kind: str, model_dir: str | Path, dst: str | Path, k: int = 10) -> Path:
    """A pyfunc model directory for ``kind`` ('recommender' or 'reward') around a saved model."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema

    dst = Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    if kind == "recommender":
        inputs = Schema([ColSpec(Array("string"), "history"), ColSpec("long", "k", required=False)])
        outputs = Schema([ColSpec(Array("string"), "items"), ColSpec(Array("double"), "scores"),
                          ColSpec(Array("string"), "unknown_items")])
    else:
        inputs = Schema([ColSpec(Array("string"), "history"), ColSpec(Array("string"), "items")])
        outputs = Schema([ColSpec(Array("double"), c) for c in ("mean", "std", "pessimistic")])
    mlflow.pyfunc.save_model(
        path=str(dst), python_model=str(PYFUNC_CODE), artifacts={"model": str(model_dir)},
        model_config={"kind": kind, "k": k}, code_paths=[str(CORE)], signature=ModelSignature(inputs, outputs),
        pip_requirements=_requirements())
    return dst


def alias_version(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _ensure_registered(client: MlflowClient, name: str, description: str) -> None:
    try:
        client.create_registered_model(name, description=description)
    except MlflowException as e:
        if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
            raise


def register_version(client: MlflowClient, name: str, run_id: str, local_model: Path, artifact_path: str,
                     tags: dict, description: str):
    """Log a pyfunc model directory to ``run_id`` and register it as a new version of ``name``."""
    client.log_artifacts(run_id, str(local_model), artifact_path)
    _ensure_registered(client, name, description)
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    return client.create_model_version(name, source, run_id=run_id, tags={k: str(v) for k, v in tags.items()})


def download_model_dir(client: MlflowClient, version, dst: str | Path) -> Path:
    """Download a registered version and return the saved (``save_pretrained``) model inside it."""
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(dst),
                                                     tracking_uri=client.tracking_uri))
    hits = [p.parent for p in local.rglob(VOCAB_FILE) if (p.parent / "model.safetensors").is_file()]
    if not hits:
        hits = [p.parent for p in local.rglob("ensemble.json")]
    if not hits:
        raise FileNotFoundError(f"{version.name} v{version.version}: no model inside {version.source}")
    return hits[0]


def same_catalog(model_dir: str | Path, processed_dir: str | Path) -> bool:
    return ItemVocab.load(Path(model_dir) / VOCAB_FILE).items == ItemVocab.load(processed_dir).items


def champion_base(client: MlflowClient, name: str, base_key: str, dst: str | Path) -> dict | None:
    """If the champion recommender was post-trained from a base with key ``base_key`` (same processed
    data hash, base params and code version), download that base into ``dst`` and describe it."""
    champ = alias_version(client, name, CHAMPION)
    if champ is None or champ.tags.get("base_key") != base_key or not champ.tags.get("base_run_id"):
        return None
    run_id = champ.tags["base_run_id"]
    with tempfile.TemporaryDirectory() as tmp:
        got = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model", dst_path=tmp,
                                                       tracking_uri=client.tracking_uri))
        dst = Path(dst)
        if dst.exists():
            shutil.rmtree(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(got, dst)
    metrics = client.get_run(run_id).data.metrics
    return {"model_dir": str(dst), "base_run_id": run_id, "champion_version": champ.version,
            **{k: metrics.get(k) for k in ("best_metric", "best_epoch", "epochs_run", "tokens_per_s",
                                           "train_seconds")}}


def write_decision(path: str | Path, decision: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(decision, indent=2))
    return path
