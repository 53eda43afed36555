"""MLflow Model Registry: serving models, champion/challenger aliases, champion base reuse.

Two registered models (names in ``registry.*``): the generative recommender (the post-trained
``posttrain.champion_method`` policy) and the reward ensemble that trained it. Both are MLflow pyfunc
models built from code (``tasks/pyfunc_model.py``; no pickle), carrying the ``save_pretrained``
weights and item vocabulary as artifacts, a signature and an input example, so ``mlflow models serve
-m models:/NAME@champion`` serves them.

Each is an MLflow 3 *LoggedModel* first: logged with a name from the retrain run (which lists it
under its outputs), carrying the run's params, linked to the metrics that justify it (``model_id``
on the metrics, and the dataset they were measured on), then registered from it (version source
``models:/<model_id>``; the LoggedModel's tag ``mlflow.modelVersions`` points back). Every retrain
registers one version of each; the gate (:mod:`asft.promotion`) decides whether the pair gets alias
``champion`` or ``challenger``, and the reason is stored on the versions and on the retrain's run.

Products: the registered names are scoped to the run's product (:func:`model_names`:
``asft-recommender-<product>``, ``asft-reward-<product>``): one registered model, one version history
and one ``champion`` alias per product, tagged with the product and its catalog fingerprint. A separate
registered model per product rather than one model with per-product aliases or tags: a registered
model is MLflow's unit of lineage (versions, aliases, ``models:/NAME@champion`` URIs, permissions), so
each product is served, listed and secured on its own and no alias lookup can cross products.

The gate (:func:`promotion_gate`) is one critical section per product: read the champion, evaluate,
register, move the alias. Against a Prefect server it is a Prefect global concurrency limit of one slot
(``asft-promotion-gate-<registered name>``), held under a lease that the holder renews and that the
server's repossessor revokes when the holder dies, so it holds across machines sharing the Prefect and
MLflow servers and never leaks; with a local SQLite store (each ``retrain`` on its own ephemeral Prefect
server) it is a file lock next to the store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities import LoggedModel, LoggedModelOutput, LoggedModelStatus, Metric
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import AnyType, Array, ColSpec, Schema
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from asft.data.preprocess import ItemVocab
from asft.models.recommender import VOCAB_FILE
from asft.promotion import catalog_fingerprint, product_name, registered_name

SOURCE_TAGS = ("mlflow.user", "mlflow.source.name", "mlflow.source.type", "mlflow.source.git.commit",
               "mlflow.source.git.branch", "mlflow.source.git.repoURL")
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
CORE = Path(__file__).resolve().parents[1] / "asft"
CHAMPION, CHALLENGER = "champion", "challenger"
KINDS = ("recommender", "reward")


def _requirements() -> list[str]:
    from tasks.lineage import environment

    env = environment()
    return [f"{p}=={env[p]}" for p in ("mlflow", "transformers", "pandas", "numpy", "pyarrow", "safetensors")
            if env.get(p, "absent") != "absent"] + [f"torch=={env['torch'].split('+')[0]}"]


def _conda_env() -> dict:
    """The model's environment, given whole: MLflow would otherwise look up the installed ``pip``
    version for conda.yaml (and warn in environments managed without pip, such as uv's)."""
    return {"name": "mlflow-env", "channels": ["conda-forge"],
            "dependencies": [f"python={platform.python_version()}", "pip", {"pip": _requirements()}]}


def serving_signature(kind: str) -> ModelSignature:
    """recommender: (history, k? a whole number) -> (items, scores, unknown_items, fallback?); reward: (history, items)
    -> (mean, std, pessimistic); every id list an array of strings. ``fallback`` is ``"popular"`` on a
    cold-start answer (no history item in the catalog: the most popular training items), else null."""
    if kind == "recommender":
        # k is declared Any and checked by the model (a whole number >= 1, else HTTP 400): as "long"
        # MLflow would truncate 2.5 to 2 and refuse a batch where only some rows give k; as "double"
        # it would refuse Python ints
        inputs = Schema([ColSpec(Array("string"), "history"), ColSpec(AnyType(), "k", required=False)])
        outputs = Schema([ColSpec(Array("string"), "items"), ColSpec(Array("double"), "scores"),
                          ColSpec(Array("string"), "unknown_items"), ColSpec("string", "fallback", required=False)])
    elif kind == "reward":
        inputs = Schema([ColSpec(Array("string"), "history"), ColSpec(Array("string"), "items")])
        outputs = Schema([ColSpec(Array("double"), c) for c in ("mean", "std", "pessimistic")])
    else:
        raise ValueError(f"serving model kind must be one of {KINDS}, got {kind!r}")
    return ModelSignature(inputs, outputs)


def catalog(model_dir: str | Path) -> list[str]:
    """The item ids a saved recommender or reward ensemble knows (its first ``item_vocab.json``)."""
    hits = sorted(Path(model_dir).rglob(VOCAB_FILE))
    if not hits:
        raise FileNotFoundError(f"{model_dir}: no {VOCAB_FILE} (not a saved recommender or reward ensemble)")
    return ItemVocab.load(hits[0]).items


def input_example(kind: str, model_dir: str | Path, k: int = 10) -> pd.DataFrame:
    """One request built from the model's own catalog: the first items as the history (and, for the
    reward model, the next ones as candidates)."""
    items = catalog(model_dir)
    if len(items) < 2:
        raise ValueError(f"{model_dir}: catalog of {len(items)} item(s); a serving example needs two")
    n_hist = min(5, len(items) - 1)
    if kind == "recommender":
        row = {"history": [items[:n_hist]], "k": [min(k, len(items) - n_hist)]}
    elif kind == "reward":
        row = {"history": [items[:n_hist]], "items": [items[n_hist : n_hist + 3]]}
    else:
        raise ValueError(f"serving model kind must be one of {KINDS}, got {kind!r}")
    # Column labels as plain objects: MLflow compares them with a range, which pandas 3 deprecates
    # for its (default) Arrow string labels.
    return pd.DataFrame(row).set_axis(pd.Index(list(row), dtype=object), axis=1)


SERVING_MAX_ROWS, SERVING_MAX_HISTORY = 1024, 10_000  # defaults of registry.serve_max_rows / serve_max_history


def serving_description(kind: str, k: int = 10, max_rows: int | None = SERVING_MAX_ROWS,
                        max_history: int | None = SERVING_MAX_HISTORY) -> str:
    """What the served model answers, its cold-start fallback and its bounds (saved in the MLmodel's
    metadata and used as the registered version's description)."""
    bounds = (f" At most {max_rows} rows per request and {max_history} ids per list; client errors"
              " (k < 1 or not an integer, malformed or missing columns, over the bounds"
              + (", unknown candidate items" if kind == "reward" else "") + ") are HTTP 400 with the reason.")
    if kind == "recommender":
        return (f"Generative recommender post-trained with A-SFT; pyfunc: rows {{history: [item ids], k?}} -> "
                f"{{items, scores (log-probabilities), unknown_items, fallback}} (default k={k}; history items"
                " never recommended; unknown ids ignored and listed). Cold start: a history with no catalog item"
                " gets the most popular training items (not in the history), scored by smoothed log-popularity,"
                " with fallback='popular' (null otherwise)." + bounds)
    if kind == "reward":
        return ("Bradley-Terry reward ensemble; pyfunc: rows {history, items} -> {mean, std, pessimistic}"
                " reward of each candidate item." + bounds)
    raise ValueError(f"serving model kind must be one of {KINDS}, got {kind!r}")


def write_popularity(model_dir: str | Path, processed_dir: str | Path, dst: str | Path) -> Path:
    """The cold-start fallback: training-event count per catalog item from the processed data the
    model was trained on (``ProcessedData.item_popularity``), as ``popularity.json``."""
    from asft.data.preprocess import ProcessedData
    from asft.serving import Popularity

    data = ProcessedData.open(processed_dir)
    if data.vocab.items != catalog(model_dir):
        raise ValueError(f"{model_dir}: its catalog is not the one of {processed_dir}; the popularity fallback"
                         " must come from the data the model was trained on")
    return Popularity.from_counts(data.vocab, data.item_popularity()).save(dst)


def save_serving_model(kind: str, model_dir: str | Path, dst: str | Path, k: int = 10,
                       processed_dir: str | Path | None = None, max_rows: int | None = SERVING_MAX_ROWS,
                       max_history: int | None = SERVING_MAX_HISTORY) -> Path:
    """A pyfunc model directory for ``kind`` ('recommender' or 'reward') around a saved model, with
    its signature, an input example (validated by MLflow against the model when saved), its request
    bounds and a description in the MLmodel metadata. A recommender needs ``processed_dir``, the
    processed data it was trained on: its item popularity is packaged as the cold-start fallback."""
    signature = serving_signature(kind)
    example = input_example(kind, model_dir, k)
    if kind == "recommender" and processed_dir is None:
        raise ValueError("a served recommender needs processed_dir (its cold-start popularity fallback)")
    dst = Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = {"model": str(model_dir)}
        if kind == "recommender":
            from asft.serving import POPULARITY_FILE

            artifacts["popularity"] = str(write_popularity(model_dir, processed_dir, Path(tmp) / POPULARITY_FILE))
        mlflow.pyfunc.save_model(
            path=str(dst), python_model=str(PYFUNC_CODE), artifacts=artifacts,
            model_config={"kind": kind, "k": k, "max_rows": max_rows, "max_history": max_history},
            code_paths=[str(CORE)], signature=signature, input_example=example, conda_env=_conda_env(),
            metadata={"description": serving_description(kind, k, max_rows, max_history)})
    return dst


def alias_version(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _ensure_registered(client: MlflowClient, name: str, description: str, tags: dict | None = None) -> None:
    """Create registered model ``name`` (with ``tags``, e.g. its product and catalog) unless it exists."""
    try:
        client.create_registered_model(name, tags={k: str(v) for k, v in (tags or {}).items()},
                                       description=description)
    except MlflowException as e:
        if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
            raise


def _model_kind(local_model: Path) -> str | None:
    flavor = Model.load(str(local_model)).flavors.get("python_function", {})
    return (flavor.get("config") or {}).get("kind")  # the saved model_config


def log_saved_model(client: MlflowClient, run_id: str, local_model: str | Path, name: str, *,
                    tags: dict | None = None, metrics: dict[str, float] | None = None,
                    dataset: tuple[str, str] | None = None, step: int = 0) -> LoggedModel:
    """A saved pyfunc directory as an MLflow 3 LoggedModel of run ``run_id``, as ``mlflow.pyfunc.log_model(
    name=...)`` does it, with explicit ids: created with the run's params and ``tags``, its MLmodel
    carrying the model id, listed among the run's outputs, ``metrics`` logged to the run linked to it
    (and to ``dataset`` = (name, digest) they were measured on), then READY (FAILED if any step fails)."""
    from tasks.tracking import TrackedRun

    local_model = Path(local_model)
    if not (local_model / "MLmodel").is_file():
        raise FileNotFoundError(f"{local_model}: not an MLflow model directory (no MLmodel)")
    run = client.get_run(run_id)
    values = {m.key: m.value for m in TrackedRun._metrics(metrics or {}, step)}  # numeric and finite, as logged
    model = client.create_logged_model(
        experiment_id=run.info.experiment_id, name=name, source_run_id=run_id, model_type=_model_kind(local_model),
        params={k: str(v) for k, v in run.data.params.items()},
        tags={**{k: v for k, v in run.data.tags.items() if k in SOURCE_TAGS},  # the UI's "Created by", "Logged from"
              **{k: str(v) for k, v in (tags or {}).items()}})
    try:
        with tempfile.TemporaryDirectory() as tmp:
            staged = Path(tmp) / "model"
            shutil.copytree(local_model, staged)
            mlmodel = Model.load(str(staged))
            mlmodel.model_id = mlmodel.model_uuid = model.model_id
            mlmodel.run_id, mlmodel.artifact_path = run_id, model.artifact_location
            mlmodel.save(str(staged / "MLmodel"))
            client.log_model_artifacts(model.model_id, str(staged))
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
        ts, (ds_name, ds_digest) = int(time.time() * 1000), dataset or (None, None)
        linked = [Metric(k, v, ts, step, model_id=model.model_id, dataset_name=ds_name, dataset_digest=ds_digest,
                         run_id=run_id) for k, v in values.items()]
        if linked:
            client.log_batch(run_id, metrics=linked)
        client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    except BaseException:
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    return client.get_logged_model(model.model_id)


_DEFAULT_URI_LOCK = threading.Lock()


@contextlib.contextmanager
def _default_tracking_uri(uri: str):
    """Make ``uri`` the process's default tracking URI for the duration of a registration.

    An in-process registry store (SQLite, a database) resolves a ``models:/<model_id>`` source with
    ``MlflowClient()``, i.e. the *default* URI, not the client's; a tracking server resolves it
    against its own store, so nothing is needed there. Both the module default and the environment
    variable are restored exactly afterwards."""
    if uri.startswith(("http://", "https://", "databricks")):
        yield
        return
    from mlflow.tracking._tracking_service import utils as tracking_utils

    with _DEFAULT_URI_LOCK:
        saved_default, saved_env = tracking_utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(uri)
        try:
            yield
        finally:
            tracking_utils._tracking_uri = saved_default
            if saved_env is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = saved_env


def register_logged_model(client: MlflowClient, name: str, model: LoggedModel, tags: dict, description: str,
                          model_tags: dict | None = None):
    """Register ``model`` as a new version of ``name`` (created if needed, tagged ``model_tags``): source
    ``models:/<model_id>``, the run that logged it, and the version listed on the LoggedModel (tag
    ``mlflow.modelVersions``)."""
    _ensure_registered(client, name, description, model_tags)
    with _default_tracking_uri(client.tracking_uri):
        version = client.create_model_version(name, f"models:/{model.model_id}", run_id=model.source_run_id,
                                              tags={k: str(v) for k, v in tags.items()}, model_id=model.model_id)
    entry = {"name": version.name, "version": int(version.version)}  # as a tracking server records it
    listed = json.loads(client.get_logged_model(model.model_id).tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
    if not any(e.get("name") == entry["name"] and str(e.get("version")) == str(entry["version"]) for e in listed):
        client.set_logged_model_tags(model.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*listed, entry])})
    return version


def register_version(client: MlflowClient, name: str, run_id: str, local_model: Path, artifact_path: str,
                     tags: dict, description: str, *, metrics: dict[str, float] | None = None,
                     dataset: tuple[str, str] | None = None, model_tags: dict | None = None):
    """Log a saved pyfunc directory to ``run_id`` as LoggedModel ``artifact_path`` (tagged ``tags``,
    linked to ``metrics`` measured on ``dataset``) and register it as a new version of ``name`` (a new
    registered model is tagged ``model_tags``)."""
    model = log_saved_model(client, run_id, local_model, artifact_path, tags=tags, metrics=metrics, dataset=dataset)
    return register_logged_model(client, name, model, tags, description, model_tags)


def download_model_dir(client: MlflowClient, version, dst: str | Path) -> Path:
    """Download a registered version and return the saved (``save_pretrained``) model inside it."""
    uri = client.get_model_version_download_uri(version.name, version.version)  # the artifacts, not models:/
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst),
                                                     tracking_uri=client.tracking_uri))
    hits = [p.parent for p in local.rglob(VOCAB_FILE) if (p.parent / "model.safetensors").is_file()]
    if not hits:
        hits = [p.parent for p in local.rglob("ensemble.json")]
    if not hits:
        raise FileNotFoundError(f"{version.name} v{version.version}: no model inside {uri}")
    return hits[0]


def same_catalog(model_dir: str | Path, processed_dir: str | Path) -> bool:
    return ItemVocab.load(Path(model_dir) / VOCAB_FILE).items == ItemVocab.load(processed_dir).items


def catalog_of(path: str | Path) -> tuple[str, int]:
    """(fingerprint, number of items) of a processed dataset's or a saved model's catalog."""
    path = Path(path)
    vocab = ItemVocab.load(path / VOCAB_FILE if (path / VOCAB_FILE).is_file() else path)
    return catalog_fingerprint(vocab.items), len(vocab.items)


def model_names(cfg, processed_dir: str | Path) -> dict[str, str]:
    """The run's product and its registered names: ``product``, ``recommender``, ``reward``,
    ``catalog`` (fingerprint) and ``items``."""
    fp, n = catalog_of(processed_dir)
    rc = cfg.registry
    product = product_name(rc.product, cfg.data.source, fp)
    return {"product": product, "recommender": registered_name(rc.recommender_model, product),
            "reward": registered_name(rc.reward_model, product), "catalog": fp, "items": str(n)}


GATE_PREFIX = "asft-promotion-gate-"


def prefect_server_url() -> str | None:
    """The Prefect API this process talks to when it is a server (``PREFECT_API_URL``); None when each
    process runs its own ephemeral server."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url or None


def ensure_gate_limit(name: str) -> None:
    """Create the global concurrency limit ``name`` with one slot, active (a limit someone changed is set
    back: the gate is only a gate with exactly one slot). Creation races are harmless: names are unique."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:
                pass
            return
        if limit.limit != 1 or not limit.active:
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=1, active=True))


class GateTimeout(RuntimeError):
    """The promotion gate stayed held past its time limit (not retried: another promotion holds it)."""


@contextlib.contextmanager
def _acquired(what: str, cm, timeout_s: float | None):
    """Enter ``cm`` (a lock); a time-out while *acquiring* it becomes :class:`GateTimeout` (errors inside the
    critical section pass through unchanged)."""
    held = contextlib.ExitStack()
    try:
        held.enter_context(cm)
    except TimeoutError as e:  # Prefect's AcquireConcurrencySlotTimeoutError, filelock.Timeout
        raise GateTimeout(f"the promotion gate ({what}) stayed held by another promotion for more than "
                          f"{timeout_s:g} s (registry.gate_timeout_s)") from e
    with held:
        yield


@contextlib.contextmanager
def promotion_gate(tracking_uri: str, lineage: str, timeout_s: float | None = None, lease_s: float = 120):
    """One promotion at a time for registered model ``lineage``; yields how it is held.

    - Prefect server (``PREFECT_API_URL``): the global concurrency limit ``asft-promotion-gate-<lineage>``
      (one slot, created if missing), acquired within ``timeout_s`` under a ``lease_s`` lease renewed in
      the background; a failed renewal cancels the holder (``raise_on_lease_renewal_failure``) rather
      than let two gates run. Holds across machines.
    - A local SQLite MLflow store: a file lock next to it (all writers are on this machine); also taken
      under a Prefect server, so runs that use an ephemeral server on the same store are serialised too.
    - An MLflow server without a Prefect server: a file lock in ``PREFECT_HOME`` (this machine's flows only;
      across machines, point them at one Prefect server).
    """
    from tasks.tracking import store_lock

    held = []
    with contextlib.ExitStack() as stack:
        if prefect_server_url():
            from prefect.concurrency.sync import concurrency

            name = GATE_PREFIX + lineage
            ensure_gate_limit(name)
            stack.enter_context(_acquired(name, concurrency(name, timeout_seconds=timeout_s, lease_duration=lease_s,
                                                            strict=True, raise_on_lease_renewal_failure=True),
                                          timeout_s))
            held.append(f"prefect global concurrency limit {name}")
        if tracking_uri.startswith("sqlite:///"):
            stack.enter_context(_acquired("file lock", store_lock(tracking_uri, f"registry.{lineage}", timeout_s), timeout_s))
            held.append("file lock next to the store")
        elif not held:
            from filelock import FileLock
            from prefect.settings import get_current_settings

            home = Path(os.environ.get("PREFECT_HOME") or get_current_settings().home) / "locks"
            home.mkdir(parents=True, exist_ok=True)
            key = hashlib.sha256(f"{tracking_uri}|{lineage}".encode()).hexdigest()[:16]
            stack.enter_context(_acquired("file lock", FileLock(str(home / f"promotion-gate-{key}.lock"),
                                                                timeout=-1 if timeout_s is None else timeout_s),
                                          timeout_s))
            held.append("file lock in PREFECT_HOME (this machine only)")
        yield " + ".join(held)


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
